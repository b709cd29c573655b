"""The diffusion dreamer of D2L: frozen diffusers models, differentiable sampling, glyph world
(the method that uses it is :mod:`avalanche_d2l.d2l`).

* :class:`Dreamer` / :class:`DreamerConfig` -- frozen denoiser + our differentiable DDIM loop
  (:mod:`.dreamer`); its settings (:mod:`.config`), saving and loading (:mod:`.loading`), prompt
  space (:mod:`.concepts`) and reference network (:mod:`.reference`) in modules of their own.
* :mod:`.glyphs` -- the offline glyph world (fonts shipped with matplotlib, no digits).
* :mod:`.pretrain` -- pretrain / cache the offline glyph dreamer.
* :mod:`.accel` -- processes (accelerate ``PartialState``), precision, loss scaling.
* :mod:`.preflight` -- measure one pass of each kind of work and extrapolate to a run (the
  measuring in :mod:`.measure`, paper-scale cost from FLOP counts in :mod:`.paper_cost`).
"""

# ---- dreamer, glyph world, pretraining (dreamer.py, glyphs.py, pretrain.py) ---------------------
from .dreamer import (
    DEFAULT_SD_CAPTIONS,
    Dreamer,
    DreamerConfig,
    ReferenceNetwork,
    from_classifier_space,
    latent_size_for,
    load_reference_network,
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
    "latent_size_for",
    "load_or_pretrain_offline_dreamer",
    "load_reference_network",
    "pretrain_offline_dreamer",
    "to_classifier_space",
]

# ---- processes, preflight ------------------------------------------------------------------------
from .accel import is_main_process, num_processes, process_index  # noqa: E402
from .preflight import (  # noqa: E402
    GpuSpec,
    PreflightError,
    PreflightReport,
    estimate_paper_cost,
    preflight,
)

__all__ += [
    "GpuSpec",
    "PreflightError",
    "PreflightReport",
    "estimate_paper_cost",
    "is_main_process",
    "num_processes",
    "preflight",
    "process_index",
]
