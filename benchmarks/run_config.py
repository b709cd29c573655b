"""Run a paper-scale experiment file (``benchmarks/configs/*.json``) on local data, usually a GPU.

Usage::

    python benchmarks/run_config.py CONFIG.json --data-root DIR --out DIR
        [--seeds 0 1 2] [--device cuda] [--strategies d2l,er,derpp] [--mem-size N]
        [--epochs N] [--dreamer ID_OR_PATH] [--max-experiences K] [--num-workers N]
        [--threads N] [--offline] [--no-progress]

One run per (strategy, seed, buffer size). Everything a run needs comes from the file:

* ``benchmark`` -> the loader of :mod:`avalanche_d2l.scenarios` with ``root=--data-root``
  (``split_cifar100``, ``mini_imagenet``, ``imagenet_r``, ``fg_imagenet``, ``cub200``; the
  offline ``split_digits`` / ``split_color_digits`` need no root). The loaders raise with the
  folder layout they expect when the data is missing.
* ``model`` (D2L files) or ``classifier`` (Genifer files) -> the classifier, see
  :func:`build_model`. ``resnet18`` is the CIFAR-stem :func:`resnet18_cifar` for images up to
  64 px and torchvision's ImageNet ``resnet18`` above (its ``features`` layer is ``avgpool``).
* ``training`` (D2L files) or ``classifier`` (Genifer files) -> the optimiser and its schedule,
  see :class:`OptimSpec` and :class:`OptimSchedule`. Genifer's ``first_task`` / ``later_tasks``
  give experience 0 and the later experiences their own optimiser, epochs and milestones; a new
  optimiser is built for every experience, and ``first_task`` takes ``epochs`` / ``milestones``
  / ``gamma`` from ``later_tasks`` when it does not state them (the CIFAR-100 file states only
  its optimiser). Single-optimiser files keep the optimiser state across experiences, as
  ``avalanche-d2l compare`` does.
* the method: D2L (``dream`` + ``dreamer`` + ``dreamer_overrides``; the dreamer is loaded once with
  :meth:`Dreamer.from_pretrained`, ``--dreamer`` replaces the file's id) or Genifer (``genifer``).
* ``baselines`` -> registry strategies with the same model, optimiser, schedule and buffer
  (``er`` -> ``replay``, ``derpp`` -> ``der``, ``er_ace`` -> ``er_ace``; see :data:`ALIASES`).
* ``mem_sizes`` (or ``--mem-size``): one output folder per buffer size, ``OUT/mem{N}/``
  (``OUT/no_buffer/`` when there is no buffer, e.g. Genifer alone). Strategies that keep no
  buffer (Genifer, Naive, LwF, ...) run once and their results are copied to the other folders.

Each folder is what ``avalanche-d2l compare`` writes: ``results.json`` (same run format, plus the
resolved experiment), ``results.md`` and ``accuracy.png`` (``cli.write_report``), per-experience
checkpoints in ``checkpoints/`` (``avalanche_d2l.checkpointing``) and work files (D2L's dream
cache) in ``work/``. Re-running the same command resumes: finished runs are skipped and an
interrupted run restarts after its last finished experience.

``--max-experiences K`` trains the first K experiences only (a smoke test on real data); the
methods still see the full stream, so Genifer trains its GAN after experience K-1 unless that is
the stream's last.

Seeds: each run seeds the benchmark's class order (when the file does not fix it), the model
initialisation, D2L's dreaming (the file's ``dream.seed`` is replaced by the run's seed) and
Genifer's GAN (``genifer.seed`` likewise), as the registry factories do.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from avalanche_d2l.cli import (  # noqa: E402
    EpochBar,
    PeakRSS,
    resume_runs,
    train_with_checkpoints,
)
from avalanche_d2l.dreaming.dreamer import DreamerConfig  # noqa: E402
from avalanche_d2l.dreaming.prompts import DreamConfig  # noqa: E402
from avalanche_d2l.registry import (  # noqa: E402
    RunConfig,
    benchmark_image_shape,
    build_strategy,
    strategy_names,
)
from avalanche_d2l.strategies.genifer import GeniferConfig  # noqa: E402
from avalanche_d2l.utils import get_module, seed_everything  # noqa: E402

__all__ = [
    "ALIASES",
    "BUFFER_FREE",
    "BenchmarkSpec",
    "ExperimentConfig",
    "ModelSpec",
    "OptimSchedule",
    "OptimSpec",
    "build_benchmark",
    "build_model",
    "load_config",
    "load_dreamer",
    "main",
    "resolve_strategies",
    "run_config",
]

#: Baseline names used in the papers' tables -> registry names.
ALIASES: dict[str, str] = {
    "er": "replay",
    "derpp": "der",
    "der++": "der",
    "er-ace": "er_ace",
    "erace": "er_ace",
    "finetune": "naive",
    "joint": "cumulative",
    "dgr": "generative_replay",
}

#: Strategies that keep no buffer of real images: one run serves every buffer size.
BUFFER_FREE = frozenset({"genifer", "naive", "lwf", "ewc", "cumulative", "generative_replay"})

#: Module names of the CIFAR-style classifiers -> torchvision ResNet's (same role).
TORCHVISION_LAYER_NAMES = {"features": "avgpool", "linear": "fc"}

#: Largest image side for which ``resnet18`` means the CIFAR-stem ResNet-18.
CIFAR_STEM_MAX_SIZE = 64

_NOTE_KEYS = {"description", "notes", "data_root_hint"}
_COMMON_KEYS = _NOTE_KEYS | {"benchmark", "seeds", "mem_sizes", "baselines"}
_D2L_KEYS = {"model", "training", "dreamer", "dreamer_overrides", "reference_network", "dream"}
_GENIFER_KEYS = {"genifer", "classifier"}
_MODEL_KEYS = {"name", "feature_layer", "width"}
_OPTIM_KEYS = {
    "optimizer",
    "lr",
    "momentum",
    "nesterov",
    "weight_decay",
    "epochs",
    "milestones",
    "gamma",
}
_BATCH_KEYS = {"train_mb_size", "eval_mb_size"}
_OPTIMIZERS = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "radam": "RAdam"}


def _check_keys(section: dict, allowed: set[str], where: str) -> None:
    if not isinstance(section, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(section).__name__}")
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; valid keys: {sorted(allowed)}")


# ------------------------------------------------------------------------------------------------
# optimiser and schedule


@dataclass(frozen=True)
class OptimSpec:
    """One optimiser with a step schedule: ``lr * gamma ** (milestones passed)`` per epoch.

    Attributes:
        optimizer: ``sgd``, ``adam``, ``adamw`` or ``radam`` (case-insensitive).
        lr: base learning rate.
        epochs: training epochs per experience.
        momentum, nesterov: SGD only.
        weight_decay: L2 weight decay.
        milestones: epochs (within an experience) at which the rate is multiplied by ``gamma``.
        gamma: decay factor at each milestone.
    """

    optimizer: str
    lr: float
    epochs: int
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    milestones: tuple[int, ...] = ()
    gamma: float = 1.0

    def __post_init__(self) -> None:
        name = self.optimizer.lower()
        if name not in _OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; valid: {sorted(_OPTIMIZERS)}")
        object.__setattr__(self, "optimizer", name)
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))
        if name != "sgd" and (self.momentum or self.nesterov):
            raise ValueError(f"momentum/nesterov are SGD settings; {self.optimizer!r} has none")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")

    @classmethod
    def from_dict(cls, d: dict, where: str, *, defaults: dict | None = None) -> OptimSpec:
        """Read the optimiser keys of ``d`` (missing ones from ``defaults``)."""
        merged = {**(defaults or {}), **{k: v for k, v in d.items() if k in _OPTIM_KEYS}}
        missing = [k for k in ("optimizer", "lr", "epochs") if k not in merged]
        if missing:
            raise ValueError(f"{where} lacks {missing}")
        return cls(**merged)

    def build(self, params) -> torch.optim.Optimizer:
        opt_cls = getattr(torch.optim, _OPTIMIZERS[self.optimizer])
        kw: dict[str, Any] = {"lr": self.lr, "weight_decay": self.weight_decay}
        if self.optimizer == "sgd":
            kw.update(momentum=self.momentum, nesterov=self.nesterov)
        return opt_cls(params, **kw)

    def lr_at(self, epoch: int) -> float:
        return self.lr * self.gamma ** sum(epoch >= m for m in self.milestones)

    def same_optimizer(self, other: OptimSpec) -> bool:
        """Same optimiser class and hyper-parameters (epochs and schedule aside)."""
        keys = ("optimizer", "lr", "momentum", "nesterov", "weight_decay")
        return all(getattr(self, k) == getattr(other, k) for k in keys)


class OptimSchedule(SupervisedPlugin):
    """Avalanche plugin: experience 0 trains with ``first``, later experiences with ``later``.

    At the first experience of the ``later`` phase a new ``later`` optimiser over the strategy's
    model replaces ``strategy.optimizer`` (a new optimiser class, e.g. SGD -> RAdam, cannot be
    reached by changing hyper-parameters); with ``fresh_each_experience`` every experience after
    the first gets a new one (no momentum / Adam state carried across experiences, each task
    trained as in its own run). Otherwise the state is kept, as Avalanche does by default. Each
    experience gets its phase's number of epochs, and every epoch its learning rate from the
    milestones. Plugin order matters: put it before plugins that read ``strategy.train_epochs``
    in ``before_training_exp``.

    Args:
        first: optimiser of experience 0 (``strategy.optimizer`` must be built from it).
        later: optimiser of the other experiences (default: ``first``).
        fresh_each_experience: build a new optimiser at the start of every later experience.
    """

    def __init__(
        self,
        *,
        first: OptimSpec,
        later: OptimSpec | None = None,
        fresh_each_experience: bool = False,
    ):
        super().__init__()
        self.first = first
        self.later = later or first
        self.fresh_each_experience = fresh_each_experience
        self.phase = "first"  # the phase strategy.optimizer was built for

    def spec(self, experience_index: int) -> OptimSpec:
        return self.first if experience_index == 0 else self.later

    def before_training_exp(self, strategy, **kwargs) -> None:
        k = strategy.experience.current_experience
        phase = "first" if k == 0 else "later"
        switch = phase != self.phase and not self.first.same_optimizer(self.later)
        if switch or (self.fresh_each_experience and k > 0):
            strategy.optimizer = self.spec(k).build(strategy.model.parameters())
        self.phase = phase
        strategy.train_epochs = self.spec(k).epochs

    def before_training_epoch(self, strategy, **kwargs) -> None:
        spec = self.spec(strategy.experience.current_experience)
        lr = spec.lr_at(strategy.clock.train_exp_epochs)
        for group in strategy.optimizer.param_groups:
            group["lr"] = lr


# ------------------------------------------------------------------------------------------------
# benchmark


@dataclass(frozen=True)
class BenchmarkSpec:
    """A benchmark of :mod:`avalanche_d2l.scenarios`: loader name and its keyword arguments
    (``root`` and ``seed`` are added per run)."""

    name: str
    loader: str
    kwargs: dict[str, Any]
    needs_root: bool = True


# canonical name -> (loader in avalanche_d2l.scenarios, accepted keys, needs a root)
_BENCH_TABLE: dict[str, tuple[str, set[str], bool]] = {
    "split_digits": (
        "split_digits",
        {"n_experiences", "image_size", "channels", "class_order"},
        False,
    ),
    "split_color_digits": (
        "split_color_digits",
        {"n_experiences", "image_size", "class_order"},
        False,
    ),
    "split_cifar100": (
        "split_cifar100",
        {
            "n_classes",
            "n_experiences",
            "n_base_classes",
            "n_tasks",
            "classes_per_task",
            "class_order",
            "image_size",
            "normalize",
        },
        True,
    ),
    "mini_imagenet": (
        "split_mini_imagenet",
        {"n_classes", "n_experiences", "image_size", "class_order", "normalize"},
        True,
    ),
    "imagenet_r": (
        "split_imagenet_r",
        {"n_classes", "n_experiences", "image_size", "class_order", "normalize", "test_fraction"},
        True,
    ),
    "fg_imagenet": (
        "split_fg_imagenet",
        {"n_classes", "n_experiences", "image_size", "class_order", "normalize", "class_list"},
        True,
    ),
    "cub200": (
        "split_cub200",
        {"n_classes", "n_experiences", "image_size", "class_order", "normalize"},
        True,
    ),
}
_BENCH_ALIASES = {
    "cifar100": "split_cifar100",
    "split_mini_imagenet": "mini_imagenet",
    "split_imagenet_r": "imagenet_r",
    "split_fg_imagenet": "fg_imagenet",
    "split_cub200": "cub200",
}
#: Descriptive class-order strings found in the configs -> the loaders' order names.
_CLASS_ORDER_ALIASES = {"icarl order, seed 1993": "icarl"}


def _parse_benchmark(section: dict, base_dir: Path) -> BenchmarkSpec:
    """Check the ``benchmark`` section and turn it into loader arguments.

    ``split_cifar100``: ``n_base_classes`` + ``n_tasks`` x ``classes_per_task`` give
    ``n_experiences = n_tasks + 1`` and ``first_experience_classes = n_base_classes``; without
    ``n_base_classes`` the classes are split equally. ``n_classes`` becomes the loaders'
    ``expected_classes`` (a deliberate subset), or is checked against ``class_list``
    (``fg_imagenet``; a path relative to the file's folder or the repository). A descriptive
    ``class_order`` such as ``"iCaRL order, seed 1993"`` maps to the loader's order name.
    """
    if not isinstance(section, dict) or "name" not in section:
        raise ValueError(
            f"the 'benchmark' section needs a 'name'; valid names: {sorted(_BENCH_TABLE)}"
        )
    name = _BENCH_ALIASES.get(section["name"], section["name"])
    if name not in _BENCH_TABLE:
        raise ValueError(
            f"unknown benchmark {section['name']!r}; valid names: {sorted(_BENCH_TABLE)}"
        )
    loader, keys, needs_root = _BENCH_TABLE[name]
    _check_keys(section, keys | {"name", "protocol", "description"}, f"benchmark ({name})")
    b = {k: v for k, v in section.items() if k in keys}
    kw: dict[str, Any] = {}
    order = b.pop("class_order", None)
    if isinstance(order, str):
        order = _CLASS_ORDER_ALIASES.get(order.lower(), order)
    if order is not None:
        kw["class_order"] = order
    n_classes = b.pop("n_classes", None)
    if name == "split_cifar100":
        if b.pop("image_size", 32) != 32:
            raise ValueError("split_cifar100 images are 32 px; remove image_size or set it to 32")
        n_base, n_tasks = b.pop("n_base_classes", None), b.pop("n_tasks", None)
        per_task = b.pop("classes_per_task", None)
        n_exp = b.pop("n_experiences", None)
        if n_tasks is not None:
            implied = n_tasks + (1 if n_base else 0)
            if n_exp is not None and n_exp != implied:
                raise ValueError(
                    f"split_cifar100: n_experiences={n_exp} but n_base_classes/"
                    f"n_tasks imply {implied}"
                )
            n_exp = implied
        if n_base is not None and n_tasks is not None and per_task is not None:
            total = n_base + n_tasks * per_task
            if n_classes is not None and total != n_classes:
                raise ValueError(
                    f"split_cifar100: {n_base} + {n_tasks} x {per_task} classes "
                    f"!= n_classes={n_classes}"
                )
            n_classes = total
        if n_exp is not None:
            kw["n_experiences"] = n_exp
        kw["first_experience_classes"] = n_base
        if n_classes is not None:
            kw["expected_classes"] = n_classes
    elif name == "fg_imagenet":
        if "class_list" in b:
            path = Path(b.pop("class_list")).expanduser()
            if not path.is_absolute():
                path = next((p for p in (base_dir / path, ROOT / path) if p.is_file()), ROOT / path)
            if not path.is_file():
                raise FileNotFoundError(f"fg_imagenet class_list {path} does not exist")
            kw["wnids"] = [
                line.strip()
                for line in path.read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")
            ]
        if n_classes is not None:
            from avalanche_d2l.scenarios import fg_imagenet_wnids

            have = len(kw.get("wnids") or fg_imagenet_wnids())
            if have != n_classes:
                raise ValueError(
                    f"fg_imagenet: n_classes={n_classes} but the class list has {have} wnids"
                )
    elif n_classes is not None:
        if name in ("split_digits", "split_color_digits"):
            raise ValueError(f"{name} has 10 classes; remove n_classes")
        kw["expected_classes"] = n_classes
    kw.update(b)
    return BenchmarkSpec(name=name, loader=loader, kwargs=kw, needs_root=needs_root)


def build_benchmark(spec: BenchmarkSpec, data_root: str | Path | None, seed: int):
    """Build the Avalanche benchmark of ``spec`` from ``data_root`` for one seed."""
    from avalanche_d2l import scenarios

    loader = getattr(scenarios, spec.loader)
    if not spec.needs_root:
        return loader(seed=seed, **spec.kwargs)
    if data_root is None:
        raise ValueError(
            f"benchmark {spec.name!r} reads local files: pass --data-root DIR "
            f"(see the layout in avalanche_d2l.scenarios.{spec.loader})"
        )
    return loader(Path(data_root).expanduser(), seed=seed, **spec.kwargs)


# ------------------------------------------------------------------------------------------------
# model


@dataclass(frozen=True)
class ModelSpec:
    """Classifier name, the feature layer the method reads, optional width (CIFAR-style nets)."""

    name: str
    feature_layer: str
    width: int | None = None


def build_model(
    spec: ModelSpec, num_classes: int, image_shape: Sequence[int]
) -> tuple[nn.Module, str]:
    """The classifier and the name of its feature layer.

    * ``small_cnn`` -> :func:`small_cnn` (layers ``block1..3``, ``features``).
    * ``resnet18_cifar`` -> :func:`resnet18_cifar` (``layer1..4``, ``features``).
    * ``resnet18`` -> ``resnet18_cifar`` for images of at most 64 px; above, torchvision's
      ImageNet ResNet-18 (random init, ``num_classes`` outputs, 3 channels). Its modules are
      ``layer1..4``, ``avgpool`` and ``fc``: ``features`` is mapped to ``avgpool`` (the pooled
      512-d vector, the same role) and ``linear`` to ``fc``.

    Raises:
        ValueError: unknown model, an unsupported width/channel count, or a feature layer the
            model lacks (the message lists its module names).
    """
    from avalanche_d2l.models import resnet18_cifar, small_cnn

    c, h, w = (int(s) for s in image_shape)
    layer = spec.feature_layer
    width = {} if spec.width is None else {"width": spec.width}
    if spec.name == "small_cnn":
        model = small_cnn(num_classes, c, **width)
    elif spec.name == "resnet18_cifar" or (
        spec.name == "resnet18" and max(h, w) <= CIFAR_STEM_MAX_SIZE
    ):
        model = resnet18_cifar(num_classes, c, **width)
    elif spec.name == "resnet18":
        from torchvision.models import resnet18

        if c != 3:
            raise ValueError(f"torchvision's resnet18 takes 3-channel images, the data has {c}")
        if spec.width is not None:
            raise ValueError(
                "'width' applies to the CIFAR-style nets (images <= "
                f"{CIFAR_STEM_MAX_SIZE} px); remove it for {h} px images"
            )
        model = resnet18(num_classes=num_classes)
        layer = TORCHVISION_LAYER_NAMES.get(layer, layer)
    else:
        raise ValueError(f"unknown model {spec.name!r}; valid: small_cnn, resnet18, resnet18_cifar")
    get_module(model, layer)  # clear error listing the module names
    return model, layer


# ------------------------------------------------------------------------------------------------
# the experiment file


@dataclass
class ExperimentConfig:
    """One experiment file, parsed and checked (every key understood).

    Attributes:
        method: ``"d2l"`` or ``"genifer"``.
        benchmark: the benchmark to build.
        model: classifier and feature layer.
        first: optimiser of experience 0; ``later``: of the other experiences.
        fresh_optimizer: a new optimiser at every experience (Genifer files with
            ``first_task``/``later_tasks``: each task is trained as its own run); otherwise the
            optimiser state is kept across experiences, as ``avalanche-d2l compare`` does.
        train_mb_size, eval_mb_size: minibatch sizes.
        mem_sizes: buffer sizes (empty: none given).
        baselines: registry names of the baselines (aliases resolved).
        seeds: seeds of the file (may be empty).
        dream, dreamer, dreamer_overrides: D2L's settings.
        genifer: Genifer's settings.
        path: the file it was read from.
        notes: free-text entries (description, notes, data_root_hint, reference_network).
    """

    method: str
    benchmark: BenchmarkSpec
    model: ModelSpec
    first: OptimSpec
    later: OptimSpec
    train_mb_size: int
    eval_mb_size: int
    fresh_optimizer: bool = False
    mem_sizes: list[int] = field(default_factory=list)
    baselines: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    dream: DreamConfig | None = None
    dreamer: str | None = None
    dreamer_overrides: dict[str, Any] = field(default_factory=dict)
    genifer: GeniferConfig | None = None
    path: str | None = None
    notes: dict[str, str] = field(default_factory=dict)

    def with_epochs(self, epochs: int) -> ExperimentConfig:
        """Copy with ``epochs`` for every phase."""
        return dataclasses.replace(
            self,
            first=dataclasses.replace(self.first, epochs=epochs),
            later=dataclasses.replace(self.later, epochs=epochs),
        )

    def record(self) -> dict[str, Any]:
        """The resolved settings saved in ``results.json`` (progress flags left out)."""

        def strip(d):
            return {k: v for k, v in d.items() if k != "progress"}

        return {
            "method": self.method,
            "benchmark": {"name": self.benchmark.name, **self.benchmark.kwargs},
            "model": dataclasses.asdict(self.model),
            "first_experience_optimizer": dataclasses.asdict(self.first),
            "later_experience_optimizer": dataclasses.asdict(self.later),
            "fresh_optimizer_each_experience": self.fresh_optimizer,
            "train_mb_size": self.train_mb_size,
            "eval_mb_size": self.eval_mb_size,
            "dream": None if self.dream is None else strip(self.dream.to_dict()),
            "dreamer_overrides": dict(self.dreamer_overrides),
            "genifer": None if self.genifer is None else strip(self.genifer.to_dict()),
        }


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and check an experiment file (D2L-style or Genifer-style, see the module docstring).

    Raises:
        ValueError: unknown keys at any level, a missing section, or bad values.
    """
    path = Path(path)
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    try:
        return _parse(data, path)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def _parse(data: dict, path: Path) -> ExperimentConfig:
    if ("dream" in data) == ("genifer" in data):
        raise ValueError(
            "an experiment file has exactly one method section: 'dream' (D2L) or "
            "'genifer' (Genifer)"
        )
    method = "d2l" if "dream" in data else "genifer"
    _check_keys(
        data,
        _COMMON_KEYS | (_D2L_KEYS if method == "d2l" else _GENIFER_KEYS),
        f"the top level of a {method} file",
    )
    bench = _parse_benchmark(data.get("benchmark"), path.parent)
    notes = {k: str(data[k]) for k in (*_NOTE_KEYS, "reference_network") if k in data}
    baselines = [ALIASES.get(b, b) for b in data.get("baselines", [])]
    unknown = [b for b in baselines if b not in strategy_names()]
    if unknown:
        raise ValueError(
            f"unknown baselines {unknown}; valid: {sorted(strategy_names())} and "
            f"the aliases {sorted(ALIASES)}"
        )
    common = dict(
        mem_sizes=[int(m) for m in data.get("mem_sizes", [])],
        baselines=baselines,
        seeds=[int(s) for s in data.get("seeds", [])],
        path=str(path.resolve()),
        notes=notes,
    )
    if method == "d2l":
        for key in ("model", "training", "dreamer"):
            if key not in data:
                raise ValueError(f"a D2L file needs a {key!r} entry")
        _check_keys(data["model"], _MODEL_KEYS, "model")
        if "name" not in data["model"] or "feature_layer" not in data["model"]:
            raise ValueError("model needs 'name' and 'feature_layer'")
        model = ModelSpec(**data["model"])
        _check_keys(data["training"], _OPTIM_KEYS | _BATCH_KEYS, "training")
        opt = OptimSpec.from_dict(data["training"], "training")
        overrides = dict(data.get("dreamer_overrides") or {})
        _check_keys(
            overrides,
            {f.name for f in dataclasses.fields(DreamerConfig)},
            "dreamer_overrides (DreamerConfig fields)",
        )
        train = data["training"]
        return ExperimentConfig(
            method=method,
            benchmark=bench,
            model=model,
            first=opt,
            later=opt,
            train_mb_size=int(train.get("train_mb_size", RunConfig.train_mb_size)),
            eval_mb_size=int(train.get("eval_mb_size", RunConfig.eval_mb_size)),
            dream=DreamConfig.from_dict(data["dream"]),
            dreamer=str(data["dreamer"]),
            dreamer_overrides=overrides,
            **common,
        )
    cls_cfg = data.get("classifier")
    if cls_cfg is None:
        raise ValueError("a Genifer file needs a 'classifier' entry")
    phased = "first_task" in cls_cfg or "later_tasks" in cls_cfg
    allowed = {"model", "feature_layer", "width"} | _BATCH_KEYS
    _check_keys(
        cls_cfg, allowed | ({"first_task", "later_tasks"} if phased else _OPTIM_KEYS), "classifier"
    )
    if "model" not in cls_cfg or "feature_layer" not in cls_cfg:
        raise ValueError("classifier needs 'model' and 'feature_layer'")
    model = ModelSpec(
        name=cls_cfg["model"], feature_layer=cls_cfg["feature_layer"], width=cls_cfg.get("width")
    )
    if phased:
        if "first_task" not in cls_cfg or "later_tasks" not in cls_cfg:
            raise ValueError("classifier needs both 'first_task' and 'later_tasks' (or neither)")
        _check_keys(cls_cfg["first_task"], _OPTIM_KEYS, "classifier.first_task")
        _check_keys(cls_cfg["later_tasks"], _OPTIM_KEYS, "classifier.later_tasks")
        later = OptimSpec.from_dict(cls_cfg["later_tasks"], "classifier.later_tasks")
        # The first task's length and schedule default to the later tasks' (the reference
        # setting states only the first task's optimiser).
        schedule = {
            k: v
            for k, v in dataclasses.asdict(later).items()
            if k in ("epochs", "milestones", "gamma")
        }
        first = OptimSpec.from_dict(
            cls_cfg["first_task"], "classifier.first_task", defaults=schedule
        )
    else:
        first = later = OptimSpec.from_dict(cls_cfg, "classifier")
    train_mb = int(cls_cfg.get("train_mb_size", RunConfig.train_mb_size))
    return ExperimentConfig(
        method=method,
        benchmark=bench,
        model=model,
        first=first,
        later=later,
        fresh_optimizer=phased,
        train_mb_size=train_mb,
        eval_mb_size=int(cls_cfg.get("eval_mb_size", RunConfig.eval_mb_size)),
        genifer=GeniferConfig.from_dict(data["genifer"]),
        **common,
    )


def resolve_strategies(names: Sequence[str] | str | None, cfg: ExperimentConfig) -> list[str]:
    """Strategy names (aliases resolved, order kept, no repeats); default: the method + baselines.

    Raises:
        ValueError: an unknown name, or the other method than the file configures.
    """
    if names is None:
        names = [cfg.method, *cfg.baselines]
    elif isinstance(names, str):
        names = [s.strip() for s in names.split(",") if s.strip()]
    out: list[str] = []
    for raw in names:
        name = ALIASES.get(raw, raw)
        if name in ("d2l", "genifer") and name != cfg.method:
            raise ValueError(
                f"{name!r} needs a {name!r} section; {cfg.path} configures {cfg.method!r}"
            )
        if name not in strategy_names():
            raise ValueError(
                f"unknown strategy {raw!r}; valid: {sorted(strategy_names())} and "
                f"the aliases {sorted(ALIASES)}"
            )
        if name not in out:
            out.append(name)
    if not out:
        raise ValueError("no strategy to run")
    return out


# ------------------------------------------------------------------------------------------------
# dreamer


def load_dreamer(
    source: str,
    overrides: dict[str, Any],
    *,
    device: str | torch.device,
    image_size: int = 16,
    offline: bool = False,
):
    """Load D2L's dreamer: ``"offline"`` (the glyph dreamer), a local directory, or a hub id.

    A hub id is looked up in the local Hugging Face cache first; unless ``offline``, a download
    is tried next. ``overrides`` are :class:`DreamerConfig` fields (output size, steps, ...).

    Raises:
        OSError: the dreamer cannot be loaded; the message says how to get it.
    """
    from avalanche_d2l.dreaming.dreamer import Dreamer

    device = torch.device(device)
    if source == "offline":
        from avalanche_d2l.strategies.d2l import resolve_dreamer

        dreamer = resolve_dreamer("offline", image_size=image_size)[0]
        for key, value in overrides.items():
            setattr(dreamer.config, key, value)
        return dreamer.to(device)
    path = Path(source).expanduser()
    if path.exists():
        return Dreamer.from_pretrained(path, device=device, **overrides)
    try:
        return Dreamer.from_pretrained(source, device=device, local_files_only=True, **overrides)
    except OSError as local_err:
        if offline:
            err: Exception = local_err
        else:
            try:
                return Dreamer.from_pretrained(source, device=device, **overrides)
            except OSError as download_err:
                err = download_err
    raise OSError(
        f"cannot load the dreamer {source!r} here: it is not a local directory and not in the "
        "local Hugging Face cache"
        + ("" if offline else ", and downloading it failed")
        + ". Download it where internet is available (e.g. `huggingface-cli download "
        f"{source}`, then copy the cache or the folder here), or pass a local path with "
        f"--dreamer PATH. Underlying error: {err.__cause__ or err}"
    )


@contextmanager
def _without_dreamer(strategy):
    """Checkpoint a D2L strategy without the frozen dreamer (gigabytes for Stable Diffusion; it
    is the same object for every run and is attached again after loading)."""
    plugin = getattr(strategy, "d2l_plugin", None)
    if plugin is None:
        yield
        return
    saved, plugin._dreamer = plugin._dreamer, None
    try:
        yield
    finally:
        plugin._dreamer = saved


# ------------------------------------------------------------------------------------------------
# runs


@dataclass
class _Context:
    """What every run of one invocation shares."""

    cfg: ExperimentConfig
    data_root: Path | None
    device: str
    dreamer: Any
    max_experiences: int | None
    progress: bool
    num_workers: int
    benchmarks: dict[int, Any] = field(default_factory=dict)

    def benchmark(self, seed: int):
        if seed not in self.benchmarks:
            self.benchmarks[seed] = build_benchmark(self.cfg.benchmark, self.data_root, seed)
        return self.benchmarks[seed]


def _build_run_strategy(name: str, seed: int, mem_size: int | None, ctx: _Context, work_dir: Path):
    """Benchmark, and the strategy ``name`` with the file's model, optimiser and schedule."""
    from avalanche_d2l.evaluation import make_evaluator

    cfg = ctx.cfg
    seed_everything(seed)
    benchmark = ctx.benchmark(seed)
    shape = benchmark_image_shape(benchmark)
    model, layer = build_model(cfg.model, int(benchmark.n_classes), shape)
    optimizer = cfg.first.build(model.parameters())
    evaluator = make_evaluator(benchmark, interactive=False, eval_mb_size=cfg.eval_mb_size)
    device = torch.device(ctx.device)
    plugins = [
        OptimSchedule(first=cfg.first, later=cfg.later, fresh_each_experience=cfg.fresh_optimizer),
        EpochBar(f"{name} s{seed}", enabled=ctx.progress),
    ]
    common = dict(
        model=model,
        optimizer=optimizer,
        criterion=nn.CrossEntropyLoss(),
        train_mb_size=cfg.train_mb_size,
        train_epochs=cfg.first.epochs,
        eval_mb_size=cfg.eval_mb_size,
        device=device,
        plugins=plugins,
        evaluator=evaluator,
    )
    if name == "d2l":
        from avalanche_d2l.strategies.d2l import D2L

        dream = dataclasses.replace(
            cfg.dream, seed=seed, progress=cfg.dream.progress and ctx.progress
        )
        return benchmark, D2L(
            mem_size=mem_size,
            dreamer=ctx.dreamer,
            dream_config=dream,
            feature_layer=layer,
            n_classes=int(benchmark.n_classes),
            eval_every=-1,
            cache_dir=work_dir / "dreams",
            **common,
        )
    if name == "genifer":
        from avalanche_d2l.strategies.genifer import Genifer

        gcfg = cfg.genifer
        _, h, _ = shape
        if gcfg.resolution is not None and gcfg.resolution != h:
            warnings.warn(
                f"Genifer config resolution {gcfg.resolution} != data size {h}; using {h}",
                stacklevel=2,
            )
        if gcfg.num_classes is not None and gcfg.num_classes != benchmark.n_classes:
            raise ValueError(
                f"genifer.num_classes={gcfg.num_classes} but the benchmark has "
                f"{benchmark.n_classes} classes"
            )
        gcfg = dataclasses.replace(
            gcfg,
            seed=seed,
            resolution=h,
            num_classes=int(benchmark.n_classes),
            progress=gcfg.progress and ctx.progress,
        )
        return benchmark, Genifer(feature_layer=layer, config=gcfg, **common)
    run = RunConfig(
        benchmark=cfg.benchmark.name,
        model=cfg.model.name,
        feature_layer=layer,
        epochs=cfg.first.epochs,
        train_mb_size=cfg.train_mb_size,
        eval_mb_size=cfg.eval_mb_size,
        lr=cfg.first.lr,
        mem_size=0 if mem_size is None else mem_size,
        seed=seed,
        device=ctx.device,
        work_dir=str(work_dir),
    )
    return benchmark, build_strategy(
        name,
        model=model,
        optimizer=optimizer,
        criterion=nn.CrossEntropyLoss(),
        benchmark=benchmark,
        run=run,
        evaluator=evaluator,
        device=device,
        plugins=plugins,
    )


def _train_run(
    name: str, seed: int, mem_size: int | None, ctx: _Context, ckpt: Path, work_dir: Path
) -> dict:
    """One run, checkpointed after every experience (``cli.train_with_checkpoints``)."""
    from avalanche_d2l.checkpointing import save_strategy

    benchmark, strategy = _build_run_strategy(name, seed, mem_size, ctx, work_dir)

    def save(strategy, path):
        with _without_dreamer(strategy):
            save_strategy(strategy, path)

    def after_load(strategy):
        if getattr(strategy, "d2l_plugin", None) is not None:
            strategy.d2l_plugin._dreamer = ctx.dreamer

    n_train = len(benchmark.train_stream)
    if ctx.max_experiences is not None:
        n_train = min(n_train, ctx.max_experiences)
    return train_with_checkpoints(
        strategy, benchmark, seed=seed, ckpt=ckpt, n_train=n_train,
        loader_kwargs={"num_workers": ctx.num_workers} if ctx.num_workers else None,
        save=save, after_load=after_load,
    )


def _folder_name(mem_size: int | None) -> str:
    return "no_buffer" if mem_size is None else f"mem{mem_size}"


def _comparable(config: dict) -> dict:
    """The settings a resumed or reused run must share (the file may move, seeds may be added)."""
    skip = ("strategies", "seeds", "mem_size", "config_file")
    return {k: v for k, v in config.items() if k not in skip}


def _reusable_runs(out: Path, config: dict) -> dict[tuple[str, int], dict]:
    """Finished buffer-free runs in ``out``'s folders made with the same settings."""
    found: dict[tuple[str, int], dict] = {}
    for path in sorted(out.glob("*/results.json")):
        previous = json.loads(path.read_text())
        if _comparable(previous["config"]) != _comparable(config):
            continue
        for r in previous["runs"]:
            if r["strategy"] in BUFFER_FREE and "reused_from" not in r:
                found.setdefault((r["strategy"], r["seed"]), {**r, "reused_from": path.parent.name})
    return found


def run_config(
    config: str | Path | ExperimentConfig,
    *,
    out: str | Path,
    data_root: str | Path | None = None,
    seeds: Sequence[int] | None = None,
    device: str = "cpu",
    strategies: Sequence[str] | str | None = None,
    mem_size: int | None = None,
    epochs: int | None = None,
    dreamer: str | None = None,
    max_experiences: int | None = None,
    progress: bool = True,
    threads: int | None = None,
    num_workers: int = 0,
    offline: bool = False,
) -> dict[str, dict]:
    """Run an experiment file; write one results folder per buffer size.

    Args:
        config: an experiment file (or its parsed :class:`ExperimentConfig`).
        out: output folder; ``out/mem{N}/`` (or ``out/no_buffer/``) per buffer size. An existing
            folder is resumed; one written with other settings is refused.
        data_root: the dataset's folder (layout in the benchmark's loader docstring).
        seeds: seeds (default: the file's, else ``[0]``).
        device: torch device, e.g. ``"cuda"``.
        strategies: strategy names / aliases (default: the file's method + its baselines).
        mem_size: one buffer size instead of the file's ``mem_sizes``.
        epochs: epochs per experience for every phase instead of the file's.
        dreamer: dreamer hub id or local path instead of the file's (D2L).
        max_experiences: train only the first K experiences (evaluation still covers the whole
            test stream; smoke tests on real data).
        progress: progress bars.
        threads: torch CPU threads (``None``: torch's default).
        num_workers: ``DataLoader`` workers of the training/evaluation loaders (image decoding).
        offline: never try to download the dreamer.

    Returns:
        ``{folder name: results}``, each as written to its ``results.json``.

    Raises:
        ValueError, FileNotFoundError, OSError: bad file or arguments, missing data, a dreamer
            that cannot be loaded -- all before any training.
    """
    cfg = config if isinstance(config, ExperimentConfig) else load_config(config)
    if epochs is not None:
        cfg = cfg.with_epochs(epochs)
    if dreamer is not None:
        local = Path(dreamer).expanduser()
        cfg = dataclasses.replace(
            cfg, dreamer=str(local.resolve()) if local.exists() else str(dreamer)
        )
    names = resolve_strategies(strategies, cfg)
    seeds = list(seeds) if seeds else (cfg.seeds or [RunConfig.seed])
    if max_experiences is not None and max_experiences < 1:
        raise ValueError(f"max_experiences must be >= 1, got {max_experiences}")
    buffered = [n for n in names if n not in BUFFER_FREE]
    if mem_size is not None:
        mem_sizes: list[int | None] = [mem_size]
    elif buffered:
        if not cfg.mem_sizes:
            raise ValueError(
                f"{', '.join(buffered)} keep a buffer but the file has no "
                "'mem_sizes': pass --mem-size N"
            )
        mem_sizes = list(cfg.mem_sizes)
    else:
        mem_sizes = [None]
    if threads is not None:
        torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message="Call to deprecated function update")
    ctx = _Context(
        cfg=cfg,
        data_root=None if data_root is None else Path(data_root),
        device=device,
        dreamer=None,
        max_experiences=max_experiences,
        progress=progress,
        num_workers=num_workers,
    )
    # Fail before any training: data (the loaders raise with the expected layout), then dreamer.
    try:
        shape = benchmark_image_shape(ctx.benchmark(seeds[0]))
    except FileNotFoundError as err:
        hint = cfg.notes.get("data_root_hint")
        raise FileNotFoundError(f"{err}\nData: {hint}" if hint else str(err)) from err
    if "d2l" in names:
        ctx.dreamer = load_dreamer(
            cfg.dreamer, cfg.dreamer_overrides, device=device, image_size=shape[1], offline=offline
        )
        if tuple(ctx.dreamer.output_shape) != tuple(shape):
            raise ValueError(
                f"the dreamer makes {tuple(ctx.dreamer.output_shape)} images but the benchmark's "
                f"are {tuple(shape)}: set output_channels / output_size in 'dreamer_overrides'"
            )
    out = Path(out)
    base_config = {
        "benchmark": cfg.benchmark.name,
        "config_file": cfg.path,
        "epochs": (
            cfg.first.epochs
            if cfg.first.epochs == cfg.later.epochs
            else f"{cfg.first.epochs} (first) / {cfg.later.epochs}"
        ),
        "device": device,
        "max_experiences": max_experiences,
        "dreamer": cfg.dreamer if cfg.method == "d2l" else None,
        "experiment": cfg.record(),
        "strategies": names,
        "seeds": seeds,
    }
    base_config = json.loads(json.dumps(base_config))  # as it reads back from results.json
    reusable = _reusable_runs(out, base_config) if out.is_dir() else {}
    all_results: dict[str, dict] = {}
    for mem in mem_sizes:
        folder = out / _folder_name(mem)
        results = _run_folder(
            folder, {**base_config, "mem_size": mem}, names, seeds, mem, ctx, reusable
        )
        all_results[folder.name] = results
    return all_results


