"""The experiment file: one schema for every method, checked key by key.

An experiment file is a JSON object::

    {
      "description": "free text",
      "benchmark": {"name": "split_cifar100", "n_experiences": 6, "first_experience_classes": 50},
      "model": {"name": "resnet18_cifar", "feature_layer": "layer3"},
      "training": {
        "train_mb_size": 32, "eval_mb_size": 256,
        "optimizer": {"name": "radam", "lr": 1e-4, "weight_decay": 5e-4, "epochs": 100, ...},
        "first_experience": {"name": "sgd", "lr": 0.1, "momentum": 0.9, ...},
        "fresh_optimizer_each_experience": true
      },
      "strategies": {"genifer": {<GeniferConfig fields>}, "lwf": {}, "naive": {}},
      "mem_sizes": [500, 1000],
      "seeds": [0, 1, 2],
      "device": "cpu", "precision": "no"
    }

* ``benchmark``: a name of :data:`avalanche_d2l.experiments.builders.BENCHMARKS` and keyword
  arguments of its loader in :mod:`avalanche_d2l.scenarios` (``root`` and ``seed`` come per run).
* ``model``: :func:`avalanche_d2l.experiments.builders.build_model`'s name, the feature layer the
  methods read, and an optional ``width``.
* ``training.optimizer``: the optimiser of every experience (of the later ones when
  ``first_experience`` is given). Each phase states all its settings: nothing is inherited.
* ``strategies``: registered strategy names, each with its section of the method's typed config
  (``{}``: the class defaults, which are the CPU preset), or the name of another strategy of the
  file whose section it shares (``"er_ace_d2l": "d2l"``).
* ``mem_sizes``: one run per buffer size for strategies that keep a buffer.

Unknown keys at any level are an error that lists the valid ones.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from avalanche_d2l.core.config import ConfigBase, check_keys
from avalanche_d2l.fields import check_value, typed_fields
from avalanche_d2l.registry import config_to_dict, get_strategy, strategy_names

__all__ = [
    "ALIASES",
    "Experiment",
    "ModelSpec",
    "OptimSpec",
    "TrainingSpec",
    "apply_overrides",
    "check_keys",
    "parse_assignment",
]

#: Names used in the papers' tables -> registry names.
ALIASES: dict[str, str] = {
    "er": "replay",
    "derpp": "der",
    "der++": "der",
    "er-ace": "er_ace",
    "finetune": "naive",
    "joint": "cumulative",
    "dgr": "generative_replay",
    "er_d2l": "d2l",
    "derpp_d2l": "der_d2l",
}

_OPTIMIZERS = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "radam": "RAdam"}
_PRECISIONS = ("no", "bf16", "fp16")


def _from_fields(cls, section: Any, where: str, required: tuple[str, ...] = ()):
    """``cls.from_dict(section)`` (:class:`ConfigBase`: unknown keys and value types checked,
    ``where`` naming the section) with the ``required`` keys present."""
    check_keys(section, {f.name for f in dataclasses.fields(cls)}, where)
    missing = [k for k in required if k not in section]
    if missing:
        raise ValueError(f"{where} lacks {missing}")
    return cls.from_dict(section, where=where)


@dataclass(frozen=True)
class OptimSpec(ConfigBase):
    """One optimiser with a step schedule: ``lr * gamma ** (milestones passed)`` per epoch.

    Attributes:
        name: ``sgd``, ``adam``, ``adamw`` or ``radam`` (case-insensitive).
        lr: base learning rate.
        epochs: training epochs per experience.
        momentum, nesterov: SGD only.
        weight_decay: weight decay (L2 added to the gradient, or decoupled, below).
        decoupled_weight_decay: RAdam's decoupled (AdamW-style) weight decay.
        milestones: epochs (within an experience) at which the rate is multiplied by ``gamma``.
        gamma: decay factor at each milestone.
    """

    name: str
    lr: float
    epochs: int
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    decoupled_weight_decay: bool = False
    milestones: tuple[int, ...] = ()
    gamma: float = 1.0

    def __post_init__(self) -> None:
        name = str(self.name).lower()
        if name not in _OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.name!r}; valid: {sorted(_OPTIMIZERS)}")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))
        if name != "sgd" and (self.momentum or self.nesterov):
            raise ValueError(f"momentum/nesterov are SGD settings; {self.name!r} has none")
        if self.decoupled_weight_decay and name != "radam":
            raise ValueError("decoupled_weight_decay is a RAdam setting (use adamw for Adam)")
        if int(self.epochs) < 1:
            raise ValueError(f"epochs must be a whole number >= 1, got {self.epochs}")
        if float(self.lr) <= 0:
            raise ValueError(f"lr must be a number > 0, got {self.lr}")

    def build(self, params) -> torch.optim.Optimizer:
        opt_cls = getattr(torch.optim, _OPTIMIZERS[self.name])
        kw: dict[str, Any] = {"lr": self.lr, "weight_decay": self.weight_decay}
        if self.name == "sgd":
            kw.update(momentum=self.momentum, nesterov=self.nesterov)
        if self.name == "radam":
            kw.update(decoupled_weight_decay=self.decoupled_weight_decay)
        return opt_cls(params, **kw)

    def lr_at(self, epoch: int) -> float:
        return self.lr * self.gamma ** sum(epoch >= m for m in self.milestones)

    def same_optimizer(self, other: OptimSpec) -> bool:
        """Same optimiser class and hyper-parameters (epochs and schedule aside)."""
        keys = ("name", "lr", "momentum", "nesterov", "weight_decay", "decoupled_weight_decay")
        return all(getattr(self, k) == getattr(other, k) for k in keys)


def _optim(section: Any, where: str) -> OptimSpec:
    return _from_fields(OptimSpec, section, where, required=("name", "lr", "epochs"))


@dataclass(frozen=True)
class ModelSpec(ConfigBase):
    """Classifier name, the feature layer the methods read, optional width (CIFAR-style nets)."""

    name: str
    feature_layer: str
    width: int | None = None


@dataclass(frozen=True)
class TrainingSpec(ConfigBase):
    """Minibatch sizes and the optimiser phases of the classifier."""

    optimizer: OptimSpec
    first_experience: OptimSpec | None = None
    train_mb_size: int = 32
    eval_mb_size: int = 256
    fresh_optimizer_each_experience: bool = False

    def __post_init__(self) -> None:
        for key in ("train_mb_size", "eval_mb_size"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"training.{key} must be >= 1, got {getattr(self, key)}")

    @property
    def first(self) -> OptimSpec:
        """The optimiser of experience 0."""
        return self.first_experience or self.optimizer

    @classmethod
    def from_dict(cls, d: Any, *, where: str | None = "training") -> TrainingSpec:
        where = where or "training"
        allowed = {f.name for f in dataclasses.fields(cls)}
        d = typed_fields(cls, dict(check_keys(d, allowed, where)), where)
        if "optimizer" not in d:
            raise ValueError(f"{where} needs an 'optimizer' (name, lr, epochs, ...)")
        d["optimizer"] = _optim(d["optimizer"], f"{where}.optimizer")
        if d.get("first_experience") is not None:
            d["first_experience"] = _optim(d["first_experience"], f"{where}.first_experience")
        return cls(**d)

    def with_epochs(self, epochs: int) -> TrainingSpec:
        first = self.first_experience
        return dataclasses.replace(
            self,
            optimizer=dataclasses.replace(self.optimizer, epochs=epochs),
            first_experience=None if first is None else dataclasses.replace(first, epochs=epochs),
        )


_TOP_KEYS = {
    "title",
    "description",
    "notes",
    "data_root_hint",
    "benchmark",
    "model",
    "training",
    "strategies",
    "mem_sizes",
    "seeds",
    "device",
    "precision",
    "dreamer_device",
}


def resolve_name(name: str) -> str:
    """A registry name from a name or a paper-table alias (``er`` -> ``replay``)."""
    return ALIASES.get(name, name)


@dataclass
class Experiment:
    """One experiment: benchmark, model, training, strategies with their settings, buffer sizes,
    seeds, device and precision. Built from a file (:meth:`from_file`) or a dict."""

    benchmark: dict[str, Any]
    model: ModelSpec
    training: TrainingSpec
    strategies: dict[str, dict[str, Any]]
    mem_sizes: list[int] = field(default_factory=lambda: [100])
    seeds: list[int] = field(default_factory=lambda: [0])
    device: str = "cpu"
    precision: str = "no"
    dreamer_device: str | None = None
    description: str = ""
    notes: dict[str, str] = field(default_factory=dict)
    name: str = ""
    title: str = ""

    def __post_init__(self) -> None:
        from avalanche_d2l.experiments.builders import check_benchmark_section

        check_benchmark_section(self.benchmark)
        if not self.strategies:
            raise ValueError("the experiment lists no strategies")
        resolved: dict[str, dict[str, Any]] = {}
        for raw, section in self.strategies.items():
            if isinstance(section, str):  # "er_ace_d2l": "d2l" shares d2l's section
                shared = self.strategies.get(section)
                if not isinstance(shared, dict):
                    raise ValueError(
                        f"strategy {raw!r} shares the section of {section!r}, which "
                        "is not a section of this experiment"
                    )
                section = shared
            name = resolve_name(raw)
            if name not in strategy_names():
                raise ValueError(
                    f"unknown strategy {raw!r}; valid: {', '.join(strategy_names())} and the "
                    f"aliases {', '.join(sorted(ALIASES))}"
                )
            if name in resolved:
                raise ValueError(f"strategy {name!r} is listed twice (an alias of {raw!r})")
            resolved[name] = dict(section or {})
            get_strategy(name).make_config(resolved[name])  # unknown keys fail here
        self.strategies = resolved
        if self.precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {_PRECISIONS}, got {self.precision!r}")
        check_seeds(self.seeds)
        check_mem_sizes(self.mem_sizes)

    # ---- reading ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, *, name: str = "") -> Experiment:
        data = check_keys(data, _TOP_KEYS, "the top level of an experiment file")
        for key in ("benchmark", "model", "training", "strategies"):
            if key not in data:
                raise ValueError(f"an experiment file needs a {key!r} entry")
        notes = {k: str(data[k]) for k in ("notes", "data_root_hint") if k in data}
        return cls(
            benchmark=dict(check_keys(data["benchmark"], set(data["benchmark"]), "benchmark")),
            model=_from_fields(ModelSpec, data["model"], "model", ("name", "feature_layer")),
            training=TrainingSpec.from_dict(data["training"]),
            strategies=dict(check_keys(data["strategies"], set(data["strategies"]), "strategies")),
            mem_sizes=check_value(data.get("mem_sizes", [100]), list[int], "mem_sizes"),
            seeds=check_value(data.get("seeds", [0]), list[int], "seeds"),
            device=check_value(data.get("device", "cpu"), str, "device"),
            precision=check_value(data.get("precision", "no"), str, "precision"),
            dreamer_device=check_value(data.get("dreamer_device"), str | None, "dreamer_device"),
            description=check_value(data.get("description", ""), str, "description"),
            title=check_value(data.get("title", ""), str, "title"),
            notes=notes,
            name=name,
        )

    @classmethod
    def from_file(cls, path: str | Path, overrides: Sequence[tuple[str, Any]] = ()) -> Experiment:
        """The experiment of a file, with ``overrides`` (:func:`apply_overrides`) applied
        before it is checked."""
        path = Path(path)
        data = read_experiment_file(path)
        try:
            return cls.from_dict(apply_overrides(data, overrides), name=path.stem)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: {err}") from err

    # ---- resolved settings -----------------------------------------------------------------
    def method_config(self, name: str):
        """The typed config of strategy ``name`` (its section over the class defaults)."""
        name = resolve_name(name)
        if name not in self.strategies:
            raise ValueError(
                f"{name!r} is not a strategy of this experiment: {', '.join(self.strategies)}"
            )
        return get_strategy(name).make_config(self.strategies[name])

    def common_settings(self) -> dict[str, Any]:
        """Everything shared by the runs of this experiment (what makes them comparable)."""
        return json.loads(
            json.dumps(
                {
                    "benchmark": self.benchmark,
                    "model": dataclasses.asdict(self.model),
                    "training": dataclasses.asdict(self.training),
                    "device": self.device,
                    "precision": self.precision,
                    "dreamer_device": self.dreamer_device,
                }
            )
        )

    def to_dict(self) -> dict[str, Any]:
        """The experiment with every strategy's *resolved* config (defaults filled in)."""
        out = {
            **({"title": self.title} if self.title else {}),
            "description": self.description,
            **self.common_settings(),
            "strategies": {n: config_to_dict(self.method_config(n)) or {} for n in self.strategies},
            "mem_sizes": list(self.mem_sizes),
            "seeds": list(self.seeds),
        }
        if self.notes:
            out.update(self.notes)
        return json.loads(json.dumps(out))

    def keeps_buffer(self, name: str) -> bool:
        return get_strategy(name).keeps_buffer


