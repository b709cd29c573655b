"""Soft-prompt dreaming: optimise one prompt per dream class through the frozen dreamer.

A dream class is a soft prompt ``(L, D)`` in the dreamer's prompt (text-embedding) space. The
prompt is optimised with Adam through :meth:`Dreamer.sample` (differentiable DDIM, truncated
backprop), with a loss computed by the **continual learner itself** on the generated images:

* ``target``: cross-entropy of the learner's head-space output towards the dream's head, i.e. the
  learner recognises the images as one coherent new class (classifier-driven);
* ``seen``: on ``p_seen``, the probability mass on the heads of classes already observed:
  ``-log(1 - p_seen)`` -- the dream must match no observed class -- or, with
  ``DreamConfig.seen_mass = m > 0``, the binary cross-entropy of ``p_seen`` towards ``m`` (minus its
  minimum): the dream sits *at the boundary* of what the learner knows, a hard negative that still
  matches no observed class;
* ``distinct``: hinge on the cosine similarity between the mean feature of a dream class and the
  *detached* mean features the other dream classes had at their last evaluation (the previous
  step; features of the learner's feature layer) -- so each class's loss depends on its own
  images only, and dreaming can run in micro-batches and across processes;
* ``consistency``: ``1 - cos(f_i, mean_f)`` inside a dream class (the images of one dream form one
  concept, not a bag of unrelated images);
* ``coherence`` (optional): distance of a dream class's batch statistics at the learner's
  BatchNorm layers from the running statistics (mean and variance) the learner holds of its data
  -- the dream stays in the domain the learner knows, only its class is new;
* ``norm``: ``(|P| / |concept| - 1)^2``, the prompt's norm relative to the mean norm of the
  dreamer's concept embeddings, so the prompt stays in the region the dreamer knows.

The head space seen by these losses is *seen heads + dream heads* -- the same space the learner
trains on (see :class:`avalanche_d2l.strategies.d2l.DreamHeads`). The stop rule is an
:class:`~avalanche_d2l.dreaming.oracle.Oracle`, checked per class and step; a class that stops is
frozen while the others continue. Initialisation (notes, section C): a random convex mix of
concept embeddings plus noise (:meth:`Dreamer.random_prompt`), or, when the head already hosted a
dream, that dream's previous prompt refined against the updated learner.

After optimisation ``samples_per_class`` images per class are generated without a graph: the
dream set, as tensors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..utils import training_mode
from .oracle import HALT_REASONS, STEP_CAP, Oracle, ReferenceOracle

__all__ = [
    "DreamConfig",
    "DreamResult",
    "HeadClassifier",
    "init_prompts",
    "dream_losses",
    "bn_coherence",
    "dream_classes",
]

_INITS = ("mix", "random")


@dataclass
class DreamConfig:
    """Settings of D2L's dreaming phase and of training with dreams.

    Attributes:
        max_dream_classes: at most this many free heads host a dream (``None``: all free heads).
        steps: step cap of the prompt optimisation (the oracle may stop a class earlier).
        lr: Adam learning rate on the prompts.
        batch_per_class: images generated per dream class per optimisation step.
        samples_per_class: images per dream class in the dream set used for training.
        num_inference_steps: DDIM steps while optimising (``None``: the dreamer's default).
        backprop_steps: DDIM steps that keep a graph while optimising (``None``: the dreamer's).
        generate_inference_steps: DDIM steps when generating the dream set (``None``: default).
        generate_batch_size: images per sampling call when generating the dream set.
        micro_batch: images per differentiable pass while optimising the prompts, rounded down to
            whole dream classes (at least one class, ``batch_per_class`` images): the gradients
            of the classes of a step are accumulated pass by pass, so the peak memory of a step
            is that of one pass whatever the number of dream classes. ``None``: all active
            classes in one pass. Results do not depend on it (up to float rounding), so it is
            left out of :meth:`fingerprint`.
        init: ``"mix"`` (random convex mix of concept embeddings + noise, the dreamer's
            ``random_prompt``) or ``"random"`` (Gaussian with the concepts' per-dim std).
        refine: start from the previous prompt of a head that already hosted a dream.
        w_target: weight of the cross-entropy towards the dream head.
        w_seen: weight of the ``seen`` term.
        seen_mass: the learner's probability mass on seen classes the dreams are driven to:
            ``0`` pushes it to zero (``-log(1 - p_seen)``); ``m`` in ``(0, 1)`` drives it to ``m``
            (binary cross-entropy minus its minimum), keeping dreams near the seen classes.
        w_distinct: weight of the inter-dream cosine hinge.
        distinct_margin: cosine similarity allowed between the mean features of two dreams.
        w_consistency: weight of the intra-class feature consistency term.
        w_norm: weight of the prompt-norm penalty.
        w_coherence: weight of the coherence term: the batch statistics of the dreams at the
            learner's BatchNorm layers against those layers' running statistics (what the learner
            knows of its data, as in DeepInversion), so dreams stay in the learner's input domain
            while being a new class. ``0`` disables it; ``> 0`` needs BatchNorm layers.
        oracle_threshold: the default oracle stops a class when the learner's mean target
            probability reaches this value (``None``: never on the learner's recognition; the
            reference checks and the step cap still apply).
        oracle_max_entropy: reference-network degeneration bound (normalised entropy).
        oracle_collapse: reference-network collapse bound (top-concept probability).
        oracle_min_steps: first step at which the reference checks apply.
        oracle_reference: the oracle's reference network: a torchvision ResNet-50 ``.pth`` file,
            a transformers image-classification directory or hub id (``None``: the dreamer's own,
            see :meth:`~avalanche_d2l.dreaming.Dreamer.reference_network`).
        require_reference: stop with an error when no reference network is available, instead
            of running the oracle on the learner's threshold and the step cap alone.
        dream_weight: weight of the dream cross-entropy added to the training loss (during an
            experience and in the sleep phase).
        train_dream_weight: the weight during an experience's training only (``None``: as
            ``dream_weight``); ``0`` learns the dreams in the sleep phase alone, so they do not
            share the training of the new classes.
        dream_batch_size: dream samples per training minibatch (``None``: ``train_mb_size``).
        sleep_epochs: passes over the new dream set right after dreaming, before the next
            experience arrives ("sleep"): minibatches of dreams (labelled with their heads) with
            as many replay-buffer samples, loss ``CE(buffer) + dream_weight * CE(dreams)``. The
            dream heads are then learned *before* the next experience's head assignment, which is
            what lets a new class find a head whose dream resembles it. ``0`` trains on dreams only
            mixed into the next experience's minibatches (then the dreams made after experience
            ``k`` are first learned during ``k + 1``, after its head assignment, and cannot give
            it forward transfer).
        dream_after_last: also dream once every class of the stream has a head (only useful with
            extra dream-only heads; normally nothing can benefit from those dreams).
        fixed_noise: reuse one initial-noise draw per dream class for every optimisation step
            (a deterministic, lower-variance objective); ``False`` draws fresh noise each step
            (the prompt must work for any noise). The dream set always uses fresh noise.
        seed: seeds initialisation and sampling noise (the experience index is added).
        progress: show tqdm progress bars.
    """

    max_dream_classes: int | None = None
    steps: int = 30
    lr: float = 0.05
    batch_per_class: int = 8
    samples_per_class: int = 64
    num_inference_steps: int | None = None
    backprop_steps: int | None = None
    generate_inference_steps: int | None = None
    generate_batch_size: int = 128
    micro_batch: int | None = 16
    init: str = "mix"
    refine: bool = True
    w_target: float = 1.0
    w_seen: float = 1.0
    seen_mass: float = 0.0
    w_distinct: float = 0.5
    distinct_margin: float = 0.5
    w_consistency: float = 0.1
    w_norm: float = 0.01
    w_coherence: float = 0.0
    oracle_threshold: float | None = 0.9
    oracle_max_entropy: float | None = 0.95
    oracle_collapse: float | None = 0.98
    oracle_min_steps: int = 1
    oracle_reference: str | None = None
    require_reference: bool = False
    dream_weight: float = 1.0
    train_dream_weight: float | None = None
    dream_batch_size: int | None = None
    sleep_epochs: int = 1
    dream_after_last: bool = False
    fixed_noise: bool = False
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.init not in _INITS:
            raise ValueError(f"DreamConfig.init must be one of {_INITS}, got {self.init!r}")
        if not 0.0 <= self.seen_mass < 1.0:
            raise ValueError(f"DreamConfig.seen_mass must be in [0, 1), got {self.seen_mass}")
        if self.sleep_epochs < 0:
            raise ValueError(f"DreamConfig.sleep_epochs must be >= 0, got {self.sleep_epochs}")
        for name in ("batch_per_class", "samples_per_class", "generate_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"DreamConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise ValueError(
                f"DreamConfig.micro_batch must be None (one pass) or >= 1, got {self.micro_batch}"
            )
        if self.steps < 0:
            raise ValueError(f"DreamConfig.steps must be >= 0, got {self.steps}")
        if self.max_dream_classes is not None and self.max_dream_classes < 0:
            raise ValueError(
                f"DreamConfig.max_dream_classes must be None or >= 0, got {self.max_dream_classes}"
            )

    # ---- (de)serialisation -----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DreamConfig:
        """Build from a dict; unknown keys are an error (typos are never silently ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown DreamConfig fields {unknown}; valid fields: {sorted(names)}")
        return cls(**dict(d))

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> DreamConfig:
        """Load a JSON file: a flat DreamConfig dict, an experiment file whose ``"dream"`` entry
        is one, or an experiment file with a ``"d2l"`` strategy section holding ``"dream"``."""
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
        data = _dream_section(data)
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err

    def to_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    def fingerprint(self) -> str:
        """Hash of the fields that change the dreams (``progress`` and ``micro_batch`` excluded)."""
        d = self.to_dict()
        d.pop("progress")
        d.pop("micro_batch")
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class DreamResult:
    """Output of one dreaming phase.

    Attributes:
        heads: ``(K,)`` head index hosting each dream class.
        prompts: ``(K, L, D)`` final prompts (CPU).
        images: ``(K * samples_per_class, C, H, W)`` dream set (CPU, classifier input space).
        labels: ``(N,)`` head index of each dream image.
        history: per-step losses (``"loss"`` and one list per term), ``"target_prob"``,
            ``"active"``, per-class ``"stop"`` ``{head: {"step", "reason"}}``, ``"steps"``,
            ``"optim_seconds"``, ``"generate_seconds"``, and ``"final_target_prob"`` /
            ``"final_seen_mass"`` per head measured on the generated dream set.
    """

    heads: Tensor
    prompts: Tensor
    images: Tensor
    labels: Tensor
    history: dict[str, Any] = field(default_factory=dict)
    oracle: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary for ``results.json``: heads, sizes, the oracle's state (reference
        network present or not, stop reason per class) and the scalar history; no tensors."""
        hist = {
            k: v
            for k, v in self.history.items()
            if k not in ("loss", "target", "seen", "distinct", "consistency", "norm", "coherence")
        }
        return json.loads(
            json.dumps(
                {
                    "heads": [int(h) for h in self.heads.tolist()],
                    "n_images": int(self.images.shape[0]),
                    "image_shape": list(self.images.shape[1:]),
                    "oracle": self.oracle,
                    "history": hist,
                },
                default=str,
            )
        )


def _dream_section(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """The DreamConfig dict inside an experiment file (``dream`` at the top or in a strategy
    section such as ``strategies.d2l`` / ``d2l``), or ``data`` itself."""
    if "dream" in data and isinstance(data["dream"], Mapping):
        return data["dream"]
    for key in ("strategies", "strategy", "methods"):
        sec = data.get(key)
        if isinstance(sec, Mapping):
            for v in sec.values():
                if isinstance(v, Mapping) and isinstance(v.get("dream"), Mapping):
                    return v["dream"]
    if isinstance(data.get("d2l"), Mapping) and isinstance(data["d2l"].get("dream"), Mapping):
        return data["d2l"]["dream"]
    return data


class HeadClassifier(Protocol):
    """What dreaming needs from the learner: head-space logits and features, differentiable."""

    def forward_heads(self, x: Tensor, *, return_features: bool = False) -> Any: ...


def _concept_stats(dreamer) -> tuple[Tensor, float]:
    table = dreamer.concept_embeddings().detach().float()
    norms = table.flatten(1).norm(dim=1)
    return table, float(norms.mean())


def init_prompts(
    dreamer,
    heads: Sequence[int],
    *,
    config: DreamConfig,
    generator: torch.Generator,
    previous: Mapping[int, Tensor] | None = None,
) -> tuple[Tensor, list[str]]:
    """Initial prompts ``(K, L, D)`` for ``heads`` and how each was initialised.

    A head with a prompt in ``previous`` starts from it when ``config.refine`` (the learner has
    changed since, so the prompt is refined); others start from ``config.init``.
    """
    k = len(heads)
    if config.init == "mix":
        fresh = dreamer.random_prompt(k, generator=generator).float().cpu()
    else:
        table, _ = _concept_stats(dreamer)
        std = table.std(0) if table.shape[0] > 1 else table.abs().mean().expand_as(table[0])
        noise = torch.randn((k, *table.shape[1:]), generator=generator)
        fresh = table.mean(0).cpu() + std.cpu() * noise
    out, how = [], []
    for i, h in enumerate(heads):
        if config.refine and previous is not None and int(h) in previous:
            out.append(previous[int(h)].detach().float().cpu())
            how.append("refine")
        else:
            out.append(fresh[i])
            how.append(config.init)
    return torch.stack(out), how


def _pool(f: Tensor) -> Tensor:
    return f.flatten(2).mean(2) if f.dim() > 2 else f


def _batchnorms(model: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    return [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        and m.track_running_stats
        and m.running_mean is not None
    ]


class _BNInputs:
    """Context: record the input of every BatchNorm layer of a model (forward hooks)."""

    def __init__(self, modules: Sequence[torch.nn.Module]):
        self.modules = list(modules)
        self.inputs: list[Tensor] = []

    def __enter__(self):
        self.handles = [
            m.register_forward_hook(lambda _m, inp, _out: self.inputs.append(inp[0]))
            for m in self.modules
        ]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return False


def bn_coherence(
    inputs: Sequence[Tensor], modules: Sequence[torch.nn.Module], rows: Tensor | None = None
) -> Tensor:
    """Sum over BatchNorm layers of ``|mean - running_mean| + |var - running_var|`` (L2 norms),
    the batch statistics taken over ``rows`` of each layer's recorded input (all rows if None)."""
    total = None
    for x, m in zip(inputs, modules):
        if rows is not None:
            x = x[rows]
        dims = [0] + list(range(2, x.dim()))
        mean = x.float().mean(dims)
        var = x.float().var(dims, unbiased=False)
        term = (mean - m.running_mean.float()).norm() + (var - m.running_var.float()).norm()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("bn_coherence: no BatchNorm layer inputs were recorded")
    return total


def dream_losses(
    logits: Tensor,
    feats: Tensor,
    *,
    targets: Tensor,
    n_seen: int,
    class_index: Tensor,
    n_active: int,
    other_means: Tensor | None,
    prompts: Tensor,
    concept_norm: float,
    config: DreamConfig,
    coherence: Tensor | None = None,
) -> dict[str, Tensor]:
    """The dream loss terms (see the module docstring) on one generated batch.

    Args:
        logits: ``(B, S + K)`` learner logits over seen heads (first ``n_seen``) + dream heads.
        feats: ``(B, F)`` learner features.
        targets: ``(B,)`` column of each image's dream head.
        n_seen: number of seen-head columns.
        class_index: ``(B,)`` index ``0..n_active-1`` of each image's prompt in ``prompts``.
        n_active: number of prompts being optimised.
        other_means: ``(M, F)`` normalised mean features of dreams not in this batch, or None.
        prompts: ``(n_active, L, D)`` prompts being optimised.
        concept_norm: mean norm of the dreamer's concept embeddings.
        config: weights and margin.
        coherence: the coherence term (:func:`bn_coherence`), or None (counted as 0).

    Returns:
        dict of scalar terms (``target``, ``seen``, ``distinct``, ``consistency``, ``norm``,
        ``coherence``) and
        their weighted sum ``loss``.
    """
    terms: dict[str, Tensor] = {}
    terms["target"] = F.cross_entropy(logits, targets)
    if n_seen > 0:
        p_seen = logits.softmax(dim=1)[:, :n_seen].sum(1).clamp(1e-6, 1 - 1e-6)
        m = float(config.seen_mass)
        bce = -(1 - m) * torch.log1p(-p_seen)
        if m > 0:  # BCE towards m, minus its minimum (the entropy of m): 0 at p_seen = m
            bce = bce - m * torch.log(p_seen) + (m * math.log(m) + (1 - m) * math.log1p(-m))
        terms["seen"] = bce.mean()
    else:
        terms["seen"] = logits.new_zeros(())
    f = F.normalize(_pool(feats).float(), dim=1)
    one_hot = F.one_hot(class_index, n_active).float()  # (B, A)
    counts = one_hot.sum(0).clamp_min(1)
    means = F.normalize((one_hot.t() @ f) / counts[:, None], dim=1)  # (A, F)
    terms["consistency"] = (1 - (f * means[class_index]).sum(1)).mean()
    pool = (
        means
        if other_means is None or other_means.numel() == 0
        else torch.cat([means, other_means.to(means)])
    )
    if pool.shape[0] > 1:
        sim = means @ pool.t()  # (A, A + M)
        self_mask = torch.zeros_like(sim, dtype=torch.bool)
        self_mask[:, :n_active] = torch.eye(n_active, dtype=torch.bool, device=sim.device)
        hinge = F.relu(sim - config.distinct_margin).masked_fill(self_mask, 0.0)
        terms["distinct"] = hinge.sum() / max(int((~self_mask).sum()), 1)
    else:
        terms["distinct"] = logits.new_zeros(())
    rel = prompts.flatten(1).norm(dim=1) / max(concept_norm, 1e-12)
    terms["norm"] = ((rel - 1.0) ** 2).mean()
    terms["coherence"] = coherence if coherence is not None else logits.new_zeros(())
    terms["loss"] = (
        config.w_target * terms["target"]
        + config.w_seen * terms["seen"]
        + config.w_distinct * terms["distinct"]
        + config.w_consistency * terms["consistency"]
        + config.w_norm * terms["norm"]
        + config.w_coherence * terms["coherence"]
    )
    return terms


@contextmanager
def _frozen_classifier(model: torch.nn.Module):
    """Context: eval mode and no parameter grads for the learner while dreaming; restores both."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with training_mode(model, False):
        model.requires_grad_(False)
        try:
            yield model
        finally:
            for n, p in model.named_parameters():
                p.requires_grad_(flags[n])


def _class_generator(seed: int, head: int, stream: int) -> torch.Generator:
    """CPU generator of one dream class and purpose (0: optimisation noise, 1: dream set).

    Every class draws its noise from its own stream, so an image does not depend on which other
    classes share its pass, its micro-batch or its process."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(head)) * 4 + int(stream))


def _draw_noise(
    gen: torch.Generator, n: int, shape: tuple[int, ...], steps: int, eta: float
) -> tuple[Tensor, Tensor | None]:
    """``n`` initial noises and, for ``eta > 0``, their ``(steps, n, ...)`` DDIM noise."""
    x_t = torch.randn((n, *shape), generator=gen)
    var = torch.randn((steps, n, *shape), generator=gen) if eta > 0 else None
    return x_t, var


def _sample(dreamer, emb: Tensor, noise: Tensor, var: Tensor | None, **kw) -> Tensor:
    if var is not None:  # only dreamers that support eta > 0 get the extra argument
        kw["variance_noise"] = var
    return dreamer.sample(emb, noise=noise, **kw)


def _oracle_state(oracle, dreamer) -> dict[str, Any]:
    describe = getattr(oracle, "describe", None)
    if callable(describe):
        state = dict(describe())
    else:  # a custom oracle: record what it is and what the dreamer offered
        state = {"type": type(oracle).__name__}
        info = getattr(dreamer, "reference_info", None)
        if callable(info):
            state["dreamer_reference"] = info()
    state["repr"] = repr(oracle)
    return state


def dream_classes(
    *,
    dreamer,
    classifier: HeadClassifier,
    heads: Sequence[int],
    seen_heads: Sequence[int],
    config: DreamConfig,
    oracle: Oracle | None = None,
    previous_prompts: Mapping[int, Tensor] | None = None,
    seed_offset: int = 0,
    progress: bool | None = None,
    distributed: bool | None = None,
) -> DreamResult:
    """Optimise one soft prompt per dream head, then generate the dream set.

    Memory: the active classes of a step go through the dreamer ``config.micro_batch`` images at
    a time (whole classes); each pass's loss is backpropagated at once and the gradients
    accumulate in the prompts, so the peak is one pass's whatever the number of classes. Each
    class's loss uses its own images only: the ``distinct`` term compares the class's mean
    feature with the *detached* mean features the other dreams had at their last evaluation
    (previous step). Noise comes from per-class generators. So a class's trajectory does not
    depend on how classes are grouped, and the result does not depend on ``micro_batch`` or on
    the number of processes (up to float rounding).

    Several processes (``accelerate launch`` / ``torchrun``, or a process group initialised by
    the caller): the dream classes are sharded across processes (class ``i`` on process
    ``i % world``); after every step the processes exchange the classes' mean features and stop
    decisions, and at the end the prompts and dream sets, so every process returns the same full
    :class:`DreamResult`. The learner must be the same in every process. Only the main process
    (:func:`~avalanche_d2l.dreaming.accel.is_main_process`) should write it to disk.

    Args:
        dreamer: a :class:`~avalanche_d2l.dreaming.Dreamer` (frozen), on any device.
        classifier: the learner (``forward_heads(x, return_features=True) -> (logits, feats)``
            with logits over all heads); put in eval mode without parameter grads meanwhile.
            Images are moved to its device.
        heads: heads that host the dream classes (free heads).
        seen_heads: heads of the classes observed so far.
        config: the :class:`DreamConfig`.
        oracle: stop rule; default :class:`ReferenceOracle` with the dreamer's reference network
            (or ``config.oracle_reference``) and ``config.oracle_*`` settings, capped at
            ``config.steps``.
        previous_prompts: ``{head: prompt}`` of the previous dreaming phase (refinement).
        seed_offset: added to ``config.seed`` (e.g. the experience index).
        progress: show progress bars (default ``config.progress``; main process only).
        distributed: shard across processes; ``None``: when a process group with more than one
            process is running (or ``accelerate launch`` started several); ``False``: every
            process dreams every class alone.

    Returns:
        a :class:`DreamResult`.
    """
    from . import accel

    heads = [int(h) for h in heads]
    seen_heads = [int(h) for h in seen_heads]
    if set(heads) & set(seen_heads):
        raise ValueError(f"dream heads {heads} overlap the seen heads {seen_heads}")
    if len(set(heads)) != len(heads):
        raise ValueError(f"dream heads must be distinct, got {heads}")
    K, b = len(heads), config.batch_per_class
    L, D = dreamer.prompt_shape
    C, H, W = dreamer.output_shape
    if distributed is None:
        distributed = accel.num_processes() > 1
    rank, world = (accel.process_index(), accel.num_processes()) if distributed else (0, 1)
    show = (config.progress if progress is None else progress) and rank == 0
    if K == 0:
        return DreamResult(
            heads=torch.empty(0, dtype=torch.long),
            prompts=torch.empty(0, L, D),
            images=torch.empty(0, C, H, W),
            labels=torch.empty(0, dtype=torch.long),
            history={"steps": 0, "stop": {}},
        )
    if oracle is None:
        oracle = ReferenceOracle.from_dreamer(
            dreamer,
            reference=config.oracle_reference,
            require_reference=config.require_reference,
            threshold=config.oracle_threshold,
            max_steps=config.steps,
            min_steps=config.oracle_min_steps,
            max_entropy=config.oracle_max_entropy,
            collapse_prob=config.oracle_collapse,
        )
    seed = int(config.seed) + int(seed_offset)
    g_init = torch.Generator().manual_seed(seed)
    dev = dreamer.device
    model_dev = next((p.device for p in classifier.parameters()), dev)  # type: ignore[attr-defined]
    _, concept_norm = _concept_stats(dreamer)
    bns = _batchnorms(classifier) if config.w_coherence > 0 else []  # type: ignore[arg-type]
    if config.w_coherence > 0 and not bns:
        raise ValueError(
            f"DreamConfig.w_coherence={config.w_coherence} needs BatchNorm layers (with running "
            f"statistics) in the learner, and {type(classifier).__name__} has none: set "
            "w_coherence=0"
        )
    cfg_d = dreamer.config
    eta = float(getattr(cfg_d, "eta", 0.0) or 0.0)
    noise_shape = (cfg_d.latent_channels, cfg_d.latent_size, cfg_d.latent_size)
    opt_steps = int(config.num_inference_steps or cfg_d.num_inference_steps)
    gen_steps = int(config.generate_inference_steps or cfg_d.num_inference_steps)
    precision = accel.resolve_precision(getattr(cfg_d, "mixed_precision", "no"), dev)
    scaler = accel.PromptLossScaler(enabled=precision == "fp16")

    init, how = init_prompts(
        dreamer, heads, config=config, generator=g_init, previous=previous_prompts
    )
    owned = accel.shard(range(K), index=rank, world=world)
    own = set(owned)
    params = {i: torch.nn.Parameter(init[i].clone().to(dev)) for i in owned}
    opt = torch.optim.Adam(list(params.values()), lr=config.lr) if params else None
    last_good = {i: p.detach().clone() for i, p in params.items()}
    gens = {i: _class_generator(seed, heads[i], 0) for i in owned}
    fixed = (
        {i: _draw_noise(gens[i], b, noise_shape, opt_steps, eta) for i in owned}
        if config.fixed_noise
        else None
    )
    per_pass = max(1, int(config.micro_batch) // b) if config.micro_batch else max(1, K)
    visible = torch.tensor(seen_heads + heads, dtype=torch.long, device=model_dev)
    n_seen = len(seen_heads)
    active = list(range(K))
    means_cache: dict[int, Tensor] = {}
    stop: dict[int, dict[str, Any]] = {}
    term_names = ("loss", "target", "seen", "distinct", "consistency", "norm", "coherence")
    hist: dict[str, Any] = {k: [] for k in (*term_names, "target_prob", "active")}
    hist["init"] = {h: how[i] for i, h in enumerate(heads)}

    t0 = time.perf_counter()
    step = 0
    with (
        _frozen_classifier(classifier),
        tqdm(total=config.steps, desc="dreaming (prompts)", disable=not show, leave=False) as bar,
    ):
        while active:
            final = step >= config.steps
            others_at_start = dict(means_cache)  # detached means of the previous evaluations
            mine = [i for i in active if i in own]
            report: dict[int, dict[str, Any]] = {}
            # 1. pass by pass: generate, judge (oracle), accumulate the gradients of the classes
            #    that continue; the graph of a pass is freed before the next one
            for start in range(0, len(mine), per_pass):
                group = mine[start : start + per_pass]
                emb = torch.stack([params[i] for i in group]).repeat_interleave(b, dim=0)
                drawn = [
                    fixed[i]
                    if fixed is not None
                    else _draw_noise(gens[i], b, noise_shape, opt_steps, eta)
                    for i in group
                ]
                noise = torch.cat([d[0] for d in drawn])
                var = torch.cat([d[1] for d in drawn], dim=1) if eta > 0 else None
                with torch.set_grad_enabled(not final):
                    images = _sample(
                        dreamer,
                        emb,
                        noise,
                        var,
                        num_inference_steps=config.num_inference_steps,
                        backprop_steps=config.backprop_steps,
                        grad=not final,
                    )
                    images = images.float().to(model_dev)
                    with _BNInputs(bns) as rec:
                        logits, feats = classifier.forward_heads(images, return_features=True)
                    logits = logits[:, visible].float()
                losses = []
                for j, i in enumerate(group):
                    rows = torch.arange(j * b, (j + 1) * b, device=model_dev)
                    target = n_seen + i
                    p_t = logits[rows].detach().softmax(1)[:, target]
                    done, reason = oracle.should_stop(images[rows].detach(), p_t, step)
                    if not done and final:
                        done, reason = True, STEP_CAP
                    with torch.no_grad():
                        f = F.normalize(_pool(feats[rows].detach()).float(), dim=1)
                        mean = F.normalize(f.mean(0), dim=0).cpu()
                    rep = {"mean": mean, "p": float(p_t.mean()), "reason": reason if done else ""}
                    if not done:
                        others = [m for o, m in sorted(others_at_start.items()) if o != i]
                        terms = dream_losses(
                            logits[rows],
                            feats[rows],
                            targets=torch.full((b,), target, device=model_dev),
                            n_seen=n_seen,
                            class_index=torch.zeros(b, dtype=torch.long, device=model_dev),
                            n_active=1,
                            other_means=torch.stack(others) if others else None,
                            prompts=emb[j * b : j * b + 1].to(model_dev),
                            concept_norm=concept_norm,
                            config=config,
                            coherence=bn_coherence(rec.inputs, bns, rows) if bns else None,
                        )
                        losses.append(terms["loss"])
                        rep["terms"] = {k: float(terms[k].detach()) for k in term_names}
                    report[i] = rep
                if losses:
                    scaler.scale_loss(torch.stack(losses).sum()).backward()
                del images, logits, feats, rec, losses

            # 2. every process learns every class's mean feature and stop decision
            merged: dict[int, dict[str, Any]] = {}
            for part in accel.gather_object(report) if world > 1 else [report]:
                merged.update(part)
            cont = []
            for i in active:
                r = merged[i]
                means_cache[i] = r["mean"]
                if r["reason"]:
                    if i in own:
                        if r["reason"] in HALT_REASONS:
                            params[i].data.copy_(last_good[i])
                        params[i].grad = None
                    stop[heads[i]] = {"step": step, "reason": r["reason"], "target_prob": r["p"]}
                else:
                    if i in own:
                        last_good[i] = params[i].detach().clone()
                    cont.append(i)
            hist["target_prob"].append(sum(merged[i]["p"] for i in active) / len(active))
            hist["active"].append(len(active))
            if not cont:
                break

            # 3. Adam step on the prompts of this process's classes that continue
            if opt is not None:
                scaler.unscale_([params[i] for i in cont if i in own])
                opt.step()
                opt.zero_grad(set_to_none=True)
            for name in term_names:
                hist[name].append(sum(merged[i]["terms"][name] for i in cont) / len(cont))
            bar.set_postfix(
                loss=f"{hist['loss'][-1]:.3f}", p=f"{hist['target_prob'][-1]:.2f}", active=len(cont)
            )
            bar.update(1)
            active = cont
            step += 1
    optim_s = time.perf_counter() - t0

    # 4. generate the dream set (no graph), per class from its own noise stream
    t1 = time.perf_counter()
    n = config.samples_per_class
    own_prompts = {i: params[i].detach().float().cpu() for i in owned}
    noise_parts, var_parts = [], []
    for i in owned:
        x_t, var = _draw_noise(_class_generator(seed, heads[i], 1), n, noise_shape, gen_steps, eta)
        noise_parts.append(x_t)
        var_parts.append(var)
    chunks = []
    if owned:
        cond = torch.stack([own_prompts[i] for i in owned]).repeat_interleave(n, dim=0)
        noise_all = torch.cat(noise_parts)
        var_all = torch.cat(var_parts, dim=1) if eta > 0 else None
        gb = config.generate_batch_size
        with torch.no_grad():
            for s in tqdm(
                range(0, cond.shape[0], gb),
                desc="dreaming (samples)",
                disable=not show,
                leave=False,
            ):
                chunks.append(
                    _sample(
                        dreamer,
                        cond[s : s + gb].to(dev),
                        noise_all[s : s + gb],
                        var_all[:, s : s + gb] if var_all is not None else None,
                        num_inference_steps=config.generate_inference_steps,
                        grad=False,
                    )
                    .float()
                    .cpu()
                )
    own_images = torch.cat(chunks) if chunks else torch.empty(0, C, H, W)
    mine_out = {i: (own_prompts[i], own_images[k * n : (k + 1) * n]) for k, i in enumerate(owned)}
    all_out: dict[int, tuple[Tensor, Tensor]] = {}
    for part in accel.gather_object(mine_out) if world > 1 else [mine_out]:
        all_out.update(part)
    final_prompts = torch.stack([all_out[i][0] for i in range(K)])
    images = torch.cat([all_out[i][1] for i in range(K)])
    labels = torch.tensor(heads, dtype=torch.long).repeat_interleave(n)
    gen_s = time.perf_counter() - t1

    # 5. how the learner sees the final dream set
    with _frozen_classifier(classifier), torch.no_grad():
        probs = []
        for s in range(0, images.shape[0], 256):
            lg, _ = classifier.forward_heads(
                images[s : s + 256].to(model_dev), return_features=True
            )
            probs.append(lg[:, visible].float().softmax(1).cpu())
        probs = torch.cat(probs)
    cols = n_seen + torch.arange(K).repeat_interleave(n)
    p_t = probs.gather(1, cols[:, None]).squeeze(1)
    seen_mass = probs[:, :n_seen].sum(1) if n_seen else torch.zeros(len(probs))
    hist["final_target_prob"] = {
        h: float(p_t[i * n : (i + 1) * n].mean()) for i, h in enumerate(heads)
    }
    hist["final_seen_mass"] = {
        h: float(seen_mass[i * n : (i + 1) * n].mean()) for i, h in enumerate(heads)
    }
    hist.update(
        stop=stop,
        steps=step,
        optim_seconds=optim_s,
        generate_seconds=gen_s,
        oracle=repr(oracle),
        processes=world,
        micro_batch=min(per_pass, K) * b,
        precision=precision,
        loss_scaler=scaler.state(),
    )
    oracle_state = _oracle_state(oracle, dreamer)
    oracle_state["stop_reasons"] = {h: stop[h]["reason"] for h in heads if h in stop}
    return DreamResult(
        heads=torch.tensor(heads, dtype=torch.long),
        prompts=final_prompts,
        images=images,
        labels=labels,
        history=hist,
        oracle=oracle_state,
    )
