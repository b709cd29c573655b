"""CIFAR-100 with Genifer's protocol (50 base classes, then 5 tasks of 10, iCaRL's class order),
read by torchvision's ``CIFAR100`` from a local root.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from avalanche.benchmarks import NCScenario
from torchvision import transforms as T

from avalanche_d2l.scenarios.folders import _Source
from avalanche_d2l.scenarios.splits import (
    _build_benchmark,
    _check_class_count,
    _experience_sizes,
    _resolve_class_order,
)

__all__ = [
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "icarl_class_order",
    "split_cifar100",
]

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


CIFAR100_LAYOUT = """\
root/
└── cifar-100-python/     (torchvision's CIFAR-100 "python version")
    ├── train
    ├── test
    └── meta"""


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
