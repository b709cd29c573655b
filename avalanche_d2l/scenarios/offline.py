"""The offline streams: in-memory tensors and scikit-learn's bundled digits (no download).

* :func:`tensor_benchmark` -- any in-memory image tensors (N, C, H, W).
* :func:`split_digits` -- the offline default: a class-incremental split of scikit-learn's 1,797
  8x8 handwritten digits, resized.
* :func:`split_color_digits` -- the same digits in colour, shifted and rescaled.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from avalanche.benchmarks import nc_benchmark
from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset
from torch.nn import functional as F

__all__ = [
    "split_color_digits",
    "split_digits",
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
