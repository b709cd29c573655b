"""The ImageNet-derived benchmarks of D2L from local folders: Mini-ImageNet, ImageNet-R and
FG-ImageNet (each function's docstring draws the layout it expects).
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from avalanche.benchmarks import NCScenario

from avalanche_d2l.scenarios.folders import (
    _find_split_dir,
    _read_class_folders,
    _read_train_test_folders,
)
from avalanche_d2l.scenarios.splits import (
    _check_class_count,
    _folder_benchmark,
    _open_folder_source,
    stratified_split,
)

__all__ = [
    "fg_imagenet_wnids",
    "split_fg_imagenet",
    "split_imagenet_r",
    "split_mini_imagenet",
]

MINI_IMAGENET_LAYOUT = """\
root/
├── train/
│   ├── n01532829/*.jpg
│   └── ...                    (one folder per class, 100 classes)
└── test/                      (or val/: the same class folders)
    ├── n01532829/*.jpg
    └── ..."""

IMAGENET_R_LAYOUT = """\
root/
└── imagenet-r/                (or the class folders directly under root/)
    ├── n01443537/*.jpg
    └── ...                    (one folder per class, 200 classes)
or, with your own split:
root/
├── train/<wnid>/*.jpg
└── test/<wnid>/*.jpg          (or val/)"""

FG_IMAGENET_LAYOUT = """\
root/                          (ImageNet-1k / ILSVRC2012 layout)
├── train/
│   ├── n01943899/*.JPEG       (the 100 FG-ImageNet wnids; others are ignored)
│   └── ...
└── val/                       (or test/; validation images sorted into wnid folders)
    ├── n01943899/*.JPEG
    └── ..."""


def split_mini_imagenet(
    root: str | Path,
    *,
    n_experiences: int = 20,
    image_size: int = 84,
    seed: int = 0,
    class_order: Sequence[int] | None = None,
    train_transform=None,
    eval_transform=None,
    normalize: bool = False,
    expected_classes: int | None = None,
) -> NCScenario:
    """Split Mini-ImageNet (100 classes, 84 px) with a per-class train/test split.

    Expected layout (``val/`` is accepted in place of ``test/``)::

        root/
        ├── train/
        │   ├── n01532829/*.jpg
        │   └── ...                    (one folder per class, 100 classes)
        └── test/                      (or val/: the same class folders)
            ├── n01532829/*.jpg
            └── ...

    Labels follow the sorted class folder names (wnids). The few-shot split of Mini-ImageNet
    (64/16/20 disjoint classes) is not this layout: continual learning needs every class in
    both splits.

    Args:
        root: the folder holding ``train/`` and ``test/`` (or ``val/``).
        n_experiences: number of experiences; must divide the number of classes.
        image_size: side of the square crops of the default transforms.
        seed: seeds the class order when ``class_order`` is ``None``.
        class_order: explicit permutation of the labels.
        train_transform: replaces :func:`default_image_transforms`' train transform.
        eval_transform: replaces its eval transform.
        normalize: append ImageNet mean/std normalisation to the default transforms.
        expected_classes: number of classes the folders must hold (default 100).

    Raises:
        FileNotFoundError: missing root, folder or files; the message names the root and draws
            the expected layout.
        ValueError: malformed contents, a class count other than expected, or an
            ``n_experiences`` that does not divide the classes.
    """
    name = "split_mini_imagenet"
    n_classes = 100 if expected_classes is None else expected_classes
    root, order, source = _open_folder_source(
        name,
        root,
        layout=MINI_IMAGENET_LAYOUT,
        n_classes=n_classes,
        n_experiences=n_experiences,
        image_size=image_size,
        class_order=class_order,
    )
    test_dir = _find_split_dir(root, ("test", "val"))
    if not (root / "train").is_dir() or test_dir is None:
        lacking = [
            d
            for d, ok in (
                ("train/", (root / "train").is_dir()),
                ("test/ (or val/)", test_dir is not None),
            )
            if not ok
        ]
        raise source.error(FileNotFoundError, f"missing {' and '.join(lacking)}")
    train, test = _read_train_test_folders(root / "train", test_dir, source=source)
    _check_class_count(len(train.classes), n_classes, source)
    return _folder_benchmark(
        train,
        test,
        n_experiences=n_experiences,
        image_size=image_size,
        seed=seed,
        order=order,
        normalize=normalize,
        train_transform=train_transform,
        eval_transform=eval_transform,
    )


def split_imagenet_r(
    root: str | Path,
    *,
    n_experiences: int = 10,
    image_size: int = 224,
    test_fraction: float = 0.2,
    seed: int = 0,
    class_order: Sequence[int] | None = None,
    train_transform=None,
    eval_transform=None,
    normalize: bool = False,
    expected_classes: int | None = None,
) -> NCScenario:
    """Split ImageNet-R (renditions of 200 ImageNet classes).

    Expected layout (the official ``imagenet-r.tar`` extracted into ``root``)::

        root/
        └── imagenet-r/                (or the class folders directly under root/)
            ├── n01443537/*.jpg
            └── ...                    (one folder per class, 200 classes)

    ImageNet-R ships without a split: each class is split into train/test by
    :func:`stratified_split` (``test_fraction`` of its images to test, seeded by ``seed``). A
    split made beforehand is used as is when present::

        root/
        ├── train/<wnid>/*.jpg
        └── test/<wnid>/*.jpg          (or val/)

    Labels follow the sorted class folder names (wnids).

    Args:
        root: see the layouts above.
        n_experiences: number of experiences; must divide the number of classes.
        image_size: side of the square crops of the default transforms.
        test_fraction: fraction of each class held out when no split is present.
        seed: seeds the train/test split and, when ``class_order`` is ``None``, the class order.
        class_order: explicit permutation of the labels.
        train_transform: replaces :func:`default_image_transforms`' train transform.
        eval_transform: replaces its eval transform.
        normalize: append ImageNet mean/std normalisation to the default transforms.
        expected_classes: number of classes the folders must hold (default 200).

    Raises:
        FileNotFoundError: missing root, folder or files; the message names the root and draws
            the expected layout.
        ValueError: malformed contents, a class count other than expected, or an
            ``n_experiences`` that does not divide the classes.
    """
    name = "split_imagenet_r"
    n_classes = 200 if expected_classes is None else expected_classes
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"{name}: test_fraction must be in (0, 1), got {test_fraction}")
    root, order, source = _open_folder_source(
        name,
        root,
        layout=IMAGENET_R_LAYOUT,
        n_classes=n_classes,
        n_experiences=n_experiences,
        image_size=image_size,
        class_order=class_order,
    )
    test_dir = _find_split_dir(root, ("test", "val"))
    if (root / "train").is_dir() and test_dir is not None:
        train, test = _read_train_test_folders(root / "train", test_dir, source=source)
    else:
        class_dir = root / "imagenet-r" if (root / "imagenet-r").is_dir() else root
        full = _read_class_folders(class_dir, source=source)
        try:
            train_idx, test_idx = stratified_split(
                full.targets, test_fraction=test_fraction, seed=seed
            )
        except ValueError as err:
            raise source.error(ValueError, str(err)) from err
        train, test = full.subset(train_idx.tolist()), full.subset(test_idx.tolist())
    _check_class_count(len(train.classes), n_classes, source)
    return _folder_benchmark(
        train,
        test,
        n_experiences=n_experiences,
        image_size=image_size,
        seed=seed,
        order=order,
        normalize=normalize,
        train_transform=train_transform,
        eval_transform=eval_transform,
    )


def fg_imagenet_wnids() -> list[str]:
    """The 100 FG-ImageNet wnids in label order (packaged ``data/fg_imagenet_wnids.txt``)."""
    text = (
        resources.files("avalanche_d2l")
        .joinpath("data", "fg_imagenet_wnids.txt")
        .read_text(encoding="utf-8")
    )
    return [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def split_fg_imagenet(
    root: str | Path,
    *,
    n_experiences: int = 20,
    image_size: int = 256,
    seed: int = 0,
    class_order: Sequence[int] | str | None = "wnids",
    wnids: Sequence[str] | None = None,
    train_transform=None,
    eval_transform=None,
    normalize: bool = False,
) -> NCScenario:
    """Split FG-ImageNet: 100 fine-grained ImageNet-1k classes, 20 experiences of 5 (D2L/WSCL).

    The classes are the wnids of :func:`fg_imagenet_wnids` (line order = label order); only
    their folders are read, so ``root`` can be a full ImageNet-1k copy. Expected layout
    (ImageNet's, with ``val/`` sorted into wnid folders; ``test/`` is accepted for ``val/``)::

        root/
        ├── train/
        │   ├── n01943899/*.JPEG       (the 100 FG-ImageNet wnids; others are ignored)
        │   └── ...
        └── val/
            ├── n01943899/*.JPEG
            └── ...

    Args:
        root: the ImageNet folder holding ``train/`` and ``val/``.
        n_experiences: number of experiences; must divide the number of classes.
        image_size: side of the square crops of the default transforms.
        seed: seeds the class order when ``class_order`` is ``None``.
        class_order: ``"wnids"`` (the list order: experience k holds labels 5k..5k+4), an
            explicit permutation of the labels, or ``None`` for a permutation seeded by ``seed``.
        wnids: replaces the packaged class list (label order = this order), e.g. a subset.
        train_transform: replaces :func:`default_image_transforms`' train transform.
        eval_transform: replaces its eval transform.
        normalize: append ImageNet mean/std normalisation to the default transforms.

    Raises:
        FileNotFoundError: missing root, split folder or wnid folders; the message names the root
            and draws the expected layout (and spots a flat, unsorted ``val/``).
        ValueError: repeated wnids, empty class folders, or an ``n_experiences`` that does not
            divide the classes.
    """
    name = "split_fg_imagenet"
    classes = list(wnids) if wnids is not None else fg_imagenet_wnids()
    duplicated = sorted({w for w in classes if classes.count(w) > 1})
    if not classes or duplicated:
        raise ValueError(
            f"{name}: wnids must be a non-empty list without repeats; repeated: {duplicated}"
        )
    n_classes = len(classes)
    root, order, source = _open_folder_source(
        name,
        root,
        layout=FG_IMAGENET_LAYOUT,
        n_classes=n_classes,
        n_experiences=n_experiences,
        image_size=image_size,
        class_order=class_order,
        named_orders={"wnids": lambda: list(range(n_classes))},
    )
    test_dir = _find_split_dir(root, ("val", "test"))
    if not (root / "train").is_dir() or test_dir is None:
        lacking = [
            d
            for d, ok in (
                ("train/", (root / "train").is_dir()),
                ("val/ (or test/)", test_dir is not None),
            )
            if not ok
        ]
        raise source.error(FileNotFoundError, f"missing {' and '.join(lacking)}")
    train, test = _read_train_test_folders(root / "train", test_dir, source=source, classes=classes)
    return _folder_benchmark(
        train,
        test,
        n_experiences=n_experiences,
        image_size=image_size,
        seed=seed,
        order=order,
        normalize=normalize,
        train_transform=train_transform,
        eval_transform=eval_transform,
    )
