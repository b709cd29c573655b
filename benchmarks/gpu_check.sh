#!/usr/bin/env bash
# One-call GPU check of avalanche-d2l (the figures the README's GPU section needs), from any folder:
#
#   bash benchmarks/gpu_check.sh               # on a GPU machine: bf16, full-size SD-1.5
#   bash benchmarks/gpu_check.sh --cpu-smoke   # the same steps on a CPU with tiny models (CI)
#
# 1. Installs, from the wheels in the git-ignored folder .whl/ (see the README's GPU section),
#    only the packages this Python lacks, into $SITE (default /tmp/site; nothing is downloaded);
#    avalanche's import of wandb is met by benchmarks/gpu_stubs/ when wandb is missing.
# 2. Runs benchmarks/gpu_check.py under the deadline DEADLINE_S (default 420 s, 150 s with
#    --cpu-smoke, counted from the start of this script): every step writes its figures to
#    $OUT/gpu_check.json as soon as they exist and is skipped when too little time is left.
# Output in $OUT (default /tmp/gpu_check/out): gpu_check.json, gpu_check.log (all of this
# script's output), dry_run.log, two_proc.log, one_proc.log, machine.txt.
# Environment: PY (default python3), OUT, WORK (scratch, default /tmp/gpu_check/work), SITE,
# DEADLINE_S, DEVICE (default cuda; cpu with --cpu-smoke).
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 1
SMOKE=0
[ "${1:-}" = --cpu-smoke ] && SMOKE=1
START=$(date +%s)
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu_check/out}
WORK=${WORK:-/tmp/gpu_check/work}
SITE=${SITE:-/tmp/site}
if [ "$SMOKE" = 1 ]; then
  DEADLINE_S=${DEADLINE_S:-150} DEVICE=${DEVICE:-cpu} THREADS=1
else
  DEADLINE_S=${DEADLINE_S:-420} DEVICE=${DEVICE:-cuda} THREADS=8
fi
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

export HF_HOME="$WORK/hf" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export AVALANCHE_D2L_CACHE="$WORK/cache" MPLBACKEND=Agg PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
export TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv; nproc; } \
  > "$OUT/machine.txt" 2>&1

# 1. the packages this Python lacks, from the carried wheels
NEEDED="avalanche-lib diffusers dill gdown beautifulsoup4 soupsieve pytorchcv gputil qpsolvers
  torchmetrics lightning-utilities tensorboard tensorboard-data-server absl-py protobuf setuptools
  requests urllib3 charset-normalizer idna certifi"
# shellcheck disable=SC2086
MISSING=$("$PY" - $NEEDED <<'EOF'
import importlib.metadata as md, sys
missing = []
for name in sys.argv[1:]:
    try:
        md.version(name)
    except md.PackageNotFoundError:
        missing.append(name)
print(" ".join(missing))
EOF
)
echo "python: $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])'); missing: ${MISSING:-none}"
if [ -n "$MISSING" ]; then
  if [ -d "$REPO/.whl" ]; then
    # shellcheck disable=SC2086
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
      --find-links "$REPO/.whl" $MISSING || echo "pip install from .whl failed (see above)"
    export PYTHONPATH="$PYTHONPATH:$SITE"
  else
    echo "missing packages and no .whl/ folder: the imports below will tell which step fails"
  fi
fi
"$PY" -c "import wandb" 2>/dev/null || export PYTHONPATH="$PYTHONPATH:$REPO/benchmarks/gpu_stubs"

# 2. the steps, under what is left of the deadline (a hung process is killed 20 s after it)
LEFT=$((DEADLINE_S - ($(date +%s) - START)))
SMOKE_FLAG=$([ "$SMOKE" = 1 ] && echo --cpu-smoke)
# shellcheck disable=SC2086
timeout -k 5 $((LEFT + 20)) "$PY" benchmarks/gpu_check.py --out "$OUT" --work "$WORK" \
  --deadline-s "$LEFT" --device "$DEVICE" $SMOKE_FLAG
RC=$?
echo "gpu_check.py exited $RC after $(($(date +%s) - START)) s in all; figures: $OUT/gpu_check.json"
exit $RC
