"""Genifer with default arguments on streams and a user model it was not tuned on.

A plain user CNN (three conv blocks with batch norm, global average pooling, a linear head; not
the package's ``small_cnn``) whose feature layer is its last conv map (``block3``) or the pooled
vector (``pool``), trained with Adam 1e-3 for ``--epochs`` epochs per experience. Per stream:
Genifer through its public constructor with ``GeniferConfig()`` (only ``seed`` and ``progress``
set), LwF and Replay(200) as references; per GAN phase the replay's fidelity, the steps it took.

Writes ``benchmarks/results/genifer_fidelity/results.json`` and ``results.md``::

    python benchmarks/genifer_fidelity.py --streams split_digits split_digits_28 \\
        split_color_digits --layers block3 pool --seeds 0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training import LwF, Naive, Replay
from avalanche.training.plugins import EvaluationPlugin
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from user_streams import rgb_shapes  # noqa: E402  (this folder is on sys.path as a script)

from avalanche_d2l.core.allocator import reuse_freed_memory  # noqa: E402
from avalanche_d2l.experiments.report import atomic_write  # noqa: E402
from avalanche_d2l.genifer.fidelity import classifier_accuracy  # noqa: E402
from avalanche_d2l.scenarios import split_color_digits, split_digits  # noqa: E402
from avalanche_d2l.strategies import Genifer, GeniferConfig  # noqa: E402
from avalanche_d2l.utils import seed_everything  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "genifer_fidelity"
STREAMS = {
    "split_digits": lambda seed: split_digits(seed=seed),
    "split_digits_28": lambda seed: split_digits(image_size=28, seed=seed),
    "split_color_digits": lambda seed: split_color_digits(seed=seed),
    # held out: built as a user builds a stream, added after every default was chosen
    "rgb_shapes_24": lambda seed: rgb_shapes(seed=seed, size=24),
}


class UserCNN(nn.Module):
    """Three conv blocks (conv, batch norm, ReLU; max-pool after the first two), global average
    pooling (``pool``), a linear head."""

    def __init__(self, channels: int, n_classes: int = 10, width: int = 32):
        super().__init__()

        def block(cin: int, cout: int, pool: bool) -> nn.Sequential:
            layers = [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
            return nn.Sequential(*layers, *([nn.MaxPool2d(2)] if pool else []))

        self.block1 = block(channels, width, True)
        self.block2 = block(width, 2 * width, True)
        self.block3 = block(2 * width, 2 * width, False)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.block3(self.block2(self.block1(x)))))


def user_setup(bench, seed: int, epochs: int) -> tuple[nn.Module, torch.optim.Optimizer, dict]:
    """The user CNN for ``bench`` (seeded), its Adam optimiser and the strategies' common
    arguments (also used by ``genifer_forgetting.py``)."""
    seed_everything(seed)
    model = UserCNN(bench.train_stream[0].dataset[0][0].shape[0], bench.n_classes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    common = {
        "criterion": nn.CrossEntropyLoss(),
        "train_mb_size": 32,
        "train_epochs": epochs,
        "eval_mb_size": 256,
        "evaluator": EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loggers=[]),
    }
    return model, opt, common


def genifer_config(config: dict, seed: int) -> GeniferConfig:
    """Default arguments with the variant's ``config`` changes, seeded, no progress bars."""
    return GeniferConfig.from_dict({**config, "seed": seed, "progress": False})


def _run(name: str, stream: str, layer: str, seed: int, epochs: int, config: dict) -> dict:
    bench = STREAMS[stream](seed)
    model, opt, common = user_setup(bench, seed, epochs)
    if name == "genifer":
        cfg = genifer_config(config, seed)
        strategy = Genifer(model=model, optimizer=opt, feature_layer=layer, config=cfg, **common)
    elif name == "lwf":
        strategy = LwF(model=model, optimizer=opt, alpha=1.0, temperature=2.0, **common)
    elif name == "replay":
        strategy = Replay(model=model, optimizer=opt, mem_size=200, **common)
    else:
        strategy = Naive(model=model, optimizer=opt, **common)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for exp in bench.train_stream:
            strategy.train(exp)
    wall = time.perf_counter() - t0
    res = strategy.eval(bench.test_stream)
    record = {
        "strategy": name,
        "stream": stream,
        "layer": layer if name == "genifer" else None,
        "seed": seed,
        "epochs": epochs,
        "final_accuracy": float(res["Top1_Acc_Stream/eval_phase/test_stream/Task000"]),
        "wall_s": wall,
    }
    record["final_per_class"] = _per_class_accuracy(strategy, bench)
    if name == "genifer":
        record["phases"] = strategy.genifer.fidelity_results()
        record["config"] = cfg.to_dict()
        record["warnings"] = [str(w.message) for w in caught if "Genifer" in str(w.message)]
    return record


