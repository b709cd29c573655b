"""D2L benchmark on CPU: dreaming throughput, and the cost of D2L as a ratio to its host.

Writes ``benchmarks/results/bench_d2l.json`` and ``bench_d2l.md`` (config, seed, device, numbers).

1. Dreaming throughput: the soft-prompt optimisation (optimisation steps/s, each step generating
   ``batch_per_class`` images for every active dream class through the differentiable DDIM loop and
   back-propagating to the prompts) and dream-set generation (images/s, no graph), with the
   offline glyph dreamer and the shipped dreaming preset (``D2LConfig().dream``), a small CNN
   learner that has seen two classes.
2. Each rehearsal host with and without D2L (ER ``replay``/``d2l``, ``er_ace``/``er_ace_d2l``,
   ``der``/``der_d2l``) on split_digits, run by the package's experiment runner in one process:
   final accuracy, forward transfer and wall time, and D2L's wall time over its host's (the
   shipped default must stay <= 5x).

Usage::

    python benchmarks/bench_d2l.py [--seed 0] [--epochs 10] [--hosts replay er_ace der]
        [--quick] [--skip-compare]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from avalanche_d2l.dreaming.prompts import DreamConfig, dream_classes
from avalanche_d2l.experiments import default_experiment, run_experiment
from avalanche_d2l.experiments.report import atomic_write
from avalanche_d2l.models.classifiers import small_cnn
from avalanche_d2l.models.heads import DreamHeads
from avalanche_d2l.strategies.d2l import D2LConfig, load_dreamer
from avalanche_d2l.utils import seed_everything

ROOT = Path(__file__).resolve().parents[1]
HOSTS = {"replay": "d2l", "er_ace": "er_ace_d2l", "der": "der_d2l"}


def bench_dreaming(dreamer, config: DreamConfig, *, seed: int, n_dreams: int) -> dict:
    """Time one dreaming phase (fixed step count: the oracle threshold is disabled)."""
    seed_everything(seed)
    c, h, w = dreamer.output_shape
    model = DreamHeads(
        small_cnn(10, c), n_classes=10, feature_layer="features", input_shape=(c, h, w)
    )
    model.assign({0: 0, 1: 1})
    cfg = DreamConfig.from_dict(
        {
            **config.to_dict(),
            "oracle_threshold": 1.01,
            "oracle_max_entropy": None,
            "oracle_collapse": None,
            "progress": False,
        }
    )
    heads = list(range(2, 2 + n_dreams))
    res = dream_classes(
        dreamer=dreamer, classifier=model, heads=heads, seen_heads=[0, 1], config=cfg
    )
    hist = res.history
    n_images = res.images.shape[0]
    return {
        "dream_classes": n_dreams,
        "optim_steps": hist["steps"],
        "images_per_step": n_dreams * cfg.batch_per_class,
        "optim_seconds": hist["optim_seconds"],
        "optim_steps_per_s": hist["steps"] / max(hist["optim_seconds"], 1e-9),
        "optim_images_per_s": hist["steps"]
        * n_dreams
        * cfg.batch_per_class
        / max(hist["optim_seconds"], 1e-9),
        "dream_images": n_images,
        "generate_seconds": hist["generate_seconds"],
        "dream_images_per_s": n_images / max(hist["generate_seconds"], 1e-9),
        "num_inference_steps": cfg.num_inference_steps or dreamer.config.num_inference_steps,
    }


def compare_hosts(
    hosts: list[str],
    *,
    seed: int,
    epochs: int | None,
    quick: bool,
    out: Path,
    dreams: str | None = None,
) -> tuple[list[dict], dict[str, float]]:
    """Each host and its D2L variant through the experiment runner; (records, wall ratios).
    ``dreams``: the D2L variants' ``D2LConfig.dreams`` (``None``: the default)."""
    exp = default_experiment("split_digits")
    names = [n for h in hosts for n in (h, HOSTS[h])]
    d2l_section = {"dreams": dreams} if dreams else {}
    sections = {n: (d2l_section if n in HOSTS.values() else {}) for n in names}
    exp = type(exp).from_dict(
        {**exp.to_dict(), "strategies": sections, "seeds": [seed]}, name=exp.name
    )
    res = run_experiment(exp, out=out, seeds=[seed], epochs=epochs, quick=quick, progress=False)
    by = {r["strategy"]: r for r in res["runs"]}
    ratios = {HOSTS[h]: by[HOSTS[h]]["wall_s"] / max(by[h]["wall_s"], 1e-9) for h in hosts}
    keep = (
        "strategy",
        "seed",
        "final_accuracy",
        "avg_incremental_accuracy",
        "forward_transfer",
        "wall_s",
    )
    return [{k: by[n].get(k) for k in keep} for n in names], ratios


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="default: the experiment's (10)")
    p.add_argument("--hosts", nargs="+", default=list(HOSTS), choices=list(HOSTS))
    p.add_argument("--n-dreams", type=int, default=8, help="dream classes in the throughput test")
    p.add_argument("--quick", action="store_true", help="tiny settings (smoke test)")
    p.add_argument("--skip-compare", action="store_true", help="only the throughput test")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--name", default="bench_d2l", help="output file stem")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument(
        "--dreams",
        choices=["random", "optimised", "noise"],
        default=None,
        help="D2LConfig.dreams of the D2L variants (default: the package default)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    d2l = D2LConfig(**({"dreams": args.dreams} if args.dreams else {}))
    dreamer = load_dreamer(d2l.dreamer, d2l.dreamer_overrides, progress=False)
    config = DreamConfig.from_dict({**d2l.dream.to_dict(), "seed": args.seed, "progress": False})
    results: dict = {
        "config": {
            "seed": args.seed,
            "d2l": d2l.to_dict(),
            "dreamer_config": dreamer.config.to_dict(),
            "benchmark": "split_digits (shipped offline experiment: 5x2, 16 px, small CNN, "
            "Adam 1e-3, buffer 100)",
            "epochs": args.epochs,
            "quick": args.quick,
            "command": "python benchmarks/bench_d2l.py "
            + " ".join(argv if argv is not None else sys.argv[1:]),
        },
        "device": f"cpu ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads)",
        "torch": torch.__version__,
    }
    print("dreaming throughput ...", flush=True)
    results["dreaming"] = bench_dreaming(dreamer, config, seed=args.seed, n_dreams=args.n_dreams)
    print(json.dumps(results["dreaming"], indent=2), flush=True)
    if not args.skip_compare:
        runs, ratios = compare_hosts(
            args.hosts,
            seed=args.seed,
            epochs=args.epochs,
            quick=args.quick,
            out=args.out / f"{args.name}_runs",
            dreams=args.dreams,
        )
        results["runs"], results["d2l_over_host_wall"] = runs, ratios

    atomic_write(args.out / f"{args.name}.json", json.dumps(results, indent=2))
    atomic_write(args.out / f"{args.name}.md", to_markdown(results))
    print(to_markdown(results))
    return 0


