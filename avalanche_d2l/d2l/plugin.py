"""D2L -- Dream2Learn (Calcagno et al., arXiv 2603.01935) as an Avalanche plugin.

The algorithm, hook by hook, in the order it runs for each experience:

0. ``before_train_dataset_adaptation`` (first experience): wrap the strategy's model in
   :class:`~avalanche_d2l.d2l.heads.DreamHeads` when it is not one yet (before Avalanche makes
   the optimizer), then size D2L to the data once -- the learner's input space, the dreamer
   fitted to it, the learner's extra head (:func:`~avalanche_d2l.d2l.space.size_to_data`).
1. ``before_training_exp`` -- **head assignment**. The learner has one head per class of the
   stream (+ optional dream-only heads). Before any update it predicts on the new experience's
   samples; each new class takes the free head most of its samples land on (greedy, each head
   once). A new class thus inherits the head whose dream resembles it: forward transfer.
2. ``before_backward`` -- **training with dreams**: each minibatch of the host (ER, ER-ACE,
   DER++, with its own replay loss) adds ``dream_weight * CE`` on a minibatch of dreams labelled
   with their heads. Dreams never enter the buffer.
3. ``after_training_exp`` -- **dreaming**, then **sleep**. Every learned class ``c`` grows a dream
   class on a free head: its prompt ``p_c`` (from the inventory, or first fitted to ``c``'s
   buffer images) is optimised by the learner through the frozen dreamer, from ``c``'s buffer
   images noised to ``strength``, until the learned oracle says stop
   (:func:`~avalanche_d2l.d2l.dreaming.dream`). Then the learner sleeps: it trains on the new
   dreams with buffer minibatches and the host's replay loss, before the next experience comes.

The method's state is the prompt inventory and the oracle (:mod:`.inventory`); dream images are
a keyed cache (:mod:`.cache`); what the plugin keeps, saves and pickles is in :mod:`.state`.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader

from ..utils import training_mode
from .cache import DreamCache, phase_key
from .config import DreamConfig, _dream_from_dict, cpu_preset
from .dreaming import DreamSet, dream
from .heads import DreamHeads, add_missing_params, greedy_assignment
from .hosts import (
    align_der_targets,
    buffer_tensors,
    host_kind,
    replay_loss,
    replay_source,
    run_after_replay,
)
from .inventory import Inventory, plan_jobs
from .oracle import LearnedOracle
from .prompts import control_dreams
from .space import InputSpace, size_to_data, wrap_for
from .state import DreamSetState

__all__ = ["D2LPlugin", "greedy_assignment"]


class D2LPlugin(DreamSetState, SupervisedPlugin, supports_distributed=True):
    """The D2L method, as a plugin of any rehearsal host.

    Hosts: ``Replay``/``ReplayPlugin`` (this plugin moves itself after it), ``ER_ACE`` and
    ``DER`` (their ``storage_policy``), or any buffer given as ``buffer=``. The strategy's model
    may be any classifier: the plugin wraps it in :class:`~avalanche_d2l.d2l.heads.DreamHeads`
    at the first experience it sees (training or evaluation), before Avalanche makes the
    optimizer.

    Args:
        dreamer: a :class:`~avalanche_d2l.dreaming.Dreamer`, or ``"offline"`` /
            ``"offline-rgb"`` / a path or hub id (loaded once per process, reloaded from its
            source after unpickling: checkpoints carry no diffusion weights).
        config: the :class:`~avalanche_d2l.d2l.config.DreamConfig` (default: the CPU preset); a
            dict is applied on top of the preset.
        buffer: the rehearsal buffer (default: found on the host).
        image_shape: ``(C, H, W)`` of the inputs (default: learned from the first experience).
        dreamer_overrides: ``DreamerConfig`` overrides when ``dreamer`` is a string.
        dreamer_device: where a dreamer named by a string runs (default: the strategy's device).
        cache_dir: folder of the dream-set cache (``None``: no cache).
        class_names: names of the stream's classes (Stable Diffusion's prompts start from them).
        keep_cached: dream-set files kept per experience.
        n_classes: classes of the stream, when the plugin wraps the model (default: from the
            benchmark of the first experience).
        feature_layer: module whose output is the learner's features, when the plugin wraps
            the model (default: as :func:`~avalanche_d2l.d2l.heads.find_feature_layer` finds it).
        n_extra_heads: dream-only heads beyond one per class, when the plugin wraps the model.
    """

    def __init__(
        self,
        dreamer=None,
        config: DreamConfig | Mapping | None = None,
        *,
        buffer=None,
        image_shape: Sequence[int] | None = None,
        dreamer_overrides=None,
        dreamer_device=None,
        cache_dir: str | os.PathLike | None = None,
        class_names: Sequence[str] | None = None,
        keep_cached: int = 1,
        n_classes: int | None = None,
        feature_layer: str | None = None,
        n_extra_heads: int = 0,
    ):
        super().__init__()
        if isinstance(config, Mapping):
            config = _dream_from_dict(config)
        self.config = config if config is not None else cpu_preset()
        self.dreamer_overrides = dict(dreamer_overrides or {})
        self.dreamer_device = str(dreamer_device) if dreamer_device is not None else None
        dreamer = "offline" if dreamer is None else dreamer
        self.dreamer_source = str(dreamer) if isinstance(dreamer, (str, os.PathLike)) else None
        if self.dreamer_source is None and not hasattr(dreamer, "sample"):
            raise TypeError(
                f"dreamer must be a Dreamer, a hub id / path or 'offline', got "
                f"{type(dreamer).__name__}"
            )
        self._base_dreamer = None if self.dreamer_source is not None else dreamer
        if self.dreamer_source is not None and self.config.uses_dreamer and dreamer_device:
            _ = self.base_dreamer  # load now: a missing dreamer fails before training
        self.wrap_args = {"n_classes": n_classes, "feature_layer": feature_layer}
        self.wrap_args["n_extra_heads"] = int(n_extra_heads)
        self._dreamer = None
        self.buffer = buffer
        self.space = InputSpace(tuple(int(s) for s in image_shape)) if image_shape else None
        self._space_learned = False
        self.cache = DreamCache(cache_dir, keep_cached)
        self.class_names = list(class_names) if class_names is not None else None
        # the method's state
        self.inventory = Inventory()
        self.oracle = LearnedOracle(
            hidden=self.config.oracle_hidden,
            lr=self.config.oracle_lr,
            updates=self.config.oracle_updates,
            min_labels=self.config.oracle_min_labels,
            memory=self.config.oracle_memory,
            seed=self.config.seed,
        )
        self._dreams_u8: Tensor | None = None
        self._dreams_float: Tensor | None = None
        self._dream_file: tuple[str, str] | None = None
        self.dream_labels: Tensor | None = None
        self.history: list[dict[str, Any]] = []
        self.assignments: list[dict[int, int]] = []
        self.dreams_loaded_from_cache = 0
        self._jobs: dict[int, Any] = {}  # head -> DreamJob of the last phase (for figures)

    # ---- 0. sized to the data once --------------------------------------------------------------

    def fit(self, space: InputSpace, model: DreamHeads | None = None) -> bool:
        """Size to ``space`` (the dreamer, the learner's extra head); True when the model gained
        parameters (the optimizer must learn of them)."""
        base = self.base_dreamer if self.config.uses_dreamer else None
        self.space, self._dreamer, grew = size_to_data(space=space, dreamer=base, model=model)
        self._space_learned = True
        return grew

    def attach(self, strategy) -> DreamHeads:
        """The strategy's model as :class:`DreamHeads`, wrapped now when it is not one (sized
        for the experience's images, the new parameters added to the optimizer); the dreamer
        follows the strategy's device unless ``dreamer_device`` was given."""
        if self.dreamer_device is None:
            self.dreamer_device = str(strategy.device)
            if self.dreamer_source is not None:
                self._base_dreamer = self._dreamer = None  # (re)loaded on that device
        if not isinstance(strategy.model, DreamHeads):
            shape = self.space.shape if self.space is not None else None
            model = wrap_for(strategy.model, strategy.experience, shape=shape, **self.wrap_args)
            strategy.model = model.to(strategy.device)
            add_missing_params(strategy.optimizer, strategy.model)
        return strategy.model

    def before_training(self, strategy, **kwargs):
        run_after_replay(self, strategy)  # the sleep phase needs the buffer updated first

    def before_eval_dataset_adaptation(self, strategy, **kwargs):
        self.attach(strategy)  # evaluated before any training: same wrapping

    def before_train_dataset_adaptation(self, strategy, **kwargs):
        model = self.attach(strategy)
        labels = [int(t) for t in getattr(strategy.experience, "task_labels", None) or [0]]
        if any(labels):
            raise ValueError(
                "D2L is class-incremental and ignores task labels, but this experience has task "
                f"labels {sorted(set(labels))}: use a class-incremental benchmark (task label 0)"
            )
        if not self._space_learned:
            space, _, _ = size_to_data(dataset=strategy.experience.dataset)
            if self.space is not None and self.space.shape != space.shape:
                raise ValueError(
                    f"D2LPlugin was given image_shape={self.space.shape} but the experience's "
                    f"images are {space.shape}: pass image_shape={space.shape} or leave it out"
                )
            self.fit(space)
        if model.build(self.space.shape):
            add_missing_params(strategy.optimizer, model)

    # ---- 1. head assignment ---------------------------------------------------------------------

    def before_training_exp(self, strategy, **kwargs):
        model = _heads(strategy)
        self.assignments.append(self.assign_heads(strategy))
        # dreams whose head a real class took are dropped; the others keep training
        if self.dream_labels is not None and self.config.labels == "new_head":
            keep = torch.isin(self.dream_labels, torch.tensor(model.free_heads()))
            if not bool(keep.all()):
                self._set_dreams(self._dream_u8()[keep], self.dream_labels[keep])
            model.set_dream_heads(sorted(set(self.dream_labels.tolist())))

    @torch.no_grad()
    def assign_heads(self, strategy) -> dict[int, int]:
        """Each new class takes the free head most of its samples land on (``labels=
        "source_class"``: the free heads in order, no head reuse); returns ``{class: head}``."""
        model = _heads(strategy)
        classes = [int(c) for c in strategy.experience.classes_in_this_experience]
        new = sorted(c for c in classes if int(model.class_to_head[c]) < 0)
        free = model.free_heads()
        if not new:
            return {}
        if self.config.labels == "source_class":
            mapping = dict(zip(new, free))
        else:
            counts = torch.zeros(len(new), len(free))
            cols = torch.tensor(free, device=strategy.device)
            ds = strategy.experience.dataset.eval()
            with training_mode(model, False):
                for x, y, *_ in DataLoader(ds, batch_size=strategy.eval_mb_size or 256):
                    lands = model.forward_heads(x.to(strategy.device))[:, cols].argmax(1).cpu()
                    for r, c in enumerate(new):
                        counts[r] += torch.bincount(lands[y == c], minlength=len(free)).float()
            mapping = {new[r]: free[k] for r, k in greedy_assignment(counts)}
        model.assign(mapping)
        return mapping

    # ---- 2. training with dreams ----------------------------------------------------------------

    def after_forward(self, strategy, **kwargs):
        align_der_targets(strategy, _heads(strategy))  # DER host: stored logits in class space

    def before_backward(self, strategy, **kwargs):
        w = self.config.train_dream_weight
        w = self.config.dream_weight if w is None else w
        if w == 0 or self.dream_labels is None or self.dream_labels.numel() == 0:
            return
        model = _heads(strategy)
        n = self.config.dream_batch_size or strategy.train_mb_size
        idx = torch.randint(0, self.dream_labels.numel(), (n,))
        x = self.dream_images[idx].to(strategy.device, non_blocking=True)
        heads = self.dream_labels[idx].to(strategy.device)
        target = model.training_targets(self.config.labels, heads)
        strategy.loss = strategy.loss + w * F.cross_entropy(model(x), target)

    # ---- 3. dreaming, then sleep ----------------------------------------------------------------

    def after_training_exp(self, strategy, **kwargs):
        model, k = _heads(strategy), int(strategy.experience.current_experience)
        owner, buffer = replay_source(self, strategy)
        buf = buffer_tensors(buffer) if buffer is not None else {"x": torch.empty(0)}
        done = bool((model.class_to_head >= 0).all()) and not self.config.dream_after_last
        if done or not model.free_heads() or buf["x"].numel() == 0:
            if buf["x"].numel() == 0:
                warnings.warn(
                    "D2L found no (non-empty) replay buffer: no dreams, no sleep "
                    "(add a ReplayPlugin before D2LPlugin)",
                    stacklevel=2,
                )
            self._set_dreams(None, None)
            model.set_dream_heads([])
            return
        result, cached, file = self._dream_or_load(model, buf, k)
        self.dreams_loaded_from_cache += int(cached)
        labels = result.labels
        if self.config.labels == "source_class":  # a dream is labelled as the class it grew from
            src = {int(h): int(model.class_to_head[j.source]) for h, j in self._jobs.items()}
            labels = torch.tensor([src[int(h)] for h in labels.tolist()], dtype=torch.long)
        self._set_dreams(self.space.quantise(result.images), labels, file)
        model.set_dream_heads(
            sorted(set(labels.tolist())) if self.config.labels == "new_head" else []
        )
        hist = {
            "experience": k,
            "from_cache": cached,
            "heads": result.heads.tolist(),
            **result.history,
        }
        hist.update(self.sleep(strategy, owner, buf, k))
        self.history.append(hist)

    def _dream_or_load(self, model: DreamHeads, buf: dict, k: int):
        """``(dream set, from the cache, (path, key) of its cache file or None)``."""
        jobs, keys = plan_jobs(
            inventory=self.inventory,
            model=model,
            buffer=buf,
            dreamer=self.dreamer,
            config=self.config,
            experience=k,
            class_names=self.class_names,
        )
        self._jobs = {j.head: j for j in jobs}
        key = phase_key(
            model=model,
            buffer=buf,
            config=self.config,
            experience=k,
            keys=keys,
            jobs=jobs,
            dreamer=self.dreamer,
            source=self.dreamer_source,
            space=self.space,
            oracle=self.oracle,
            prompts=self.inventory.prompts,
        )
        make = lambda: self._make_dreams(model, jobs, k)  # noqa: E731
        result, cached, file = self.cache.load_or_make(
            k, key, space=self.space, oracle=self.oracle, make=make
        )
        for key_, job, p in zip(keys, jobs, result.prompts):
            if self.config.uses_dreamer:
                self.inventory.prompts[key_] = p.clone()
            self.inventory.homes[key_] = job.head
        return result, cached, file

    def _make_dreams(self, model: DreamHeads, jobs, k: int) -> DreamSet:
        seed = int(self.config.seed) + k
        if self.config.uses_dreamer:
            return dream(
                dreamer=self.dreamer,
                learner=model,
                jobs=jobs,
                seen_heads=model.seen_heads(),
                config=self.config,
                oracle=self.oracle,
                seed=seed,
            )
        return control_dreams(jobs, self.config, self.space, seed)

    def sleep(self, strategy, owner, buf: dict[str, Tensor], k: int) -> dict[str, Any]:
        """``sleep_epochs`` passes over the dream set, each dream minibatch with as many buffer
        samples (``sleep_data="experience"``: and as many of the experience just trained on):
        ``host replay loss [+ CE(experience)] + dream_weight * CE(dreams)``, the strategy's
        optimizer."""
        epochs, n_dreams = int(self.config.sleep_epochs), int(self.dream_labels.numel())
        if epochs <= 0 or n_dreams == 0:
            return {"sleep_steps": 0, "sleep_seconds": 0.0}
        kind, model, dev = host_kind(strategy, owner), _heads(strategy), strategy.device
        g = torch.Generator().manual_seed(int(self.config.seed) + 104_729 + k)
        n, m = self.config.dream_batch_size or strategy.train_mb_size, strategy.train_mb_size
        dreams, t0, steps = self.dream_images, time.perf_counter(), 0
        exp = None
        if self.config.sleep_data == "experience":
            exp = buffer_tensors(strategy.experience.dataset)
        with training_mode(model, True):
            for _ in range(epochs):
                order = torch.randperm(n_dreams, generator=g)
                for s in range(0, n_dreams, n):
                    idx, bidx = (
                        order[s : s + n],
                        torch.randint(0, buf["y"].numel(), (m,), generator=g),
                    )
                    real = [buf["x"][bidx].to(dreams.dtype)]
                    if exp is not None:
                        eidx = torch.randint(0, exp["y"].numel(), (m,), generator=g)
                        real.append(exp["x"][eidx].to(dreams.dtype))
                    r = sum(len(x) for x in real)
                    out = model(torch.cat([*real, dreams[idx]]).to(dev))
                    stored = buf["logits"][bidx].to(dev) if kind == "der" else None
                    loss = replay_loss(kind, strategy, out[:m], buf["y"][bidx].to(dev), stored)
                    if exp is not None:
                        loss = loss + F.cross_entropy(out[m:r], exp["y"][eidx].to(dev))
                    heads = self.dream_labels[idx].to(dev)
                    target = model.training_targets(self.config.labels, heads)
                    loss = loss + self.config.dream_weight * F.cross_entropy(out[r:], target)
                    strategy.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    strategy.optimizer.step()
                    steps += 1
        return {"sleep_steps": steps, "sleep_seconds": time.perf_counter() - t0, "host": kind}


def _heads(strategy) -> DreamHeads:
    if not isinstance(strategy.model, DreamHeads):
        raise TypeError(
            f"the strategy's model is a {type(strategy.model).__name__}, not yet wrapped in "
            "DreamHeads: D2LPlugin wraps it when the strategy trains or evaluates, so call "
            "strategy.train(...) or strategy.eval(...) first"
        )
    return strategy.model
