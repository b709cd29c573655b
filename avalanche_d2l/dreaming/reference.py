"""The reference network: a frozen classifier independent of the continual learner, fed with a
dreamer's images (the glyph classifier saved with the offline dreamer, torchvision's ImageNet
ResNet-50, or a transformers image classifier)."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import DreamerConfig, from_classifier_space, to_classifier_space

__all__ = ["DreamerReference", "ReferenceNetwork", "load_reference_network", "make_reference"]


class ReferenceNetwork(nn.Module):
    """A frozen classifier fed with images in the dreamer's output space (what ``sample`` returns).

    It undoes the dreamer's output normalisation, converts to the network's own input (size,
    channels, normalisation) and returns the network's logits. Used by D2L's oracle, it is
    independent of the continual learner.

    Args:
        net: the classifier.
        in_size: its input side.
        in_channels: its input channels.
        in_mean: its input normalisation mean (``None``: [0, 1] inputs).
        in_std: its input normalisation std.
        src_mean: the dreamer's output normalisation mean (``None``: [0, 1]).
        src_std: the dreamer's output normalisation std.
        class_names: names of the network's classes.
    """

    def __init__(
        self,
        *,
        net: nn.Module,
        in_size: int,
        in_channels: int,
        in_mean: Sequence[float] | None = None,
        in_std: Sequence[float] | None = None,
        src_mean: Sequence[float] | None = None,
        src_std: Sequence[float] | None = None,
        class_names: list[str] | None = None,
    ):
        super().__init__()
        self.net = net
        self.in_size = int(in_size)
        self.in_channels = int(in_channels)
        self.in_mean = tuple(in_mean) if in_mean is not None else None
        self.in_std = tuple(in_std) if in_std is not None else None
        self.src_mean = tuple(src_mean) if src_mean is not None else None
        self.src_std = tuple(src_std) if src_std is not None else None
        self.class_names = class_names
        self._saveable: dict | None = None  # architecture spec when it can be saved/rebuilt
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> ReferenceNetwork:
        # Frozen: always in eval mode (BatchNorm statistics never move).
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        x01 = from_classifier_space(images, mean=self.src_mean, std=self.src_std).clamp(0, 1)
        x = to_classifier_space(
            x01, size=self.in_size, channels=self.in_channels, mean=self.in_mean, std=self.in_std
        )
        p = next(self.net.parameters(), None)
        if p is not None:
            x = x.to(device=p.device, dtype=p.dtype)
        return self.net(x)


def _load_reference(ref_dir: Path, config: DreamerConfig) -> ReferenceNetwork | None:
    if not (ref_dir / "reference.json").is_file():
        return None
    spec = json.loads((ref_dir / "reference.json").read_text())
    arch = spec.get("arch")
    if arch != "small_cnn":
        raise ValueError(f"{ref_dir}: unknown reference architecture {arch!r} (expected small_cnn)")
    from ..models.classifiers import small_cnn

    net = small_cnn(
        num_classes=spec["num_classes"], in_channels=spec["in_channels"], width=spec["width"]
    )
    net.load_state_dict(torch.load(ref_dir / "model.pt", map_location="cpu", weights_only=True))
    return make_reference(net, spec=spec, config=config)


def make_reference(net: nn.Module, *, spec: dict, config: DreamerConfig) -> ReferenceNetwork:
    """Wrap a trained glyph classifier as the dreamer's reference network (saved with it).

    ``spec`` holds ``arch``, ``num_classes``, ``in_channels``, ``width``, ``in_size`` and
    optionally ``in_mean``/``in_std``/``class_names``.
    """
    ref = ReferenceNetwork(
        net=net,
        in_size=spec["in_size"],
        in_channels=spec["in_channels"],
        in_mean=spec.get("in_mean"),
        in_std=spec.get("in_std"),
        src_mean=config.output_mean,
        src_std=config.output_std,
        class_names=spec.get("class_names"),
    )
    ref._saveable = {k: spec[k] for k in ("arch", "num_classes", "width")}
    return ref


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _torchvision_resnet50(path: Path, config: DreamerConfig) -> ReferenceNetwork:
    from torchvision.models import ResNet50_Weights, resnet50

    net = resnet50()
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(
            f"{path} is not a torchvision ResNet-50 state dict ({str(err)[:200]}); pass a "
            "torchvision resnet50 .pth file, or a transformers image-classification directory "
            "or hub id"
        ) from err
    return ReferenceNetwork(
        net=net,
        in_size=224,
        in_channels=3,
        in_mean=_IMAGENET_MEAN,
        in_std=_IMAGENET_STD,
        src_mean=config.output_mean,
        src_std=config.output_std,
        class_names=list(ResNet50_Weights.DEFAULT.meta["categories"]),
    )


class _LogitsOnly(nn.Module):
    """A transformers image classifier as ``images -> logits``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(pixel_values=x).logits


