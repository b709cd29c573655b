"""D2L controls on an offline stream: where the dreams come from, and the rehearsal host.

Each variant is a registered D2L strategy run by the package's experiment runner
(:func:`avalanche_d2l.experiments.run_experiment`) on the shipped offline experiment of the
benchmark (same model, optimiser, epochs, buffer and seeds as ``avalanche-d2l compare``), with
one :class:`~avalanche_d2l.strategies.d2l.D2LConfig` change:

* ``replay``: the host alone (no dreams) -- the reference;
* ``d2l_optimised``: prompts optimised by the learner through the frozen dreamer (the paper's
  mechanism) with the preset's objective: the dreams are driven to a probability mass of 0.8 on
  the seen classes (``DreamConfig.seen_mass``: at the boundary of what the learner knows) and run
  to the step cap;
* ``d2l_optimised_away``: the same with the objective before these measurements: the dreams are
  pushed *off* the seen classes (``seen_mass=0``) and stop once the learner recognises them;
* ``d2l_random``: prompts drawn as the optimisation would start, never optimised;
* ``d2l_noise``: uniform noise images instead of the dreamer;
* ``d2l_boundary_m05`` / ``d2l_boundary_m05_s5`` / ``d2l_optimised_w05``: the objective search
  (seen mass 0.5; 0.5 with 5 steps; 0.8 with half the dream weight in training);
* ``*_sleep_only``: each host's D2L with the dreams learned in the sleep phase only
  (``train_dream_weight=0``), not during the training of the next experience;
* ``er_ace`` / ``er_ace_d2l``, ``der`` / ``der_d2l``: the other hosts with and without D2L.

Writes ``<out>/<benchmark>/{results.json,results.md}`` (means over seeds; the runner's own
``results.json`` per variant set lives under ``<out>/<benchmark>/runs``)::

    python benchmarks/d2l_ablation.py --benchmark split_digits --seeds 0 1 2
    python benchmarks/d2l_ablation.py --benchmark split_digits --seeds 3 4 5 \\
        --out benchmarks/results/d2l_heldout_seeds
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from avalanche.core import SupervisedPlugin

from avalanche_d2l import registry
from avalanche_d2l.experiments import default_experiment, run_experiment
from avalanche_d2l.experiments.report import atomic_write
from avalanche_d2l.strategies.d2l import D2LConfig

ROOT = Path(__file__).resolve().parents[1]

#: variant -> (registered strategy it runs, its D2LConfig section); None: a registry baseline
VARIANTS: dict[str, tuple[str, dict | None]] = {
    "replay": ("replay", None),
    "d2l_optimised": ("d2l", {"dreams": "optimised"}),
    "d2l_optimised_away": (
        "d2l",
        {"dreams": "optimised", "dream": {"seen_mass": 0.0, "oracle_threshold": 0.9}},
    ),
    "d2l_random": ("d2l", {"dreams": "random"}),
    "d2l_noise": ("d2l", {"dreams": "noise"}),
    "d2l_boundary_m05": ("d2l", {"dreams": "optimised", "dream": {"seen_mass": 0.5}}),
    "d2l_boundary_m05_s5": (
        "d2l",
        {"dreams": "optimised", "dream": {"seen_mass": 0.5, "steps": 5}},
    ),
    "d2l_optimised_w05": ("d2l", {"dreams": "optimised", "dream": {"dream_weight": 0.5}}),
    "d2l_sleep_only": ("d2l", {"dream": {"train_dream_weight": 0.0}}),
    "er_ace_d2l_sleep_only": ("er_ace_d2l", {"dream": {"train_dream_weight": 0.0}}),
    "der_d2l_sleep_only": ("der_d2l", {"dream": {"train_dream_weight": 0.0}}),
    "er_ace": ("er_ace", None),
    "er_ace_d2l": ("er_ace_d2l", {}),
    "der": ("der", None),
    "der_d2l": ("der_d2l", {}),
}
DEFAULT_VARIANTS = [
    "replay",
    "d2l_random",
    "d2l_optimised",
    "d2l_optimised_away",
    "d2l_noise",
    "er_ace",
    "er_ace_d2l",
    "der",
    "der_d2l",
]
KEYS = ("final_accuracy", "avg_incremental_accuracy", "forward_transfer", "wall_s")


def _register(variant: str) -> str:
    """The registry name the variant runs under (D2L variants get their own name)."""
    base, section = VARIANTS[variant]
    if section is None or variant == base:
        return base
    registry.register_strategy(
        variant,
        registry.get_strategy(base).factory,
        config=D2LConfig,
        keeps_buffer=True,
        overwrite=True,
        description=f"D2L control {variant} (on {base})",
    )
    return variant


def _merge(path: Path, rows: list[dict], variants: list[str]) -> list[dict]:
    """Rows of an earlier call (other variants) kept, in ``VARIANTS`` order."""
    old = json.loads(path.read_text()) if path.is_file() else []
    kept = [r for r in old if r.get("variant") not in variants and r.get("variant") in VARIANTS]
    order = list(VARIANTS)
    return sorted(kept + rows, key=lambda r: order.index(r["variant"]))


def to_markdown(rows: list[dict], benchmark: str, seeds: list[int], mem_size: int) -> str:
    lines = [
        f"D2L controls on `{benchmark}`, seeds {seeds}, buffer {mem_size}, "
        f"command `python benchmarks/d2l_ablation.py --benchmark {benchmark} --seeds "
        f"{' '.join(map(str, seeds))} --variants {' '.join(r['variant'] for r in rows)}`"
        " (finished runs are reused). Mean over seeds (final accuracy ± sample std; "
        "FWT per seed in brackets).",
        "",
        "| variant | changes | final acc. | avg. incr. acc. | FWT | wall s | x host |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per_seed = ", ".join(f"{v:+.3f}" for v in r["forward_transfer_per_seed"])
        changed = json.dumps(r["changes"]) if r["changes"] else "-"
        ratio = f"{r['wall_over_host']:.1f}" if r.get("wall_over_host") else "-"
        lines.append(
            f"| {r['variant']} | {changed} | {r['final_accuracy']:.3f} ± "
            f"{r['final_accuracy_std']:.3f} | {r['avg_incremental_accuracy']:.3f} | "
            f"{r['forward_transfer']:+.3f} [{per_seed}] | {r['wall_s']:.0f} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


#: the four cells of the summary: (benchmark, results folder, seeds)
CELLS = (
    ("split_digits", "d2l_ablation", "0-2"),
    ("split_color_digits", "d2l_ablation", "0-2"),
    ("split_digits", "d2l_heldout_seeds", "3-5 (held out)"),
    ("split_color_digits", "d2l_heldout_seeds", "3-5 (held out)"),
)
HOSTS = {"d2l": "replay", "er_ace_d2l": "er_ace", "der_d2l": "der"}


def summarise(results_root: Path) -> str:
    """``summary.md``: every variant's final accuracy and FWT in each cell (stream x seed set)
    and their mean over the cells it ran in, with each D2L host's gain over its host per cell;
    read from the cells' ``results.json``."""
    cells = []
    for bench, folder, seeds in CELLS:
        path = results_root / folder / bench / "results.json"
        rows = {r["variant"]: r for r in json.loads(path.read_text())} if path.is_file() else {}
        cells.append((f"{bench} {seeds}", rows))
    names = [v for v in VARIANTS if any(v in rows for _, rows in cells)]
    head = " | ".join(label for label, _ in cells)
    lines = [
        "# D2L: hosts with and without D2L, and the dream controls (four cells)",
        "",
        "Final accuracy / FWT, mean over 3 seeds per cell; seeds 3-5 were never used for a "
        "choice. Command: `python benchmarks/d2l_ablation.py --summarise` (after the four runs "
        "named in each cell's `results.md`). Wall time is not compared here: these runs ran two "
        "at a time beside other work; the cost in one process is `benchmarks/results/"
        "bench_d2l.md`.",
        "",
        f"| variant | {head} | mean |",
        "|---" * (len(cells) + 2) + "|",
    ]
    for v in names:
        vals, fa, fw = [], [], []
        for _, rows in cells:
            r = rows.get(v)
            if r is None:
                vals.append("-")
                continue
            vals.append(f"{r['final_accuracy']:.3f} / {r['forward_transfer']:+.3f}")
            fa.append(r["final_accuracy"])
            fw.append(r["forward_transfer"])
        mean = f"{statistics.fmean(fa):.3f} / {statistics.fmean(fw):+.3f}" if fa else "-"
        lines.append(f"| {v} | {' | '.join(vals)} | {mean} |")
    lines += ["", "Each D2L variant against its host (final accuracy difference; FWT):", ""]
    lines += [f"| variant | {head} |", "|---" * (len(cells) + 1) + "|"]
    for v in names:
        host = HOSTS.get(VARIANTS[v][0])
        if host is None:
            continue
        diffs = []
        for _, rows in cells:
            r, h = rows.get(v), rows.get(host)
            diffs.append(
                f"{r['final_accuracy'] - h['final_accuracy']:+.3f}; {r['forward_transfer']:+.3f}"
                if r and h
                else "-"
            )
        lines.append(f"| {v} vs {host} | {' | '.join(diffs)} |")
    return "\n".join(lines) + "\n"