def _run_folder(
    folder: Path,
    config: dict,
    names: list[str],
    seeds: list[int],
    mem: int | None,
    ctx: _Context,
    reusable: dict,
) -> dict:
    config = json.loads(json.dumps(config))  # tuples -> lists, as read back from the file

    def check_settings(previous: dict, results_path: Path) -> None:
        old, new = _comparable(previous), _comparable(config)
        if old != new or previous.get("mem_size") != mem:
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ValueError(
                f"{results_path} was written with different settings (differing: "
                f"{changed}); use another --out or the same settings"
            )

    def run_one(name: str, seed: int, ckpt: Path, work_dir: Path) -> dict:
        if name in BUFFER_FREE and (name, seed) in reusable:
            return reusable[(name, seed)]
        cuda = torch.device(ctx.device).type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with PeakRSS() as rss:
            summary = _train_run(name, seed, mem, ctx, ckpt, work_dir)
        record = {"strategy": name, "seed": seed, **summary, "peak_rss_mb": rss.peak / 2**20}
        if cuda:
            record["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        if name in BUFFER_FREE:
            reusable[(name, seed)] = {**record, "reused_from": folder.name}
        return record

    return resume_runs(folder, config, names, seeds, run_one, check_settings=check_settings,
                       progress=ctx.progress, desc=folder.name)


# ------------------------------------------------------------------------------------------------
# command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config", help="experiment file, e.g. benchmarks/configs/d2l_mini_imagenet.json")
    p.add_argument("--data-root", default=None, help="the dataset's folder")
    p.add_argument("--out", required=True, help="output folder (resumes if it exists)")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--strategies",
        default=None,
        help="comma-separated names (default: the method + the file's baselines); "
        f"aliases: {', '.join(f'{k}={v}' for k, v in ALIASES.items())}",
    )
    p.add_argument("--mem-size", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--dreamer", default=None, help="dreamer hub id or local path (D2L)")
    p.add_argument("--max-experiences", type=int, default=None)
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--offline", action="store_true", help="never download the dreamer")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        results = run_config(
            args.config,
            out=args.out,
            data_root=args.data_root,
            seeds=args.seeds,
            device=args.device,
            strategies=args.strategies,
            mem_size=args.mem_size,
            epochs=args.epochs,
            dreamer=args.dreamer,
            max_experiences=args.max_experiences,
            progress=not args.no_progress,
            threads=args.threads,
            num_workers=args.num_workers,
            offline=args.offline,
        )
    except (ValueError, OSError) as err:
        print(f"run_config: error: {err}", file=sys.stderr)
        return 2
    for folder in results:
        path = Path(args.out) / folder
        print(f"== {path}\n{(path / 'results.md').read_text()}")
    return 0


if __name__ == "__main__":
    # Run the module imported under its own name, so that checkpoints pickle OptimSchedule as
    # ``run_config.OptimSchedule`` (by reference), not as a class of ``__main__``.
    import run_config

    raise SystemExit(run_config.main())
