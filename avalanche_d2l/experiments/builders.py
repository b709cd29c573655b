"""Benchmark and model builders shared by every entry point (``compare``, ``run``, notebooks,
benchmark scripts)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from avalanche.logging import TextLogger
from torch import nn

from avalanche_d2l.utils import get_module

__all__ = [
    "BENCHMARKS",
    "BenchmarkInfo",
    "LineTextLogger",
    "RunLogs",
    "benchmark_loader",
    "build_benchmark",
    "build_model",
    "check_benchmark_section",
    "check_class_incremental",
    "check_wandb",
    "import_model",
]


@dataclass(frozen=True)
class BenchmarkInfo:
    """A benchmark of :mod:`avalanche_d2l.scenarios`.

    Attributes:
        loader: the function's name in :mod:`avalanche_d2l.scenarios`.
        needs_root: whether it reads a local folder (``--data-root``).
        model, feature_layer: the classifier ``compare`` gives it.
        description: one line for ``--help``.
    """

    loader: str
    needs_root: bool
    model: str
    feature_layer: str
    description: str


BENCHMARKS: dict[str, BenchmarkInfo] = {
    "split_digits": BenchmarkInfo(
        "split_digits",
        False,
        "small_cnn",
        "block3",
        "offline: scikit-learn digits, 5 x 2 classes, 16 px grey",
    ),
    "split_color_digits": BenchmarkInfo(
        "split_color_digits",
        False,
        "small_cnn",
        "block3",
        "offline: coloured, rescaled, shifted digits, RGB",
    ),
    "split_cifar100": BenchmarkInfo(
        "split_cifar100",
        True,
        "resnet18_cifar",
        "layer3",
        "CIFAR-100 from a local root (Genifer: 50 + 5 x 10)",
    ),
    "split_cub200": BenchmarkInfo(
        "split_cub200", True, "resnet18", "layer3", "CUB-200-2011 from a local root"
    ),
    "split_mini_imagenet": BenchmarkInfo(
        "split_mini_imagenet", True, "resnet18", "features", "Mini-ImageNet from a local root (D2L)"
    ),
    "split_imagenet_r": BenchmarkInfo(
        "split_imagenet_r", True, "resnet18", "features", "ImageNet-R from a local root (D2L)"
    ),
    "split_fg_imagenet": BenchmarkInfo(
        "split_fg_imagenet",
        True,
        "resnet18",
        "features",
        "FG-ImageNet from a local ImageNet root (D2L)",
    ),
    "image_folder": BenchmarkInfo(
        "image_folder",
        True,
        "resnet18",
        "features",
        "your folders: --data-root DIR with train/<class>/ and test/<class>/ (--n-experiences)",
    ),
}

#: Module names of the CIFAR-style classifiers -> torchvision ResNet's (same role).
TORCHVISION_LAYER_NAMES = {"features": "avgpool", "linear": "fc"}

#: Largest image side for which ``resnet18`` means the CIFAR-stem ResNet-18.
CIFAR_STEM_MAX_SIZE = 64


def benchmark_loader(name: str):
    """The function of :mod:`avalanche_d2l.scenarios` that builds benchmark ``name``."""
    from avalanche_d2l import scenarios

    return getattr(scenarios, BENCHMARKS[name].loader)


def check_benchmark_section(section: Any) -> None:
    """A benchmark section names a known benchmark and only its loader's keyword arguments."""
    from avalanche_d2l.experiments.schema import check_keys, loader_keywords

    if not isinstance(section, dict) or "name" not in section:
        raise ValueError(f"the 'benchmark' section needs a 'name'; valid: {', '.join(BENCHMARKS)}")
    name = section["name"]
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; valid names: {', '.join(BENCHMARKS)}")
    check_keys(section, loader_keywords(benchmark_loader(name)) | {"name"}, f"benchmark ({name})")