def read_experiment_file(path: Path) -> Any:
    """The JSON content of an experiment file (not yet checked), or one sentence."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err.reason}): save it as UTF-8") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def check_seeds(seeds) -> list[int]:
    seeds = list(seeds)
    if not seeds:
        raise ValueError("give at least one seed")
    bad = [s for s in seeds if int(s) < 0]
    if bad:
        raise ValueError(f"seeds must be non-negative integers, got {bad}")
    dup = sorted({s for s in seeds if seeds.count(s) > 1})
    if dup:
        raise ValueError(f"seed(s) {dup} given twice: each seed is one run; list each once")
    return [int(s) for s in seeds]


def check_mem_sizes(mem_sizes) -> list[int]:
    mem_sizes = [int(m) for m in mem_sizes]
    bad = [m for m in mem_sizes if m < 0]
    if bad:
        raise ValueError(f"buffer sizes must be >= 0, got {bad}")
    if len(set(mem_sizes)) != len(mem_sizes):
        raise ValueError(f"buffer sizes {mem_sizes} repeat a value; list each once")
    return mem_sizes


def loader_keywords(loader) -> set[str]:
    """Keyword arguments of a scenario loader that an experiment file may set."""
    skip = {"root", "seed", "train_transform", "eval_transform", "download"}
    return {p for p in inspect.signature(loader).parameters if p not in skip}


# ---- command-line overrides ----------------------------------------------------------------------


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"key.path=value"`` -> ``("key.path", value)``: the value as JSON when it parses
    (``5``, ``0.1``, ``true``, ``[0, 1]``, ``null``), else the text itself (``sgd``, ``fast``)."""
    path, sep, raw = text.partition("=")
    if not sep or not path.strip() or any(not part for part in path.strip().split(".")):
        raise ValueError(f"--set {text!r}: write KEY.PATH=VALUE, e.g. training.optimizer.lr=0.01")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return path.strip(), value


