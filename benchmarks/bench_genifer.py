"""Genifer speed/memory benchmark: cost against Naive, generator throughput, GAN steps/s, memory.

1. ``--compare-naive``: one run of Naive and one of Genifer (CPU preset) on ``split_digits``
   (seed 0, the shipped experiment's model, optimiser and epochs, through the experiment
   engine), in the same process one after the other: wall times, their ratio and Genifer's
   breakdown (GAN phases vs classifier training and evaluation).

2. For the 16 px CPU setting (``GeniferConfig()``), the same default config on a user's RGB CNN
   (``genifer_fidelity.UserCNN``, feature layer ``block3``) at 32 and 64 px (``user32``,
   ``user64``), and the 32 px CIFAR reference setting (the ``genifer`` section of the
   ``genifer_cifar100`` experiment):

* generator throughput (images/s, no grad, batch 64),
* GAN training steps/s (one D + one G step, batch ``gan.batch_size``, classifier features at the
  configured layer, t > 0 so the previous generator and the self-distillation are included),
* peak memory (process peak RSS on CPU; ``torch.cuda.max_memory_allocated`` on CUDA).

Writes ``benchmarks/results/bench_genifer.json`` and ``.md`` (with the exact configs).

    python benchmarks/bench_genifer.py --compare-naive [--device cpu] [--steps 20] [--quick]
    python benchmarks/bench_genifer.py --compare-naive --settings cpu16 --name genifer_cost \
        --variants '{"default": {}, "check_every_100": {"gan": {"check_every": 100}}}'

With ``--variants`` every Genifer run follows a Naive run of its own and both wall time and
process CPU time are recorded (CPU time is less disturbed by other users of a shared machine).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout, installed or not

from avalanche_d2l.core.allocator import reuse_freed_memory  # noqa: E402
from avalanche_d2l.experiments import load_experiment  # noqa: E402
from avalanche_d2l.experiments.report import atomic_write
from avalanche_d2l.genifer.config import merge_sections  # noqa: E402
from avalanche_d2l.models.classifiers import resnet18_cifar, small_cnn  # noqa: E402
from avalanche_d2l.models.feature_gan import frozen_copy  # noqa: E402
from avalanche_d2l.models.feature_gan_parts import device_layout  # noqa: E402
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
        cfg = GeniferConfig(num_classes=10, generator={"output_range": (0.0, 1.0)}, progress=False)
        return cfg, small_cnn(num_classes=10, in_channels=1), "block3", (1, 16, 16), 10
    if name in ("user32", "user64"):  # the default config on a user's RGB CNN at 32 / 64 px
        from genifer_fidelity import UserCNN  # this folder is on sys.path when run as a script

        size = int(name[4:])
        cfg = GeniferConfig(num_classes=10, generator={"output_range": (0.0, 1.0)}, progress=False)
        return cfg, UserCNN(3), "block3", (3, size, size), 10
    cfg = load_experiment("genifer_cifar100").method_config("genifer")
    cfg = cfg.merged(
        {"progress": False, "num_classes": 100, "generator": {"output_range": (0.0, 1.0)}}
    )
    if quick:  # smaller widths so that CI can run the script
        small = {"z_dim": 64, "w_dim": 64, "embed_dim": 32, "channel_base": 512, "channel_max": 64}
        cfg = cfg.merged({"generator": small, "discriminator": {"channels": 64, "cmap_dim": 32}})
    width = 16 if quick else 64
    return cfg, resnet18_cifar(num_classes=100, width=width), "layer3", (3, 32, 32), 100


@contextlib.contextmanager
def compiled_generators():
    """Inside: every ``StyleGenerator`` runs its forward through ``torch.compile`` (one compiled
    function per instance, so the previous generator of a phase keeps its own weights)."""
    from avalanche_d2l.models.gan import StyleGenerator

    plain = StyleGenerator.forward
    compiled: dict[int, object] = {}

    def forward(self, *args, **kwargs):
        if id(self) not in compiled:
            compiled[id(self)] = torch.compile(plain.__get__(self), dynamic=False)
        return compiled[id(self)](*args, **kwargs)

    StyleGenerator.forward = forward
    try:
        yield
    finally:
        StyleGenerator.forward = plain


def bench_setting(
    name: str, *, device: torch.device, steps: int, quick: bool, compile_g: bool = False
) -> dict:
    """One setting's generator throughput, GAN steps/s and peak memory; ``compile_g``: with the
    generators compiled (:func:`compiled_generators`), ``first_s`` then includes compiling."""
    if compile_g:
        with compiled_generators():
            return bench_setting(name, device=device, steps=steps, quick=quick)
    t_first = time.perf_counter()
    seed_everything(0)
    cfg, model, layer, shape, n_classes = _setting(name, quick)
    model = model.to(device)
    # the GAN step alone: fixed length, no held-out images, no fidelity probes
    cfg = cfg.merged({"gan": {"stop": "fixed", "measure_fidelity": False}})
    plugin = GeniferPlugin(feature_layer=layer, config=cfg)
    plugin.build_models(image_shape=shape, num_classes=n_classes, classifier=frozen_copy(model))
    plugin.freeze_teacher(model)  # as after an experience (channels-last on CPU)
    g = device_layout(plugin.generator_ema, device)  # as in a run: channels-last on CPU only
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
    per_class = max(cfg.gan.batch_size, 64)
    x = torch.rand(2 * per_class, *shape)
    y = torch.arange(2).repeat_interleave(per_class) + 2
    bench = tensor_benchmark(x, y, x, y, n_experiences=1)
    exp = bench.train_stream[0]
    plugin.generated_classes = [0, 1]  # pretend classes 0, 1 were learnt before
    plugin.train_gan(experience=exp, device=device, steps=2)  # warm-up
    sync()
    first_s = time.perf_counter() - t_first
    summary = plugin.train_gan(experience=exp, device=device, steps=steps)
    sync()
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _peak_rss_mb()
    return {
        "setting": name,
        "image_shape": list(shape),
        "feature_layer": layer,
        "generator_params": sum(p.numel() for p in plugin.generator.parameters()),
        "discriminator_params": sum(p.numel() for p in plugin.discriminator.parameters()),
        "generator_family": cfg.generator.family,
        "discriminator_family": cfg.discriminator.family,
        "generator_images_per_s": gen_ips,
        "gan_steps_per_s": summary["steps_per_s"],
        "gan_batch_size": cfg.gan.batch_size,
        "gan_images_per_s": summary["steps_per_s"] * cfg.gan.batch_size,
        "peak_memory_mb": peak,
        "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "process_rss",
        "first_s": first_s,
        "config": cfg.to_dict(),
    }


def _genifer_row(strategy) -> dict:
    """GAN phases of a finished Genifer run: steps, wall time, the checks' share of it."""
    hist = strategy.genifer.history
    row = {"gan_phases": len(hist), "gan_steps": sum(h["steps"] for h in hist)}
    row["gan_wall_s"] = sum(h["wall_s"] for h in hist)
    row["gan_steps_per_s"] = row["gan_steps"] / max(row["gan_wall_s"], 1e-9)
    row["gan_steps_per_phase"] = [h["steps"] for h in hist]
    checks = [c for h in hist for c in h.get("fidelity", {}).get("checks", [])]
    # the checks during the phases are inside the GAN wall time; the final measurement is not
    row["check_count"] = len(checks)
    row["check_wall_s"] = sum(c.get("wall_s", 0.0) for c in checks)
    row["fidelity_wall_s"] = sum(h.get("fidelity", {}).get("wall_s", 0) for h in hist)
    row["probe_min_per_phase"] = [h.get("fidelity", {}).get("probe_min") for h in hist]
    return row