def build_benchmark(section: dict[str, Any], data_root: str | Path | None, seed: int):
    """The Avalanche benchmark of an experiment's ``benchmark`` section for one seed.

    Raises:
        ValueError: a benchmark that reads local files without ``data_root``.
        FileNotFoundError: missing or malformed data (the loaders draw the expected layout).
    """
    name = section["name"]
    kwargs = {k: v for k, v in section.items() if k != "name"}
    loader = benchmark_loader(name)
    if not BENCHMARKS[name].needs_root:
        return loader(seed=seed, **kwargs)
    if data_root is None:
        raise ValueError(
            f"benchmark {name!r} reads local files: pass --data-root DIR (the layout "
            f"is drawn in avalanche_d2l.scenarios.{BENCHMARKS[name].loader})"
        )
    return loader(Path(data_root).expanduser(), seed=seed, **kwargs)


def check_class_incremental(benchmark) -> None:
    """Refuse task-incremental benchmarks: every strategy here is measured class-incrementally
    (single head, no task labels), so task labels would be silently ignored."""
    for stream in (benchmark.train_stream, benchmark.test_stream):
        for exp in stream:
            labels = set(int(t) for t in exp.task_labels)
            if labels != {0}:
                raise ValueError(
                    f"the benchmark has task labels {sorted(labels)} (task-incremental); D2L, "
                    "Genifer and this package's evaluation are class-incremental: build it "
                    "without task labels (e.g. nc_benchmark(..., task_labels=False))"
                )


def build_model(
    name: str,
    feature_layer: str,
    num_classes: int,
    image_shape: Sequence[int],
    width: int | None = None,
) -> tuple[nn.Module, str]:
    """The classifier and the name of its feature layer.

    * ``small_cnn`` -> :func:`avalanche_d2l.models.small_cnn` (``block1..3``, ``features``).
    * ``resnet18_cifar`` -> :func:`avalanche_d2l.models.resnet18_cifar` (``layer1..4``,
      ``features``).
    * ``resnet18`` -> ``resnet18_cifar`` for images of at most 64 px; above, torchvision's
      ImageNet ResNet-18 (random init), whose ``features``/``linear`` roles are ``avgpool``/``fc``.
    * ``package.module:callable`` -> the user's model, ``callable(num_classes)`` (see
      :func:`import_model`); its feature layer is checked by the methods that read features.

    Raises:
        ValueError: unknown model, unsupported channels/width, or a feature layer the model lacks
            (the message lists its module names).
    """
    from avalanche_d2l.models import resnet18_cifar, small_cnn

    c, h, w = (int(s) for s in image_shape)
    kw = {} if width is None else {"width": width}
    layer = feature_layer
    if ":" in name:
        if width is not None:
            raise ValueError(f"'width' applies to the package's nets, not to {name!r}; remove it")
        return _call_model(name, import_model(name), num_classes), layer
    if name == "small_cnn":
        model = small_cnn(num_classes, c, **kw)
    elif name == "resnet18_cifar" or (name == "resnet18" and max(h, w) <= CIFAR_STEM_MAX_SIZE):
        model = resnet18_cifar(num_classes, c, **kw)
    elif name == "resnet18":
        from torchvision.models import resnet18

        if c != 3:
            raise ValueError(f"torchvision's resnet18 takes 3-channel images, the data has {c}")
        if width is not None:
            raise ValueError(
                f"'width' applies to the CIFAR-style nets (images <= "
                f"{CIFAR_STEM_MAX_SIZE} px); remove it for {h} px images"
            )
        model = resnet18(num_classes=num_classes)
        layer = TORCHVISION_LAYER_NAMES.get(layer, layer)
    else:
        raise ValueError(
            f"unknown model {name!r}; valid: small_cnn, resnet18, resnet18_cifar, or your own "
            "as package.module:callable"
        )
    get_module(model, layer)  # clear error listing the module names
    return model, layer


