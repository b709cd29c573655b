"""The user's own image folders (``train/<class>/``, ``test/<class>/``), listed by torchvision's
``ImageFolder`` with our errors on top, split class-incrementally.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from avalanche.benchmarks import NCScenario

from avalanche_d2l.scenarios.folders import (
    IMAGE_EXTENSIONS,
    ImagePathDataset,
    _find_split_dir,
    _list_images,
    _readable,
    _Source,
)
from avalanche_d2l.scenarios.splits import (
    _build_benchmark,
    _check_image_size,
    _resolve_class_order,
    default_image_transforms,
)

__all__ = [
    "image_folder",
]

IMAGE_FOLDER_LAYOUT = """\
root/                          (your data: any class names, any image sizes)
├── train/
│   ├── cat/*.jpg              (one folder per class)
│   └── dog/*.png
└── test/                      (or val/: the same class folders)
    ├── cat/*.jpg
    └── dog/*.png"""


def _list_image_folder(
    split_dir: Path, source: _Source, class_to_idx: Mapping[str, int] | None = None
) -> ImagePathDataset:
    """``split_dir/<class>/<image>`` listed by torchvision's ``ImageFolder`` (hidden folders and
    files skipped), with our messages for what it would refuse and every file's header read."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import find_classes

    if not split_dir.is_dir():
        raise source.error(FileNotFoundError, f"missing folder {split_dir}")
    try:
        found, _ = find_classes(str(split_dir))  # what ImageFolder lists
    except FileNotFoundError:
        found = []
    found = [c for c in found if not c.startswith(".")]
    if not found:
        loose = _list_images(split_dir, IMAGE_EXTENSIONS)
        hint = "Sort the images into one sub-folder per class." if loose else None
        raise source.error(ValueError, f"no class folders in {split_dir}", hint)
    if class_to_idx is None:
        class_to_idx = {name: i for i, name in enumerate(found)}
    elif extra := sorted(set(found) - set(class_to_idx)):
        raise source.error(
            ValueError,
            f"{split_dir} has class folders that train/ lacks: {', '.join(extra[:5])}",
            "Train and test must hold the same classes.",
        )
    samples = ImageFolder.make_dataset(
        str(split_dir),
        dict(class_to_idx),
        is_valid_file=lambda p: (
            p.lower().endswith(IMAGE_EXTENSIONS) and not os.path.basename(p).startswith(".")
        ),
        allow_empty=True,
    )
    counts = np.bincount([t for _, t in samples], minlength=len(class_to_idx))
    empty = [c for c, i in class_to_idx.items() if counts[i] == 0]
    if empty:
        raise source.error(
            ValueError,
            f"{len(empty)} class folder(s) in {split_dir} missing or without image files: "
            f"{', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''} "
            f"(looked for {', '.join(IMAGE_EXTENSIONS)})",
        )
    classes = sorted(class_to_idx, key=class_to_idx.__getitem__)
    dataset = ImagePathDataset(
        paths=[p for p, _ in samples], targets=[t for _, t in samples], classes=classes
    )
    return _readable(dataset, source)


def image_folder(
    root: str | Path,
    *,
    n_experiences: int | None = None,
    image_size: int = 32,
    seed: int = 0,
    class_order: Sequence[int] | None = None,
    train_transform=None,
    eval_transform=None,
    normalize: bool = False,
) -> NCScenario:
    """Your own images, split class-incrementally (``compare --benchmark image_folder``).

    Expected layout (``val/`` is accepted in place of ``test/``)::

        root/
        ├── train/
        │   ├── cat/*.jpg              (one folder per class)
        │   └── dog/*.png
        └── test/                      (the same class folders)

    Files are listed with torchvision's ``ImageFolder`` (labels follow the sorted class folder
    names; hidden folders and files are skipped) and every file's header is read before any
    training. The classes are shuffled with ``seed`` (each run's seed) unless ``class_order`` is
    given, and cut into ``n_experiences`` experiences of equal size; when they do not divide
    evenly the first experience takes the remainder (7 classes in 3: 3 + 2 + 2).

    Args:
        root: the folder holding ``train/`` and ``test/`` (or ``val/``).
        n_experiences: number of experiences (default: two classes each, ``n_classes // 2``).
        image_size: side of the square crops of :func:`default_image_transforms`.
        seed: seeds the class order when ``class_order`` is ``None``.
        class_order: explicit permutation of the labels.
        train_transform, eval_transform: replace the default transforms.
        normalize: append ImageNet mean/std normalisation to the default transforms.

    Raises:
        FileNotFoundError: missing root or split folder (the message draws the layout).
        ValueError: no class folders, an empty class, test classes that train lacks, unreadable
            files, or ``n_experiences`` outside ``1..n_classes``.
    """
    name = "image_folder"
    _check_image_size(image_size)
    root = Path(root).expanduser()
    source = _Source(name=name, root=root, layout=IMAGE_FOLDER_LAYOUT)
    source.require_root()
    test_dir = _find_split_dir(root, ("test", "val"))
    found = (("train/", (root / "train").is_dir()), ("test/ (or val/)", test_dir is not None))
    lacking = [d for d, ok in found if not ok]
    if lacking:
        raise source.error(FileNotFoundError, f"missing {' and '.join(lacking)}")
    train = _list_image_folder(root / "train", source)
    test = _list_image_folder(test_dir, source, train.class_to_idx)
    n_classes = len(train.classes)
    k = max(1, n_classes // 2) if n_experiences is None else n_experiences
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_classes:
        raise ValueError(
            f"{name}: n_experiences must be a whole number from 1 to the {n_classes} classes "
            f"of {root}, got {n_experiences!r}"
        )
    order = _resolve_class_order(class_order, n_classes, name)
    rest = n_classes % k
    default_train, default_eval = default_image_transforms(image_size, normalize=normalize)
    return _build_benchmark(
        train,
        test,
        n_experiences=k,
        seed=seed,
        class_order=order,
        per_exp_classes={0: n_classes // k + rest} if rest else None,
        train_transform=train_transform if train_transform is not None else default_train,
        eval_transform=eval_transform if eval_transform is not None else default_eval,
    )