def compare_naive(
    quick: bool,
    variants: dict[str, dict] | None = None,
    repeats: int = 1,
    seeds: list[int] | tuple[int, ...] = (0,),
) -> dict:
    """Naive and Genifer on split_digits (seed 0 by default), one after the other in this process.

    ``variants``: named changes to the ``genifer`` section (one run each, after a Naive run,
    in the order given, ``repeats`` times over, for every seed of ``seeds``), so every Genifer
    run has a Naive run of the same moment to be divided by (the machine may be shared). With
    several seeds, ``per_variant`` gives each variant's summed Genifer wall time over its
    Naive runs' (the fidelity stop makes the number of GAN steps vary from seed to seed).
    """
    import tempfile
    from dataclasses import replace as dc_replace

    from avalanche_d2l.experiments.runner import (
        RunKey,
        RunOptions,
        build_run,
        train_with_checkpoints,
    )

    base = load_experiment("split_digits")
    variants = variants or {"default": {}}
    opts = RunOptions(quick=quick, progress=False, threads=torch.get_num_threads())
    out: dict = {
        "benchmark": "split_digits",
        "seed": seeds[0],
        "seeds": list(seeds),
        "quick": quick,
        "runs": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for rep, seed, (vname, change) in (
            (r, sd, v) for r in range(repeats) for sd in seeds for v in variants.items()
        ):  # for each: one Naive run, then the variant's Genifer run
            for name in ("naive", "genifer"):
                strategies = dict(base.strategies)
                strategies["genifer"] = merge_sections(strategies.get("genifer", {}), change)
                exp = dc_replace(base, strategies=strategies)
                key = RunKey(name, seed, None)
                work = Path(tmp) / f"{vname}_{rep}_{seed}_{name}"
                work.mkdir(parents=True)
                benchmark, strategy = build_run(exp, key, opts, work_dir=work)
                load0 = os.getloadavg()[0]
                faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                t0, c0 = time.perf_counter(), time.process_time()
                summary = train_with_checkpoints(
                    strategy, benchmark, seed=seed, ckpt=work / "run.pkl"
                )
                row = {
                    "strategy": name,
                    "seed": seed,
                    "variant": vname if name == "genifer" else None,
                    "change": change if name == "genifer" else None,
                    "repeat": rep,
                    "wall_s": time.perf_counter() - t0,
                    # CPU time of this process: less sensitive to other users of the machine
                    "cpu_s": time.process_time() - c0,
                    "page_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0,
                    "train_eval_wall_s": summary["wall_s"],
                    "final_accuracy": summary["final_accuracy"],
                    "load_average_start_end": [load0, os.getloadavg()[0]],
                }
                if name == "genifer":
                    row.update(_genifer_row(strategy))
                    row["ratio_to_naive"] = row["wall_s"] / out["runs"][-1]["wall_s"]
                    row["cpu_ratio_to_naive"] = row["cpu_s"] / out["runs"][-1]["cpu_s"]
                out["runs"].append(row)
                print(json.dumps(row), flush=True)
    # the first pair under the names the earlier results used
    out["naive"], out["genifer"] = out["runs"][0], out["runs"][1]
    out["ratio_genifer_to_naive"] = out["genifer"]["ratio_to_naive"]
    g = out["genifer"]
    out["genifer_gan_share"] = g["gan_wall_s"] / g["wall_s"]
    per: dict[str, dict] = {}
    runs = out["runs"]
    for naive, gen in zip(runs[0::2], runs[1::2]):
        p = per.setdefault(gen["variant"], {"naive_s": 0.0, "genifer_s": 0.0, "steps": 0, "n": 0})
        p["naive_s"] += naive["wall_s"]
        p["genifer_s"] += gen["wall_s"]
        p["steps"] += gen["gan_steps"]
        p["n"] += 1
        p.setdefault("final_accuracy", []).append(gen["final_accuracy"])
    for p in per.values():
        p["ratio_of_sums"] = p["genifer_s"] / p["naive_s"]
    out["per_variant"] = per
    return out


def _compare_lines(cmp: dict, argv: list[str]) -> list[str]:
    """The Naive / Genifer table of :func:`compare_naive`, one row per run in run order."""
    lines = [
        f"## Genifer against Naive (split_digits, seeds {cmp.get('seeds', [0])}, same process, "
        "runs in this order)",
        "",
        "| run | seed | variant | wall s | ratio to the Naive run before (wall, CPU) | final acc "
        "| GAN steps per phase | GAN wall s | checks (n, s) | probe min per phase "
        "| page faults | load avg start-end |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(cmp["runs"]):
        seed = r.get("seed", 0)
        load = "-".join(f"{v:.1f}" for v in r["load_average_start_end"])
        faults = f"{r['page_faults']:,}" if "page_faults" in r else "-"
        if r["strategy"] == "naive":
            lines.append(
                f"| {i} naive | {seed} | - | {r['wall_s']:.1f} | - | {r['final_accuracy']:.3f} "
                f"| - | - | - | - | {faults} | {load} |"
            )
            continue
        probes = ", ".join("-" if p is None else f"{p:.2f}" for p in r["probe_min_per_phase"])
        lines.append(
            f"| {i} genifer | {seed} | {r['variant']} | {r['wall_s']:.1f} | "
            f"{r['ratio_to_naive']:.1f}x, {r['cpu_ratio_to_naive']:.1f}x | "
            f"{r['final_accuracy']:.3f} | {r['gan_steps_per_phase']} | {r['gan_wall_s']:.1f} | "
            f"{r['check_count']}, {r['check_wall_s']:.1f} | {probes} | {faults} | {load} |"
        )
    changes = {r["variant"]: r["change"] for r in cmp["runs"] if r["strategy"] == "genifer"}
    per = cmp.get("per_variant") or {}
    if any(p["n"] > 1 for p in per.values()):
        lines += [
            "",
            "Per variant over its runs: summed Genifer wall time over the summed wall time of "
            "the Naive runs before them (GAN steps in all, final accuracies):",
            "",
            *(
                f"- `{k}`: **{p['ratio_of_sums']:.1f}x** ({p['genifer_s']:.0f} s / "
                f"{p['naive_s']:.0f} s, {p['n']} runs, {p['steps']} GAN steps, "
                + " / ".join(f"{a:.3f}" for a in p["final_accuracy"])
                + ")"
                for k, p in per.items()
            ),
        ]
    lines += [
        "",
        "Variants (changes to the experiment's `genifer` section): "
        + "; ".join(f"`{k}`: `{json.dumps(v)}`" for k, v in changes.items()),
        "",
        "GAN wall time includes the fidelity checks made during the phases; shared 2-core "
        "machine: compare a Genifer run with the Naive run just before it.",
        "",
        f"Command: `python benchmarks/bench_genifer.py {shlex.join(argv)}`",
    ]
    return lines


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
    ap.add_argument(
        "--variants",
        default=None,
        help="JSON {name: {genifer key: value}}: Genifer runs to compare (default: one, {})",
    )
    ap.add_argument("--repeats", type=int, default=1, help="times over the variant list")
    ap.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="seeds of --compare-naive's runs"
    )
    ap.add_argument(
        "--compile",
        action="store_true",
        help="measure every setting twice, alternately: plain and with torch.compile'd generators",
    )
    ap.add_argument(
        "--malloc",
        choices=("reuse", "default"),
        default="reuse",
        help="reuse: keep freed memory, as the avalanche-d2l command does (default); "
        "default: glibc's own settings",
    )
    ap.add_argument("--name", default="bench_genifer", help="file name of the results")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    allocator = reuse_freed_memory() if args.malloc == "reuse" else {"allocator": "glibc defaults"}
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    variants = json.loads(args.variants) if args.variants else None
    naive_cmp = (
        compare_naive(args.quick, variants, args.repeats, args.seeds)
        if args.compare_naive
        else None
    )
    rows = []
    for s in args.settings:
        for compile_g in (False, True) if args.compile else (False,):
            row = bench_setting(
                s, device=device, steps=args.steps, quick=args.quick, compile_g=compile_g
            )
            rows.append({**row, "compiled": compile_g})
    result = {
        "benchmark": "genifer_speed",
        "device": str(device),
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "quick": args.quick,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "allocator": allocator,
        "seed": 0,
        "rows": rows,
        "compare_naive": naive_cmp,
        "load_average_at_end": list(os.getloadavg()),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / f"{args.name}.json", json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Genifer speed ({device}, {torch.get_num_threads()} threads, torch {torch.__version__})",
        "",
        f"CPU allocator: {json.dumps(allocator)}.",
        "",
        (
            "| setting | G compiled | image | G params | D params | G images/s | GAN steps/s "
            "| GAN images/s | peak MB | first s |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {'yes' if r['compiled'] else 'no'} "
            f"| {'x'.join(map(str, r['image_shape']))} | "
            f"{r['generator_params']:,} | {r['discriminator_params']:,} | "
            f"{r['generator_images_per_s']:.0f} | {r['gan_steps_per_s']:.2f} | "
            f"{r['gan_images_per_s']:.0f} | {r['peak_memory_mb']:.0f} ({r['peak_memory_kind']}) "
            f"| {r['first_s']:.1f} |"
        )
    lines += [
        "",
        (
            f"Steps measured: {args.steps} (after 2 warm-up steps); quick={args.quick}. "
            f"Configs are in {args.name}.json. First s: from building the models to the end of "
            "the warm-up (with a compiled generator: its compilation, in this process)."
        ),
    ]
    if naive_cmp is not None:
        lines += ["", *_compare_lines(naive_cmp, sys.argv[1:] if argv is None else argv)]
    atomic_write(out / f"{args.name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
