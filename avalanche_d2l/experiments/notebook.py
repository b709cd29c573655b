"""What the reproduction notebooks share: parameters with environment overrides, the comparison
through the engine, and the method illustrations, each cached on disk under the settings that made
it (so a re-executed notebook reads instead of retraining)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from avalanche_d2l.core.storage import atomic_write
from avalanche_d2l.experiments.runner import RunKey, RunOptions, build_run, run_settings
from avalanche_d2l.experiments.schema import Experiment
from avalanche_d2l.utils import quiet_replay_deprecation

__all__ = [
    "DreamRecorder",
    "cached",
    "notebook_params",
    "quiet_replay_deprecation",
    "reuse_runs",
    "settings_key",
    "trained_run",
]

ENV_PREFIX = "AVALANCHE_D2L_NB_"


def _parse(raw: str, default: Any) -> Any:
    if isinstance(default, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected 1/0 (true/false), got {raw!r}")
    if isinstance(default, list):
        items = [s.strip() for s in raw.split(",") if s.strip()]
        return [int(s) for s in items] if default and isinstance(default[0], int) else items
    if isinstance(default, int) or default is None:
        return int(raw) if raw.lstrip("-").isdigit() else raw
    return type(default)(raw)


def notebook_params(**defaults: Any) -> SimpleNamespace:
    """The notebook's parameters: ``defaults``, each overridable by the environment variable
    ``AVALANCHE_D2L_NB_<NAME>`` (lists comma-separated, flags 1/0), as the notebook tests do."""
    values = {}
    for name, default in defaults.items():
        raw = os.environ.get(ENV_PREFIX + name, "").strip()
        values[name] = default if raw == "" else _parse(raw, default)
    return SimpleNamespace(**values)


def cached(path: Path, key: dict, compute: Callable[[], Any]) -> tuple[Any, bool]:
    """``compute()``'s value, stored at ``path`` with ``key``; read back while the key is the
    same. Returns ``(value, reused)``. Written atomically. The value must be what
    ``torch.load(weights_only=True)`` reads (tensors, numbers, strings, lists, dicts): it is
    checked when written, so a value that could not be read back is an error, not a cache that
    silently never hits."""
    path = Path(path)
    key = json.loads(json.dumps(key, default=str))
    if path.is_file():
        try:
            # tensors, numbers, strings and containers only: nothing executes from the file
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("key") == key:
                return saved["value"], True
        except Exception:  # noqa: BLE001 -- an unreadable cache is recomputed
            pass
    value = compute()
    buffer = io.BytesIO()
    torch.save({"key": key, "value": value}, buffer)
    buffer.seek(0)
    torch.load(buffer, map_location="cpu", weights_only=True)  # raises for unsafe values
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buffer.getvalue())
    return value, False


def reuse_runs(source: str | os.PathLike, out: str | os.PathLike) -> int:
    """Copy the finished-run records of the output folder ``source`` (its ``runs/*.json``) into
    ``out/runs/`` where ``out`` has none of that name, so :func:`run_experiment` into ``out``
    reuses them (a record whose settings differ from the command's is run again) and
    ``source``'s own results and figures stay as they are. Returns the records copied."""
    src, dst = Path(source) / "runs", Path(out) / "runs"
    copied = 0
    for record in sorted(src.glob("*.json")) if src.is_dir() else []:
        if not (dst / record.name).exists():
            dst.mkdir(parents=True, exist_ok=True)
            atomic_write(dst / record.name, record.read_bytes())
            copied += 1
    return copied


def with_section(exp, strategy: str, section: Mapping[str, Any]):
    """``exp`` with ``section`` written over ``strategy``'s settings part by part
    (``{"gan": {"steps": 3}}`` changes one GAN setting and keeps the file's others)."""
    from avalanche_d2l.core.config import merge_sections

    merged = merge_sections(exp.strategies.get(strategy, {}), section)
    return dataclasses.replace(exp, strategies={**exp.strategies, strategy: merged})


def trained_run(
    exp: Experiment,
    strategy: str,
    seed: int,
    *,
    quick: bool = False,
    mem_size: int | None = None,
    section: dict | None = None,
    plugins: Sequence = (),
):
    """Train one run of ``exp`` in memory (the comparison's own builders and seeds) and return
    ``(benchmark, strategy)``; ``section`` updates the strategy's settings (e.g. to also train
    Genifer's GAN after the last experience, for a grid of every class); ``plugins`` are added
    after the strategy's own."""
    from avalanche_d2l.utils import seed_everything

    if section:
        exp = with_section(exp, strategy, section)
    mem = (
        (mem_size if mem_size is not None else exp.mem_sizes[0])
        if exp.keeps_buffer(strategy)
        else None
    )
    key = RunKey(strategy, seed, mem)
    opts = RunOptions(quick=quick, progress=False)
    benchmark, strat = build_run(exp, key, opts, extra_plugins=plugins)
    with quiet_replay_deprecation():
        for k, experience in enumerate(benchmark.train_stream):
            seed_everything(seed * 1000 + k)
            strat.train(experience, eval_streams=[])
    return benchmark, strat


def settings_key(exp: Experiment, strategy: str, seed: int, quick: bool, **extra) -> dict:
    """The cache key of an illustration made from one run: that run's recorded settings."""
    mem = exp.mem_sizes[0] if exp.keeps_buffer(strategy) and exp.mem_sizes else None
    settings = run_settings(exp, RunKey(strategy, seed, mem), RunOptions(quick=quick))
    return {
        "run": hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest(),
        **extra,
    }


class DreamRecorder:
    """Avalanche plugin (put after D2L's): after each experience, for every dream head of the new
    dream set, ``per_head`` of its images and ``sources`` buffer images of the learned class it
    grew from (its anchors; none for dreams not grown from a class), all in [0, 1]:
    ``rows[k] = {"heads", "source_classes", "dreams", "sources"}`` (lists, one entry per head)."""

    def __init__(self, per_head: int = 4, sources: int = 2):
        self.per_head = per_head
        self.sources = sources
        self.rows: dict[int, dict] = {}

    def after_training_exp(self, strategy, **kwargs) -> None:
        plugin = getattr(strategy, "d2l_plugin", None)  # set by the D2L strategies' factories
        if plugin is None:
            return
        images, labels = plugin.dream_images, plugin.dream_labels
        if images is None or labels is None:
            return
        unit = plugin.space.to_unit(images)
        jobs = getattr(plugin, "_jobs", {})  # head -> the dream class's job (source, anchors)
        row: dict[str, list] = {"heads": [], "source_classes": [], "dreams": [], "sources": []}
        for h in sorted(set(labels.tolist())):
            job = jobs.get(h)
            anchors = job.anchors[: self.sources] if job is not None else images[:0]
            row["heads"].append(h)
            row["source_classes"].append(int(job.source) if job is not None else -1)
            row["dreams"].append(unit[labels == h][: self.per_head])
            row["sources"].append(plugin.space.to_unit(anchors.cpu()))
        self.rows[strategy.experience.current_experience] = row