def _valid_keys(data: dict[str, Any], parents: list[str]) -> set[str] | None:
    """The keys an experiment file may hold at ``parents`` (``None``: not known here, e.g. a
    strategy's own config, which checks its keys itself and lists them)."""
    if not parents:
        return set(_TOP_KEYS)
    head, rest = parents[0], parents[1:]
    if head == "training":
        if not rest:
            return {f.name for f in dataclasses.fields(TrainingSpec)}
        if len(rest) == 1 and rest[0] in ("optimizer", "first_experience"):
            return {f.name for f in dataclasses.fields(OptimSpec)}
    if head == "model" and not rest:
        return {f.name for f in dataclasses.fields(ModelSpec)}
    if head == "benchmark" and not rest:
        from avalanche_d2l.experiments.builders import BENCHMARKS, benchmark_loader

        name = data.get("benchmark", {}).get("name")
        return loader_keywords(benchmark_loader(name)) | {"name"} if name in BENCHMARKS else None
    if head == "strategies":
        if not rest:
            return set(strategy_names()) | set(ALIASES)
        return _config_keys(resolve_name(rest[0]), rest[1:])
    return None


def _config_keys(strategy: str, parents: list[str]) -> set[str] | None:
    """Field names of a strategy's typed config, or of a nested config on ``parents``."""
    import typing

    if strategy not in strategy_names():
        return None
    cls = get_strategy(strategy).config_type
    for key in parents:
        if cls is None or not dataclasses.is_dataclass(cls):
            return None
        cls = typing.get_type_hints(cls).get(key)
    if cls is None or not dataclasses.is_dataclass(cls):
        return None
    return {f.name for f in dataclasses.fields(cls)}