class _WhereNewClassesLand(SupervisedPlugin):
    """Avalanche plugin for the diagnosis, placed before ``D2LPlugin``: at the start of each
    experience (before the head assignment) it records, on the experience's training samples, the
    share whose argmax over *seen + free* heads is a seen class and the mean probability mass on
    the seen classes -- new-class samples predicted as a class already learned can only score 0
    at the start, whatever the dreams did to the free heads."""

    def __init__(self):
        super().__init__()
        self.rows: dict[int, dict[str, float]] = {}

    def before_training_exp(self, strategy, **kwargs):
        import torch
        from torch.utils.data import DataLoader

        from avalanche_d2l.utils import training_mode

        model = strategy.model
        seen, free = model.seen_heads(), model.free_heads()
        if not seen or not free:
            return
        visible = torch.tensor(seen + free)
        on_seen, mass, n = 0.0, 0.0, 0
        loader = DataLoader(strategy.experience.dataset.eval(), batch_size=512)
        with torch.no_grad(), training_mode(model, False):
            for batch in loader:
                p = model.forward_heads(batch[0])[:, visible].softmax(1)
                on_seen += float((p.argmax(1) < len(seen)).sum())
                mass += float(p[:, : len(seen)].sum())
                n += p.shape[0]
        k = int(strategy.experience.current_experience)
        self.rows[k] = {"argmax_on_seen": on_seen / n, "mass_on_seen": mass / n}


