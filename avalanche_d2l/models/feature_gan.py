"""Training of Genifer's GAN on the features of a frozen classifier.

:class:`FeatureGANTrainer` owns the generator G, its EMA copy, the discriminator D, their Adam
optimisers and the adaptive augmentation, and runs one *GAN phase* after an experience:

1. "real" batch: images of the experience's (new) classes, plus (after the first phase) as many
   images of the old classes drawn from the previous EMA generator;
2. fake batch from G with the same labels; real and fake are augmented in image space and passed
   through the frozen classifier up to the feature layer (the forward pass stops there);
3. D step: ``softplus(D(fake)) + softplus(-D(real))`` plus a lazy R1 penalty on the real
   *features* every ``r1_interval`` steps;
4. G step: ``softplus(-D(fake))`` plus the self-distillation
   ``g_distill_weight * n_old / n_new * L1(G(z, y_old) - G_prev(z, y_old))`` (same z and noise);
5. EMA of G; 6. adaptation of the augmentation probability.

A phase can write a checkpoint every ``gan_checkpoint_every`` steps (atomically) and resumes from
it exactly when it is started again with the same checkpoint path (the file is removed when the
phase ends).

The trainer reads its settings from a config object with the GAN fields of
:class:`avalanche_d2l.strategies.genifer.GeniferConfig` (``z_dim``, ``gan_batch_size``, ``g_lr``,
``d_lr``, ``adam_betas``, ``r1_*``, ``ema_*``, ``g_distill_*``, ``augment``, ``ada_*``,
``real_cache_mb``, ``mixed_precision``, ``progress``, ``gan_optimizer_reset``,
``gan_checkpoint_every``).
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from copy import deepcopy
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from avalanche_d2l.augment import AdaptiveAugment
from avalanche_d2l.models.gan import (
    DiscriminatorConfig,
    FeatureDiscriminator,
    GeneratorConfig,
    StyleGenerator,
)
from avalanche_d2l.utils import FeatureHook

__all__ = [
    "FeatureGANTrainer",
    "FeatureTap",
    "RealBatches",
    "atomic_torch_save",
    "feature_shape",
    "frozen_copy",
    "module_fingerprint",
]


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` in eval mode with every parameter frozen."""
    copy = deepcopy(module).eval()
    copy.requires_grad_(False)
    return copy


def module_fingerprint(module: nn.Module) -> str:
    """A short hash of a module's state (to check that a checkpoint belongs to it)."""
    h = hashlib.sha1()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace`` it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class _StopForward(Exception):
    """Raised by :class:`FeatureTap` to skip the classifier layers after the feature layer."""


class FeatureTap(FeatureHook):
    """Feature hook that stops the forward pass right after the hooked layer (saves the rest)."""

    def _hook(self, module: nn.Module, inputs, output) -> None:
        super()._hook(module, inputs, output)
        raise _StopForward

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        try:
            model(x)
        except _StopForward:
            pass
        return self.pop()


def feature_shape(classifier: nn.Module, layer: str, image_shape: Sequence[int]) -> tuple:
    """Shape of one sample's output of ``layer`` for images of ``image_shape`` (C, H, W)."""
    device = next(classifier.parameters()).device
    tap = FeatureTap(classifier, layer)
    was_training = classifier.training
    try:
        classifier.eval()
        with torch.no_grad():
            feat = tap(classifier, torch.zeros(2, *image_shape, device=device))
    finally:
        tap.remove()
        classifier.train(was_training)
    return tuple(int(s) for s in feat.shape[1:])


