"""The cost of D2L on CPU: each rehearsal host with and without D2L, timed in one process.

Each host (ER ``replay``, ``er_ace``, ``der``) and its D2L variant at default arguments
(``d2l``, ``er_ace_d2l``, ``der_d2l``) run one after the other in this process through the
package's experiment runner on the shipped ``split_digits`` experiment (small CNN, Adam 1e-3,
10 epochs, buffer 100), into a fresh temporary folder (nothing is reused: this is a timing).
The wall time of a run is the runner's (training and evaluation of every experience, dreaming
included). The machine's load average before and after is recorded: a ratio measured while other
processes shared the cores is noisier, not comparable to an idle machine.

Writes ``benchmarks/results/bench_d2l.json`` and ``bench_d2l.md``::

    python benchmarks/bench_d2l.py [--seed 0] [--hosts replay er_ace der] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

from avalanche_d2l import __version__
from avalanche_d2l.experiments import default_experiment, run_experiment
from avalanche_d2l.experiments.report import atomic_write

ROOT = Path(__file__).resolve().parents[1]
HOSTS = {"replay": "d2l", "er_ace": "er_ace_d2l", "der": "der_d2l"}
KEEP = ("strategy", "seed", "lab_final_accuracy", "lab_forward_transfer", "wall_s")


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def compare_hosts(
    hosts: list[str], *, seed: int, quick: bool, threads: int = 1
) -> tuple[list[dict], dict]:
    """Each host then its D2L variant in this process; (run records, D2L wall / host wall)."""
    exp = default_experiment("split_digits")
    names = [n for h in hosts for n in (h, HOSTS[h])]
    exp = type(exp).from_dict(
        {**exp.to_dict(), "strategies": {n: {} for n in names}, "seeds": [seed]}, name=exp.name
    )
    with tempfile.TemporaryDirectory(prefix="bench_d2l_") as out:
        res = run_experiment(
            exp, out=out, seeds=[seed], quick=quick, progress=False, jobs=1, threads=threads
        )
    by = {r["strategy"]: r for r in res["runs"]}
    ratios = {HOSTS[h]: by[HOSTS[h]]["wall_s"] / max(by[h]["wall_s"], 1e-9) for h in hosts}
    return [{k: by[n].get(k) for k in KEEP} for n in names], ratios


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hosts", nargs="+", default=list(HOSTS), choices=list(HOSTS))
    p.add_argument("--quick", action="store_true", help="tiny settings (smoke test)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--name", default="bench_d2l", help="output file stem")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per run")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    before = _load()
    runs, ratios = compare_hosts(args.hosts, seed=args.seed, quick=args.quick, threads=args.threads)
    after = _load()
    results = {
        "config": {
            "seed": args.seed,
            "benchmark": "split_digits (shipped experiment: 5 x 2 classes, 16 px, small CNN, "
            "Adam 1e-3, 10 epochs, buffer 100); every strategy at its default arguments",
            "quick": args.quick,
            "package_version": __version__,
            "command": "python benchmarks/bench_d2l.py "
            + " ".join(argv if argv is not None else sys.argv[1:]),
        },
        "device": f"cpu ({platform.processor() or platform.machine()}, {args.threads} torch "
        f"thread(s), {os.cpu_count()} cores on the machine)",
        "torch": torch.__version__,
        "load_before": before,
        "load_after": after,
        "load": f"1-min load average {before[0]:.1f} before, {after[0]:.1f} after",
        "runs": runs,
        "d2l_over_host_wall": ratios,
    }
    atomic_write(args.out / f"{args.name}.json", json.dumps(results, indent=2))
    atomic_write(args.out / f"{args.name}.md", to_markdown(results))
    print(to_markdown(results))
    return 0


def to_markdown(r: dict) -> str:
    lines = [
        "# The cost of D2L: hosts with and without D2L in one process (CPU)",
        "",
        f"Device: {r['device']}, torch {r['torch']}, package {r['config']['package_version']}. "
        f"Seed {r['config']['seed']}. Load average (1, 5, 15 min) before {r['load_before']}, "
        f"after {r['load_after']}. Command: `{r['config']['command']}`.",
        "",
        "| strategy | final accuracy (lab) | FWT (lab) | wall time (s) | x host |",
        "|---|---|---|---|---|",
    ]
    for run in r["runs"]:
        ratio = r["d2l_over_host_wall"].get(run["strategy"])
        lines.append(
            f"| {run['strategy']} | {run['lab_final_accuracy']:.3f} | "
            f"{run['lab_forward_transfer']:+.3f} | {run['wall_s']:.1f} | "
            f"{f'{ratio:.1f}' if ratio else '-'} |"
        )
    lines += ["", "Exact settings: the `config` entry of the JSON file next to this one.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
