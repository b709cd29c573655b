"""The Python part of ``benchmarks/gpu_check.sh``: the GPU path of avalanche-d2l, step by step,
under one deadline, each figure written to ``OUT/gpu_check.json`` as soon as it is measured.

Steps, most important first (a step is skipped when less time is left than it needs; a step that
fails records its error text and the next one runs):

* ``sd15`` -- a random-weight, full-size Stable Diffusion 1.5 in the diffusers layout, built from
  its configs (``bench_sd15``'s) on the device and saved (seconds, bytes, parameters).
* ``dream`` -- D2L's own dreaming phase, through the experiment engine: the shipped
  ``d2l_mini_imagenet`` with that folder as dreamer (bf16 on CUDA), one tiny experience of an
  84 px image folder trained, the time from the end of its last epoch to the end of
  ``train()`` taken as the phase (synchronised), peak device memory over it; a warm-up phase
  first, then 4 and 20 dream classes at two step caps. Seconds per optimisation step come from
  the difference of the two caps, seconds per pass from the passes a step makes.
* ``dry_run`` -- the README's ``avalanche-d2l run d2l_mini_imagenet --dreamer <folder> --dry-run``.
* ``genifer`` -- Genifer's GAN steps/s at the CIFAR preset (``bench_genifer``'s ``cifar32``).
* ``two_proc`` -- the same tiny D2L run in 2 processes on the one device
  (``torch.distributed.run --nproc_per_node 2``): its exit status and log, then the 1-process run
  for comparison when it succeeded.

``--cpu-smoke`` runs the same steps on the CPU with a tiny model of the same layout.

    python benchmarks/gpu_check.py --out OUT --work WORK [--deadline-s 420] [--cpu-smoke]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # this checkout first (bench_genifer)

#: Stable Diffusion 1.5 in the diffusers layout: the public configs of its UNet and VAE, the
#: text part of CLIP ViT-L/14 and SD-1.4's PNDM scheduler config (written here, not imported from
#: bench_sd15, so that this check does not depend on that script's imports).
SD15 = {
    "unet": {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": (320, 640, 1280, 1280),
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    },
    "vae": {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": (128, 256, 512, 512),
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "sample_size": 512,
        "scaling_factor": 0.18215,
    },
    "clip": {
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "projection_dim": 768,
    },
    "scheduler": {
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
    },
}
#: The tiny stand-in of ``--cpu-smoke``: the same classes, layout and prompt length (77 tokens),
#: narrow layers.
TINY = {
    "unet": {
        "block_out_channels": (32, 64),
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "cross_attention_dim": 32,
    },
    "vae": {"block_out_channels": (8, 8, 8, 8), "layers_per_block": 1, "norm_num_groups": 4},
    "clip": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "projection_dim": 32,
    },
}

#: (max seconds, seconds that must be left to start) of each step, in the order they run.
BUDGETS = {
    "sd15": (180, 40),
    "dream": (200, 60),
    "dry_run": (150, 45),
    "genifer": (90, 25),
    "two_proc": (150, 60),
}
#: ``--cpu-smoke``: generous maxima (a loaded CI machine), the 2-process step capped.
SMOKE_BUDGETS = {"sd15": (120, 5), "dream": (120, 10), "dry_run": (120, 10), "genifer": (60, 5)}
SMOKE_BUDGETS["two_proc"] = (90, 20)  # 2 + 1 process runs of one experience


class StepTimeout(Exception):
    """A step ran past its share of the deadline."""


# ------------------------------------------------------------------------------------------------
# the record


class Record:
    """``gpu_check.json``: rewritten (atomically) after every change, so a run killed at its
    limit still leaves every figure measured so far."""

    def __init__(self, path: Path, start: float, deadline_s: float):
        self.path = path
        self.start = start
        self.deadline_s = deadline_s
        self.data: dict[str, Any] = {
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        }
        self.data["deadline_s"] = deadline_s
        self.data["steps"] = {}
        self.write()

    def left(self) -> float:
        return self.deadline_s - (time.monotonic() - self.start)

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.write()

    def step(self, name: str, **fields: Any) -> None:
        self.data["steps"].setdefault(name, {}).update(fields)
        self.write()

    def write(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.start, 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


@contextlib.contextmanager
def alarm(seconds: float):
    """Raise :class:`StepTimeout` in this (main) thread after ``seconds``."""

    def _raise(signum, frame):
        raise StepTimeout(f"step stopped after {seconds:.0f} s (its share of the deadline)")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_index(device: torch.device) -> torch.device:
    """``cuda`` as ``cuda:N`` (peak-memory calls need the device they count)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def tail(text: str, n: int = 3000) -> str:
    return text[-n:]


