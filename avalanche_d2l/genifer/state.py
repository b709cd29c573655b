"""The state of a :class:`~avalanche_d2l.genifer.plugin.GeniferPlugin` as a dict of tensors and
plain values, and its restoration (checkpoints, resumed runs)."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["load_plugin_state", "plugin_state"]


def plugin_state(plugin) -> dict[str, Any]:
    """GAN trainer state, teacher, classes, image shape, RNG of ``plugin``."""
    return {
        "config": plugin.config.to_dict(),
        "feature_layer": plugin.feature_layer,
        "image_shape": plugin.image_shape,
        "gan": plugin.gan.state_dict(),
        "teacher": None if plugin.teacher is None else plugin.teacher.state_dict(),
        "seen_classes": list(plugin.seen_classes),
        "generated_classes": list(plugin.generated_classes),
        "active_classes": list(plugin.active_classes),
        "rng_state": plugin.rng.get_state(),
    }


def load_plugin_state(plugin, state: dict[str, Any], *, model: nn.Module | None = None) -> None:
    """Restore :func:`plugin_state` into ``plugin``; ``model`` (the classifier) rebuilds the
    teacher when the plugin has none yet."""
    if state["feature_layer"] != plugin.feature_layer:
        raise ValueError(
            f"state is for feature_layer={state['feature_layer']!r}, this plugin "
            f"uses {plugin.feature_layer!r}"
        )
    plugin.gan.load_state_dict(state["gan"])
    plugin.image_shape = None if state["image_shape"] is None else tuple(state["image_shape"])
    if state["teacher"] is not None:
        if plugin.teacher is None:
            if model is None:
                raise ValueError(
                    "this state has a teacher classifier: pass model=<the "
                    "classifier> to load_state_dict so it can be rebuilt"
                )
            # the copy, the weights and the layout the trained plugin's teacher had
            plugin.freeze_teacher(model, state["teacher"])
        else:
            plugin.teacher.load_state_dict(state["teacher"])
    plugin.seen_classes = list(state["seen_classes"])
    plugin.generated_classes = list(state["generated_classes"])
    plugin.active_classes = list(state["active_classes"])
    plugin.rng.set_state(state["rng_state"])