def diagnose(benchmark: str, seed: int, out: Path, variant: str = "d2l_optimised") -> str:
    """One D2L run of ``variant`` (the experiment's settings) with the dreaming history of every
    phase: the learner's mean target probability per prompt step, the oracle's stop reasons and
    steps, the first/last value of each loss term, and where the next experience's samples land
    before its head assignment; written to ``out/diagnosis_<variant>.md``."""
    import collections

    import torch

    from avalanche_d2l.evaluation import make_evaluator
    from avalanche_d2l.models.classifiers import small_cnn
    from avalanche_d2l.registry import RunConfig, build_strategy
    from avalanche_d2l.scenarios import split_color_digits, split_digits
    from avalanche_d2l.utils import seed_everything

    base, section = VARIANTS[variant]
    if base != "d2l":
        raise SystemExit(f"--diagnose takes a D2L variant on the ER host, got {variant!r}")
    torch.set_num_threads(1)
    make = split_digits if benchmark == "split_digits" else split_color_digits
    bench = make(n_experiences=5, image_size=16, seed=seed)
    c = bench.train_stream[0].dataset[0][0].shape[0]
    seed_everything(seed)
    model = small_cnn(10, c)
    run = RunConfig(benchmark=benchmark, epochs=10, mem_size=100, seed=seed, progress=False)
    strategy = build_strategy(
        "d2l",
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), 1e-3),
        criterion=torch.nn.CrossEntropyLoss(),
        benchmark=bench,
        run=run,
        evaluator=make_evaluator(bench, interactive=False),
        device="cpu",
        config=section or {},
    )
    probe = _WhereNewClassesLand()
    strategy.plugins.insert(0, probe)  # before D2LPlugin: it must see the heads unassigned
    lines = [
        f"# D2L dreaming diagnosis: `{benchmark}`, seed {seed}, variant `{variant}`",
        "",
        f"Changes from the default: `{json.dumps(section)}`. Command: `python "
        f"benchmarks/d2l_ablation.py --diagnose {variant} --benchmark {benchmark} --seeds {seed}`.",
        "",
    ]
    for k, exp in enumerate(bench.train_stream):
        seed_everything(seed * 1000 + k)
        strategy.train(exp, eval_streams=[])
        if not strategy.d2l_plugin.history or strategy.d2l_plugin.history[-1]["experience"] != k:
            continue
        h = strategy.d2l_plugin.history[-1]
        stops = collections.Counter(v["reason"] for v in h.get("stop", {}).values())
        steps = sorted(v["step"] for v in h.get("stop", {}).values())
        tp = " ".join(f"{v:.2f}" for v in h.get("target_prob", []))
        lines += [
            f"## after experience {k}",
            "",
            f"- prompt steps {h.get('steps')}; stop reasons {dict(stops)} at steps {steps}; "
            f"initialisation {dict(collections.Counter(h.get('init', {}).values()))}",
            f"- learner's mean target probability per step: {tp}",
        ]
        for term in ("target", "seen", "distinct", "consistency", "norm"):
            v = h.get(term, [])
            if v:
                lines.append(f"- loss `{term}`: {v[0]:.3f} -> {v[-1]:.3f}")
        ft, fs = h.get("final_target_prob", {}), h.get("final_seen_mass", {})
        if ft:
            lines.append(
                f"- dream set: mean target probability {sum(ft.values()) / len(ft):.2f}, mass "
                f"on seen classes {sum(fs.values()) / len(fs):.2f}"
            )
        lines.append("")
    fwt = next(
        m for m in strategy.evaluator.metrics if type(m).__name__ == "ForwardTransferAtStart"
    )
    lines += [
        "Start of each experience (before the head assignment, on its training samples; after "
        "the assignment for the accuracy):",
        "",
        "| experience | predicted as a seen class | probability mass on seen classes | "
        "accuracy at start |",
        "|---|---|---|---|",
    ]
    for k, acc in sorted(fwt.accuracy_at_start.items()):
        r = probe.rows.get(k)
        where = f"{r['argmax_on_seen']:.2f} | {r['mass_on_seen']:.2f}" if r else "- | -"
        lines.append(f"| {k} | {where} | {acc:.3f} |")
    md = "\n".join(lines) + "\n"
    atomic_write(out / f"diagnosis_{variant}.md", md)
    return md


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--benchmark", default="split_digits", choices=["split_digits", "split_color_digits"]
    )
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/d2l_ablation"))
    parser.add_argument("--quick", action="store_true", help="tiny settings (smoke test)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (processes)")
    parser.add_argument(
        "--diagnose",
        metavar="VARIANT",
        choices=[v for v, (base, _) in VARIANTS.items() if base == "d2l"],
        help="one run of this D2L variant (first seed) with its dreaming history, then stop",
    )
    parser.add_argument(
        "--summarise",
        action="store_true",
        help="write benchmarks/results/d2l_ablation/summary.md from the four cells, then stop",
    )
    args = parser.parse_args(argv)
    if args.summarise:
        md = summarise(ROOT / "benchmarks/results")
        atomic_write(ROOT / "benchmarks/results/d2l_ablation/summary.md", md)
        print(md)
        return 0
    out = Path(args.out) / args.benchmark
    if args.diagnose:
        print(diagnose(args.benchmark, args.seeds[0], out, args.diagnose))
        return 0

    exp = default_experiment(args.benchmark)
    names = [_register(v) for v in args.variants]
    sections = {name: (VARIANTS[v][1] or {}) for v, name in zip(args.variants, names)}
    exp = type(exp).from_dict(
        {**exp.to_dict(), "strategies": sections, "seeds": args.seeds}, name=exp.name
    )
    res = run_experiment(
        exp,
        out=out / "runs",
        seeds=args.seeds,
        epochs=args.epochs,
        quick=args.quick,
        progress=not args.no_progress,
        jobs=args.jobs,
    )
    rows = []
    for v, name in zip(args.variants, names):
        runs = [r for r in res["runs"] if r["strategy"] == name]
        if not runs:
            continue
        row = {"variant": v, "strategy": VARIANTS[v][0], "changes": VARIANTS[v][1] or {}}
        for k in KEYS:
            vals = [float(r[k]) for r in runs if r.get(k) is not None]
            row[k] = statistics.fmean(vals) if vals else None
            row[f"{k}_per_seed"] = vals
        acc = row["final_accuracy_per_seed"]
        row["final_accuracy_std"] = statistics.stdev(acc) if len(acc) > 1 else 0.0
        row["seeds"] = [r["seed"] for r in runs]
        rows.append(row)
    base_wall = {r["strategy"]: r["wall_s"] for r in rows if r["changes"] == {}}
    for r in rows:
        host = HOSTS.get(r["strategy"], r["strategy"])
        if host in base_wall and r["wall_s"]:
            r["wall_over_host"] = r["wall_s"] / base_wall[host]
    rows = _merge(out / "results.json", rows, args.variants)
    atomic_write(out / "results.json", json.dumps(rows, indent=1))
    md = to_markdown(rows, args.benchmark, args.seeds, exp.mem_sizes[0])
    atomic_write(out / "results.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
