"""Tiny diffusers dreamers built from configs, shared by the tests (CPU, no weights)."""

from __future__ import annotations

from avalanche_d2l.dreaming.dreamer import Dreamer, DreamerConfig

#: UNet2DConditionModel arguments of the tiny dreamers: two levels (8, 16), one attention level.
TINY_UNET = {
    "block_out_channels": (8, 16),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "norm_num_groups": 4,
    "attention_head_dim": 4,
}


def tiny_pixel_dreamer(
    *, seed: int = 0, num_concepts: int = 6, unet: dict | None = None, **config
) -> Dreamer:
    """A random pixel-space dreamer: 8 px, 1 channel, prompts (2, 16), 2 DDIM steps.

    ``config`` overrides :class:`DreamerConfig` fields (e.g. ``output_size=16``).
    """
    cfg = {
        "kind": "pixel",
        "image_size": 8,
        "channels": 1,
        "prompt_len": 2,
        "prompt_dim": 16,
        "num_inference_steps": 2,
        **config,
    }
    return Dreamer.from_config(
        DreamerConfig(**cfg), unet or TINY_UNET, num_concepts=num_concepts, seed=seed
    )
