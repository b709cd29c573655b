"""Genifer speed/memory benchmark: cost against Naive, generator throughput, GAN steps/s, memory.

1. ``--compare-naive``: one run of Naive and one of Genifer (CPU preset) on ``split_digits``
   (seed 0, the shipped experiment's model, optimiser and epochs, through the experiment
   engine), in the same process one after the other: wall times, their ratio and Genifer's
   breakdown (GAN phases vs classifier training and evaluation).

2. For the 16 px CPU setting (``GeniferConfig()``) and the 32 px CIFAR reference setting (the
   ``genifer`` section of the ``genifer_cifar100`` experiment):

* generator throughput (images/s, no grad, batch 64),
* GAN training steps/s (one D + one G step, batch ``gan_batch_size``, classifier features at the
  configured layer, t > 0 so the previous generator and the self-distillation are included),
* peak memory (process peak RSS on CPU; ``torch.cuda.max_memory_allocated`` on CUDA).

Writes ``benchmarks/results/bench_genifer.json`` and ``.md`` (with the exact configs).

    python benchmarks/bench_genifer.py --compare-naive [--device cpu] [--steps 20] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout, installed or not

from avalanche_d2l.experiments import load_experiment  # noqa: E402
from avalanche_d2l.experiments.report import atomic_write
from avalanche_d2l.models.classifiers import resnet18_cifar, small_cnn  # noqa: E402
from avalanche_d2l.models.feature_gan import frozen_copy  # noqa: E402
from avalanche_d2l.scenarios import tensor_benchmark  # noqa: E402
from avalanche_d2l.strategies.genifer import GeniferConfig, GeniferPlugin  # noqa: E402
from avalanche_d2l.utils import resolve_device, seed_everything  # noqa: E402

HERE = Path(__file__).resolve().parent


def _peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def _setting(name: str, quick: bool):
    """(config, classifier, feature layer, image shape, classes) of one setting."""
    if name == "cpu16":
        cfg = GeniferConfig(num_classes=10, output_range=(0.0, 1.0), progress=False)
        return cfg, small_cnn(num_classes=10, in_channels=1), "block3", (1, 16, 16), 10
    cfg = load_experiment("genifer_cifar100").method_config("genifer")
    cfg = replace(cfg, progress=False, num_classes=100, output_range=(0.0, 1.0))
    if quick:  # smaller widths so that CI can run the script
        cfg = replace(
            cfg,
            z_dim=64,
            w_dim=64,
            embed_dim=32,
            g_channel_base=512,
            g_channel_max=64,
            d_channels=64,
            d_cmap_dim=32,
        )
    width = 16 if quick else 64
    return cfg, resnet18_cifar(num_classes=100, width=width), "layer3", (3, 32, 32), 100


def bench_setting(name: str, *, device: torch.device, steps: int, quick: bool) -> dict:
    seed_everything(0)
    cfg, model, layer, shape, n_classes = _setting(name, quick)
    model = model.to(device)
    # the GAN step alone: fixed length, no held-out images, no fidelity probes
    cfg = replace(cfg, gan_stop="fixed", measure_fidelity=False)
    plugin = GeniferPlugin(feature_layer=layer, config=cfg)
    plugin.teacher = frozen_copy(model)
    plugin.build_models(image_shape=shape, num_classes=n_classes, classifier=plugin.teacher)
    g = plugin.generator_ema.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    # 1. generator throughput (images/s, no grad)
    n_batches = max(2, steps // 2)
    g.generate(64, generator=torch.Generator().manual_seed(0))
    sync()
    t0 = time.perf_counter()
    for i in range(n_batches):
        g.generate(64, generator=torch.Generator().manual_seed(i))
    sync()
    gen_ips = 64 * n_batches / (time.perf_counter() - t0)

    # 2. GAN steps/s on a synthetic "experience" (t > 0: previous generator + distillation)
    per_class = max(cfg.gan_batch_size, 64)
    x = torch.rand(2 * per_class, *shape)
    y = torch.arange(2).repeat_interleave(per_class) + 2
    bench = tensor_benchmark(x, y, x, y, n_experiences=1)
    exp = bench.train_stream[0]
    plugin.generated_classes = [0, 1]  # pretend classes 0, 1 were learnt before
    plugin.train_gan(experience=exp, device=device, steps=2)  # warm-up
    sync()
    summary = plugin.train_gan(experience=exp, device=device, steps=steps)
    sync()
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _peak_rss_mb()
    return {
        "setting": name,
        "image_shape": list(shape),
        "feature_layer": layer,
        "generator_params": sum(p.numel() for p in plugin.generator.parameters()),
        "discriminator_params": sum(p.numel() for p in plugin.discriminator.parameters()),
        "generator_family": cfg.g_family,
        "discriminator_family": cfg.d_family,
        "generator_images_per_s": gen_ips,
        "gan_steps_per_s": summary["steps_per_s"],
        "gan_batch_size": cfg.gan_batch_size,
        "gan_images_per_s": summary["steps_per_s"] * cfg.gan_batch_size,
        "peak_memory_mb": peak,
        "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "process_rss",
        "config": cfg.to_dict(),
    }


def compare_naive(quick: bool) -> dict:
    """Naive and Genifer on split_digits seed 0, one after the other in this process."""
    import tempfile

    from avalanche_d2l.experiments.runner import (
        RunKey,
        RunOptions,
        build_run,
        train_with_checkpoints,
    )

    exp = load_experiment("split_digits")
    opts = RunOptions(quick=quick, progress=False, threads=torch.get_num_threads())
    out: dict = {"benchmark": "split_digits", "seed": 0, "quick": quick}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("naive", "genifer"):
            key = RunKey(name, 0, None)
            benchmark, strategy = build_run(exp, key, opts, work_dir=Path(tmp) / name)
            t0 = time.perf_counter()
            summary = train_with_checkpoints(
                strategy, benchmark, seed=0, ckpt=Path(tmp) / f"{name}.pkl"
            )
            row = {
                "wall_s": time.perf_counter() - t0,
                "train_eval_wall_s": summary["wall_s"],
                "final_accuracy": summary["final_accuracy"],
            }
            if name == "genifer":
                hist = strategy.genifer.history
                row["gan_phases"] = len(hist)
                row["gan_steps"] = sum(h["steps"] for h in hist)
                row["gan_wall_s"] = sum(h["wall_s"] for h in hist)
                row["gan_steps_per_s"] = row["gan_steps"] / max(row["gan_wall_s"], 1e-9)
                row["gan_steps_per_phase"] = [h["steps"] for h in hist]
                # the final fidelity measurement after each phase (checks during a phase are
                # in its GAN wall time)
                row["fidelity_wall_s"] = sum(h.get("fidelity", {}).get("wall_s", 0) for h in hist)
            out[name] = row
    out["ratio_genifer_to_naive"] = out["genifer"]["wall_s"] / out["naive"]["wall_s"]
    g = out["genifer"]
    out["genifer_gan_share"] = g["gan_wall_s"] / g["wall_s"]
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    ap.add_argument("--quick", action="store_true", help="small CIFAR widths, few steps")
    ap.add_argument("--settings", nargs="+", default=["cpu16", "cifar32"])
    ap.add_argument(
        "--compare-naive",
        action="store_true",
        help="also one Naive and one Genifer run on split_digits (wall-time ratio)",
    )
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    naive_cmp = compare_naive(args.quick) if args.compare_naive else None
    rows = [
        bench_setting(s, device=device, steps=args.steps, quick=args.quick) for s in args.settings
    ]
    result = {
        "benchmark": "genifer_speed",
        "device": str(device),
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "quick": args.quick,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "seed": 0,
        "rows": rows,
        "compare_naive": naive_cmp,
        "load_average_at_end": list(os.getloadavg()),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "bench_genifer.json", json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Genifer speed ({device}, {torch.get_num_threads()} threads, torch {torch.__version__})",
        "",
        (
            "| setting | image | G params | D params | G images/s | GAN steps/s | GAN images/s "
            "| peak MB |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {'x'.join(map(str, r['image_shape']))} | "
            f"{r['generator_params']:,} | {r['discriminator_params']:,} | "
            f"{r['generator_images_per_s']:.0f} | {r['gan_steps_per_s']:.2f} | "
            f"{r['gan_images_per_s']:.0f} | {r['peak_memory_mb']:.0f} ({r['peak_memory_kind']}) |"
        )
    lines += [
        "",
        (
            f"Steps measured: {args.steps} (after 2 warm-up steps); quick={args.quick}. "
            "Configs are in bench_genifer.json."
        ),
    ]
    if naive_cmp is not None:
        n, g = naive_cmp["naive"], naive_cmp["genifer"]
        lines += [
            "",
            "## Genifer against Naive (split_digits, seed 0, same process)",
            "",
            "| strategy | wall s | final acc | GAN phases | GAN steps | GAN wall s | GAN steps/s |",
            "|---|---|---|---|---|---|---|",
            f"| naive | {n['wall_s']:.1f} | {n['final_accuracy']:.3f} | - | - | - | - |",
            f"| genifer | {g['wall_s']:.1f} | {g['final_accuracy']:.3f} | {g['gan_phases']} | "
            f"{g['gan_steps']} | {g['gan_wall_s']:.1f} | {g['gan_steps_per_s']:.2f} |",
            "",
            f"GAN steps per phase (ended by the fidelity check): {g['gan_steps_per_phase']}; "
            f"GAN wall time includes the checks; the final fidelity measurements took "
            f"{g['fidelity_wall_s']:.1f} s in all.",
            "",
            f"Ratio Genifer / Naive: {naive_cmp['ratio_genifer_to_naive']:.1f}x; GAN phases "
            f"are {100 * naive_cmp['genifer_gan_share']:.0f}% of Genifer's wall time. Load "
            f"average at the end: {result['load_average_at_end'][0]:.1f} (shared machine).",
        ]
    atomic_write(out / "bench_genifer.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
