"""Benchmark and model builders shared by every entry point (``compare``, ``run``, notebooks,
benchmark scripts)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from avalanche_d2l.utils import get_module

__all__ = [
    "BENCHMARKS",
    "BenchmarkInfo",
    "build_benchmark",
    "build_model",
    "check_benchmark_section",
    "check_class_incremental",
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
}

#: Module names of the CIFAR-style classifiers -> torchvision ResNet's (same role).
TORCHVISION_LAYER_NAMES = {"features": "avgpool", "linear": "fc"}

#: Largest image side for which ``resnet18`` means the CIFAR-stem ResNet-18.
CIFAR_STEM_MAX_SIZE = 64


def _loader(name: str):
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
    check_keys(section, loader_keywords(_loader(name)) | {"name"}, f"benchmark ({name})")


def build_benchmark(section: dict[str, Any], data_root: str | Path | None, seed: int):
    """The Avalanche benchmark of an experiment's ``benchmark`` section for one seed.

    Raises:
        ValueError: a benchmark that reads local files without ``data_root``.
        FileNotFoundError: missing or malformed data (the loaders draw the expected layout).
    """
    name = section["name"]
    kwargs = {k: v for k, v in section.items() if k != "name"}
    loader = _loader(name)
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

    Raises:
        ValueError: unknown model, unsupported channels/width, or a feature layer the model lacks
            (the message lists its module names).
    """
    from avalanche_d2l.models import resnet18_cifar, small_cnn

    c, h, w = (int(s) for s in image_shape)
    kw = {} if width is None else {"width": width}
    layer = feature_layer
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
        raise ValueError(f"unknown model {name!r}; valid: small_cnn, resnet18, resnet18_cifar")
    get_module(model, layer)  # clear error listing the module names
    return model, layer
