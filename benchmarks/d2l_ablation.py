"""D2L ablation on an offline stream: the sleep phase, dream-only heads and the dream weight.

Each variant is the registry's ``d2l`` (same model, optimiser, epochs, buffer and seeds as
``avalanche-d2l compare``) with some settings changed:

* ``default``: one head per class, one sleep epoch on the dreams after each dreaming phase,
  ``dream_weight=1`` (what ``avalanche-d2l compare`` runs);
* ``no_sleep``: dreams only mixed into the next experience's minibatches (no sleep phase);
* ``extra5``: the default plus 5 dream-only heads;
* ``extra5_no_sleep_w05``: 5 dream-only heads, no sleep, ``dream_weight=0.5`` (the settings
  before the sleep phase existed);
* ``coherence``: the default plus the BatchNorm-statistics coherence term (``w_coherence=0.1``).

Writes ``<out>/<benchmark>/{results.json,results.md}`` (one row per variant, mean over seeds)::

    python benchmarks/d2l_ablation.py --benchmark split_color_digits --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from avalanche_d2l import registry  # noqa: E402
from avalanche_d2l.cli import BENCHMARKS, atomic_write, mean_std, run_compare  # noqa: E402
from avalanche_d2l.strategies import d2l  # noqa: E402

#: variant -> (dream-only heads, DreamConfig changes)
VARIANTS: dict[str, tuple[int, dict]] = {
    "default": (0, {}),
    "no_sleep": (0, {"sleep_epochs": 0}),
    "extra5": (5, {}),
    "extra5_no_sleep_w05": (5, {"sleep_epochs": 0, "dream_weight": 0.5}),
    "coherence": (0, {"w_coherence": 0.1}),
}


def _factory(n_extra_heads: int, changes: dict):
    def build(**kw):
        strategy = d2l.build_d2l(n_extra_heads=n_extra_heads, **kw)
        plugin = strategy.d2l_plugin
        plugin.config = dataclasses.replace(plugin.config, **changes)
        return strategy

    return build


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--benchmark", default="split_digits", choices=sorted(BENCHMARKS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/d2l_ablation"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out) / args.benchmark
    rows = []
    for variant in args.variants:
        n_extra, changes = VARIANTS[variant]
        name = f"d2l_{variant}"
        registry.register_strategy(name, _factory(n_extra, changes), overwrite=True)
        res = run_compare(args.benchmark, [name], args.seeds, out / name,
                          progress=not args.no_progress)
        runs = res["runs"]
        keys = ("final_accuracy", "avg_incremental_accuracy", "forward_transfer", "wall_s")
        rows.append({
            "variant": variant,
            "n_extra_heads": n_extra,
            "changes": changes,
            "runs": runs,
            **{k: statistics.fmean(r[k] for r in runs) for k in keys},
            "final_accuracy_std": mean_std([r["final_accuracy"] for r in runs])[1],
            "forward_transfer_per_seed": [r["forward_transfer"] for r in runs],
        })
        atomic_write(out / "results.json", json.dumps(rows, indent=1))
    lines = [
        f"D2L variants on `{args.benchmark}`, seeds {args.seeds}, buffer 100, 10 epochs. "
        "Mean over seeds (final accuracy ± std; FWT per seed in brackets).",
        "",
        "| variant | extra heads | changes | final acc. | avg. incr. acc. | FWT | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per_seed = ", ".join(f"{v:+.3f}" for v in r["forward_transfer_per_seed"])
        changed = ", ".join(f"{k}={v}" for k, v in r["changes"].items()) or "-"
        lines.append(
            f"| {r['variant']} | {r['n_extra_heads']} | {changed} | "
            f"{r['final_accuracy']:.3f} ± {r['final_accuracy_std']:.3f} | "
            f"{r['avg_incremental_accuracy']:.3f} | {r['forward_transfer']:+.3f} [{per_seed}] | "
            f"{r['wall_s']:.0f} |"
        )
    atomic_write(out / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