def apply_overrides(data: Any, assignments: Sequence[tuple[str, Any]]) -> Any:
    """A copy of the experiment file's ``data`` with each ``(key.path, value)`` set, before the
    file is checked: the schema then checks the values as it checks a file's (its messages name
    the key's path). A path through an unknown key is refused here, naming the valid keys; a
    strategy that shares another's section (``"er_ace_d2l": "d2l"``) gets a copy of it first.

    Raises:
        ValueError: an unknown key on the path, or a path through a value that is not a section.
    """
    if not assignments:
        return data
    where = "the top level of an experiment file"
    data = json.loads(json.dumps(check_keys(data, _TOP_KEYS, where)))
    for path, value in assignments:
        parts = path.split(".")
        node = data
        for i, key in enumerate(parts[:-1]):
            _check_step(data, path, parts[:i], key)
            node = _section(node, key, path, parts[: i + 1])
        _check_step(data, path, parts[:-1], parts[-1])
        node[parts[-1]] = value
    return data


def _check_step(data: dict[str, Any], path: str, parents: list[str], key: str) -> None:
    valid = _valid_keys(data, parents)
    if valid is not None and key not in valid:
        moved = _moved_key(parents, key)
        if moved:
            raise ValueError(f"--set {path}: {key!r} is now {moved}; set that path instead")
        raise ValueError(
            f"--set {path}: unknown key {key!r} in {'.'.join(parents) or 'the top level'}; "
            f"valid keys: {', '.join(sorted(valid))}"
        )


def _moved_key(parents: list[str], key: str) -> str | None:
    """The path a strategy's config now gives a key of its earlier flat layout (its class's
    ``RENAMED_KEYS``), or ``None``."""
    if len(parents) != 2 or parents[0] != "strategies":
        return None
    strategy = resolve_name(parents[1])
    cls = get_strategy(strategy).config_type if strategy in strategy_names() else None
    new = getattr(cls, "RENAMED_KEYS", {}).get(key)
    return f"{'.'.join(parents)}.{new}" if new else None


def _section(node: dict[str, Any], key: str, path: str, where: list[str]) -> dict[str, Any]:
    """``node[key]`` as a section to set keys in (created when absent)."""
    child = node.get(key)
    if child is None:
        child = node[key] = {}
    elif isinstance(child, str) and where[:-1] == ["strategies"]:
        shared = node.get(child)  # "er_ace_d2l": "d2l" -> its own copy of d2l's section
        child = node[key] = dict(json.loads(json.dumps(shared))) if isinstance(shared, dict) else {}
    elif not isinstance(child, dict):
        raise ValueError(f"--set {path}: {'.'.join(where)} is {child!r}, not a section with keys")
    return child