# ------------------------------------------------------------------------------------------------
# environment


def environment(device: torch.device) -> dict[str, Any]:
    import importlib.metadata as md

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device": str(device),
    }
    for name in ("diffusers", "transformers", "accelerate", "avalanche-lib", "huggingface-hub"):
        try:
            env[name] = md.version(name)
        except md.PackageNotFoundError:
            env[name] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device_name=props.name,
            total_memory_gib=round(props.total_memory / 2**30, 2),
            compute_capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            bf16_native=bool(torch.cuda.is_bf16_supported(including_emulation=False)),
            bf16_with_emulation=bool(torch.cuda.is_bf16_supported(including_emulation=True)),
            cudnn=torch.backends.cudnn.version(),
        )
    return env


# ------------------------------------------------------------------------------------------------
# (a) Stable Diffusion 1.5 with random weights


def _letters_tokenizer(folder: Path):
    """A CLIP tokenizer with a letters-only vocabulary (the BPE files cannot be fetched offline);
    it pads to 77 tokens as SD's does."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        vocab_file=str(folder / "vocab.json"),
        merges_file=str(folder / "merges.txt"),
        model_max_length=77,
    )


def build_sd(root: Path, *, tiny: bool, device: torch.device) -> dict[str, Any]:
    """Write SD-1.5 (:data:`SD15`; the narrow layers of :data:`TINY` when ``tiny``) to ``root``
    in the diffusers layout, the weights drawn on ``device`` (seconds on a GPU, a minute on a
    CPU)."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_cfg, vae_cfg, clip_cfg = (
        {**SD15[part], **(TINY[part] if tiny else {})} for part in ("unet", "vae", "clip")
    )
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    torch.manual_seed(0)
    params = {}
    t0 = time.perf_counter()
    with torch.device(device):
        for name, model in (
            ("unet", UNet2DConditionModel(**unet_cfg)),
            ("vae", AutoencoderKL(**vae_cfg)),
            ("text_encoder", CLIPTextModel(CLIPTextConfig(**clip_cfg))),
        ):
            params[name] = sum(p.numel() for p in model.parameters())
            model.to("cpu").save_pretrained(tmp / name)  # written from host memory
            del model
    _letters_tokenizer(tmp / "tokfiles").save_pretrained(tmp / "tokenizer")
    shutil.rmtree(tmp / "tokfiles")
    PNDMScheduler(**SD15["scheduler"]).save_pretrained(tmp / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "note": "random weights (benchmarks/gpu_check.py), for speed and memory only",
    }
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    os.replace(tmp, root)
    return {
        "path": str(root),
        "tiny": tiny,
        "build_s": round(time.perf_counter() - t0, 2),
        "params": params,
        "params_total": sum(params.values()),
        "bytes_on_disk": sum(p.stat().st_size for p in root.rglob("*") if p.is_file()),
    }


# ------------------------------------------------------------------------------------------------
# data and experiment files


def image_folder(root: Path, n_classes: int = 100, size: int = 84) -> Path:
    """Mini-ImageNet layout (``train/<wnid>/*.jpg``, ``test/...``): 2 train and 1 test image
    per class, each a noisy colour of its class."""
    from PIL import Image

    if (root / "test").is_dir():
        return root
    rng = np.random.default_rng(0)
    for c in range(n_classes):
        colour = rng.integers(0, 256, 3)
        for split, n in (("train", 2), ("test", 1)):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.clip(colour + rng.integers(-40, 40, (size, size, 3)), 0, 255)
                Image.fromarray(img.astype(np.uint8)).save(folder / f"{i}.jpg")
    return root


