"""Benchmark builders.

* :func:`split_digits` -- the offline default: class-incremental split of scikit-learn's bundled
  handwritten digits (1,797 8x8 images), resized; needs no download.
* :func:`tensor_benchmark` -- any in-memory image tensors.
* Paper benchmarks read from local folders (each function's docstring draws the layout it expects):
  :func:`split_cifar100` (Genifer), :func:`split_cub200` (Genifer), :func:`split_mini_imagenet`,
  :func:`split_imagenet_r` and :func:`split_fg_imagenet` (D2L).

All builders return class-incremental Avalanche benchmarks (``nc_benchmark``, ``task_labels=False``)
whose images are tensors in [0, 1] unless a normalising transform is asked for. Image-folder
datasets are lazy: they keep file paths and targets and decode a file with PIL only when an item is
read, so building a benchmark over ImageNet-sized folders costs a directory scan, not a decode.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from avalanche.benchmarks import NCScenario, nc_benchmark
from avalanche.benchmarks.utils import (
    _make_taskaware_classification_dataset,
    _make_taskaware_tensor_classification_dataset,
)
from PIL import Image
from torch.nn import functional as F
from torch.utils.data import Dataset
from torchvision import transforms as T
from tqdm.auto import tqdm

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImagePathDataset",
    "default_image_transforms",
    "fg_imagenet_wnids",
    "icarl_class_order",
    "image_folder",
    "split_cifar100",
    "split_color_digits",
    "split_cub200",
    "split_digits",
    "split_fg_imagenet",
    "split_imagenet_r",
    "split_mini_imagenet",
    "stratified_split",
    "tensor_benchmark",
]


def tensor_benchmark(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    *,
    n_experiences: int,
    seed: int = 0,
    class_order: Sequence[int] | None = None,
    per_exp_classes: dict[int, int] | None = None,
):
    """Class-incremental Avalanche benchmark from in-memory image tensors (N, C, H, W)."""
    train = _make_taskaware_tensor_classification_dataset(x_train, y_train.long(), task_labels=0)
    test = _make_taskaware_tensor_classification_dataset(x_test, y_test.long(), task_labels=0)
    n_classes = int(torch.unique(y_train).numel())
    if n_experiences < 1 or (per_exp_classes is None and n_classes % n_experiences != 0):
        raise ValueError(
            f"n_experiences={n_experiences} does not divide the {n_classes} classes evenly; "
            f"pick a divisor of {n_classes} or pass per_exp_classes"
        )
    return nc_benchmark(
        train,
        test,
        n_experiences=n_experiences,
        task_labels=False,
        shuffle=class_order is None,
        seed=seed,
        fixed_class_order=list(class_order) if class_order is not None else None,
        per_exp_classes=per_exp_classes,
    )


def _digits_tensors(image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as (N, 1, image_size, image_size) in [0, 1] and their labels."""
    from sklearn.datasets import load_digits

    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 (the digits are 8x8), got {image_size}")
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if image_size != 8:
        x = F.interpolate(
            x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False
        ).clamp(0, 1)
    return x, torch.tensor(digits.target, dtype=torch.long)


def _split_digit_tensors(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    n_experiences: int,
    seed: int,
    class_order: Sequence[int] | None,
    test_size: float,
):
    """Stratified, seeded train/test split of digit tensors into a class-incremental benchmark."""
    from sklearn.model_selection import train_test_split

    if class_order is not None and sorted(class_order) != list(range(10)):
        raise ValueError(f"class_order must be a permutation of 0..9, got {list(class_order)}")
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=test_size, stratify=y.numpy(), random_state=seed
    )
    idx_train, idx_test = torch.as_tensor(idx_train), torch.as_tensor(idx_test)
    return tensor_benchmark(
        x[idx_train],
        y[idx_train],
        x[idx_test],
        y[idx_test],
        n_experiences=n_experiences,
        seed=seed,
        class_order=class_order,
    )


