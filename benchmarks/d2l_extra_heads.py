"""D2L on split_digits: how many dream-only heads (``n_extra_heads``) to add.

More free heads host more dreams, so a new class more often finds a head whose dream resembles it
(forward transfer); the dream heads also compete with the real ones during training (final
accuracy). Runs D2L with the command line's machinery (same model, optimiser, epochs, buffer and
seeds as ``avalanche-d2l compare``) for each setting and writes
``benchmarks/results/d2l_extra_heads/{results.json,results.md}``.

    python benchmarks/d2l_extra_heads.py --extra-heads 0 5 10 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from avalanche_d2l import registry  # noqa: E402
from avalanche_d2l.cli import atomic_write, run_compare  # noqa: E402
from avalanche_d2l.strategies import d2l  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--extra-heads", type=int, nargs="+", default=[0, 5, 10])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/d2l_extra_heads"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    rows = []
    for n in args.extra_heads:
        name = f"d2l_extra{n}"
        registry.register_strategy(name, partial(d2l.build_d2l, n_extra_heads=n), overwrite=True)
        res = run_compare("split_digits", [name], args.seeds, out / name,
                          progress=not args.no_progress)
        runs = res["runs"]
        rows.append({
            "n_extra_heads": n,
            "runs": runs,
            **{key: statistics.fmean(r[key] for r in runs)
               for key in ("final_accuracy", "avg_incremental_accuracy", "forward_transfer",
                           "wall_s")},
        })
    atomic_write(out / "results.json", json.dumps(rows, indent=1))
    lines = [
        f"D2L on split_digits, seeds {args.seeds}, buffer 100, 10 epochs. Mean over seeds.",
        "",
        "| extra dream heads | final acc. | avg. incr. acc. | FWT | wall s |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['n_extra_heads']} | {r['final_accuracy']:.3f} | "
                     f"{r['avg_incremental_accuracy']:.3f} | {r['forward_transfer']:+.3f} | "
                     f"{r['wall_s']:.0f} |")
    atomic_write(out / "results.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