def dream_settings(n_classes: int, steps: int, *, smoke: bool) -> dict[str, Any]:
    """DreamConfig changes of one measured phase: ``n_classes`` dream classes, ``steps`` prompt
    steps run to the cap, a token dream set (1 image per class, 2 DDIM steps), no sleep."""
    return {
        "max_dream_classes": n_classes,
        # enough dream classes per learned class (at least 5 learned after experience 0)
        "dreams_per_class": math.ceil(n_classes / 5),
        "steps": steps,
        "stop": "fixed",
        "min_steps": 0,
        "oracle_threshold": None,
        "oracle_min_steps": 0,
        "invert_steps": 0,
        "samples_per_class": 1,
        "generate_inference_steps": 2,
        "generate_batch_size": 32,
        "sleep_epochs": 0,
        "progress": False,
        **({"batch_per_class": 1, "micro_batch": 4} if smoke else {}),
    }


def d2l_experiment(sd_path: Path, dream: dict[str, Any], *, device: str, smoke: bool) -> dict:
    """The shipped ``d2l_mini_imagenet`` (its D2L section only) with the local dreamer, one
    epoch, a buffer of 20, and the DreamConfig fields of ``dream`` that the current D2L has."""
    from avalanche_d2l import DreamConfig
    from avalanche_d2l.experiments import experiment_files

    data = json.loads(experiment_files()["d2l_mini_imagenet"].read_text())
    section = copy.deepcopy(data["strategies"]["d2l"])
    section["dreamer"] = str(sd_path)
    known = {f.name for f in dataclasses.fields(DreamConfig)}
    section["dream"] = {
        **{k: v for k, v in section.get("dream", {}).items() if k in known},
        **{k: v for k, v in dream.items() if k in known},
    }
    data["strategies"] = {"d2l": section}
    if smoke:
        shrink(data)
    data["training"]["optimizer"]["epochs"] = 1
    data.update(mem_sizes=[20], seeds=[0], device=device, precision="no" if smoke else "bf16")
    return data


def shrink(data: dict) -> dict:
    """CPU sizes for ``--cpu-smoke``: small latents, 2 DDIM steps, no bf16 autocast (slow on a
    CPU), a narrow ResNet-18 on 32 px crops of the 84 px images."""
    for section in data["strategies"].values():
        if isinstance(section, dict) and "dreamer_overrides" in section:
            section["dreamer_overrides"].update(
                mixed_precision="no", latent_size=8, num_inference_steps=2, backprop_steps=1
            )
    data["model"]["width"] = 8
    data["benchmark"]["image_size"] = 32
    return data


# ------------------------------------------------------------------------------------------------
# (b) D2L's dreaming phase


class PhaseTimer:
    """Times the end of an experience: from the end of its last training epoch to the end of
    ``train()`` (D2L dreams in ``after_training_exp``), devices synchronised, with the peak
    device memory over that window."""

    def __init__(self, device: torch.device):
        from avalanche.core import SupervisedPlugin

        # built here so that the class is defined only once avalanche is importable
        timer = self

        class _Hooks(SupervisedPlugin):
            def after_training_epoch(self, strategy, **kwargs):
                timer.mark()

            def after_training(self, strategy, **kwargs):
                timer.stop()

        self.device = device
        self.plugin = _Hooks()
        self.t0 = self.t1 = None
        self.peak: int | None = None

    def mark(self) -> None:
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.t0 = time.perf_counter()

    def stop(self) -> None:
        sync(self.device)
        self.t1 = time.perf_counter()
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)

    @property
    def seconds(self) -> float:
        return self.t1 - self.t0


def _plugin_report(strategy) -> dict[str, Any]:
    """What D2L's plugin says about its last phase, when it keeps a ``history`` (scalars only;
    optional: the figures above do not depend on it)."""
    for plugin in getattr(strategy, "plugins", []):
        hist = getattr(plugin, "history", None)
        if type(plugin).__name__.startswith("D2L") and isinstance(hist, list) and hist:
            last = hist[-1]
            if isinstance(last, dict):
                keep = (int, float, str, bool, type(None))
                return {k: v for k, v in last.items() if isinstance(v, keep)}
    return {}