def split_digits(
    n_experiences: int = 5,
    image_size: int = 16,
    channels: int = 1,
    seed: int = 0,
    class_order: Sequence[int] | None = None,
    test_size: float = 0.3,
):
    """Split handwritten digits: the offline class-incremental benchmark.

    Images are scikit-learn's 8x8 digits scaled to [0, 1] and resized (bilinear, antialiased) to
    ``image_size``; ``channels=3`` repeats the grey channel. The train/test split is stratified
    and seeded; the class order is a seeded permutation unless ``class_order`` is given.

    Args:
        n_experiences: number of experiences; must divide 10.
        image_size: side of the square images, >= 8.
        channels: 1 or 3.
        seed: seeds the split and the class order.
        class_order: explicit order of the 10 classes.
        test_size: fraction of each class held out for the test stream.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    x, y = _digits_tensors(image_size)
    if channels == 3:
        x = x.repeat(1, 3, 1, 1)
    return _split_digit_tensors(
        x, y, n_experiences=n_experiences, seed=seed, class_order=class_order, test_size=test_size
    )


def split_color_digits(
    n_experiences: int = 5,
    image_size: int = 16,
    seed: int = 0,
    class_order: Sequence[int] | None = None,
    test_size: float = 0.3,
):
    """A second offline stream: the digits in colour, shifted and rescaled.

    Each image gets its own random stroke colour and a darker random background colour (RGB),
    a random isotropic scale in [0.75, 1.1] and a random shift of up to 1/8 of the side. The
    distortions are drawn once per image from a generator seeded by ``seed``, so the benchmark is
    fixed for a seed. Harder than :func:`split_digits` (colour is a nuisance, position varies),
    with the same classes; images (3, ``image_size``, ``image_size``) in [0, 1].

    Args: as :func:`split_digits`.
    """
    x, y = _digits_tensors(image_size)
    g = torch.Generator().manual_seed(10_007 + seed)
    n = x.shape[0]
    scale = torch.empty(n).uniform_(0.75, 1.1, generator=g)
    shift = torch.empty(n, 2).uniform_(-0.25, 0.25, generator=g)  # grid units: 1/8 of the side
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="zeros", align_corners=False).clamp(0, 1)
    fg = torch.empty(n, 3, 1, 1).uniform_(0.5, 1.0, generator=g)
    bg = torch.empty(n, 3, 1, 1).uniform_(0.0, 0.35, generator=g)
    x = bg + (fg - bg) * x
    return _split_digit_tensors(
        x, y, n_experiences=n_experiences, seed=seed, class_order=class_order, test_size=test_size
    )


# ---------------------------------------------------------------------------------------------
# Paper benchmarks from local folders
# ---------------------------------------------------------------------------------------------

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

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

CIFAR100_LAYOUT = """\
root/
└── cifar-100-python/     (torchvision's CIFAR-100 "python version")
    ├── train
    ├── test
    └── meta"""

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
):
    """The checks every image-folder loader starts with, in order: image size, experience split,
    class order, root folder. Returns ``(root, order, source)``."""
    _check_image_size(image_size)
    _experience_sizes(n_classes, n_experiences, None, name)
    if named_orders is None:
        order = _resolve_class_order(class_order, n_classes, name)
    else:
        order = _resolve_class_order(class_order, n_classes, name, named_orders)
    root = Path(root).expanduser()
    source = _Source(name=name, root=root, layout=layout)
    source.require_root()
    return root, order, source


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


def icarl_class_order() -> list[int]:
    """iCaRL's CIFAR-100 class order: ``np.random.seed(1993); np.random.permutation(100)``.

    Drawn from a private ``RandomState(1993)`` (same numbers), so the global NumPy state is kept.
    """
    return np.random.RandomState(1993).permutation(100).tolist()


def split_cifar100(
    root: str | Path,
    *,
    n_experiences: int = 6,
    first_experience_classes: int | None = 50,
    class_order: Sequence[int] | str | None = "icarl",
    seed: int = 1993,
    download: bool = False,
    train_transform=None,
    eval_transform=None,
    normalize: bool = False,
    expected_classes: int | None = None,
) -> NCScenario:
    """Split CIFAR-100 (Genifer's protocol by default: 50 base classes, then 5 tasks of 10).

    Expected layout (torchvision's, read with ``torchvision.datasets.CIFAR100``)::

        root/
        └── cifar-100-python/
            ├── train
            ├── test
            └── meta

    Args:
        root: folder that holds (or, with ``download=True``, will hold) ``cifar-100-python/``.
        n_experiences: number of experiences, the first included.
        first_experience_classes: classes in the first experience; the other experiences share
            the rest equally. ``None`` splits all classes equally.
        class_order: ``"icarl"`` (iCaRL's order, :func:`icarl_class_order`), an explicit
            permutation of the class ids, or ``None`` for a permutation seeded by ``seed``.
        seed: seeds the class order when ``class_order`` is ``None``.
        download: let torchvision download the dataset into ``root`` (needs internet).
        train_transform: replaces the default (random crop 32 pad 4, flip, ``ToTensor``).
        eval_transform: replaces the default (``ToTensor``).
        normalize: append CIFAR-100 mean/std normalisation to the default transforms (off, so
            images stay in [0, 1]).
        expected_classes: number of classes the files must hold (default 100); lower it only
            for deliberate subsets such as test fixtures.

    Raises:
        FileNotFoundError: missing root or files (the message says to pass ``download=True``).
        ValueError: files that fail torchvision's checks, a wrong class count, or an
            ``n_experiences`` / ``first_experience_classes`` that does not split the classes.
    """
    from torchvision.datasets import CIFAR100

    name = "split_cifar100"
    root = Path(root).expanduser()
    n_classes = 100 if expected_classes is None else expected_classes
    per_exp = _experience_sizes(n_classes, n_experiences, first_experience_classes, name)
    order = _resolve_class_order(class_order, n_classes, name, {"icarl": icarl_class_order})
    source = _Source(name=name, root=root, layout=CIFAR100_LAYOUT)
    if not download:
        hint = (
            "Pass download=True where internet is available (torchvision fetches the 161 MB "
            "archive into root), or copy the extracted cifar-100-python/ folder there."
        )
        if not root.is_dir():
            raise source.error(FileNotFoundError, "root does not exist", hint)
        missing = [
            f for f in ("train", "test", "meta") if not (root / CIFAR100.base_folder / f).is_file()
        ]
        if missing:
            raise source.error(
                FileNotFoundError,
                f"missing {', '.join(missing)} in {root / CIFAR100.base_folder}",
                hint,
            )
    try:
        train = CIFAR100(str(root), train=True, download=download)
        test = CIFAR100(str(root), train=False, download=False)
    except RuntimeError as err:  # torchvision's "not found or corrupted" (MD5 mismatch)
        raise source.error(
            ValueError,
            f"torchvision could not load the files: {err}",
            "They exist but fail torchvision's MD5 check (truncated copy, or not "
            "the official python version). Delete the folder and pass "
            "download=True where internet is available.",
        ) from err
    _check_class_count(len(set(train.targets)), n_classes, source)
    if sorted(set(train.targets)) != list(range(n_classes)) or not set(test.targets) <= set(
        train.targets
    ):
        raise source.error(
            ValueError, f"labels must be 0..{n_classes - 1} in train and a subset of them in test"
        )
    default_train = T.Compose(
        [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor()]
        + ([T.Normalize(CIFAR100_MEAN, CIFAR100_STD)] if normalize else [])
    )
    default_eval = T.Compose(
        [T.ToTensor()] + ([T.Normalize(CIFAR100_MEAN, CIFAR100_STD)] if normalize else [])
    )
    return _build_benchmark(
        train,
        test,
        n_experiences=n_experiences,
        seed=seed,
        class_order=order,
        per_exp_classes=per_exp,
        train_transform=train_transform if train_transform is not None else default_train,
        eval_transform=eval_transform if eval_transform is not None else default_eval,
    )


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

    Args:
        root: folder holding ``CUB_200_2011/`` (or that folder).
        n_experiences: number of experiences; must divide the number of classes.
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
            ``n_experiences`` that does not divide the classes.
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
) -> NCScenario:
    default_train, default_eval = default_image_transforms(image_size, normalize=normalize)
    return _build_benchmark(
        train,
        test,
        n_experiences=n_experiences,
        seed=seed,
        class_order=order,
        per_exp_classes=None,
        train_transform=train_transform if train_transform is not None else default_train,
        eval_transform=eval_transform if eval_transform is not None else default_eval,
    )


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