def _per_class_accuracy(strategy, bench) -> dict[str, float]:
    """Final accuracy of each class on the test stream (Genifer's logits masked as in its
    evaluation): which classes a run lost."""
    model = strategy.model.eval()
    mask = getattr(getattr(strategy, "genifer", None), "mask_logits", lambda z: z)
    batches = [
        (x, torch.as_tensor(y))
        for exp in bench.test_stream
        for x, y, *_ in torch.utils.data.DataLoader(exp.dataset, batch_size=256)
    ]
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    acc = classifier_accuracy(lambda z: mask(model(z)), x, y, range(bench.n_classes))
    return {str(c): a for c, a in sorted(acc.items())}


def phase_steps(record: dict) -> str:
    """The GAN steps of each phase of a run record, ``"150 / 200 / ..."`` (``-`` without phases)."""
    return " / ".join(str(p["steps"]) for p in record.get("phases") or []) or "-"


def phase_column(record: dict, key: str) -> str:
    """A fidelity figure of each phase of a run record, ``"0.75 / 0.92 / ..."``."""
    fid = [p.get("fidelity") or {} for p in record.get("phases") or []]
    return " / ".join(f"{f.get(key, float('nan')):.2f}" for f in fid) or "-"


def _markdown(records: list[dict]) -> str:
    lines = [
        "# Genifer with default arguments on a user CNN",
        "",
        "| stream | strategy | layer | seed | final acc | wall s | GAN steps per phase | "
        "probe min per phase | classifier-on-replay | diversity | separability |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        cols = [phase_column(r, k) for k in ("probe_min", "classifier_mean", "diversity_mean")]
        lines.append(
            f"| {r['stream']} | {r['strategy']} | {r['layer'] or '-'} | {r['seed']} | "
            f"{r['final_accuracy']:.3f} | {r['wall_s']:.0f} | {phase_steps(r)} | "
            + " | ".join(cols)
            + f" | {phase_column(r, 'separability')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--streams", nargs="+", default=list(STREAMS), choices=list(STREAMS))
    p.add_argument("--layers", nargs="+", default=["block3", "pool"])
    p.add_argument("--strategies", nargs="+", default=["genifer", "lwf", "replay"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--config", default="{}", help="JSON GeniferConfig overrides (a variant)")
    p.add_argument("--tag", default="default", help="results file suffix")
    p.add_argument(
        "--malloc",
        choices=("default", "reuse"),
        default="default",
        help="default: glibc's own settings, as in a user's script (the default); reuse: keep "
        "freed memory, as the avalanche-d2l command does",
    )
    args = p.parse_args(argv)
    allocator = reuse_freed_memory() if args.malloc == "reuse" else {"allocator": "glibc defaults"}
    torch.set_num_threads(1)
    path = OUT / f"results_{args.tag}.json"
    records = json.loads(path.read_text())["runs"] if path.exists() else []
    config = json.loads(args.config)

    def key(name: str, stream: str, layer: str | None, seed: int, epochs, cfg) -> tuple:
        """What made a run: a Genifer run is redone when its resolved config changes (a new
        default, other overrides), not only when its stream, layer, seed or epochs do."""
        return (name, stream, layer, seed, epochs, json.dumps(cfg, sort_keys=True))

    done = {
        key(r["strategy"], r["stream"], r["layer"], r["seed"], r["epochs"], r.get("config"))
        for r in records
    }
    for stream in args.streams:
        for seed in args.seeds:
            for name in args.strategies:
                for layer in args.layers if name == "genifer" else [None]:
                    resolved = (
                        GeniferConfig.from_dict(
                            {**config, "seed": seed, "progress": False}
                        ).to_dict()
                        if name == "genifer"
                        else None
                    )
                    if key(name, stream, layer, seed, args.epochs, resolved) in done:
                        continue
                    # a run made otherwise (an earlier default) is replaced, not kept beside it
                    records = [
                        r
                        for r in records
                        if (r["strategy"], r["stream"], r["layer"], r["seed"])
                        != (name, stream, layer, seed)
                    ]
                    rec = _run(name, stream, layer or "block3", seed, args.epochs, config)
                    records.append(rec)
                    print(json.dumps({k: v for k, v in rec.items() if k != "config"})[:2000])
                    payload = {"config_overrides": config, "allocator": allocator, "runs": records}
                    atomic_write(path, json.dumps(payload, indent=1))
                    atomic_write(path.with_suffix(".md"), _markdown(records))


if __name__ == "__main__":
    main()
