"""CUB-200-2011 (200 bird species) with the official train/test split, from a local root."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from avalanche.benchmarks import NCScenario

from avalanche_d2l.scenarios.folders import ImagePathDataset, _readable, _Source
from avalanche_d2l.scenarios.splits import (
    _check_class_count,
    _experience_sizes,
    _folder_benchmark,
    _open_folder_source,
)

__all__ = [
    "split_cub200",
]

CUB200_LAYOUT = """\
root/                          (root may also be the CUB_200_2011/ folder itself)
└── CUB_200_2011/
    ├── images.txt             <image_id> <path under images/>
    ├── image_class_labels.txt <image_id> <class_id, 1..200>
    ├── train_test_split.txt   <image_id> <1 = train, 0 = test>
    ├── classes.txt            <class_id> <class name>   (optional)
    └── images/
        ├── 001.Black_footed_Albatross/*.jpg
        └── ..."""


def _read_id_table(path: Path, source: _Source) -> dict[int, str]:
    """Parse a CUB ``<image_id> <value>`` file."""
    table: dict[int, str] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split(maxsplit=1)
            if len(parts) != 2 or not parts[0].isdigit():
                raise source.error(
                    ValueError, f"{path}:{lineno}: expected '<id> <value>', got {line.strip()!r}"
                )
            table[int(parts[0])] = parts[1].strip()
    if not table:
        raise source.error(ValueError, f"{path} is empty")
    return table


def split_cub200(
    root: str | Path,
    *,
    n_experiences: int = 10,
    first_experience_classes: int | None = None,
    image_size: int = 224,
    seed: int = 0,
    class_order: Sequence[int] | None = None,
    train_transform=None,
    eval_transform=None,
    normalize: bool = False,
    expected_classes: int | None = None,
) -> NCScenario:
    """Split CUB-200-2011 (200 bird species) with the official train/test split.

    Expected layout (the official archive, extracted)::

        root/                          (root may also be the CUB_200_2011/ folder itself)
        └── CUB_200_2011/
            ├── images.txt             <image_id> <path under images/>
            ├── image_class_labels.txt <image_id> <class_id, 1..200>
            ├── train_test_split.txt   <image_id> <1 = train, 0 = test>
            ├── classes.txt            <class_id> <class name>   (optional)
            └── images/
                ├── 001.Black_footed_Albatross/*.jpg
                └── ...

    Labels are the class ids in increasing order, from 0 (so ``class_id - 1`` for the full set).
    Images are read whole; Avalanche's ``CUB200`` crops each to its ``bounding_boxes.txt`` box
    and otherwise gives the same experiences (``tests/test_cub.py``).

    Args:
        root: folder holding ``CUB_200_2011/`` (or that folder).
        n_experiences: number of experiences, the first included.
        first_experience_classes: classes in the first experience; the other experiences share
            the rest equally. ``None`` splits all classes equally (``n_experiences`` must divide
            them).
        image_size: side of the square crops of the default transforms.
        seed: seeds the class order when ``class_order`` is ``None``.
        class_order: explicit permutation of the labels.
        train_transform: replaces :func:`default_image_transforms`' train transform.
        eval_transform: replaces its eval transform.
        normalize: append ImageNet mean/std normalisation to the default transforms.
        expected_classes: number of classes the files must hold (default 200).

    Raises:
        FileNotFoundError: missing root, folder or files; the message names the root and draws
            the expected layout.
        ValueError: malformed contents, a class count other than expected, or an
            ``n_experiences`` / ``first_experience_classes`` that does not split the classes.
    """
    name = "split_cub200"
    n_classes = 200 if expected_classes is None else expected_classes
    root, order, source = _open_folder_source(
        name,
        root,
        layout=CUB200_LAYOUT,
        n_classes=n_classes,
        n_experiences=n_experiences,
        image_size=image_size,
        class_order=class_order,
        first_experience_classes=first_experience_classes,
    )
    base = root / "CUB_200_2011" if (root / "CUB_200_2011").is_dir() else root
    needed = ["images.txt", "image_class_labels.txt", "train_test_split.txt", "images/"]
    missing = [n for n in needed if not (base / n).exists()]
    if missing:
        raise source.error(FileNotFoundError, f"missing {', '.join(missing)} in {base}")
    rel_paths = _read_id_table(base / "images.txt", source)
    class_ids = _read_id_table(base / "image_class_labels.txt", source)
    is_train = _read_id_table(base / "train_test_split.txt", source)
    for fname, table in (("image_class_labels.txt", class_ids), ("train_test_split.txt", is_train)):
        if table.keys() != rel_paths.keys():
            diff = sorted(rel_paths.keys() ^ table.keys())
            raise source.error(
                ValueError,
                f"images.txt and {fname} list different image ids "
                f"({len(diff)} differ, e.g. {diff[:5]})",
            )
    bad = [i for i in rel_paths if not class_ids[i].isdigit() or is_train[i] not in ("0", "1")]
    if bad:
        raise source.error(
            ValueError,
            f"image {bad[0]}: class id {class_ids[bad[0]]!r} / split "
            f"flag {is_train[bad[0]]!r}; expected an integer and 0 or 1",
        )
    ids = sorted(rel_paths)
    paths = [base / "images" / rel_paths[i] for i in ids]
    absent = [p for p in paths if not p.is_file()]
    if absent:
        raise source.error(
            FileNotFoundError,
            f"{len(absent)} image files listed in images.txt are missing, e.g. {absent[0]}",
        )
    sorted_ids = sorted({int(class_ids[i]) for i in ids})
    _check_class_count(len(sorted_ids), n_classes, source)
    label_of = {cid: label for label, cid in enumerate(sorted_ids)}
    names = {int(class_ids[i]): p.parent.name for p, i in zip(paths, ids)}  # folder names
    if (base / "classes.txt").is_file():
        names.update(
            {k: v for k, v in _read_id_table(base / "classes.txt", source).items() if k in label_of}
        )
    classes = [names[cid] for cid in sorted_ids]
    targets = [label_of[int(class_ids[i])] for i in ids]
    full = _readable(ImagePathDataset(paths=paths, targets=targets, classes=classes), source)
    train_idx = [k for k, i in enumerate(ids) if is_train[i] == "1"]
    test_idx = [k for k, i in enumerate(ids) if is_train[i] == "0"]
    train, test = full.subset(train_idx), full.subset(test_idx)
    lacking = sorted(set(range(n_classes)) - (set(train.targets) & set(test.targets)))
    if lacking:
        raise source.error(
            ValueError,
            f"classes {[classes[c] for c in lacking[:5]]} have no "
            "train or no test images in train_test_split.txt",
        )
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
        per_exp_classes=_experience_sizes(n_classes, n_experiences, first_experience_classes, name),
    )