def _transformers_classifier(
    source: str, config: DreamerConfig, local_files_only: bool | None
) -> ReferenceNetwork:
    from transformers import AutoConfig, AutoModelForImageClassification

    kw = {"local_files_only": local_files_only} if local_files_only is not None else {}
    model = AutoModelForImageClassification.from_pretrained(source, **kw)
    mean, std, size = _IMAGENET_MEAN, _IMAGENET_STD, 224
    try:
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(source, **kw)
        mean = tuple(getattr(proc, "image_mean", None) or mean)
        std = tuple(getattr(proc, "image_std", None) or std)
        sz = getattr(proc, "crop_size", None) or getattr(proc, "size", None) or {}
        sz = dict(sz) if not isinstance(sz, int) else {"height": sz}
        size = int(sz.get("height") or sz.get("shortest_edge") or size)
    except (OSError, ValueError):
        pass  # no preprocessor config: ImageNet normalisation at 224 px
    cfg = AutoConfig.from_pretrained(source, **kw)
    labels = getattr(cfg, "id2label", None) or {}
    return ReferenceNetwork(
        net=_LogitsOnly(model),
        in_size=size,
        in_channels=int(getattr(cfg, "num_channels", 3)),
        in_mean=mean,
        in_std=std,
        src_mean=config.output_mean,
        src_std=config.output_std,
        class_names=[labels[i] for i in sorted(labels)] if labels else None,
    )


def load_reference_network(
    source: str | os.PathLike,
    *,
    config: DreamerConfig,
    device: str | torch.device = "cpu",
    local_files_only: bool | None = None,
) -> ReferenceNetwork:
    """Load the oracle's reference network from a path or a hub id.

    Args:
        source: a file (``.pth``/``.pt``/``.safetensors``): torchvision ResNet-50 ImageNet
            weights; a directory with ``config.json``, or a hub id: a transformers
            image-classification model (e.g. ``microsoft/resnet-50``), normalised as its
            preprocessor config says.
        config: the dreamer's config (the reference undoes its output normalisation).
        device: where to put it.
        local_files_only: forwarded to transformers.

    Raises:
        OSError: nothing loadable at ``source``.
    """
    path = Path(source)
    try:
        if path.is_file():
            ref = _torchvision_resnet50(path, config)
        else:
            ref = _transformers_classifier(str(source), config, local_files_only)
    except OSError as err:
        raise OSError(
            f"no reference network at {str(source)!r}: give a torchvision ResNet-50 .pth file, "
            "a transformers image-classification directory, or a hub id reachable from here "
            f"(or in the HF cache). Underlying error: {err}"
        ) from err
    return ref.to(device)


def _load_imagenet_reference(
    config: DreamerConfig, device: torch.device
) -> tuple[ReferenceNetwork | None, str]:
    """torchvision ResNet-50 (ImageNet) from the local torch hub cache, or ``(None, why)``."""
    try:
        from torchvision.models import ResNet50_Weights
    except ImportError:  # pragma: no cover
        return None, "no reference network: torchvision is not installed"
    fname = os.path.basename(ResNet50_Weights.DEFAULT.url)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / fname
    if not cached.is_file():
        return None, (
            f"no reference network: torchvision's ResNet-50 ImageNet weights are not in the local "
            f"torch hub cache ({cached}); nothing is downloaded. Put the file there, or give "
            "DreamConfig.oracle_reference (a .pth path or a transformers hub id), to enable the "
            "reference checks of D2L's oracle."
        )
    return _torchvision_resnet50(cached, config).to(device), ""


class DreamerReference:
    """The reference network of :class:`~avalanche_d2l.dreaming.dreamer.Dreamer` (mixed into
    it): the one saved with the dreamer, ImageNet's from the local torch hub cache, or one set
    by the user."""

    def reference_network(self) -> ReferenceNetwork | None:
        """Frozen classifier independent of the continual learner, for D2L's oracle.

        The one given to :meth:`set_reference`; else, pixel (glyph) dreamer: the glyph classifier
        trained and saved with it; latent kind: torchvision's ImageNet ResNet-50 when its weights
        are in the local torch hub cache, else ``None`` with one warning (nothing is downloaded;
        :meth:`reference_info` says why). It takes images as :meth:`sample` returns them.
        """
        if self._reference is None and self.config.kind == "latent" and not self._reference_missing:
            ref, why = _load_imagenet_reference(self.config, self.device)
            if ref is None:
                self._reference_missing = why
                warnings.warn(why, stacklevel=2)
            else:
                self._reference = ref
                self._reference_source = "torchvision resnet50 ImageNet (torch hub cache)"
        return self._reference

    def set_reference(
        self, source: str | os.PathLike | nn.Module, *, local_files_only: bool | None = None
    ) -> ReferenceNetwork:
        """Use another reference network for the oracle (see :func:`load_reference_network`).

        Args:
            source: a torchvision ResNet-50 state-dict file, a transformers image-classification
                directory or hub id, or a module already wrapped as :class:`ReferenceNetwork`.
            local_files_only: forwarded to transformers for hub ids.
        """
        if isinstance(source, ReferenceNetwork):
            ref, name = source, type(source.net).__name__
        else:
            ref = load_reference_network(
                source, config=self.config, device=self.device, local_files_only=local_files_only
            )
            name = str(source)
        self._reference = ref.to(self.device)
        self._reference_source = name
        self._reference_missing = None
        return self._reference

    def reference_info(self) -> dict[str, Any]:
        """JSON-able state of the reference network: present or not, where from, why absent."""
        ref = self._reference
        return {
            "present": ref is not None,
            "source": self._reference_source if ref is not None else None,
            "num_classes": len(ref.class_names) if ref is not None and ref.class_names else None,
            "missing_reason": self._reference_missing if ref is None else None,
        }
