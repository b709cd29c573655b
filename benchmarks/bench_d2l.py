"""D2L benchmark on CPU: dreaming throughput, and D2L vs Replay on split_digits.

Writes ``benchmarks/results/bench_d2l.json`` and ``bench_d2l.md`` (config, seed, device, numbers).

1. Dreaming throughput: the soft-prompt optimisation (optimisation steps/s, each step generating
   ``batch_per_class`` images for every active dream class through the differentiable DDIM loop and
   back-propagating to the prompts) and dream-set generation (images/s, no graph), with the
   offline glyph dreamer and a small CNN learner that has seen two classes.
2. D2L vs Replay on split_digits (5 x 2 classes, 16 px, small CNN, Adam 1e-3, same buffer): final
   accuracy, forward transfer (accuracy on experience k after D2L's head assignment and before
   training, minus a random-init copy's, mean over k >= 1 0-based), wall time.

Usage::

    python benchmarks/bench_d2l.py [--seed 0] [--epochs 10] [--mem-size 100]
        [--dreamer offline|PATH] [--dream-config benchmarks/configs/d2l_split_digits.json]
        [--quick] [--skip-compare]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from avalanche_d2l.dreaming.prompts import DreamConfig, dream_classes  # noqa: E402
from avalanche_d2l.evaluation import make_evaluator  # noqa: E402
from avalanche_d2l.models.classifiers import small_cnn  # noqa: E402
from avalanche_d2l.scenarios import split_digits  # noqa: E402
from avalanche_d2l.strategies.d2l import (  # noqa: E402
    D2L,
    DreamHeads,
    resolve_dreamer,
    split_digits_dream_config,
)
from avalanche_d2l.utils import seed_everything  # noqa: E402

STREAM_ACC = "Top1_Acc_Stream/eval_phase/test_stream/Task000"


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


def run_one(
    name: str,
    *,
    seed: int,
    epochs: int,
    mem_size: int,
    dreamer,
    config: DreamConfig,
    progress: bool,
) -> dict:
    from avalanche.training import Replay

    seed_everything(seed)
    bench = split_digits(n_experiences=5, image_size=16, seed=seed)
    model = small_cnn(10, 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    evaluator = make_evaluator(bench, interactive=False)
    common = dict(
        model=model,
        optimizer=opt,
        criterion=torch.nn.CrossEntropyLoss(),
        train_mb_size=32,
        train_epochs=epochs,
        eval_mb_size=256,
        device="cpu",
        evaluator=evaluator,
    )
    if name == "replay":
        strategy = Replay(mem_size=mem_size, **common)
    else:
        strategy = D2L(
            mem_size=mem_size,
            dreamer=dreamer,
            dream_config=config,
            feature_layer="features",
            n_classes=10,
            **common,
        )
    t0 = time.perf_counter()
    accs = []
    for exp in bench.train_stream:
        seed_everything(seed * 1000 + exp.current_experience)
        strategy.train(exp, eval_streams=[])
        res = strategy.eval(bench.test_stream)
        accs.append(float(res[STREAM_ACC]))
        if progress:
            print(f"  {name} exp {exp.current_experience}: acc {accs[-1]:.3f}", flush=True)
    wall = time.perf_counter() - t0
    fwt_metric = next(m for m in evaluator.metrics if type(m).__name__ == "ForwardTransferAtStart")
    out = {
        "strategy": name,
        "seed": seed,
        "final_accuracy": accs[-1],
        "accuracy_curve": accs,
        "forward_transfer": fwt_metric.result(),
        "forward_transfer_per_exp": {int(k): v for k, v in fwt_metric.transfer.items()},
        "accuracy_at_start": {int(k): v for k, v in fwt_metric.accuracy_at_start.items()},
        "wall_s": wall,
    }
    if name == "d2l":
        plugin = strategy.d2l_plugin
        out["dream_phases"] = [
            {
                "experience": h["experience"],
                "heads": h["heads"],
                "steps": h.get("steps"),
                "optim_seconds": h.get("optim_seconds"),
                "generate_seconds": h.get("generate_seconds"),
                "stop_reasons": sorted({s["reason"] for s in h.get("stop", {}).values()}),
                "final_target_prob": h.get("final_target_prob"),
                "final_seen_mass": h.get("final_seen_mass"),
            }
            for h in plugin.history
        ]
        out["assignments"] = plugin.assignments
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--mem-size", type=int, default=100)
    p.add_argument("--dreamer", default="offline", help="'offline' or a Dreamer directory / hub id")
    p.add_argument(
        "--dream-config",
        type=Path,
        default=None,
        help="DreamConfig JSON (default: split_digits_dream_config())",
    )
    p.add_argument("--n-dreams", type=int, default=8, help="dream classes in the throughput test")
    p.add_argument("--quick", action="store_true", help="tiny settings (smoke test)")
    p.add_argument("--skip-compare", action="store_true", help="only the throughput test")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--name", default="bench_d2l", help="output file stem")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    dreamer, source = resolve_dreamer(args.dreamer, image_size=16)
    config = (
        DreamConfig.from_json(args.dream_config)
        if args.dream_config
        else split_digits_dream_config(quick=args.quick, seed=args.seed)
    )
    config.seed = args.seed
    config.progress = False
    epochs = 1 if args.quick else args.epochs

    results: dict = {
        "config": {
            "seed": args.seed,
            "epochs": epochs,
            "mem_size": args.mem_size,
            "dreamer": args.dreamer,
            "dreamer_config": dreamer.config.to_dict(),
            "dream": config.to_dict(),
            "benchmark": "split_digits(5x2, 16px)",
            "model": "small_cnn",
            "optimizer": "Adam(1e-3)",
            "train_mb_size": 32,
        },
        "device": f"cpu ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads)",
        "torch": torch.__version__,
    }
    print("dreaming throughput ...", flush=True)
    results["dreaming"] = bench_dreaming(dreamer, config, seed=args.seed, n_dreams=args.n_dreams)
    print(json.dumps(results["dreaming"], indent=2), flush=True)
    if not args.skip_compare:
        runs = []
        for name in ("replay", "d2l"):
            print(f"{name} ...", flush=True)
            runs.append(
                run_one(
                    name,
                    seed=args.seed,
                    epochs=epochs,
                    mem_size=args.mem_size,
                    dreamer=dreamer,
                    config=config,
                    progress=True,
                )
            )
        results["runs"] = runs
        rep = runs[0]["wall_s"]
        results["d2l_over_replay_wall"] = runs[1]["wall_s"] / max(rep, 1e-9)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(results, indent=2))
    (args.out / f"{args.name}.md").write_text(to_markdown(results))
    print(to_markdown(results))
    return 0


def to_markdown(r: dict) -> str:
    d = r["dreaming"]
    lines = [
        "# D2L benchmark (CPU)",
        "",
        f"Device: {r['device']}, torch {r['torch']}. Seed {r['config']['seed']}. "
        f"Dreamer: `{r['config']['dreamer']}`.",
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
            f"## D2L vs Replay on split_digits (buffer {r['config']['mem_size']}, "
            f"{r['config']['epochs']} epochs)",
            "",
            "| strategy | final accuracy | forward transfer | wall time (s) |",
            "|---|---|---|---|",
        ]
        for run in r["runs"]:
            fwt = run["forward_transfer"]
            lines.append(
                f"| {run['strategy']} | {run['final_accuracy']:.3f} | "
                f"{fwt:+.3f} | {run['wall_s']:.1f} |"
            )
        lines += ["", f"D2L wall time / Replay wall time: {r['d2l_over_replay_wall']:.1f}x"]
    lines += ["", "Exact settings: the `config` entry of the JSON file next to this one.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
