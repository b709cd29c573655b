"""From datasets to class-incremental benchmarks: class splits, class orders, default transforms.

Every builder of the package returns a class-incremental Avalanche benchmark (``nc_benchmark``,
``task_labels=False``) whose images are tensors in [0, 1] unless a normalising transform is asked
for; the checks of the arguments run before any folder is read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from avalanche.benchmarks import NCScenario, nc_benchmark
from avalanche.benchmarks.utils import _make_taskaware_classification_dataset
from torch.utils.data import Dataset
from torchvision import transforms as T

from avalanche_d2l.scenarios.folders import ImagePathDataset, _Source

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "default_image_transforms",
    "stratified_split",
]


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _open_folder_source(
    name: str,
    root,
    *,
    layout: str,
    n_classes: int,
    n_experiences: int,
    image_size: int,
    class_order,
    named_orders=None,
    first_experience_classes: int | None = None,
):
    """The checks every image-folder loader starts with, in order: image size, experience split,
    class order, root folder. Returns ``(root, order, source)``."""
    _check_image_size(image_size)
    _experience_sizes(n_classes, n_experiences, first_experience_classes, name)
    if named_orders is None:
        order = _resolve_class_order(class_order, n_classes, name)
    else:
        order = _resolve_class_order(class_order, n_classes, name, named_orders)
    root = Path(root).expanduser()
    source = _Source(name=name, root=root, layout=layout)
    source.require_root()
    return root, order, source


def stratified_split(
    targets: Sequence[int], *, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split of item indices into (train, test).

    Each class sends ``round(n * test_fraction)`` of its ``n`` items to the test side, at least
    one and never all of them, so every class is in both splits.

    Raises:
        ValueError: ``test_fraction`` outside (0, 1), or a class with fewer than 2 items.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    y = np.asarray(targets)
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        if len(idx) < 2:
            raise ValueError(f"class {c} has {len(idx)} item(s); a train/test split needs >= 2")
        n_test = min(max(round(len(idx) * test_fraction), 1), len(idx) - 1)
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(test_idx))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _experience_sizes(
    n_classes: int, n_experiences: int, first_experience_classes: int | None, name: str
) -> dict[int, int] | None:
    """Validate the class split; return ``per_exp_classes`` for ``nc_benchmark``."""
    if n_experiences < 1:
        raise ValueError(f"{name}: n_experiences must be >= 1, got {n_experiences}")
    if first_experience_classes is None:
        if n_classes % n_experiences != 0:
            raise ValueError(
                f"{name}: n_experiences={n_experiences} does not divide the {n_classes} classes "
                f"evenly; pick one of {_divisors(n_classes)}"
            )
        return None
    rest, later = n_classes - first_experience_classes, n_experiences - 1
    if (
        not 0 < first_experience_classes <= n_classes
        or (later == 0) != (rest == 0)
        or (later > 0 and rest % later != 0)
    ):
        raise ValueError(
            f"{name}: first_experience_classes={first_experience_classes} and "
            f"n_experiences={n_experiences} do not split the {n_classes} classes: the other "
            f"{n_experiences - 1} experience(s) must share the remaining {rest} classes evenly "
            f"(e.g. 50 base classes + 5 tasks of 10 for 100 classes); "
            "or pass first_experience_classes=None for an equal split"
        )
    return {0: first_experience_classes}


def _resolve_class_order(
    class_order: Sequence[int] | str | None,
    n_classes: int,
    name: str,
    named: Mapping[str, Callable[[], list[int]]] | None = None,
) -> list[int] | None:
    """Explicit list -> validated list; a known name -> its order; None -> None (seeded shuffle)."""
    named = dict(named or {})
    if class_order is None:
        return None
    if isinstance(class_order, str):
        if class_order not in named:
            raise ValueError(
                f"{name}: unknown class_order {class_order!r}; pass one of "
                f"{sorted(named)}, an explicit list of class ids, or None (seeded)"
            )
        order = named[class_order]()
    else:
        order = [int(c) for c in class_order]
    if sorted(order) != list(range(n_classes)):
        raise ValueError(
            f"{name}: class_order must be a permutation of 0..{n_classes - 1}, "
            f"got {len(order)} ids {order[:10]}{' ...' if len(order) > 10 else ''}"
        )
    return order


def _check_class_count(n_found: int, expected: int, source: _Source) -> None:
    if n_found != expected:
        raise source.error(
            ValueError,
            f"found {n_found} classes, expected {expected}",
            "Pass expected_classes to use a subset of the dataset on purpose.",
        )


def _check_image_size(image_size: int) -> None:
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")


def default_image_transforms(
    image_size: int,
    *,
    normalize: bool = False,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
):
    """Default (train, eval) transforms for the image-folder benchmarks.

    Train: resize the short side to ``round(image_size * 8 / 7)`` (256 for 224), random crop
    ``image_size``, horizontal flip, ``ToTensor``. Eval: same resize, centre crop, ``ToTensor``.
    Images stay in [0, 1] unless ``normalize`` appends ``Normalize(mean, std)``.
    """
    _check_image_size(image_size)
    resize = max(image_size, round(image_size * 8 / 7))
    tail = [T.ToTensor()] + ([T.Normalize(mean, std)] if normalize else [])
    train = T.Compose([T.Resize(resize), T.RandomCrop(image_size), T.RandomHorizontalFlip(), *tail])
    test = T.Compose([T.Resize(resize), T.CenterCrop(image_size), *tail])
    return train, test


def _build_benchmark(
    train: Dataset,
    test: Dataset,
    *,
    n_experiences: int,
    seed: int,
    class_order: list[int] | None,
    per_exp_classes: dict[int, int] | None,
    train_transform,
    eval_transform,
) -> NCScenario:
    """Wrap both datasets as Avalanche classification datasets and split them by class."""
    return nc_benchmark(
        _make_taskaware_classification_dataset(train, task_labels=0),
        _make_taskaware_classification_dataset(test, task_labels=0),
        n_experiences=n_experiences,
        task_labels=False,
        shuffle=class_order is None,
        seed=seed,
        fixed_class_order=class_order,
        per_exp_classes=per_exp_classes,
        train_transform=train_transform,
        eval_transform=eval_transform,
    )


def _folder_benchmark(
    train: ImagePathDataset,
    test: ImagePathDataset,
    *,
    n_experiences: int,
    image_size: int,
    seed: int,
    order: list[int] | None,
    normalize: bool,
    train_transform,
    eval_transform,
    per_exp_classes: dict[int, int] | None = None,
) -> NCScenario:
    default_train, default_eval = default_image_transforms(image_size, normalize=normalize)
    return _build_benchmark(
        train,
        test,
        n_experiences=n_experiences,
        seed=seed,
        class_order=order,
        per_exp_classes=per_exp_classes,
        train_transform=train_transform if train_transform is not None else default_train,
        eval_transform=eval_transform if eval_transform is not None else default_eval,
    )
