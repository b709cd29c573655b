"""The diffusion dreamer of D2L: frozen diffusers models, differentiable sampling, glyph world.

* :class:`Dreamer` / :class:`DreamerConfig` -- frozen denoiser + our differentiable DDIM loop.
* :mod:`.glyphs` -- the offline glyph world (fonts shipped with matplotlib, no digits).
* :mod:`.pretrain` -- pretrain / cache the offline glyph dreamer.
"""

# ---- dreamer, glyph world, pretraining (dreamer.py, glyphs.py, pretrain.py) ---------------------
from .dreamer import (
    DEFAULT_SD_CAPTIONS,
    Dreamer,
    DreamerConfig,
    ReferenceNetwork,
    from_classifier_space,
    to_classifier_space,
)

__all__ = [
    "DEFAULT_SD_CAPTIONS",
    "Dreamer",
    "DreamerConfig",
    "ReferenceNetwork",
    "from_classifier_space",
    "to_classifier_space",
]

# ---- soft-prompt optimisation and oracle (owned by the D2L strategy engineer) -------------------
