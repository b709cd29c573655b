"""Training of Genifer's GAN on the features of a frozen classifier.

:class:`FeatureGANTrainer` owns the generator G, its EMA copy, the discriminator D, their Adam
optimisers and the adaptive augmentation, and runs one *GAN phase* after an experience:

1. "real" batch: images of the experience's (new) classes, plus (after the first phase) as many
   images of the old classes drawn from the previous EMA generator;
2. fake batch from G with the same labels; real and fake are augmented in image space and passed
   through the frozen classifier up to the feature layer (the forward pass stops there);
3. D step: ``softplus(D(fake)) + softplus(-D(real))`` plus a lazy R1 penalty on the real
   *features* every ``gan.r1_interval`` steps;
4. G step: ``softplus(-D(fake))`` plus the self-distillation
   ``gan.distill_weight * n_old / n_new * L1(G(z, y_old) - G_prev(z, y_old))`` (same z, noise);
5. EMA of G; 6. adaptation of the augmentation probability.

With ``gan.image_weight > 0`` (an experiment, off by default) a second discriminator of D's
architecture reads the augmented images themselves (step 3 trains it the same way, step 4 adds
its generator loss with that weight): Genifer's own D never reads pixels.

A phase can write a checkpoint every ``gan.checkpoint_every`` steps (atomically) and resumes from
it exactly when it is started again with the same checkpoint path (the file is removed when the
phase ends).

The trainer takes only its own settings: the ``gan``, ``discriminator`` and ``augment`` parts of
:class:`avalanche_d2l.genifer.GeniferConfig` (the generator is built, or given, outside it).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from copy import deepcopy
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from avalanche_d2l.augment import AdaptiveAugment
from avalanche_d2l.models.feature_gan_parts import (
    ConvStats,
    FeatureTap,
    RealBatches,
    atomic_torch_save,
    device_layout,
    feature_shape,
    frozen_copy,
    module_fingerprint,
)
from avalanche_d2l.models.gan import (
    DiscriminatorConfig,
    FeatureDiscriminator,
    GeneratorConfig,
    StyleGenerator,
)
from avalanche_d2l.utils import get_module

if TYPE_CHECKING:  # the settings' types only: the trainer reads them, it does not build them
    from avalanche_d2l.genifer.config import AugmentSettings, DiscriminatorSettings, GanSettings

__all__ = [
    "FeatureGANTrainer",
    "FeatureTap",
    "RealBatches",
    "atomic_torch_save",
    "feature_shape",
    "frozen_copy",
    "module_fingerprint",
]


class FeatureGANTrainer:
    """G, EMA G, D, their optimisers and the adaptive augmentation; trains one phase at a time.

    Args:
        gan: the phase's settings (length, optimisers, R1, EMA, self-distillation, checkpoints).
        discriminator: the architecture of D (built by :meth:`build_discriminator`).
        augment: the adaptive augmentation.
        rng: torch CPU generator for z, labels, noise, augmentation and batch order.
        progress: show a tqdm bar for the steps.
    """

    def __init__(
        self,
        *,
        gan: GanSettings,
        discriminator: DiscriminatorSettings,
        augment: AugmentSettings,
        rng: torch.Generator,
        progress: bool = True,
    ):
        self.settings = gan
        self.discriminator_settings = discriminator
        self.progress = progress
        self.rng = rng
        self.generator: StyleGenerator | None = None
        self.generator_ema: StyleGenerator | None = None
        self.discriminator: FeatureDiscriminator | None = None
        # gan.image_weight > 0 (an experiment): a second D on the augmented images themselves
        self.image_discriminator: FeatureDiscriminator | None = None
        self.opt_g: torch.optim.Optimizer | None = None
        self.opt_d: torch.optim.Optimizer | None = None
        self.opt_di: torch.optim.Optimizer | None = None
        self.ada_interval = augment.interval
        self.ada = AdaptiveAugment(
            config=augment.ops, target=augment.target, p_max=augment.p_max, kimg=augment.kimg
        )
        self.gan_nimg = 0  # images shown to D so far (drives the cumulative EMA ramp-up)
        self.history: list[dict[str, Any]] = []  # one summary per GAN phase

    # ------------------------------------------------------------------ models / optimisers
    def set_generator(self, generator: StyleGenerator) -> None:
        self.generator = device_layout(generator)  # type: ignore[assignment]
        self.generator_ema = frozen_copy(generator)  # type: ignore[assignment]

    def build_discriminator(self, feature_shape: Sequence[int], num_classes: int) -> None:
        self.discriminator = self._new_discriminator(feature_shape, num_classes)

    def _new_discriminator(self, shape: Sequence[int], num_classes: int) -> FeatureDiscriminator:
        d = self.discriminator_settings
        return FeatureDiscriminator(
            config=DiscriminatorConfig(
                feature_shape=tuple(shape),
                num_classes=num_classes,
                channels=d.channels,
                mbstd_group=d.mbstd_group,
                cmap_dim=d.cmap_dim,
                family=d.family,
            )
        )

    def d_adam_settings(self) -> tuple[float, tuple[float, float], float]:
        """(lr, betas, R1 factor) of D. With ``r1_lazy_scaling="reference"`` lazy R1 every
        ``k`` steps is weighted ``k / (k + 1)`` and D's lr and betas are adjusted by the same
        factor (lr * c, beta ** c); with ``"interval"`` the penalty is weighted ``k`` and Adam
        is as configured."""
        cfg = self.settings
        k = max(1, int(cfg.r1_interval))
        b1, b2 = cfg.adam_betas
        if cfg.r1_lazy_scaling == "reference":
            c = k / (k + 1) if k > 1 else 1.0
            return cfg.d_lr * c, (b1**c, b2**c), c
        return cfg.d_lr, (b1, b2), float(k)

    def make_optimizers(self) -> None:
        cfg = self.settings
        self.opt_g = torch.optim.Adam(
            self.generator.parameters(),
            lr=cfg.g_lr,  # type: ignore
            betas=tuple(cfg.adam_betas),
            eps=1e-8,
            foreach=True,  # one call per step, not one per tensor (the same numbers, bitwise)
        )
        self.opt_d = self._d_adam(self.discriminator)
        self.opt_di = None
        if self.image_discriminator is not None:
            self.opt_di = self._d_adam(self.image_discriminator)

    def _d_adam(self, discriminator: nn.Module) -> torch.optim.Optimizer:
        lr_d, betas_d, _ = self.d_adam_settings()
        return torch.optim.Adam(
            discriminator.parameters(),
            lr=lr_d,  # type: ignore
            betas=betas_d,
            eps=1e-8,
            foreach=True,
        )

    def _accelerator(self, device: torch.device):
        """A fresh ``accelerate.Accelerator`` for autocast/backward (never kept: dill-safe)."""
        from accelerate import Accelerator

        precision = self.settings.mixed_precision
        try:
            return Accelerator(cpu=device.type == "cpu", mixed_precision=precision)
        except ValueError as err:
            raise RuntimeError(
                f"could not set up accelerate with mixed_precision={precision!r} (another "
                f"Accelerator in this process uses other settings): {err}"
            ) from err

    # ------------------------------------------------------------------ state
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # torch optimisers do not always survive dill (a sentinel in torch's step wrapper):
        # keep their state_dicts and rebuild them in __setstate__
        for name in ("opt_g", "opt_d", "opt_di"):
            opt = state.pop(name, None)
            state[f"_{name}_state"] = None if opt is None else opt.state_dict()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        opt_states = {n: state.pop(f"_{n}_state", None) for n in ("opt_g", "opt_d", "opt_di")}
        state.setdefault("image_discriminator", None)  # pickled before the field existed
        self.__dict__.update(state)
        self.opt_g = self.opt_d = self.opt_di = None
        if (
            opt_states["opt_g"] is not None
            and self.generator is not None
            and self.discriminator is not None
        ):
            self.make_optimizers()
            self.opt_g.load_state_dict(opt_states["opt_g"])  # type: ignore[union-attr]
            self.opt_d.load_state_dict(opt_states["opt_d"])  # type: ignore[union-attr]
            if self.opt_di is not None and opt_states["opt_di"] is not None:
                self.opt_di.load_state_dict(opt_states["opt_di"])

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
            # only with gan.image_weight > 0: earlier states keep their keys
            **(
                {}
                if self.image_discriminator is None
                else {
                    "image_discriminator_config": asdict(self.image_discriminator.config),
                    "image_discriminator": sd(self.image_discriminator),
                    "opt_di": sd(self.opt_di),
                }
            ),
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
        self.image_discriminator = None
        if state.get("image_discriminator_config") is not None:
            self.image_discriminator = FeatureDiscriminator(
                config=DiscriminatorConfig(**state["image_discriminator_config"])
            )
            self.image_discriminator.load_state_dict(state["image_discriminator"])
        self.opt_g = self.opt_d = self.opt_di = None
        if state["opt_g"] is not None:
            self.make_optimizers()
            self.opt_g.load_state_dict(state["opt_g"])  # type: ignore[union-attr]
            self.opt_d.load_state_dict(state["opt_d"])  # type: ignore[union-attr]
            if self.opt_di is not None and state.get("opt_di") is not None:
                self.opt_di.load_state_dict(state["opt_di"])
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
        cfg = self.settings
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
        cfg = self.settings
        device = torch.device(device)
        G, G_ema, D = self.generator, self.generator_ema, self.discriminator
        if G is None or G_ema is None or D is None:
            raise RuntimeError("build the generator and the discriminator first")
        new = [int(c) for c in new_classes]
        old = [int(c) for c in old_classes]
        device_layout(G, device).train()  # channels-last on CPU (D reads small maps: no gain)
        device_layout(G_ema, device)
        D.to(device).train()
        fresh_di = cfg.image_weight > 0 and self.image_discriminator is None
        if fresh_di:  # built from the generator's image shape, its weights from the trainer's rng
            gc = G.config
            shape = (gc.img_channels, *(gc.output_size or (gc.resolution, gc.resolution)))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(torch.randint(2**31, (1,), generator=self.rng)))
                self.image_discriminator = self._new_discriminator(shape, gc.num_classes)
        DI = self.image_discriminator if cfg.image_weight > 0 else None
        if DI is not None:
            DI.to(device).train()
        if cfg.optimizer_reset or self.opt_g is None or self.opt_d is None:
            self.make_optimizers()  # reference: new Adams every phase
        elif fresh_di:  # switched on after an earlier phase: G's and D's Adams are kept
            self.opt_di = self._d_adam(DI)  # type: ignore[arg-type]
        for opt in (self.opt_g, self.opt_d, self.opt_di):  # optimiser state follows the device
            if opt is None:
                continue
            for st in opt.state.values():  # type: ignore[union-attr]
                for k, v in st.items():
                    if torch.is_tensor(v) and k != "step":
                        st[k] = v.to(device)
        if self.history:
            # every phase starts from the EMA generator of the previous one (never re-initialised)
            G.load_state_dict(G_ema.state_dict())
        g_prev = frozen_copy(G_ema) if old else None
        batch = cfg.batch_size
        n_old = batch // 2 if old else 0
        n_new = batch - n_old
        distill_w = cfg.distill_weight * len(old) / max(1, len(new))
        distill_std = None
        if cfg.distill_std is not None:
            distill_std = torch.as_tensor(cfg.distill_std, dtype=torch.float32, device=device).view(
                1, -1, 1, 1
            )
        _, _, r1_factor = self.d_adam_settings()
        self.ada.reset()
        self.ada.to(device)
        acc = self._accelerator(device)
        conv_stats = None
        if cfg.stats_weight > 0:  # built before the tap: a conv feature layer counts in both passes
            conv_stats = ConvStats(classifier, until=get_module(classifier, feature_layer))
            if not conv_stats.layers:
                conv_stats.remove()
                conv_stats = None  # no convolution to match (the setting says so in its docstring)
        tap = FeatureTap(classifier, feature_layer)
        real_iter = RealBatches(dataset, n_new, device, self.rng, cfg.real_cache_mb)
        sums = {"loss_d": 0.0, "loss_g": 0.0, "distill": 0.0, "r1": 0.0}
        if cfg.class_weight > 0:
            sums["class_ce"] = 0.0
        if conv_stats is not None:
            sums["conv_stats"] = 0.0
        if DI is not None:
            sums["loss_d_image"] = 0.0
            sums["r1_image"] = 0.0
        start = 0
        key = {
            "experience": int(experience),
            "new": new,
            "old": old,
            "steps": int(steps),
            "classifier": module_fingerprint(classifier),
        }
        ckpt = Path(checkpoint_path) if checkpoint_path else None
        saved = _read_checkpoint(ckpt) if ckpt is not None and ckpt.exists() else None
        if saved is not None:
            if saved.get("key") == key:
                start = self._restore_checkpoint(saved, g_prev, real_iter, device)
                sums = saved["sums"]
                G, G_ema, D = self.generator, self.generator_ema, self.discriminator
                DI = self.image_discriminator if cfg.image_weight > 0 else None
        t0 = time.perf_counter()
        done = start

        seen = sorted(set(new) | set(old))
        to_seen = torch.full((max(seen) + 1,), -1, dtype=torch.long)
        to_seen[seen] = torch.arange(len(seen))
        to_seen = to_seen.to(device)

        def step_opt(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
            opt.zero_grad(set_to_none=True)
            acc.backward(loss)
            if acc.scaler is not None:  # fp16: the scaler unscales, skips inf steps, updates
                acc.scaler.step(opt)
                acc.scaler.update()
            else:
                opt.step()

        def d_loss(disc: nn.Module, fake_in, real_in, labels, do_r1: bool):
            """``disc``'s loss on a fake and a real batch, with the lazy R1 penalty on the real
            inputs when ``do_r1``: ``(loss, D(real), R1 or None)``."""
            if do_r1:
                real_in = real_in.detach().float().requires_grad_(True)
            with acc.autocast():
                d_fake = disc(fake_in.detach(), labels)
            with nullcontext() if do_r1 else acc.autocast():
                d_real = disc(real_in, labels)
            loss = F.softplus(d_fake).mean() + F.softplus(-d_real).mean()
            if not do_r1:
                return loss, d_real, None
            (grad,) = torch.autograd.grad(d_real.float().sum(), real_in, create_graph=True)
            r1 = grad.square().flatten(1).sum(1).mean()
            return loss + r1 * (cfg.r1_gamma / 2) * r1_factor, d_real, r1.detach()

        bar = tqdm(
            range(start, steps),
            desc=f"Genifer GAN (classes {new})",
            disable=not self.progress,
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
                z = torch.randn(batch, G.config.z_dim, generator=self.rng).to(device)
                noise = G.make_noise(batch, generator=self.rng, device=device)
                with acc.autocast():
                    fake = G(z, y_real, noise)
                    if conv_stats is not None:
                        conv_stats.active = True
                    aug_fake = self.ada(fake, generator=self.rng)
                    if cfg.class_weight > 0:  # the whole classifier: its logits as well
                        f_fake, logits = tap.with_output(classifier, aug_fake)
                    else:
                        f_fake = tap(classifier, aug_fake)
                    s_fake = conv_stats.take() if conv_stats is not None else None
                    with torch.no_grad():
                        aug_real = self.ada(x_real, generator=self.rng)
                        f_real = tap(classifier, aug_real)
                    if conv_stats is not None:
                        s_real = conv_stats.take()
                        conv_stats.active = False
                # 3. discriminator step: softplus(D(fake)) + softplus(-D(real)) (+ lazy R1)
                do_r1 = cfg.r1_gamma > 0 and step % cfg.r1_interval == 0
                loss_d, d_real, r1 = d_loss(D, f_fake, f_real, y_real, do_r1)
                if r1 is not None:
                    sums["r1"] += float(r1)
                self.ada.accumulate(d_real)
                step_opt(self.opt_d, loss_d)  # type: ignore[arg-type]
                if DI is not None:  # the same loss and lazy R1 on the (augmented) images
                    loss_di, _, r1_i = d_loss(DI, aug_fake, aug_real, y_real, do_r1)
                    if r1_i is not None:
                        sums["r1_image"] += float(r1_i)
                    step_opt(self.opt_di, loss_di)  # type: ignore[arg-type]
                    sums["loss_d_image"] += float(loss_di.detach())
                    DI.requires_grad_(False)
                # 4. generator step: fool the updated D through the frozen classifier, plus
                #    L1 self-distillation to the previous generator on old classes (same z, noise)
                D.requires_grad_(False)
                with acc.autocast():
                    loss_g = F.softplus(-D(f_fake, y_real)).mean()
                    if DI is not None:  # ... and the image discriminator
                        g_img = F.softplus(-DI(aug_fake, y_real)).mean()
                        loss_g = loss_g + cfg.image_weight * g_img
                    if cfg.class_weight > 0:  # conditioning strength: the label's class
                        ce = F.cross_entropy(logits[:, seen].float(), to_seen[y_real])
                        loss_g = loss_g + cfg.class_weight * ce
                        sums["class_ce"] += float(ce.detach())
                    if conv_stats is not None:  # every conv layer's statistics, not only D's
                        st = ConvStats.distance(s_fake, s_real)  # type: ignore[arg-type]
                        loss_g = loss_g + cfg.stats_weight * st
                        sums["conv_stats"] += float(st.detach())
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
                if DI is not None:
                    DI.requires_grad_(True)
                # 5. EMA of G
                self.gan_nimg += batch
                beta = self.ema_beta(step, steps, batch)
                with torch.no_grad():  # one fused call (bitwise equal to a loop of lerp_)
                    torch._foreach_lerp_(
                        list(G_ema.parameters()), [p.detach() for p in G.parameters()], 1 - beta
                    )
                # 6. adapt the augmentation probability
                if (step + 1) % self.ada_interval == 0:
                    self.ada.adjust()
                sums["loss_d"] += float(loss_d.detach())
                sums["loss_g"] += float(loss_g.detach())
                if self.progress and step % 20 == 0:
                    bar.set_postfix(
                        d=f"{loss_d.item():.3f}",
                        g=f"{loss_g.item():.3f}",
                        p=f"{float(self.ada.p):.2f}",
                    )
                every = cfg.checkpoint_every
                if ckpt is not None and every and (step + 1) % every == 0 and step + 1 < steps:
                    self._write_checkpoint(ckpt, key, step + 1, g_prev, real_iter, sums)
                done = step + 1
                # 7. stop when the monitor (the replay's fidelity) says the replay is good
                if monitor is not None and monitor_every and done % monitor_every == 0:
                    G.eval()
                    with tap.passing():  # the monitor may run the whole classifier
                        stop = monitor(done)
                    G.train()
                    if stop:
                        break
        finally:
            bar.close()
            tap.remove()
            if conv_stats is not None:
                conv_stats.remove()
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
        device_layout(self.generator, device).train()  # type: ignore[arg-type]
        device_layout(self.generator_ema, device)  # type: ignore[arg-type]
        self.discriminator.to(device).train()  # type: ignore[union-attr]
        if self.image_discriminator is not None:
            self.image_discriminator.to(device).train()
        self.ada.to(device)
        for opt in (self.opt_g, self.opt_d, self.opt_di):
            if opt is None:
                continue
            for st in opt.state.values():  # type: ignore[union-attr]
                for k, v in st.items():
                    if torch.is_tensor(v) and k != "step":
                        st[k] = v.to(device)
        if g_prev is not None:
            g_prev.load_state_dict(saved["g_prev"])
        self.rng.set_state(saved["rng"])
        real_iter.load_state_dict(saved["real"])
        return int(saved["next_step"])


def _read_checkpoint(path: Path) -> dict | None:
    """A mid-phase GAN checkpoint (tensors and plain values only: ``weights_only=True``), or
    ``None`` with a warning when it cannot be read; the file is then set aside
    (``<name>.corrupt``) so the phase restarts from its beginning instead of failing again."""
    import warnings

    from avalanche_d2l.core.storage import set_aside

    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(saved, dict):
            raise ValueError(f"it holds a {type(saved).__name__}, not a checkpoint")
        return saved
    except Exception as err:  # truncated, planted or foreign file: never fatal, never executed
        aside = set_aside(path)
        warnings.warn(
            f"Genifer: the GAN checkpoint {path} could not be read ({type(err).__name__}); "
            f"moved to {aside.name}, the GAN phase starts from its beginning",
            stacklevel=2,
        )
        return None
