"""D2L's controls and the paper's ablations: hosts with and without D2L, and the dream controls.

Each variant is a registered strategy run by the package's experiment runner
(:func:`avalanche_d2l.experiments.run_experiment`) on the shipped offline experiment of a stream
(same model, optimiser, epochs, buffer and seeds as ``avalanche-d2l compare``), with one change
to D2L's settings (a ``DreamConfig`` field) or none:

* hosts ``replay`` (ER), ``er_ace``, ``der`` (DER++) and each with D2L at its default arguments:
  ``d2l``, ``er_ace_d2l``, ``der_d2l``;
* controls, all on the ER host (``d2l`` with one change): ``d2l_random_prompts`` (prompts never
  optimised), ``d2l_noise`` (noise images), ``d2l_unanchored`` (a prompt per free head from pure
  noise, no buffer image), ``d2l_interpolation`` (two buffer images of different classes mixed
  into a new class), ``d2l_source_labels`` (dreams labelled as their conditioning class, no head
  reuse), ``d2l_no_oracle`` (a fixed number of prompt steps) and ``d2l_rule_stop`` (a fixed stop
  rule instead of the learned oracle).

A *cell* is a stream, a model and a seed set. The stream's folder
``benchmarks/results/d2l_ablation/<cell>/`` is the runner's output folder: one record per run in
``runs/`` (metrics of both evaluation protocols per experience, and the settings that made it),
reused when run again with unchanged settings. Cells named ``*_user_cnn`` replace the preset
classifier with :class:`UserCNN`, a plain CNN of the kind a user writes (D2L was never tuned on
it); the run records name it in their strategy (``d2l@user_cnn``)::

    python benchmarks/d2l_ablation.py --cell split_digits --seeds 0 1 2 --jobs 1
    python benchmarks/d2l_ablation.py --cell split_digits_user_cnn --seeds 0 1 2 --jobs 1
    python benchmarks/d2l_ablation.py --diagnose --cell split_digits --seeds 0
    python benchmarks/d2l_ablation.py --summarise      # summary.md from every cell's records
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
from pathlib import Path

import torch
from avalanche.core import SupervisedPlugin
from torch import nn

from avalanche_d2l import registry
from avalanche_d2l.experiments import default_experiment, run_experiment
from avalanche_d2l.experiments.report import atomic_write

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "d2l_ablation"

#: variant -> (registered strategy it runs, its settings section or None for a plain host, what
#: it tests)
VARIANTS: dict[str, tuple[str, dict | None, str]] = {
    "replay": ("replay", None, "host: ER"),
    "d2l": ("d2l", {}, "ER + D2L, default arguments"),
    "er_ace": ("er_ace", None, "host: ER-ACE"),
    "er_ace_d2l": ("er_ace_d2l", {}, "ER-ACE + D2L, default arguments"),
    "der": ("der", None, "host: DER++"),
    "der_d2l": ("der_d2l", {}, "DER++ + D2L, default arguments"),
    "d2l_random_prompts": ("d2l", {"dream": {"prompts": "random"}}, "prompts never optimised"),
    "d2l_noise": ("d2l", {"dream": {"source": "noise"}}, "noise images instead of dreams"),
    "d2l_unanchored": (
        "d2l",
        {"dream": {"source": "unanchored"}},
        "a prompt per free head from pure noise (no buffer image)",
    ),
    "d2l_interpolation": (
        "d2l",
        {"dream": {"source": "interpolation"}},
        "two buffer images of different classes mixed into a new class",
    ),
    "d2l_source_labels": (
        "d2l",
        {"dream": {"labels": "source_class"}},
        "dreams labelled as their conditioning class, no head reuse",
    ),
    "d2l_no_oracle": ("d2l", {"dream": {"stop": "fixed"}}, "fixed prompt steps, no oracle"),
    "d2l_rule_stop": ("d2l", {"dream": {"stop": "rule"}}, "a stop rule instead of the oracle"),
}
HOSTS = {"d2l": "replay", "er_ace_d2l": "er_ace", "der_d2l": "der"}
CONTROLS = [v for v in VARIANTS if v.startswith("d2l_")]


class UserCNN(nn.Module):
    """A plain CNN as a user writes it, not one of the package's models: three conv blocks with
    batch norm (16, 32, 64 channels; the first two halve the image), global average pooling
    (``pool``, the feature layer D2L is given) and a linear head."""

    def __init__(self, channels: int, n_classes: int):
        super().__init__()
        layers, c = [], channels
        for i, width in enumerate((16, 32, 64)):
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
            if i < 2:
                layers.append(nn.MaxPool2d(2))
            c = width
        self.body = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(c, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.body(x)))


def _on_user_cnn(base: str, *, model, optimizer, benchmark, run, **kwargs):
    """Registry factory: strategy ``base`` built on a fresh :class:`UserCNN` in place of the
    experiment's model, with an optimiser of the same kind and settings (seeded like the model it
    replaces: :func:`build_run` seeded the run just before)."""
    channels = registry.benchmark_image_shape(benchmark)[0]
    net = UserCNN(channels, int(benchmark.n_classes))
    opt = type(optimizer)(net.parameters(), **optimizer.defaults)
    run = dataclasses.replace(run, feature_layer="pool")
    return registry.get_strategy(base).factory(
        model=net, optimizer=opt, benchmark=benchmark, run=run, **kwargs
    )


@dataclasses.dataclass(frozen=True)
class Cell:
    """A stream (shipped experiment) and a model; the seed set is chosen per call."""

    benchmark: str
    user_cnn: bool = False

    @property
    def name(self) -> str:
        return self.benchmark + ("_user_cnn" if self.user_cnn else "")

    @property
    def model(self) -> str:
        return "UserCNN" if self.user_cnn else "preset (small_cnn)"


CELLS = {
    c.name: c for b in ("split_digits", "split_color_digits") for c in (Cell(b), Cell(b, True))
}
SEED_SETS = {"0-2": (0, 1, 2), "3-5": (3, 4, 5), "0": (0,)}
#: the cells of the issue's targets: both offline streams x seeds 0-2 and held-out 3-5
TARGET_CELLS = [(c, s) for s in ("0-2", "3-5") for c in ("split_digits", "split_color_digits")]
#: where a target falls back to when no target cell has both variants (indicative only)
FALLBACK_CELL = ("split_digits", "0")


def register(variant: str, cell: Cell) -> str:
    """The registry name ``variant`` runs under in ``cell`` (registered here when it is not the
    package's own strategy with its default settings)."""
    base, section, what = VARIANTS[variant]
    if variant == base and not cell.user_cnn:
        return base
    name = variant + ("@user_cnn" if cell.user_cnn else "")
    info = registry.get_strategy(base)
    factory = functools.partial(_on_user_cnn, base) if cell.user_cnn else info.factory
    registry.register_strategy(
        name,
        factory,
        config=info.config_type,
        keeps_buffer=info.keeps_buffer,
        overwrite=True,
        description=f"{what} ({base}{' on UserCNN' if cell.user_cnn else ''})",
    )
    return name


def run_cell(cell: Cell, variants: list[str], seeds: list[int], root=RESULTS, **options) -> dict:
    """Every variant x seed of ``cell`` through the runner into ``root/<cell>`` (finished runs
    are reused)."""
    exp = default_experiment(cell.benchmark)
    names = [register(v, cell) for v in variants]
    sections = {n: VARIANTS[v][1] or {} for v, n in zip(variants, names)}
    exp = type(exp).from_dict(
        {**exp.to_dict(), "strategies": sections, "seeds": seeds}, name=exp.name
    )
    return run_experiment(exp, out=Path(root) / cell.name, seeds=seeds, **options)


# ------------------------------------------------------------------------------------------------
# both protocols from a run record


def variant_of(record: dict) -> str:
    return record["strategy"].split("@")[0]


def metrics(record: dict) -> dict[str, float]:
    """Final accuracy and forward transfer of one run under the lab protocol (argmax over all
    output units, dream heads included; final accuracy the mean of per-experience accuracies)
    and the masked one (the model's class-space output; final accuracy over all seen samples)."""
    out = {
        "masked_final": record["final_accuracy"],
        "masked_fwt": record["forward_transfer"],
        "wall_s": record["wall_s"],
    }
    if "lab_final_accuracy" in record:
        out["lab_final"] = record["lab_final_accuracy"]
        out["lab_fwt"] = record["lab_forward_transfer"]
    elif VARIANTS[variant_of(record)][1] is None:
        # a plain host recorded before the lab fields existed: no dream heads, so the same
        # predictions; the lab's final accuracy is the mean of the last row's experiences
        out["lab_final"] = statistics.fmean(record["accuracy_matrix"][-1])
        out["lab_fwt"] = record["forward_transfer"]
    return out


def current_records(cell: Cell) -> list[dict]:
    """The run records in ``<cell>/runs/`` whose settings are what this script and the package
    would run now (a record of older settings or code version is left out, as the runner would
    run it again)."""
    from avalanche_d2l.experiments.runner import RunKey, RunOptions, fingerprint, run_settings

    exp = default_experiment(cell.benchmark)
    names = {register(v, cell): v for v in VARIANTS}
    kept = []
    for path in sorted((RESULTS / cell.name / "runs").glob("*.json")):
        rec = json.loads(path.read_text())
        name = rec.get("strategy")
        if name not in names:
            continue
        try:  # a variant whose settings the package does not take (any more) has no current run
            one = dataclasses.replace(exp, strategies={name: VARIANTS[names[name]][1] or {}})
        except ValueError:
            continue
        key = RunKey(name, int(rec["seed"]), rec["mem_size"])
        if rec.get("fingerprint") == fingerprint(run_settings(one, key, RunOptions())):
            kept.append(rec)
    return kept


def load_cell(cell: str, seeds: tuple[int, ...]) -> dict[str, list[dict]]:
    """variant -> its runs' metrics on ``seeds`` in ``cell`` (variants that ran every seed)."""
    by: dict[str, dict[int, dict]] = {}
    for r in current_records(CELLS[cell]):
        if r["seed"] in seeds:
            by.setdefault(variant_of(r), {})[r["seed"]] = metrics(r)
    return {v: [m[s] for s in seeds] for v, m in by.items() if set(m) == set(seeds)}


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if key in r]
    return statistics.fmean(vals) if len(vals) == len(rows) and vals else None