def to_markdown(r: dict) -> str:
    d = r["dreaming"]
    lines = [
        "# D2L benchmark (CPU)",
        "",
        f"Device: {r['device']}, torch {r['torch']}. Seed {r['config']['seed']}. "
        f"Dreamer: `{r['config']['d2l']['dreamer']}`, dreams `{r['config']['d2l']['dreams']}`. "
        f"Command: `{r['config'].get('command', 'python benchmarks/bench_d2l.py')}`.",
        "",
        "## Dreaming throughput",
        "",
        "| dream classes | optim steps | images/step | optim steps/s | optim images/s | "
        "dream images | dream images/s |",
        "|---|---|---|---|---|---|---|",
        f"| {d['dream_classes']} | {d['optim_steps']} | {d['images_per_step']} | "
        f"{d['optim_steps_per_s']:.2f} | {d['optim_images_per_s']:.1f} | {d['dream_images']} | "
        f"{d['dream_images_per_s']:.1f} |",
    ]
    if "runs" in r:
        lines += [
            "",
            "## Hosts with and without D2L on split_digits (one process, seed "
            f"{r['config']['seed']})",
            "",
            "| strategy | final accuracy | forward transfer | wall time (s) | x host |",
            "|---|---|---|---|---|",
        ]
        for run in r["runs"]:
            ratio = r["d2l_over_host_wall"].get(run["strategy"])
            lines.append(
                f"| {run['strategy']} | {run['final_accuracy']:.3f} | "
                f"{run['forward_transfer']:+.3f} | {run['wall_s']:.1f} | "
                f"{f'{ratio:.1f}' if ratio else '-'} |"
            )
    lines += ["", "Exact settings: the `config` entry of the JSON file next to this one.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
