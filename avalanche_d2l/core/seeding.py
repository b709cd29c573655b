"""The one seeding function of the package."""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (CPU and every CUDA device).

    The same generators ``accelerate.utils.set_seed`` seeds, with NumPy given ``seed`` modulo
    2**32 (NumPy refuses larger seeds; per-experience seeds such as ``seed * 1000 + k`` can be).
    """
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
