"""Typed settings of D2L: :class:`DreamConfig` (dreaming, the oracle, training with dreams) and
:class:`D2LConfig` (the dreamer, the head layout, the rehearsal host, the cache).

Both round-trip through dicts (experiment files): ``from_dict`` rejects unknown keys and lists
the valid ones; ``fingerprint()`` hashes what changes results (``progress`` and ``micro_batch``
left out). Keys of the previous design that have no meaning any more are accepted with a warning
and ignored (:data:`RETIRED_DREAM_KEYS`), so older experiment files still load.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.config import ConfigBase, check_config_keys
from ..core.storage import atomic_write

__all__ = [
    "D2LConfig",
    "DreamConfig",
    "LABELS",
    "PROMPTS",
    "RETIRED_DREAM_KEYS",
    "SLEEP_DATA",
    "SOURCES",
    "STOPS",
    "quick_dream_config",
]

#: ``DreamConfig.source``: where a dream class starts.
SOURCES = ("anchored", "unanchored", "interpolation", "noise")
#: ``DreamConfig.prompts``: whether the prompts are optimised by the learner.
PROMPTS = ("optimised", "random")
#: ``DreamConfig.labels``: what a dream image is labelled with.
LABELS = ("new_head", "source_class")
#: ``DreamConfig.stop``: what stops the prompt updates of a dream class.
STOPS = ("oracle", "fixed", "rule")
#: ``DreamConfig.sleep_data``: the real samples beside the dreams in a sleep minibatch.
SLEEP_DATA = ("buffer", "experience")
#: Fields added after run records, dream caches and checkpoints were made with this config:
#: left out of ``to_dict`` (and so of ``fingerprint``) at their default value, the behaviour
#: those were made with, so they stay valid.
ADDED_AT_DEFAULT = {"sleep_data": "buffer", "invert_choice_images": None}
#: Keys of the previous design (one prompt per free head, a reference-network oracle), accepted
#: and ignored with a warning.
RETIRED_DREAM_KEYS = frozenset(
    {
        "init",
        "refine",
        "w_consistency",
        "oracle_threshold",
        "oracle_max_entropy",
        "oracle_collapse",
        "oracle_reference",
        "require_reference",
        "fixed_noise",
    }
)


def _check_choice(owner: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{owner}.{name} must be one of {choices}, got {value!r}")


@dataclass
class DreamConfig(ConfigBase):
    """Settings of D2L's dreaming phase, its oracle and training with dreams.

    The variant (the names the ablation uses):

    Attributes:
        source: ``"anchored"`` (default: per learned class ``c`` a prompt ``p_c``, every dream
            image denoised under ``p_c`` from one of ``c``'s buffer images noised to
            ``strength``), ``"unanchored"`` (a prompt per free head from the dreamer's concepts,
            generated from pure noise: the previous design), ``"interpolation"`` (two buffer
            images of different seen classes mixed into a new class; no dreamer),
            ``"noise"`` (uniform noise images; no dreamer).
        prompts: ``"optimised"`` (default: the learner's loss moves the prompts) or
            ``"random"`` (prompts drawn near the dreamer's concepts and never optimised).
        labels: ``"new_head"`` (default: each dream class on its own free head; at the next
            experience new classes take the free heads their samples land on) or
            ``"source_class"`` (dreams labelled as the class they grew from; new classes take
            free heads in order, no head reuse).
        stop: ``"oracle"`` (default: the learned oracle, :mod:`avalanche_d2l.d2l.oracle`),
            ``"fixed"`` (the step cap only) or ``"rule"`` (the rule that labels the oracle's
            training data, applied directly: stop when distinctness stops rising or coherence
            falls, and keep the previous prompt).

    How much and how:

    Attributes:
        strength: share of the DDIM steps an anchored dream runs from its buffer image (1.0:
            the buffer image is drowned in noise; small: the dream stays close to it).
        steps: step cap of the prompt optimisation.
        lr: Adam learning rate on the prompts.
        dreams_per_class: dream classes grown from each learned class (free heads permitting).
        max_dream_classes: at most this many dream classes per phase (``None``: all free heads).
        batch_per_class: images per dream class per optimisation step.
        samples_per_class: images per dream class in the dream set.
        invert_steps: textual-inversion steps fitting a new class's prompt to its buffer images
            (the dreamer's denoising loss); ``0`` keeps the best concept of the dreamer.
        invert_lr: Adam learning rate of the inversion.
        invert_choice_images: choose the inversion's starting concept on at most this many of
            the class's buffer images (``None``: all of them; the choice is most of an
            inversion's time, see ``benchmarks/d2l_profile.py``).
        name_template: caption of a class whose name the benchmark knows (Stable Diffusion's
            text encoder then gives the initial prompt).
        num_inference_steps: DDIM steps while optimising (``None``: the dreamer's).
        backprop_steps: DDIM steps that keep a graph while optimising (``None``: the dreamer's).
        generate_inference_steps: DDIM steps of the dream set (``None``: the dreamer's).
        generate_batch_size: images per sampling call when generating the dream set.
        micro_batch: images per differentiable pass, rounded down to whole dream classes: the
            gradients of a step accumulate pass by pass, so peak memory does not grow with the
            number of dream classes (``None``: one pass). Left out of :meth:`fingerprint`.

    The prompt objective (on the learner's logits over seen + dream heads and its features):

    Attributes:
        w_target: cross-entropy towards the dream's own head (the learner sees a class of its
            own).
        w_seen: weight of the seen-mass term; ``seen_mass`` is its target: the binary
            cross-entropy of the learner's mass on seen classes towards it (``0``: pushed to 0).
        w_distinct: hinge on the cosine between a dream's mean feature and the other dreams'.
        distinct_margin: cosine allowed between two dreams' mean features.
        w_coherence: hinge keeping a dream's mean feature within ``coherence_margin`` cosine
            of its source class's prototype (the mean feature of its buffer images).
        w_norm: prompt norm relative to the dreamer's concepts.

    The oracle (``stop="oracle"``) and its labels (``stop="rule"`` uses the labels directly):

    Attributes:
        rule_rise: distinctness (mean probability of the dream's own head) must rise by more
            than this per step, else the step before is labelled "stop".
        rule_drop: a fall of coherence (cosine to the source prototype) by more than this
            labels the step before "stop".
        oracle_hidden: hidden width of the oracle network.
        oracle_lr: its Adam learning rate.
        oracle_updates: gradient steps of the oracle per prompt step (on all labels so far).
        oracle_min_labels: labelled steps (with both answers among them) before the oracle
            decides; until then only the cap stops.
        oracle_memory: labelled steps kept to train it (oldest dropped).
        min_steps: no stop before this step.

    Training with dreams:

    Attributes:
        dream_weight: weight of the dreams' cross-entropy (sleep phase and training).
        train_dream_weight: the weight while an experience trains (``None``: ``dream_weight``).
        dream_batch_size: dream samples per minibatch (``None``: ``train_mb_size``).
        sleep_epochs: passes over the new dream set with buffer minibatches right after
            dreaming, so the next head assignment sees heads shaped by the dreams. Default 0:
            the dreams train with the next experience only, as in the lab's code (each
            experience trains on its real data plus the dreams); the README's D2L section
            shows what a sleep phase does to the just-learned classes.
        sleep_data: ``"buffer"`` (each sleep minibatch: dreams and buffer samples with the
            host's replay loss) or ``"experience"`` (and as many samples of the experience just
            trained on, cross-entropy: the classes the dreams grew from keep their real data).
        dream_after_last: dream also when every class has a head (extra heads only).
        seed: seeds prompts, anchors and noise (the experience index is added).
        progress: progress bars.
    """

    source: str = "anchored"
    prompts: str = "optimised"
    labels: str = "new_head"
    stop: str = "oracle"
    strength: float = 0.6
    steps: int = 10
    lr: float = 0.05
    dreams_per_class: int = 1
    max_dream_classes: int | None = None
    batch_per_class: int = 8
    samples_per_class: int = 64
    invert_steps: int = 10
    invert_lr: float = 0.05
    invert_choice_images: int | None = None
    name_template: str = "a photo of a {}"
    num_inference_steps: int | None = None
    backprop_steps: int | None = None
    generate_inference_steps: int | None = None
    generate_batch_size: int = 128
    micro_batch: int | None = 32
    w_target: float = 1.0
    w_seen: float = 1.0
    seen_mass: float = 0.5
    w_distinct: float = 0.5
    distinct_margin: float = 0.5
    w_coherence: float = 1.0
    coherence_margin: float = 0.5
    w_norm: float = 0.01
    rule_rise: float = 0.01
    rule_drop: float = 0.02
    oracle_hidden: int = 32
    oracle_lr: float = 0.01
    oracle_updates: int = 5
    oracle_min_labels: int = 6
    oracle_memory: int = 512
    min_steps: int = 1
    dream_weight: float = 1.0
    train_dream_weight: float | None = None
    dream_batch_size: int | None = None
    sleep_epochs: int = 0
    sleep_data: str = "buffer"
    dream_after_last: bool = False
    seed: int = 0
    progress: bool = True

    # from_dict keeps values as given (an int stays an int), as the recorded fingerprints did
    checks_types = False
    omitted_at_default = ADDED_AT_DEFAULT
    not_fingerprinted = ("progress", "micro_batch")

    def __post_init__(self) -> None:
        for name, choices in (
            ("source", SOURCES),
            ("prompts", PROMPTS),
            ("labels", LABELS),
            ("stop", STOPS),
            ("sleep_data", SLEEP_DATA),
        ):
            _check_choice("DreamConfig", name, getattr(self, name), choices)
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"DreamConfig.strength must be in (0, 1], got {self.strength}")
        if not 0.0 <= self.seen_mass < 1.0:
            raise ValueError(f"DreamConfig.seen_mass must be in [0, 1), got {self.seen_mass}")
        for name in ("steps", "sleep_epochs", "invert_steps", "min_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"DreamConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.invert_choice_images is not None and self.invert_choice_images < 1:
            raise ValueError(
                "DreamConfig.invert_choice_images must be >= 1 or null (all buffer images), "
                f"got {self.invert_choice_images}"
            )
        for name in (
            "batch_per_class",
            "samples_per_class",
            "generate_batch_size",
            "dreams_per_class",
            "oracle_hidden",
            "oracle_memory",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"DreamConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise ValueError(
                f"DreamConfig.micro_batch must be None or >= 1, got {self.micro_batch}"
            )
        if self.max_dream_classes is not None and self.max_dream_classes < 0:
            raise ValueError(
                f"DreamConfig.max_dream_classes must be None or >= 0, got {self.max_dream_classes}"
            )

    @property
    def uses_dreamer(self) -> bool:
        """Whether dreams come from the dreamer (``interpolation`` and ``noise`` need none)."""
        return self.source in ("anchored", "unanchored")

    @property
    def optimises(self) -> bool:
        """Whether prompts are optimised by the learner."""
        return self.uses_dreamer and self.prompts == "optimised" and self.steps > 0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str | None = None) -> DreamConfig:
        """Build from a dict; unknown keys are an error listing the valid ones, keys of the
        previous design (:data:`RETIRED_DREAM_KEYS`) are dropped with a warning."""
        old = sorted(set(d) & RETIRED_DREAM_KEYS) if isinstance(d, Mapping) else []
        if old:
            warnings.warn(
                f"{cls.__name__} keys {old} belong to the previous D2L design and are ignored",
                stacklevel=2,
            )
            d = {k: v for k, v in d.items() if k not in RETIRED_DREAM_KEYS}
        return super().from_dict(d, where=where)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> DreamConfig:
        """Load a flat DreamConfig JSON, or an experiment file holding one (``"dream"`` at the
        top or in a strategy section)."""
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
        section = _dream_section(data)
        try:
            return cls.from_dict(section)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err

    def to_json(self, path: str | os.PathLike) -> Path:
        return atomic_write(path, json.dumps(self.to_dict(), indent=2))


def _dream_section(data: Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(data.get("dream"), Mapping):
        return data["dream"]
    for key in ("strategies", "strategy", "methods"):
        sec = data.get(key)
        if isinstance(sec, Mapping):
            for v in sec.values():
                if isinstance(v, Mapping) and isinstance(v.get("dream"), Mapping):
                    return v["dream"]
    return data


def cpu_preset() -> DreamConfig:
    """The CPU preset (offline glyph dreamer, 16-32 px streams): ``DreamConfig()``'s defaults
    with 4 images per class and step, 2 back-propagated DDIM steps and 256-image sampling calls."""
    return DreamConfig(batch_per_class=4, backprop_steps=2, generate_batch_size=256)


def quick_dream_config(seed: int = 0) -> DreamConfig:
    """Tiny dreaming settings for tests and smoke runs (``RunConfig.quick``)."""
    return DreamConfig(
        steps=2,
        batch_per_class=2,
        samples_per_class=8,
        backprop_steps=1,
        invert_steps=1,
        invert_choice_images=2,
        seed=seed,
        progress=False,
    )


#: ``D2LConfig.dreams`` of the previous design, mapped onto DreamConfig fields.
_RETIRED_DREAMS = {
    "optimised": {"prompts": "optimised"},
    "random": {"prompts": "random"},
    "noise": {"source": "noise"},
}


@dataclass
class D2LConfig(ConfigBase):
    """Settings of D2L (the registry's ``d2l``, ``er_ace_d2l`` and ``der_d2l``).

    Attributes:
        dreamer: ``"offline"`` (grey glyph dreamer), ``"offline-rgb"`` (coloured glyphs), or a
            local path / hub id of a saved dreamer or a diffusers Stable Diffusion.
        dreamer_overrides: :class:`~avalanche_d2l.dreaming.DreamerConfig` fields to override;
            for the offline dreamers also ``image_size``/``steps``/``seed`` of the one to load.
        dream: the :class:`DreamConfig` (a dict in ``from_dict`` is applied on top of the CPU
            preset).
        n_extra_heads: dream-only heads beyond one per class.
        host: hyper-parameters of the rehearsal host (``der_d2l``: ``alpha``, ``beta``;
            ``er_ace_d2l``: ``batch_size_mem``).
        cache_dreams: keep dream sets in the run's ``work_dir``.
    """

    dreamer: str = "offline"
    dreamer_overrides: dict[str, Any] = field(default_factory=dict)
    dream: DreamConfig = field(default_factory=cpu_preset)
    n_extra_heads: int = 0
    host: dict[str, Any] = field(default_factory=dict)
    cache_dreams: bool = True

    checks_types = False
    not_fingerprinted = ("dream.progress", "dream.micro_batch")

    def __post_init__(self) -> None:
        if isinstance(self.dream, Mapping):
            self.dream = _dream_from_dict(self.dream)
        if self.n_extra_heads < 0:
            raise ValueError(f"D2LConfig.n_extra_heads must be >= 0, got {self.n_extra_heads}")
        if not isinstance(self.dreamer, str) or not self.dreamer:
            raise ValueError(
                "D2LConfig.dreamer must be 'offline', 'offline-rgb' or a path / hub id, got "
                f"{self.dreamer!r}"
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str | None = None) -> D2LConfig:
        """Build from an experiment file's section; unknown keys are an error listing the valid
        ones. ``dreams`` (previous design) is mapped onto ``dream.prompts`` / ``dream.source``."""
        data = check_config_keys(cls, {k: v for k, v in d.items() if k != "dreams"}, where=where)
        dream = dict(d.get("dream") or {}) if isinstance(d.get("dream"), Mapping) else None
        if "dreams" in d:
            if d["dreams"] not in _RETIRED_DREAMS:
                raise ValueError(f"D2LConfig.dreams must be one of {list(_RETIRED_DREAMS)}")
            dream = {**_RETIRED_DREAMS[d["dreams"]], **(dream or {})}
        if dream is not None:
            data["dream"] = _dream_from_dict(dream)
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(super().to_dict(), default=str))


def _dream_from_dict(d: Mapping[str, Any]) -> DreamConfig:
    """A :class:`DreamConfig` from the CPU preset with the fields of ``d`` changed."""
    try:
        return DreamConfig.from_dict({**cpu_preset().to_dict(), **dict(d)})
    except ValueError as err:
        raise ValueError(f"D2LConfig.dream: {err}") from err
