"""Reading image folders: lazy path datasets, class folders, and the errors that draw the layout.

Image-folder datasets are lazy: they keep file paths and targets and decode a file with PIL only
when an item is read, so building a benchmark over ImageNet-sized folders costs a directory scan
(and a header read per file), not a decode. Every error names the root and draws the folder layout
the loader expected (:class:`_Source`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImagePathDataset",
]


#: File suffixes (compared lower-case) read as images by the folder loaders.
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
)


class _Source:
    """Where a loader is reading from, so every error names the root and the expected layout."""

    def __init__(self, *, name: str, root: Path, layout: str):
        self.name = name
        self.root = root
        self.layout = layout

    def error(self, exc_type: type[Exception], what: str, hint: str | None = None) -> Exception:
        message = f"{self.name}: {what} (root: {self.root}).\nExpected layout:\n{self.layout}"
        if hint:
            message += f"\n{hint}"
        return exc_type(message)

    def require_root(self) -> None:
        if not self.root.is_dir():
            what = "root is not a folder" if self.root.exists() else "root does not exist"
            raise self.error(FileNotFoundError, what)


class ImagePathDataset(Dataset):
    """Lazy image dataset: file paths and integer targets, decoded with PIL only on access.

    Items are ``(PIL.Image in RGB, int label)`` like torchvision's ``ImageFolder``; the
    benchmark's train/eval transforms turn them into tensors. Only paths are held in memory, so
    the dataset pickles cheaply into ``DataLoader`` workers.

    Args:
        paths: image file paths.
        targets: class label of each path, in ``range(len(classes))``.
        classes: class names (folder names or wnids); ``classes[label]`` names a label.
    """

    def __init__(
        self, *, paths: Sequence[str | Path], targets: Sequence[int], classes: Sequence[str]
    ):
        if len(paths) != len(targets):
            raise ValueError(f"got {len(paths)} paths but {len(targets)} targets")
        self.paths = [str(p) for p in paths]
        self.targets = [int(t) for t in targets]
        self.classes = list(classes)
        out_of_range = sorted({t for t in self.targets if not 0 <= t < len(self.classes)})
        if out_of_range:
            raise ValueError(f"targets {out_of_range[:5]} are outside range({len(self.classes)})")

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.classes)}

    def subset(self, indices: Sequence[int]) -> ImagePathDataset:
        """The items at ``indices`` (same classes)."""
        return ImagePathDataset(
            paths=[self.paths[i] for i in indices],
            targets=[self.targets[i] for i in indices],
            classes=self.classes,
        )

    def __len__(self) -> int:
        return len(self.paths)

    def unreadable(self) -> list[str]:
        """Files that are empty, not images, or of zero size, read from their headers only (no
        decode: a few milliseconds a file). ``--check-data`` decodes every file in full."""
        problems = []
        bar = tqdm(self.paths, desc="image headers", unit="file", leave=False, mininterval=1.0)
        for path in bar:
            try:
                with Image.open(path) as img:
                    width, height = img.size
                if width < 1 or height < 1:
                    problems.append(f"{path}: image of size {width}x{height}")
            except (OSError, SyntaxError, ValueError) as err:
                problems.append(f"{path}: {err}")
        return problems

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path = self.paths[index]
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB")  # greyscale / CMYK / palette files -> 3 channels
        except (OSError, SyntaxError, ValueError) as err:  # truncated or not an image
            raise OSError(
                f"cannot read image {path}: {err} (remove or replace the file; "
                "`--check-data` lists every unreadable one before training)"
            ) from err
        return rgb, self.targets[index]


def _list_images(folder: Path, extensions: Sequence[str]) -> list[str]:
    exts = tuple(e.lower() for e in extensions)
    with os.scandir(folder) as entries:
        return sorted(
            e.path
            for e in entries
            if e.is_file() and e.name.lower().endswith(exts) and not e.name.startswith(".")
        )


def _read_class_folders(
    split_dir: Path,
    *,
    source: _Source,
    classes: Sequence[str] | None = None,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> ImagePathDataset:
    """The shared image-folder reader: ``split_dir/<class>/<image>`` -> :class:`ImagePathDataset`.

    Args:
        split_dir: folder holding one sub-folder per class.
        source: dataset name, root and layout used in error messages.
        classes: class folder names in label order; ``None`` uses the sorted sub-folder names
            (hidden folders skipped). With explicit classes, other sub-folders are ignored.
        extensions: file suffixes read as images (case-insensitive).

    Raises:
        FileNotFoundError: ``split_dir`` or a requested class folder is missing.
        ValueError: no class folders, or a class folder without images.
    """
    if not split_dir.is_dir():
        raise source.error(FileNotFoundError, f"missing folder {split_dir}")
    with os.scandir(split_dir) as entries:
        subdirs = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    if classes is None:
        if not subdirs:
            loose = _list_images(split_dir, extensions)
            hint = (
                f"It holds {len(loose)} image files but no class folders: sort the images into "
                "one sub-folder per class."
                if loose
                else None
            )
            raise source.error(ValueError, f"no class folders in {split_dir}", hint)
        classes = subdirs
    else:
        present = set(subdirs)
        missing = [c for c in classes if c not in present]
        if missing:
            loose = _list_images(split_dir, extensions)
            hint = (
                f"{split_dir} holds {len(loose)} loose image files: sort them into one folder "
                "per class (ImageNet's val/ ships flat; use its ground-truth labels to sort "
                "it)."
                if loose
                else None
            )
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise source.error(
                FileNotFoundError,
                f"{len(missing)} of {len(classes)} class folders missing in {split_dir}: {shown}",
                hint,
            )
    paths: list[str] = []
    targets: list[int] = []
    for label, name in enumerate(classes):
        files = _list_images(split_dir / name, extensions)
        if not files:
            raise source.error(
                ValueError,
                f"class folder {split_dir / name} has no image files "
                f"(looked for {', '.join(extensions)})",
            )
        paths += files
        targets += [label] * len(files)
    return _readable(ImagePathDataset(paths=paths, targets=targets, classes=classes), source)


def _readable(dataset: ImagePathDataset, source: _Source) -> ImagePathDataset:
    """``dataset`` once every file's header reads as an image, else one error listing them."""
    problems = dataset.unreadable()
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(
            f"{source.name}: {len(problems)} file(s) under {source.root} are not readable "
            f"images; remove or replace them, then run again:\n  {shown}{more}"
        )
    return dataset


def _find_split_dir(root: Path, names: Sequence[str]) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


def _read_train_test_folders(
    train_dir: Path, test_dir: Path, *, source: _Source, classes: Sequence[str] | None = None
) -> tuple[ImagePathDataset, ImagePathDataset]:
    """Both splits with one label order: the train split's classes (or ``classes``)."""
    train = _read_class_folders(train_dir, source=source, classes=classes)
    if classes is None:
        known = set(train.classes)
        with os.scandir(test_dir) as entries:
            extra = sorted(
                e.name
                for e in entries
                if e.is_dir() and not e.name.startswith(".") and e.name not in known
            )
        if extra:
            raise source.error(
                ValueError,
                f"{test_dir} has class folders that {train_dir} lacks: "
                f"{', '.join(extra[:5])}{', ...' if len(extra) > 5 else ''}",
                "Train and test must hold the same classes (a few-shot split with "
                "disjoint classes per split is not a class-incremental split).",
            )
    test = _read_class_folders(test_dir, source=source, classes=train.classes)
    return train, test