def _fmt(final: float | None, fwt: float | None) -> str:
    return "-" if final is None or fwt is None else f"{final:.3f} / {fwt:+.3f}"


# ------------------------------------------------------------------------------------------------
# where the new classes' samples land (diagnosis)


def _unit_logits(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits over every output unit (heads of a head-slot model, dream heads included) and the
    class -> unit map (``None`` for a plain classifier: unit c is class c)."""
    if hasattr(model, "forward_heads") and hasattr(model, "class_to_head"):
        return model.forward_heads(x), model.class_to_head.cpu()
    return model(x), None


class WhereNewClassesLand(SupervisedPlugin):
    """Avalanche plugin for the diagnosis, put first in ``strategy.plugins``. At the start of
    each experience k >= 1, *before* the other plugins (D2L's head assignment), on the
    experience's training samples: the share whose argmax over all output units is a seen
    class's unit, and per new class its most frequent unit among the others with that unit's
    share (two new classes on one unit cannot both inherit it). At the first epoch, *after* the
    assignment and before any update, on the experience's test samples: the share on their own
    class's unit (the lab protocol's accuracy at start), on another new class's, on a seen
    class's, and on a unit of no class yet (a dream head)."""

    def __init__(self, test_stream):
        super().__init__()
        self.test_stream = test_stream
        self.rows: dict[int, dict] = {}
        self._seen: list[int] = []

    @staticmethod
    def _predict(model, dataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        from torch.utils.data import DataLoader

        from avalanche_d2l.utils import training_mode

        device = next(model.parameters()).device
        preds, ys, c2h = [], [], None
        with torch.no_grad(), training_mode(model, False):
            for batch in DataLoader(dataset.eval(), batch_size=512):
                logits, c2h = _unit_logits(model, batch[0].to(device))
                preds.append(logits.argmax(1).cpu())
                ys.append(torch.as_tensor(batch[1]))
        return torch.cat(preds), torch.cat(ys), c2h

    def before_training_exp(self, strategy, **kwargs):
        if not self._seen:
            return
        pred, y, c2h = self._predict(strategy.model, strategy.experience.dataset)
        seen = _units(self._seen, c2h)
        modal = {}
        for c in sorted(set(y.tolist())):
            other = pred[(y == c) & ~torch.isin(pred, seen)]
            if len(other):
                u = int(torch.mode(other).values)
                modal[c] = [u, float((other == u).sum()) / float((y == c).sum())]
        k = int(strategy.experience.current_experience)
        self.rows[k] = {
            "before_on_seen": float(torch.isin(pred, seen).float().mean()),
            "before_modal_unit": modal,
        }

    def before_training_epoch(self, strategy, **kwargs):
        k = int(strategy.experience.current_experience)
        if strategy.clock.train_exp_epochs != 0 or k not in self.rows:
            return
        pred, y, c2h = self._predict(strategy.model, self.test_stream[k].dataset)
        own = _units(y.tolist(), c2h)
        new = _units(sorted(set(y.tolist())), c2h)
        on_seen = torch.isin(pred, _units(self._seen, c2h))
        on_new = torch.isin(pred, new)
        self.rows[k].update(
            own=float((pred == own).float().mean()),
            other_new=float((on_new & (pred != own)).float().mean()),
            seen=float(on_seen.float().mean()),
            no_class=float((~on_seen & ~on_new).float().mean()),
        )

    def after_training_exp(self, strategy, **kwargs):
        self._seen += [int(c) for c in strategy.experience.classes_in_this_experience]


def _units(classes: list[int], class_to_unit: torch.Tensor | None) -> torch.Tensor:
    """The output unit of each class (its head; -1 while it has none)."""
    c = torch.as_tensor(classes, dtype=torch.long)
    return c if class_to_unit is None else class_to_unit[c]


def diagnose(
    cell: Cell, variants: list[str], seed: int, root=RESULTS, quick: bool = False
) -> dict[str, dict]:
    """One run of each variant on ``cell`` (the experiment's settings, seed ``seed``) with
    :class:`WhereNewClassesLand`; written to ``<cell>/diagnosis_seed<seed>.{json,md}``."""
    from avalanche_d2l.experiments.runner import RunKey, RunOptions, build_run
    from avalanche_d2l.utils import seed_everything

    exp = default_experiment(cell.benchmark)
    names = {v: register(v, cell) for v in variants}
    exp = dataclasses.replace(exp, strategies={n: VARIANTS[v][1] or {} for v, n in names.items()})
    found = {}
    for v, name in names.items():
        key = RunKey(name, seed, exp.mem_sizes[0] if exp.keeps_buffer(name) else None)
        benchmark, strategy = build_run(exp, key, RunOptions(quick=quick, progress=False))
        probe = WhereNewClassesLand(benchmark.test_stream)
        strategy.plugins.insert(0, probe)  # before D2L's head assignment
        for k, experience in enumerate(benchmark.train_stream):
            seed_everything(seed * 1000 + k)
            strategy.train(experience, eval_streams=[])
        found[v] = {str(k): row for k, row in sorted(probe.rows.items())}
        print(v, json.dumps(found[v]), flush=True)
    path = Path(root) / cell.name / f"diagnosis_seed{seed}"
    atomic_write(path.with_suffix(".json"), json.dumps(found, indent=1))
    atomic_write(path.with_suffix(".md"), diagnosis_markdown(found, cell, seed))
    return found


def diagnosis_markdown(found: dict[str, dict], cell: Cell, seed: int) -> str:
    lines = [
        f"# Where the new classes' samples land: `{cell.name}` ({cell.model}), seed {seed}",
        "",
        f"Command: `python benchmarks/d2l_ablation.py --diagnose --cell {cell.name} --seeds "
        f"{seed} --variants {' '.join(found)}`. Means over experiences 2-5 (1-based). *Before "
        "assignment*, on the experience's training samples: share predicted as a seen class; "
        "experiences where both new classes' most frequent other unit is the same unit. *At "
        "start* (after the assignment, before any update), on its test samples: share on their "
        "own class's unit (the lab protocol's accuracy at start), on the other new class's, on "
        "a seen class's, on a unit of no class (a dream head).",
        "",
        "| variant | before: on seen | before: both on one unit | start: own | start: other "
        "new | start: seen | start: dream head |",
        "|---|---|---|---|---|---|---|",
    ]
    for v, rows in found.items():
        rs = list(rows.values())
        if not rs:
            continue

        def m(key, rs=rs):
            return statistics.fmean(r.get(key, float("nan")) for r in rs)

        same = sum(
            len({u for u, _ in r["before_modal_unit"].values()}) < len(r["before_modal_unit"])
            for r in rs
        )
        lines.append(
            f"| {v} | {m('before_on_seen'):.2f} | {same}/{len(rs)} | {m('own'):.2f} | "
            f"{m('other_new'):.2f} | {m('seen'):.2f} | {m('no_class'):.2f} |"
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# summary.md


def _table(cells: list[tuple[str, str]]) -> dict[str, dict[tuple[str, str], list[dict]]]:
    """variant -> (cell, seed set) -> per-seed metrics, for every cell that has all its seeds."""
    out: dict[str, dict] = {v: {} for v in VARIANTS}
    for cell, seeds in cells:
        for v, rows in load_cell(cell, SEED_SETS[seeds]).items():
            out[v][(cell, seeds)] = rows
    return out


def _over(table, v: str, cells, key: str) -> float | None:
    """Mean over ``cells`` of the per-cell means of ``key`` (None if a cell lacks it)."""
    per = [_mean(table[v][c], key) for c in cells if c in table[v]]
    return statistics.fmean(per) if per and None not in per and len(per) == len(cells) else None


def _common(table, a: str, b: str) -> list:
    return [c for c in TARGET_CELLS if c in table[a] and c in table[b]]


def target_lines(table, cost: dict | None) -> list[str]:
    """Each target of the issue as met / missed / not run, with the numbers it rests on."""
    lines = ["| target | verdict | measured (lab protocol, means over the cells both ran) |"]
    lines.append("|---|---|---|")

    def row(name, a, b, ok):
        cells, note = _common(table, a, b), ""
        if not cells and FALLBACK_CELL in table[a] and FALLBACK_CELL in table[b]:
            cells, note = [FALLBACK_CELL], " (split_digits seed 0 only: indicative)"
        if not cells:
            lines.append(f"| {name} | not run | - |")
            return
        fa, fb = (_over(table, x, cells, "lab_final") for x in (a, b))
        wa, wb = (_over(table, x, cells, "lab_fwt") for x in (a, b))
        if None in (fa, fb, wa, wb):
            lines.append(f"| {name} | not measurable | lab-protocol fields missing |")
            return
        verdict = ("met" if ok(fa, fb, wa, wb) else "missed") + note
        d = 3 if f"{fa:.3f}" != f"{fb:.3f}" else 4  # a tie at 3 decimals shows which side leads
        lines.append(
            f"| {name} | {verdict} | final {fa:.{d}f} vs {fb:.{d}f}; FWT {wa:+.3f} vs {wb:+.3f} "
            f"({len(cells)} cell{'s' if len(cells) > 1 else ''}) |"
        )

    for c in CONTROLS:
        row(
            f"`d2l` beats `{c}` (final and FWT)",
            "d2l",
            c,
            lambda fa, fb, wa, wb: fa > fb and wa > wb,
        )
    for x, host in HOSTS.items():
        row(
            f"`{x}` beats `{host}` on final, FWT > 0",
            x,
            host,
            lambda fa, fb, wa, wb: fa > fb and wa > 0,
        )
    from avalanche_d2l import __version__

    if cost is None or cost.get("config", {}).get("package_version") != __version__:
        lines.append(
            "| `d2l` costs <= 5x `replay` in one process | not run | no `bench_d2l.json` of "
            f"this package version ({__version__}) |"
        )
    else:
        for x, ratio in cost["d2l_over_host_wall"].items():
            verdict = "met" if ratio <= 5 else "missed"
            lines.append(
                f"| `{x}` costs <= 5x `{HOSTS[x]}` in one process | {verdict} | {ratio:.1f}x "
                f"(`benchmarks/results/bench_d2l.md`, load {cost.get('load', '?')}) |"
            )
    return lines


def record_diagnosis(cell: str, seed: int) -> list[str]:
    """From the run records alone: per variant, the accuracy on each new experience *right
    after* training on it (and, for D2L, after the sleep on the dreams grown from it) under both
    protocols -- the gap is the share of its test samples that land on a dream head -- and at
    its start. Means over experiences 2-5."""
    rows = [
        "## Where new-class samples land (from the run records, "
        f"{cell} seed {seed}; means over experiences 2-5)",
        "",
        "Right after training on experience k (after D2L's dreaming and sleep that follow it), "
        "its test accuracy under the lab and the masked protocol: the difference is a lower bound "
        "of the share of its samples predicted on a dream head (whose best class unit is right). "
        "At start: accuracy on experience k before training on it (lab; masked).",
        "",
        "| variant | right after: lab | right after: masked | on a dream head (>=) | at start: lab "
        "| at start: masked |",
        "|---|---|---|---|---|---|",
    ]
    for r in current_records(CELLS[cell]):
        if r["seed"] != seed or "lab_accuracy_matrix" not in r:
            continue
        lab, masked = r["lab_accuracy_matrix"], r["accuracy_matrix"]
        ks = range(1, len(lab))
        after_lab = statistics.fmean(lab[k][k] for k in ks)
        after_masked = statistics.fmean(masked[k][k] for k in ks)
        start_lab = statistics.fmean(r["lab_accuracy_at_start"][k] for k in ks)
        start_masked = statistics.fmean(r["accuracy_at_start"][k] for k in ks)
        rows.append(
            f"| {variant_of(r)} | {after_lab:.3f} | {after_masked:.3f} | "
            f"{after_masked - after_lab:.3f} | {start_lab:.3f} | {start_masked:.3f} |"
        )
    return [*rows, ""]


def summarise() -> str:
    extra = [(c, "0-2") for c in CELLS if CELLS[c].user_cnn]
    cells = TARGET_CELLS + [FALLBACK_CELL] + extra
    table = _table(cells)
    label = {c: f"{c[0]} {c[1]}" for c in cells}
    cost_path = ROOT / "benchmarks" / "results" / "bench_d2l.json"
    cost = json.loads(cost_path.read_text()) if cost_path.is_file() else None
    head = " | ".join(label[c] for c in cells)
    lines = [
        "# D2L: hosts with and without D2L, the dream controls and the paper's ablations",
        "",
        "Final accuracy / FWT under the **lab protocol** (argmax over *all* output units, heads "
        "that host a dream included, so a sample landing on a dream head is an error; final "
        "accuracy = mean of the per-experience accuracies), mean over the seeds of each cell. "
        "The last column is the same mean under the masked protocol (dream heads masked; final "
        "accuracy over all seen test samples). Cells: the two offline streams with their preset "
        "classifier (`small_cnn`) on seeds 0-2 and on held-out seeds 3-5 (never used for a "
        "choice), and each stream with `UserCNN` (a plain user CNN, see the script; D2L was "
        "never tuned on it). `split_color_digits` is dreamt by the grey offline dreamer, built "
        "on glyphs made to look like the grey digits, not on coloured, shifted ones. A `-` is a "
        "cell that was not run (or not for every seed); the column `split_digits 0` is seed 0 "
        "alone, the part of the first cell every variant ran. Commands: `python "
        "benchmarks/d2l_ablation.py --cell CELL --seeds S S S --jobs 1` per cell, then `python "
        "benchmarks/d2l_ablation.py --summarise`; per-run records in `<cell>/runs/`.",
        "",
        f"| variant | what it tests | {head} | mean, target cells | masked mean |",
        "|---" * (len(cells) + 4) + "|",
    ]
    for v, (_, _, what) in VARIANTS.items():
        if not table[v]:
            continue
        vals = [
            _fmt(_mean(table[v][c], "lab_final"), _mean(table[v][c], "lab_fwt"))
            if c in table[v]
            else "-"
            for c in cells
        ]
        ran = [c for c in TARGET_CELLS if c in table[v]]
        mean = _fmt(_over(table, v, ran, "lab_final"), _over(table, v, ran, "lab_fwt"))
        masked = _fmt(_over(table, v, ran, "masked_final"), _over(table, v, ran, "masked_fwt"))
        n = f" ({len(ran)})" if ran and len(ran) < len(TARGET_CELLS) else ""
        lines.append(f"| {v} | {what} | {' | '.join(vals)} | {mean}{n} | {masked}{n} |")
    lines += ["", "## Targets (issue 19, item 6)", "", *target_lines(table, cost), ""]
    lines += record_diagnosis("split_digits", 0)
    for path in sorted(RESULTS.glob("*/diagnosis_seed*.md")):
        body = path.read_text().split("\n", 2)[2]
        lines += [
            f"## {path.parent.name}, {path.stem.split('_')[-1]}: where new-class samples land",
            "",
            body,
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cell", default="split_digits", choices=list(CELLS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="tiny settings (smoke test)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results root (smoke tests)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (processes)")
    parser.add_argument("--diagnose", action="store_true", help="where new-class samples land")
    parser.add_argument("--summarise", action="store_true", help="write summary.md, then stop")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.summarise:
        md = summarise()
        atomic_write(RESULTS / "summary.md", md)
        print(md)
        return 0
    cell = CELLS[args.cell]
    if args.diagnose:
        for seed in args.seeds:
            found = diagnose(cell, args.variants, seed, args.out, args.quick)
            print(diagnosis_markdown(found, cell, seed))
        return 0
    res = run_cell(
        cell,
        args.variants,
        args.seeds,
        args.out,
        quick=args.quick,
        progress=not args.no_progress,
        jobs=args.jobs,
    )
    print(f"{len(res['runs'])} runs in {args.out / cell.name}/results.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
