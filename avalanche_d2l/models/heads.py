"""Former home of :class:`~avalanche_d2l.d2l.heads.DreamHeads` (kept as an import path)."""

from ..d2l.heads import MASK_VALUE, DreamHeads, pool_features

__all__ = ["DreamHeads", "MASK_VALUE", "pool_features"]
