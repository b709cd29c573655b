"""One lever of D2L's defaults at a time: ``d2l`` (ER + D2L) with one ``DreamConfig`` change.

Each lever is a registered strategy ``d2l_lever_<name>`` (the package's ``d2l`` with one section)
run by the package's experiment runner on the shipped offline experiment of ``split_digits``
(same model, optimiser, epochs, buffer as ``d2l_ablation.py``) into
``benchmarks/results/d2l_ablation/levers/<cell>/<levers>_seeds<seeds>/`` (finished runs with
unchanged settings are reused). ``--table`` writes ``levers_<cell>.md`` from every record:
lab-protocol final accuracy and FWT, the accuracy on each new experience right after its
training and sleep (lab, masked), and the wall time::

    python benchmarks/d2l_levers.py --levers sleep0 seen0 --seeds 0
    python benchmarks/d2l_levers.py --table
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from d2l_ablation import RESULTS, metrics  # noqa: E402

from avalanche_d2l import registry  # noqa: E402
from avalanche_d2l.experiments import default_experiment, run_experiment  # noqa: E402
from avalanche_d2l.experiments.report import atomic_write  # noqa: E402

OUT = RESULTS / "levers"
#: lever -> its ``dream`` section (one change from the default, or a named combination)
LEVERS: dict[str, dict] = {
    "default": {},
    "choice8": {"invert_choice_images": 8},
    "sleep0": {"sleep_epochs": 0},
    "sleep_experience": {"sleep_data": "experience"},
    "seen0": {"seen_mass": 0.0},
    "seen0.2": {"seen_mass": 0.2},
    "strength0.8": {"strength": 0.8},
    "strength0.9": {"strength": 0.9},
    "strength0.4": {"strength": 0.4},
    "weight0.3": {"dream_weight": 0.3},
    "train_weight0.3": {"train_dream_weight": 0.3},
    "distinct2": {"w_distinct": 2.0, "distinct_margin": 0.2},
    "coherence0.2": {"w_coherence": 0.2},
    "samples32": {"samples_per_class": 32},
    # on top of the no-sleep default (the levers above were run on the former sleep default)
    "ns_weight0.3": {"dream_weight": 0.3},
    "ns_seen0": {"seen_mass": 0.0},
}


def register(lever: str, section: dict) -> str:
    name = f"d2l_lever_{lever}"
    info = registry.get_strategy("d2l")
    registry.register_strategy(
        name,
        info.factory,
        config=info.config_type,
        keeps_buffer=info.keeps_buffer,
        overwrite=True,
        description=f"ER + D2L, dream {section}",
    )
    return name


def run(levers: list[str], seeds: list[int], cell: str, sections: dict[str, dict]) -> None:
    exp = default_experiment(cell)
    names = {register(lv, sections[lv]): {"dream": sections[lv]} for lv in levers}
    exp = type(exp).from_dict({**exp.to_dict(), "strategies": names, "seeds": seeds}, name=exp.name)
    # one output folder per lever set and seeds: two can run at once (each folder is locked)
    folder = "+".join(levers) + "_seeds" + "-".join(map(str, seeds))
    run_experiment(exp, out=OUT / cell / folder, seeds=seeds, progress=False, jobs=1)


def table(cell: str) -> str:
    rows = [
        f"# D2L levers on `{cell}` (ER + D2L, one `DreamConfig` change each)",
        "",
        "Lab protocol (argmax over all output units; final = mean of per-experience accuracies). "
        "*Right after*: accuracy on experience k right after its training and D2L's dreaming and "
        "sleep, mean over k = 2-5 (lab / masked). Wall time on a shared 2-core machine (other "
        "agents' processes ran beside it): indicative only. Command: `python "
        "benchmarks/d2l_levers.py --levers NAME --seeds S`, then `--table`.",
        "",
        "| lever | dream section | seed | lab final | lab FWT | right after: lab / masked | "
        "wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for path in sorted((OUT / cell).glob("**/runs/*.json")):
        r = json.loads(path.read_text())
        if "lab_accuracy_matrix" not in r:
            continue
        m = metrics({**r, "strategy": "d2l"})
        lab, masked = r["lab_accuracy_matrix"], r["accuracy_matrix"]
        ks = range(1, len(lab))
        after = (
            statistics.fmean(lab[k][k] for k in ks),
            statistics.fmean(masked[k][k] for k in ks),
        )
        lever = r["strategy"][len("d2l_lever_") :]
        changed = {k: v for part in lever.split("+") for k, v in LEVERS.get(part, {}).items()}
        rows.append(
            f"| {lever} | `{json.dumps(changed)}` | {r['seed']} | "
            f"{m['lab_final']:.3f} | {m['lab_fwt']:+.3f} | {after[0]:.3f} / {after[1]:.3f} | "
            f"{r['wall_s']:.0f} |"
        )
    return "\n".join(rows) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--levers", nargs="+", default=[], choices=list(LEVERS))
    p.add_argument(
        "--combine", nargs="+", default=[], choices=list(LEVERS), help="one run of them all"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--cell", default="split_digits")
    p.add_argument("--table", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    sections = dict(LEVERS)
    levers = list(args.levers)
    if args.combine:
        name = "+".join(args.combine)
        sections[name] = {k: v for lv in args.combine for k, v in LEVERS[lv].items()}
        levers.append(name)
    if levers:
        run(levers, args.seeds, args.cell, sections)
    if args.table or levers:
        md = table(args.cell)
        atomic_write(OUT / cell_md(args.cell), md)
        print(md)
    return 0


def cell_md(cell: str) -> str:
    return f"levers_{cell}.md"


if __name__ == "__main__":
    raise SystemExit(main())