def import_model(spec: str) -> Callable[[int], nn.Module]:
    """The user's model factory named ``package.module:callable``.

    Calling convention: ``callable(num_classes)`` (one positional argument, the benchmark's
    number of classes) returns a ``torch.nn.Module`` that maps a batch of the benchmark's images
    ``(N, C, H, W)`` to ``(N, num_classes)`` logits; a class whose ``__init__`` takes
    ``num_classes`` is such a callable. The module is imported from ``sys.path``, which holds
    ``PYTHONPATH`` and, as with ``python -m``, the current folder.

    Raises:
        ValueError: ``spec`` is not ``module:callable``, the module cannot be imported, or it has
            no such callable (one sentence each, saying what to do).
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"model {spec!r}: write your model as package.module:callable")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(
            f"model {spec!r}: cannot import {module_name!r} ({err}); put the folder that holds it "
            "on PYTHONPATH, run from that folder, or pip install it"
        ) from None
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ValueError(f"model {spec!r}: module {module_name!r} has no {attr!r}")
    if not callable(factory):
        raise ValueError(f"model {spec!r}: {attr!r} is not callable (a class or a function)")
    return factory


def _call_model(spec: str, factory: Callable[[int], nn.Module], num_classes: int) -> nn.Module:
    try:
        model = factory(num_classes)
    except Exception as err:  # noqa: BLE001 -- the user's code: any error is reported in one line
        raise ValueError(
            f"model {spec!r}: calling it with the number of classes ({num_classes}) failed "
            f"({type(err).__name__}: {err}); it must take num_classes as its one positional "
            "argument and return a torch.nn.Module"
        ) from None
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"model {spec!r}({num_classes}) returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


@dataclass(frozen=True)
class RunLogs:
    """Where each run of a command logs, through Avalanche's loggers; every run gets its own
    sub-folder (W&B: its own run) named after the run, ``<strategy>_seed<S>[_mem<M>]``.

    Attributes:
        tensorboard_dir: TensorBoard event files in ``tensorboard_dir/<run>/``.
        csv_dir: Avalanche's CSV files in ``csv_dir/<run>/``.
        wandb_project: a Weights & Biases project (needs ``pip install wandb``).
        text_dir: Avalanche's text log in ``text_dir/<run>.log``, written line by line.
    """

    tensorboard_dir: str | None = None
    csv_dir: str | None = None
    wandb_project: str | None = None
    text_dir: str | None = None

    def evaluator_kwargs(self, run_name: str, config: dict | None = None) -> dict:
        """Keyword arguments of :func:`avalanche_d2l.evaluation.make_evaluator` for one run."""
        kwargs: dict = {"loggers": []}
        if self.tensorboard_dir is not None:
            kwargs["tensorboard_dir"] = str(Path(self.tensorboard_dir).expanduser() / run_name)
        if self.csv_dir is not None:
            kwargs["csv_dir"] = str(Path(self.csv_dir).expanduser() / run_name)
        if self.text_dir is not None:
            folder = Path(self.text_dir).expanduser()
            folder.mkdir(parents=True, exist_ok=True)
            kwargs["loggers"].append(LineTextLogger(folder / f"{run_name}.log"))
        if self.wandb_project is not None:
            from avalanche.logging import WandBLogger

            kwargs["loggers"].append(
                WandBLogger(project_name=self.wandb_project, run_name=run_name, config=config)
            )
        return kwargs


def check_wandb() -> None:
    """``--wandb`` needs the ``wandb`` package; one sentence when it is missing."""
    if importlib.util.find_spec("wandb") is None:
        raise ValueError("--wandb needs the wandb package: pip install wandb (then wandb login)")


def _line_buffered(path: str | Path):
    return open(path, "a", buffering=1)  # noqa: SIM115 -- the logger's file, open for the run


class LineTextLogger(TextLogger):
    """Avalanche's ``TextLogger`` writing to a file line by line, so the log can be followed
    while the run goes (``tail -f``), also after a checkpoint's resume reopens it."""

    def __init__(self, path: str | Path):
        super().__init__(_line_buffered(path))

    def __setstate__(self, state):
        super().__setstate__(state)  # reopens the file in append mode, block-buffered
        name = getattr(self.file, "name", None)
        if isinstance(name, str) and not name.startswith("<"):
            self.file.close()
            self.file = _line_buffered(name)