class RealBatches:
    """Endless batches ``(images, labels)`` of a dataset (eval transforms), with a state.

    Small datasets are loaded once as tensors (freed with this object) and drawn without
    replacement in random order; large ones are streamed by a seeded DataLoader. The position
    can be saved and restored (:meth:`state_dict`), which mid-phase checkpoints need.
    """

    def __init__(
        self, dataset, batch_size: int, device: torch.device, rng: torch.Generator, cache_mb: float
    ):
        self.ds = dataset.eval() if hasattr(dataset, "eval") else dataset
        self.n = batch_size
        self.device = device
        self.rng = rng
        x0 = self.ds[0][0]
        self.cached = len(self.ds) * x0.numel() * 4 <= cache_mb * 2**20
        self.perm: torch.Tensor | None = None
        self.pos = 0
        if self.cached:
            xs, ys = [], []
            for batch in torch.utils.data.DataLoader(self.ds, batch_size=512, shuffle=False):
                xs.append(batch[0])
                ys.append(batch[1])
            self.xs = torch.cat(xs).to(device)
            self.ys = torch.cat(ys).long().to(device)
        else:
            seed = int(torch.randint(2**31, (1,), generator=rng))
            self.loader_rng = torch.Generator().manual_seed(seed)
            self.loader = torch.utils.data.DataLoader(
                self.ds,
                batch_size=batch_size,
                shuffle=True,
                drop_last=len(self.ds) >= batch_size,
                generator=self.loader_rng,
            )
            self._epoch_state = self.loader_rng.get_state()
            self._it = iter(self.loader)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cached:
            total, n = len(self.ys), self.n
            if total < n:
                idx = torch.randint(total, (n,), generator=self.rng).to(self.device)
                return self.xs[idx], self.ys[idx]
            if self.perm is None or self.pos + n > total:
                self.perm = torch.randperm(total, generator=self.rng).to(self.device)
                self.pos = 0
            idx = self.perm[self.pos : self.pos + n]
            self.pos += n
            return self.xs[idx], self.ys[idx]
        try:
            batch = next(self._it)
        except StopIteration:
            self._epoch_state = self.loader_rng.get_state()
            self.pos = 0
            self._it = iter(self.loader)
            batch = next(self._it)
        self.pos += 1
        return batch[0].to(self.device), batch[1].long().to(self.device)

    def state_dict(self) -> dict[str, Any]:
        if self.cached:
            return {
                "cached": True,
                "pos": self.pos,
                "perm": None if self.perm is None else self.perm.cpu(),
            }
        return {"cached": False, "pos": self.pos, "epoch_state": self._epoch_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["cached"] != self.cached:
            raise ValueError(
                "the checkpoint's real-batch state is for another caching mode: keep "
                "real_cache_mb unchanged when resuming a GAN phase"
            )
        self.pos = int(state["pos"])
        if self.cached:
            self.perm = None if state["perm"] is None else state["perm"].to(self.device)
            return
        self._epoch_state = state["epoch_state"]
        self.loader_rng.set_state(self._epoch_state)
        self._it = iter(self.loader)
        for _ in range(self.pos):  # skip the batches already used in this epoch
            next(self._it)

    def close(self) -> None:
        self.xs = self.ys = None  # type: ignore[assignment]


class FeatureGANTrainer:
    """G, EMA G, D, their optimisers and the adaptive augmentation; trains one phase at a time.

    Args:
        config: the GAN settings (see the module docstring).
        rng: torch CPU generator for z, labels, noise, augmentation and batch order.
    """

    def __init__(self, *, config, rng: torch.Generator):
        self.config = config
        self.rng = rng
        self.generator: StyleGenerator | None = None
        self.generator_ema: StyleGenerator | None = None
        self.discriminator: FeatureDiscriminator | None = None
        self.opt_g: torch.optim.Optimizer | None = None
        self.opt_d: torch.optim.Optimizer | None = None
        cfg = config
        self.ada = AdaptiveAugment(
            config=cfg.augment, target=cfg.ada_target, p_max=cfg.ada_p_max, kimg=cfg.ada_kimg
        )
        self.gan_nimg = 0  # images shown to D so far (drives the cumulative EMA ramp-up)
        self.history: list[dict[str, Any]] = []  # one summary per GAN phase

    # ------------------------------------------------------------------ models / optimisers
    def set_generator(self, generator: StyleGenerator) -> None:
        self.generator = generator
        self.generator_ema = frozen_copy(generator)  # type: ignore[assignment]

    def build_discriminator(self, feature_shape: Sequence[int], num_classes: int) -> None:
        cfg = self.config
        self.discriminator = FeatureDiscriminator(
            config=DiscriminatorConfig(
                feature_shape=tuple(feature_shape),
                num_classes=num_classes,
                channels=cfg.d_channels,
                mbstd_group=cfg.mbstd_group,
                cmap_dim=cfg.d_cmap_dim,
                family=cfg.d_family,
            )
        )

    def d_adam_settings(self) -> tuple[float, tuple[float, float], float]:
        """(lr, betas, R1 factor) of D. With ``r1_lazy_scaling="reference"`` lazy R1 every
        ``k`` steps is weighted ``k / (k + 1)`` and D's lr and betas are adjusted by the same
        factor (lr * c, beta ** c); with ``"interval"`` the penalty is weighted ``k`` and Adam
        is as configured."""
        cfg = self.config
        k = max(1, int(cfg.r1_interval))
        b1, b2 = cfg.adam_betas
        if cfg.r1_lazy_scaling == "reference":
            c = k / (k + 1) if k > 1 else 1.0
            return cfg.d_lr * c, (b1**c, b2**c), c
        return cfg.d_lr, (b1, b2), float(k)

    def make_optimizers(self) -> None:
        cfg = self.config
        self.opt_g = torch.optim.Adam(
            self.generator.parameters(),
            lr=cfg.g_lr,  # type: ignore
            betas=tuple(cfg.adam_betas),
            eps=1e-8,
        )
        lr_d, betas_d, _ = self.d_adam_settings()
        self.opt_d = torch.optim.Adam(
            self.discriminator.parameters(),
            lr=lr_d,  # type: ignore
            betas=betas_d,
            eps=1e-8,
        )

    def _accelerator(self, device: torch.device):
        """A fresh ``accelerate.Accelerator`` for autocast/backward (never kept: dill-safe)."""
        from accelerate import Accelerator

        try:
            return Accelerator(
                cpu=device.type == "cpu", mixed_precision=self.config.mixed_precision
            )
        except ValueError as err:
            raise RuntimeError(
                f"could not set up accelerate with mixed_precision="
                f"{self.config.mixed_precision!r} (another Accelerator in this process uses other "
                f"settings): {err}"
            ) from err

    # ------------------------------------------------------------------ state
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # torch optimisers do not always survive dill (a sentinel in torch's step wrapper):
        # keep their state_dicts and rebuild them in __setstate__
        for name in ("opt_g", "opt_d"):
            opt = state.pop(name)
            state[f"_{name}_state"] = None if opt is None else opt.state_dict()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        opt_states = {n: state.pop(f"_{n}_state", None) for n in ("opt_g", "opt_d")}
        self.__dict__.update(state)
        self.opt_g = self.opt_d = None
        if (
            opt_states["opt_g"] is not None
            and self.generator is not None
            and self.discriminator is not None
        ):
            self.make_optimizers()
            self.opt_g.load_state_dict(opt_states["opt_g"])  # type: ignore[union-attr]
            self.opt_d.load_state_dict(opt_states["opt_d"])  # type: ignore[union-attr]

    def state_dict(self) -> dict[str, Any]:
        def sd(m):
            return None if m is None else m.state_dict()

        return {
            "generator_config": None if self.generator is None else asdict(self.generator.config),
            "discriminator_config": (
                None if self.discriminator is None else asdict(self.discriminator.config)
            ),
            "generator": sd(self.generator),
            "generator_ema": sd(self.generator_ema),
            "discriminator": sd(self.discriminator),
            "opt_g": sd(self.opt_g),
            "opt_d": sd(self.opt_d),
            "ada": self.ada.state_dict(),
            "gan_nimg": self.gan_nimg,
            "history": deepcopy(self.history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["generator_config"] is not None:
            gcfg = GeneratorConfig(**state["generator_config"])
            if self.generator is None or asdict(self.generator.config) != asdict(gcfg):
                self.set_generator(StyleGenerator(config=gcfg))
            self.generator.load_state_dict(state["generator"])  # type: ignore[union-attr]
            self.generator_ema.load_state_dict(state["generator_ema"])  # type: ignore[union-attr]
        if state["discriminator_config"] is not None:
            self.discriminator = FeatureDiscriminator(
                config=DiscriminatorConfig(**state["discriminator_config"])
            )
            self.discriminator.load_state_dict(state["discriminator"])
        self.opt_g = self.opt_d = None
        if state["opt_g"] is not None:
            self.make_optimizers()
            self.opt_g.load_state_dict(state["opt_g"])  # type: ignore[union-attr]
            self.opt_d.load_state_dict(state["opt_d"])  # type: ignore[union-attr]
        self.ada.load_state_dict(state["ada"])
        self.gan_nimg = int(state["gan_nimg"])
        self.history = deepcopy(state["history"])

    # ------------------------------------------------------------------ one GAN phase
    def ema_beta(self, step: int, steps: int, batch: int) -> float:
        """EMA decay of G for ``step`` (0-based) of a phase of ``steps`` steps.

        The half-life is ``ema_kimg`` thousand images. With ``ema_ramp_phase`` (a fraction) it
        grows linearly from 0 over that fraction of every phase; else, with ``ema_rampup``, it
        is at most ``ema_rampup`` times the images shown since the first phase (StyleGAN2).
        """
        cfg = self.config
        ema_nimg = cfg.ema_kimg * 1000
        if cfg.ema_ramp_phase:
            ema_nimg = ema_nimg * min(1.0, step / max(1e-8, cfg.ema_ramp_phase * steps))
        elif cfg.ema_rampup:
            ema_nimg = min(ema_nimg, self.gan_nimg * cfg.ema_rampup)
        return 0.5 ** (batch / max(ema_nimg, 1e-8))

    def train_phase(
        self,
        *,
        classifier: nn.Module,
        feature_layer: str,
        dataset,
        new_classes: Sequence[int],
        old_classes: Sequence[int],
        steps: int,
        device: torch.device | str = "cpu",
        experience: int = 0,
        checkpoint_path: str | os.PathLike | None = None,
        monitor: Callable[[int], bool] | None = None,
        monitor_every: int = 0,
    ) -> dict[str, Any]:
        """Train G and D for ``steps`` steps on the features of the frozen ``classifier``.

        ``dataset`` holds the real images of ``new_classes``; ``old_classes`` are drawn from the
        EMA generator as it is at the start of the phase. With ``monitor``, it is called with the
        number of steps done every ``monitor_every`` steps and the phase ends early when it
        returns True (``steps`` is then the cap). Returns (and appends to ``self.history``) a
        summary of the phase.
        """
        cfg = self.config
        device = torch.device(device)
        G, G_ema, D = self.generator, self.generator_ema, self.discriminator
        if G is None or G_ema is None or D is None:
            raise RuntimeError("build the generator and the discriminator first")
        new = [int(c) for c in new_classes]
        old = [int(c) for c in old_classes]
        G.to(device).train()
        G_ema.to(device)
        D.to(device).train()
        if cfg.gan_optimizer_reset or self.opt_g is None or self.opt_d is None:
            self.make_optimizers()  # reference: new Adams every phase
        for opt in (self.opt_g, self.opt_d):  # optimiser state follows the models' device
            for st in opt.state.values():  # type: ignore[union-attr]
                for k, v in st.items():
                    if torch.is_tensor(v) and k != "step":
                        st[k] = v.to(device)
        if self.history:
            # every phase starts from the EMA generator of the previous one (never re-initialised)
            G.load_state_dict(G_ema.state_dict())
        g_prev = frozen_copy(G_ema) if old else None
        batch = cfg.gan_batch_size
        n_old = batch // 2 if old else 0
        n_new = batch - n_old
        distill_w = cfg.g_distill_weight * len(old) / max(1, len(new))
        distill_std = None
        if cfg.g_distill_std is not None:
            distill_std = torch.as_tensor(
                cfg.g_distill_std, dtype=torch.float32, device=device
            ).view(1, -1, 1, 1)
        _, _, r1_factor = self.d_adam_settings()
        self.ada.reset()
        self.ada.to(device)
        acc = self._accelerator(device)
        tap = FeatureTap(classifier, feature_layer)
        real_iter = RealBatches(dataset, n_new, device, self.rng, cfg.real_cache_mb)
        sums = {"loss_d": 0.0, "loss_g": 0.0, "distill": 0.0, "r1": 0.0}
        start = 0
        key = {
            "experience": int(experience),
            "new": new,
            "old": old,
            "steps": int(steps),
            "classifier": module_fingerprint(classifier),
        }
        ckpt = Path(checkpoint_path) if checkpoint_path else None
        if ckpt is not None and ckpt.exists():
            saved = torch.load(ckpt, map_location="cpu", weights_only=True)
            if saved["key"] == key:
                start = self._restore_checkpoint(saved, g_prev, real_iter, device)
                sums = saved["sums"]
                G, G_ema, D = self.generator, self.generator_ema, self.discriminator
        t0 = time.perf_counter()
        done = start

        def features(x: torch.Tensor) -> torch.Tensor:
            return tap(classifier, self.ada(x, generator=self.rng))

        def step_opt(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
            opt.zero_grad(set_to_none=True)
            acc.backward(loss)
            if acc.scaler is not None:  # fp16: the scaler unscales, skips inf steps, updates
                acc.scaler.step(opt)
                acc.scaler.update()
            else:
                opt.step()

        bar = tqdm(
            range(start, steps),
            desc=f"Genifer GAN (classes {new})",
            disable=not cfg.progress,
            leave=False,
            initial=start,
            total=steps,
        )
        try:
            for step in bar:
                # 1. "real" batch: new-class images, plus old classes from the previous G
                x_real, y_real = next(real_iter)
                if old:
                    y_old = G.sample_labels(n_old, old, generator=self.rng).to(device)
                    x_old = g_prev.generate(n_old, y_old, generator=self.rng)  # type: ignore
                    x_real = torch.cat([x_real.to(x_old.dtype), x_old])
                    y_real = torch.cat([y_real, y_old])
                # 2. fake batch (same labels), kept with its graph: the classifier is frozen, so
                #    one pass through it serves both the D step (detached) and the G step
                z = torch.randn(batch, cfg.z_dim, generator=self.rng).to(device)
                noise = G.make_noise(batch, generator=self.rng, device=device)
                with acc.autocast():
                    fake = G(z, y_real, noise)
                    f_fake = features(fake)
                    with torch.no_grad():
                        f_real = features(x_real)
                # 3. discriminator step: softplus(D(fake)) + softplus(-D(real)) (+ lazy R1)
                do_r1 = cfg.r1_gamma > 0 and step % cfg.r1_interval == 0
                if do_r1:
                    f_real = f_real.detach().float().requires_grad_(True)
                with acc.autocast():
                    d_fake = D(f_fake.detach(), y_real)
                with nullcontext() if do_r1 else acc.autocast():
                    d_real = D(f_real, y_real)
                loss_d = F.softplus(d_fake).mean() + F.softplus(-d_real).mean()
                if do_r1:
                    (grad,) = torch.autograd.grad(d_real.float().sum(), f_real, create_graph=True)
                    r1 = grad.square().flatten(1).sum(1).mean()
                    loss_d = loss_d + r1 * (cfg.r1_gamma / 2) * r1_factor
                    sums["r1"] += float(r1.detach())
                self.ada.accumulate(d_real)
                step_opt(self.opt_d, loss_d)  # type: ignore[arg-type]
                # 4. generator step: fool the updated D through the frozen classifier, plus
                #    L1 self-distillation to the previous generator on old classes (same z, noise)
                D.requires_grad_(False)
                with acc.autocast():
                    loss_g = F.softplus(-D(f_fake, y_real)).mean()
                    if old:
                        with torch.no_grad():
                            prev = g_prev(
                                z[n_new:],
                                y_real[n_new:],  # type: ignore[misc]
                                [t[n_new:] for t in noise],
                            )
                        diff = fake[n_new:].float() - prev.float()
                        if distill_std is not None:  # in the normalised space of the reference
                            diff = diff / distill_std
                        distill = diff.abs().mean()
                        loss_g = loss_g + distill_w * distill
                        sums["distill"] += float(distill.detach())
                step_opt(self.opt_g, loss_g)  # type: ignore[arg-type]
                D.requires_grad_(True)
                # 5. EMA of G
                self.gan_nimg += batch
                beta = self.ema_beta(step, steps, batch)
                with torch.no_grad():  # one fused call (bitwise equal to a loop of lerp_)
                    torch._foreach_lerp_(
                        list(G_ema.parameters()), [p.detach() for p in G.parameters()], 1 - beta
                    )
                # 6. adapt the augmentation probability
                if (step + 1) % cfg.ada_interval == 0:
                    self.ada.adjust()
                sums["loss_d"] += float(loss_d.detach())
                sums["loss_g"] += float(loss_g.detach())
                if cfg.progress and step % 20 == 0:
                    bar.set_postfix(
                        d=f"{loss_d.item():.3f}",
                        g=f"{loss_g.item():.3f}",
                        p=f"{float(self.ada.p):.2f}",
                    )
                every = cfg.gan_checkpoint_every
                if ckpt is not None and every and (step + 1) % every == 0 and step + 1 < steps:
                    self._write_checkpoint(ckpt, key, step + 1, g_prev, real_iter, sums)
                done = step + 1
                # 7. stop when the monitor (the replay's fidelity) says the replay is good
                if monitor is not None and monitor_every and done % monitor_every == 0:
                    G.eval()
                    stop = monitor(done)
                    G.train()
                    if stop:
                        break
        finally:
            bar.close()
            tap.remove()
            real_iter.close()
        G.eval()
        if ckpt is not None and ckpt.exists():
            ckpt.unlink()  # the phase is complete: its result lives in the trainer's state
        wall = time.perf_counter() - t0
        summary = {
            "experience": int(experience),
            "new_classes": new,
            "old_classes": old,
            "steps": done,
            "max_steps": steps,
            "resumed_at": start,
            "wall_s": wall,
            "steps_per_s": (done - start) / wall if wall > 0 else math.inf,
            "ada_p": float(self.ada.p),
            **{k: v / max(1, done) for k, v in sums.items()},
        }
        self.history.append(summary)
        return summary

    def _write_checkpoint(
        self, path: Path, key: dict, next_step: int, g_prev, real_iter, sums: dict
    ) -> None:
        atomic_torch_save(
            {
                "key": key,
                "next_step": next_step,
                "trainer": self.state_dict(),
                "g_prev": None if g_prev is None else g_prev.state_dict(),
                "rng": self.rng.get_state(),
                "real": real_iter.state_dict(),
                "sums": dict(sums),
            },
            path,
        )

    def _restore_checkpoint(
        self, saved: dict, g_prev, real_iter: RealBatches, device: torch.device
    ) -> int:
        self.load_state_dict(saved["trainer"])
        # load_state_dict keeps the module objects when the configs match: move them back
        self.generator.to(device).train()  # type: ignore[union-attr]
        self.generator_ema.to(device)  # type: ignore[union-attr]
        self.discriminator.to(device).train()  # type: ignore[union-attr]
        self.ada.to(device)
        for opt in (self.opt_g, self.opt_d):
            for st in opt.state.values():  # type: ignore[union-attr]
                for k, v in st.items():
                    if torch.is_tensor(v) and k != "step":
                        st[k] = v.to(device)
        if g_prev is not None:
            g_prev.load_state_dict(saved["g_prev"])
        self.rng.set_state(saved["rng"])
        real_iter.load_state_dict(saved["real"])
        return int(saved["next_step"])
