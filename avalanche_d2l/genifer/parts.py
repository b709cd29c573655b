"""Genifer's plumbing around the paper's loop: the generator and discriminator fitted to the data,
the output head of the reference's semantics."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from avalanche_d2l.genifer.config import GeneratorSettings, GeniferConfig
from avalanche_d2l.models.feature_gan import FeatureGANTrainer
from avalanche_d2l.models.feature_gan_parts import feature_shape
from avalanche_d2l.models.gan import GeneratorConfig, StyleGenerator, next_power_of_two
from avalanche_d2l.utils import get_module

__all__ = [
    "build_generator",
    "check_image_shape",
    "fit_gan",
    "mask_inactive",
    "num_classes_of",
    "output_linear",
    "reinit_rows",
    "value_range",
]

MASK_VALUE = -1e4  # logit of a class the model has not seen (softmax weight exactly 0)


def value_range(dataset, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (min, max) of up to 1024 images of ``dataset`` (eval transforms)."""
    ds = dataset.eval() if hasattr(dataset, "eval") else dataset
    x = next(iter(torch.utils.data.DataLoader(ds, batch_size=1024, shuffle=False)))[0]
    x = x.float().transpose(0, 1).reshape(channels, -1)
    return tuple(x.min(1).values.tolist()), tuple(x.max(1).values.tolist())


def num_classes_of(experience, configured: int | None) -> int:
    """``configured``, else the benchmark's ``n_classes``."""
    if configured is not None:
        return configured
    try:
        return int(experience.origin_stream.benchmark.n_classes)
    except AttributeError as err:
        raise ValueError(
            "cannot infer the number of classes of the benchmark: set GeniferConfig.num_classes"
        ) from err


def check_image_shape(image_shape: Sequence[int]) -> tuple[int, int, int]:
    """``(C, H, W)`` as ints, or a ValueError saying what to pass instead."""
    if len(image_shape) != 3:
        raise ValueError(
            f"Genifer needs image batches (N, C, H, W); got samples of shape "
            f"{tuple(image_shape)}: pass image_shape=(C, H, W) of the model's "
            "input or reshape the dataset's images"
        )
    c, h, w = (int(s) for s in image_shape)
    if min(h, w) < 4:
        raise ValueError(
            f"images of {h}x{w} px are too small for the generator (>= 4 px): "
            "resize the benchmark's images"
        )
    return c, h, w


def build_generator(
    settings: GeneratorSettings,
    shape: tuple[int, int, int],
    num_classes: int,
    out_range,
    *,
    seed: int,
) -> StyleGenerator:
    """A generator of ``settings``' architecture for images of ``shape`` in ``out_range``, its
    weights drawn from ``seed`` (the global RNG, i.e. the data order, is left untouched)."""
    c, h, w = shape
    res = settings.resolution or next_power_of_two(max(h, w))
    if out_range is None:
        raise ValueError(
            "no output_range: set GeniferConfig.generator.output_range to the value "
            "range of the classifier's input, e.g. (0.0, 1.0)"
        )
    gen_cfg = GeneratorConfig(
        num_classes=num_classes,
        resolution=res,
        img_channels=c,
        z_dim=settings.z_dim,
        embed_dim=settings.embed_dim,
        w_dim=settings.w_dim,
        mapping_layers=settings.mapping_layers,
        channel_base=settings.channel_base,
        channel_max=settings.channel_max,
        output_activation=settings.output_activation,
        output_range=tuple(out_range),
        family=settings.family,
        output_size=None if (h, w) == (res, res) else (h, w),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return StyleGenerator(config=gen_cfg)


def fit_gan(
    trainer: FeatureGANTrainer,
    cfg: GeniferConfig,
    *,
    feature_layer: str,
    image_shape: Sequence[int],
    num_classes: int,
    classifier: nn.Module,
    value_range: tuple | None = None,
) -> tuple[int, int, int]:
    """Build the trainer's G (unless it has one; value range ``cfg.generator.output_range``, else
    ``value_range``) for images of ``image_shape`` and D for the classifier's features at
    ``feature_layer``; check that a given generator fits. Returns ``(C, H, W)``.

    Raises:
        ValueError: the shape cannot be served (with what to pass instead).
    """
    c, h, w = check_image_shape(image_shape)
    if trainer.generator is None:
        out_range = cfg.generator.output_range
        out_range = out_range if out_range is not None else value_range
        generator = build_generator(cfg.generator, (c, h, w), num_classes, out_range, seed=cfg.seed)
        trainer.set_generator(generator)
    gc = trainer.generator.config  # type: ignore[union-attr]
    made = (gc.img_channels, *(gc.output_size or (gc.resolution, gc.resolution)))
    if tuple(made) != (c, h, w):
        raise ValueError(
            f"the generator makes {made[0]}x{made[1]}x{made[2]} images but the data is "
            f"{c}x{h}x{w}: pass a generator with GeneratorConfig(img_channels={c}, "
            f"output_size=({h}, {w})) or none (it is then built from the data)"
        )
    if trainer.discriminator is None:
        shape = feature_shape(classifier, feature_layer, (c, h, w))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 1)
            trainer.build_discriminator(shape, gc.num_classes)
    return c, h, w


def output_linear(model: nn.Module, name: str | None) -> nn.Linear:
    """The model's output layer: the module ``name``, else its last ``nn.Linear``."""
    if name is not None:
        head = get_module(model, name)
        if not isinstance(head, nn.Linear):
            raise ValueError(f"head_module {name!r} is a {type(head).__name__}, not an nn.Linear")
        return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(
            "head='fresh_per_task' needs the model's output nn.Linear: set "
            "GeniferConfig.head_module to its name"
        )
    return linears[-1]


@torch.no_grad()
def reinit_rows(head: nn.Linear, classes: Sequence[int], rng: torch.Generator) -> None:
    """Re-initialise the output rows of ``classes`` (nn.Linear's default init)."""
    rows = [c for c in classes if c < head.out_features]
    if not rows:
        return
    bound = 1 / math.sqrt(head.in_features)
    idx = torch.as_tensor(rows, device=head.weight.device)
    w = (torch.rand(len(rows), head.in_features, generator=rng) * 2 - 1) * bound
    head.weight.index_copy_(0, idx, w.to(head.weight))
    if head.bias is not None:
        b = (torch.rand(len(rows), generator=rng) * 2 - 1) * bound
        head.bias.index_copy_(0, idx, b.to(head.bias))


def mask_inactive(logits: torch.Tensor, active: Sequence[int]) -> torch.Tensor:
    """Logits of classes outside ``active`` set to a large negative value."""
    mask = torch.ones(logits.shape[1], dtype=torch.bool, device=logits.device)
    idx = torch.as_tensor(
        [c for c in active if c < logits.shape[1]], dtype=torch.long, device=logits.device
    )
    mask[idx] = False
    return logits.masked_fill(mask, MASK_VALUE)
