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
from .glyphs import DEFAULT_GLYPHS, GlyphBank, GlyphConfig
from .pretrain import (
    PretrainConfig,
    default_cache_dir,
    evaluate_dreamer,
    load_or_pretrain_offline_dreamer,
    pretrain_offline_dreamer,
)

__all__ = [
    "DEFAULT_GLYPHS",
    "DEFAULT_SD_CAPTIONS",
    "Dreamer",
    "DreamerConfig",
    "GlyphBank",
    "GlyphConfig",
    "PretrainConfig",
    "ReferenceNetwork",
    "default_cache_dir",
    "evaluate_dreamer",
    "from_classifier_space",
    "load_or_pretrain_offline_dreamer",
    "pretrain_offline_dreamer",
    "to_classifier_space",
]

# ---- soft-prompt optimisation and oracle (owned by the D2L strategy engineer) -------------------
from .oracle import (  # noqa: E402
    COLLAPSED,
    DEGENERATED,
    HALT_REASONS,
    RECOGNISED,
    STEP_CAP,
    Oracle,
    ReferenceOracle,
)
from .prompts import DreamConfig, DreamResult, dream_classes, dream_losses, init_prompts  # noqa: E402

__all__ += [
    "COLLAPSED",
    "DEGENERATED",
    "HALT_REASONS",
    "RECOGNISED",
    "STEP_CAP",
    "Oracle",
    "ReferenceOracle",
    "DreamConfig",
    "DreamResult",
    "dream_classes",
    "dream_losses",
    "init_prompts",
]
