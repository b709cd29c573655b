"""Benchmark builders.

* Offline streams: :func:`split_digits` (the default: scikit-learn's bundled digits, no
  download), :func:`split_color_digits` and :func:`tensor_benchmark` (any
  in-memory image tensors).
* Paper benchmarks from local folders (each function's docstring draws the layout it expects):
  :func:`split_cifar100` and :func:`split_cub200` (Genifer), :func:`split_mini_imagenet`,
  :func:`split_imagenet_r` and :func:`split_fg_imagenet` (D2L).
* :func:`image_folder` -- the user's own ``train/<class>/``, ``test/<class>/`` folders.
* :mod:`~avalanche_d2l.scenarios.folders` (lazy path datasets, the folder readers and their
  errors) and :mod:`~avalanche_d2l.scenarios.splits` (class splits, class orders, transforms) are
  what the folder loaders share.

All builders return class-incremental Avalanche benchmarks (``nc_benchmark``, ``task_labels=False``)
whose images are tensors in [0, 1] unless a normalising transform is asked for.
"""

from avalanche_d2l.scenarios.cifar100 import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    icarl_class_order,
    split_cifar100,
)
from avalanche_d2l.scenarios.cub200 import split_cub200
from avalanche_d2l.scenarios.folders import IMAGE_EXTENSIONS, ImagePathDataset
from avalanche_d2l.scenarios.imagenet import (
    fg_imagenet_wnids,
    split_fg_imagenet,
    split_imagenet_r,
    split_mini_imagenet,
)
from avalanche_d2l.scenarios.offline import split_color_digits, split_digits, tensor_benchmark
from avalanche_d2l.scenarios.splits import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    default_image_transforms,
    stratified_split,
)
from avalanche_d2l.scenarios.user_folders import image_folder

__all__ = [
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
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