def run_phase(ctx: dict, n_classes: int, steps: int) -> dict[str, Any]:
    """Train experience 0 of a fresh D2L run with a phase of ``n_classes`` x ``steps``."""
    from avalanche_d2l.experiments import Experiment, RunKey, RunOptions, build_run

    data = d2l_experiment(
        ctx["sd"],
        dream_settings(n_classes, steps, smoke=ctx["smoke"]),
        device=ctx["device_str"],
        smoke=ctx["smoke"],
    )
    exp = Experiment.from_dict(data, name="gpu_check_d2l")
    timer = PhaseTimer(ctx["device"])
    t_build = time.perf_counter()
    benchmark, strategy = build_run(
        exp,
        RunKey("d2l", 0, 20),
        RunOptions(data_root=str(ctx["mini"]), progress=False),
        benchmark=ctx.get("benchmark"),
        extra_plugins=[timer.plugin],
    )
    ctx["benchmark"] = benchmark
    build_s = time.perf_counter() - t_build
    strategy.train(benchmark.train_stream[0])
    dream = exp.method_config("d2l").dream
    per_pass = max(1, (dream.micro_batch or 10**9) // dream.batch_per_class)
    out = {
        "dream_classes": n_classes,
        "steps": steps,
        "batch_per_class": dream.batch_per_class,
        "micro_batch": dream.micro_batch,
        "passes_per_step": math.ceil(n_classes / per_pass),
        "phase_s": round(timer.seconds, 4),
        "build_s": round(build_s, 2),
        "peak_alloc_gib": None if timer.peak is None else round(timer.peak / 2**30, 3),
        "reported": _plugin_report(strategy),
    }
    del strategy
    if ctx["device"].type == "cuda":
        torch.cuda.empty_cache()
    return out


#: (few, many) dream classes and the second step cap of the measured phases; ``--cpu-smoke``
#: measures 2 and 6 classes (D2L's per-class prompt initialisation dominates a CPU phase).
DREAM_PLAN = {"gpu": (4, 20, 5), "smoke": (2, 6, 2)}


def _per_step(lo: dict, hi: dict) -> dict[str, Any]:
    """Seconds per prompt step and per pass of one class count: from the difference of the two
    step caps' synchronised phase times, and from D2L's own ``optim_seconds`` when it reports
    them (the optimisation alone, without the phase's fixed costs)."""
    passes = hi["passes_per_step"]
    per_step = (hi["phase_s"] - lo["phase_s"]) / (hi["steps"] - lo["steps"])
    out = {
        "phase_s": hi["phase_s"],
        "s_per_step": round(per_step, 4),
        "s_per_pass": round(per_step / passes, 4),
        "peak_alloc_gib": max((p["peak_alloc_gib"] or 0.0) for p in (lo, hi)) or None,
    }
    rep = hi["reported"]
    if isinstance(rep.get("optim_seconds"), (int, float)) and rep.get("steps"):
        out["reported_s_per_step"] = round(rep["optim_seconds"] / rep["steps"], 4)
        out["reported_s_per_pass"] = round(out["reported_s_per_step"] / passes, 4)
        out["reported_optim_share_of_phase"] = round(rep["optim_seconds"] / hi["phase_s"], 3)
    return out


def step_dream(rec: Record, ctx: dict) -> None:
    few, many, s2 = DREAM_PLAN["smoke" if ctx["smoke"] else "gpu"]
    order = ((few, 1), (many, 1), (few, s2), (many, s2))
    rec.step("dream", classes=[few, many], plan=[[many, 1, "warm-up"], *map(list, order)])
    # first CUDA calls, cuDNN/cuBLAS choices for every micro-batch shape, the dreamer's load
    rec.step("dream", warmup=run_phase(ctx, many, 1))
    phases = {}
    for n, steps in order:
        phases[f"{n}x{steps}"] = run_phase(ctx, n, steps)
        rec.step("dream", phases=phases)
    summary = {str(n): _per_step(phases[f"{n}x1"], phases[f"{n}x{s2}"]) for n in (few, many)}
    rec.step("dream", per_classes=summary)
    if summary[str(few)]["peak_alloc_gib"]:
        ratio = summary[str(many)]["peak_alloc_gib"] / summary[str(few)]["peak_alloc_gib"]
        rec.step("dream", peak_ratio_many_vs_few=round(ratio, 3))


def step_sd15(rec: Record, ctx: dict) -> None:
    rec.step("sd15", **build_sd(ctx["sd"], tiny=ctx["smoke"], device=ctx["device"]))


# ------------------------------------------------------------------------------------------------
# subprocess steps: the command line


def run_cmd(cmd: list[str], until: float, log: Path) -> dict[str, Any]:
    """Run ``cmd`` in its own process group, output to ``log``, stopped at the monotonic time
    ``until`` (SIGTERM first: torchrun passes it on to its workers, which live in their own
    sessions; SIGKILL 10 s later)."""
    t0 = time.perf_counter()
    with log.open("w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )
        rc: int | str = "timeout"
        try:
            rc = proc.wait(timeout=max(until - time.monotonic(), 1.0))
        except subprocess.TimeoutExpired:
            pass
        finally:
            if proc.poll() is None:
                _stop(proc)
    text = log.read_text(errors="replace")
    return {"rc": rc, "wall_s": round(time.perf_counter() - t0, 2), "log_tail": tail(text)}


def _stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _json_lines(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                rows.append(json.loads(line))
    return rows


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "avalanche_d2l", *args]


def step_dry_run(rec: Record, ctx: dict) -> None:
    from avalanche_d2l.experiments import experiment_files

    name = "d2l_mini_imagenet"
    if ctx["smoke"]:  # the shipped file at CPU sizes (its settings otherwise unchanged)
        data = shrink(json.loads(experiment_files()[name].read_text()))
        name = str(ctx["work"] / "d2l_mini_imagenet_smoke.json")
        Path(name).write_text(json.dumps(data, indent=1))
    cmd = cli(
        "run",
        name,
        "--data-root",
        str(ctx["mini"]),
        "--dreamer",
        str(ctx["sd"]),
        "--strategies",
        "d2l",
        "--device",
        ctx["device_str"],
        "--dry-run",
        "--no-progress",
    )
    if ctx["smoke"]:
        cmd += ["--quick", "--precision", "no"]
    res = run_cmd(cmd, ctx["until"], ctx["out"] / "dry_run.log")
    res["reports"] = _json_lines(res["log_tail"])
    rec.step("dry_run", command=" ".join(cmd[1:]), **res)
    if res["rc"] != 0:
        raise RuntimeError(f"the dry run exited {res['rc']}: see dry_run.log")


def step_genifer(rec: Record, ctx: dict) -> None:
    import bench_genifer

    steps = 4 if ctx["smoke"] else 200
    row = bench_genifer.bench_setting(
        "cifar32", device=ctx["device"], steps=steps, quick=ctx["smoke"]
    )
    keys = (
        "gan_steps_per_s",
        "gan_batch_size",
        "gan_images_per_s",
        "generator_images_per_s",
        "generator_params",
        "discriminator_params",
        "peak_memory_mb",
        "peak_memory_kind",
        "image_shape",
        "feature_layer",
    )
    rec.step("genifer", steps=steps, quick=ctx["smoke"], **{k: row[k] for k in keys})


def step_two_proc(rec: Record, ctx: dict) -> None:
    """2 processes on the one device, then (when it succeeded) 1 process for comparison."""
    data = d2l_experiment(
        ctx["sd"],
        dream_settings(4, 2, smoke=ctx["smoke"]),
        device=ctx["device_str"],
        smoke=ctx["smoke"],
    )
    data["strategies"]["d2l"]["dream"]["sleep_epochs"] = 1
    path = ctx["work"] / "d2l_two_proc.json"
    path.write_text(json.dumps(data, indent=1))
    args = [
        "run",
        str(path),
        "--data-root",
        str(ctx["mini"]),
        "--no-progress",
        "--max-experiences",
        "1" if ctx["smoke"] else "2",
    ]
    for name in ("two", "one"):  # no finished runs of an earlier check reused
        shutil.rmtree(ctx["work"] / name, ignore_errors=True)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd = [*launcher, "--nproc_per_node", "2", "-m", "avalanche_d2l", *args]
    two = run_cmd(
        [*cmd, "--out", str(ctx["work"] / "two")], ctx["until"], ctx["out"] / "two_proc.log"
    )
    two["results_written"] = (ctx["work"] / "two" / "results.json").is_file()
    # each rank that got to the end of `run` prints this line (only one should write)
    two["ranks_reporting_written"] = Path(ctx["out"] / "two_proc.log").read_text().count("\nwrote ")
    rec.step("two_proc", command=" ".join(cmd[1:]), **two)
    if two["rc"] != 0:
        raise RuntimeError(f"2 processes exited {two['rc']}: see two_proc.log")
    one = run_cmd(
        cli(*args, "--out", str(ctx["work"] / "one")), ctx["until"], ctx["out"] / "one_proc.log"
    )
    rec.step("two_proc", one_proc={k: one[k] for k in ("rc", "wall_s")})
    if one["rc"] != 0:  # no comparison without the 1-process run: the step did not finish
        raise RuntimeError(f"the 1-process run exited {one['rc']}: see one_proc.log")
    finals = {}
    for name in ("one", "two"):
        path = ctx["work"] / name / "results.json"
        if path.is_file():
            runs = json.loads(path.read_text())["runs"]
            finals[name] = [r.get("final_accuracy") for r in runs]
    rec.step("two_proc", final_accuracy=finals)


# ------------------------------------------------------------------------------------------------
# the driver


def run_step(rec: Record, name: str, fn, ctx: dict) -> None:
    """Run one step inside its budget; record ok / error / timeout / skipped."""
    max_s, need_s = (SMOKE_BUDGETS if ctx["smoke"] else BUDGETS)[name]
    left = rec.left()
    if left < need_s:
        rec.step(name, status="skipped", reason=f"{left:.0f} s left, {need_s} s needed")
        return
    budget = min(max_s, left - 5)
    rec.step(name, status="running", budget_s=round(budget))
    print(f"== {name} (budget {budget:.0f} s)", flush=True)
    t0 = time.perf_counter()
    ctx["until"] = time.monotonic() + budget  # the subprocess steps stop their commands then
    try:
        with alarm(budget + 15):
            fn(rec, ctx)
        status = {"status": "ok"}
    except StepTimeout as err:
        status = {"status": "timeout", "error": str(err)}
    except Exception as err:  # noqa: BLE001 -- every failure is the step's result
        status = {"status": "error", "error": f"{type(err).__name__}: {err}"}
        status["traceback"] = tail(traceback.format_exc(), 4000)
        print(traceback.format_exc(), flush=True)
    rec.step(name, wall_s=round(time.perf_counter() - t0, 2), **status)
    print(f"== {name}: {status['status']} in {time.perf_counter() - t0:.1f} s", flush=True)


STEPS = {
    "sd15": step_sd15,
    "dream": step_dream,
    "dry_run": step_dry_run,
    "genifer": step_genifer,
    "two_proc": step_two_proc,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gpu_check/out")))
    p.add_argument("--work", type=Path, default=Path("/tmp/gpu_check/work"))
    p.add_argument("--deadline-s", type=float, default=420.0)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny models on the CPU")
    p.add_argument("--device", default=None, help="default: cuda, or cpu with --cpu-smoke")
    p.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset, in order")
    a = p.parse_args(argv)
    start = time.monotonic()
    device = torch.device(a.device or ("cpu" if a.cpu_smoke else "cuda"))
    if a.cpu_smoke:
        torch.set_num_threads(1)
    rec = Record(a.out / "gpu_check.json", start, a.deadline_s)
    rec.set("mode", "cpu-smoke" if a.cpu_smoke else "gpu")
    try:
        device = cuda_index(device)
        rec.set("env", environment(device))
    except Exception as err:  # noqa: BLE001 -- no device: recorded, every step then fails
        rec.set("env", {"error": f"{type(err).__name__}: {err}", "torch": torch.__version__})
    a.work.mkdir(parents=True, exist_ok=True)
    ctx = {
        "smoke": a.cpu_smoke,
        "device": device,
        "device_str": str(device),
        "out": a.out,
        "work": a.work,
        "sd": a.work / ("sd_tiny" if a.cpu_smoke else "sd15"),
        "mini": image_folder(a.work / "mini"),
    }
    for name in a.steps.split(","):
        run_step(rec, name, STEPS[name], ctx)
    rec.set("finished", True)
    print(json.dumps({k: v.get("status") for k, v in rec.data["steps"].items()}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
