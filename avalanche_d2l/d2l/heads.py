"""Head layouts for classifiers that host dreamed classes (D2L).

:class:`DreamHeads` wraps any classifier so that its output space holds one head per class of the
stream plus optional dream-only heads; heads not yet given to a real class host dreams.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..utils import capture_features, get_module, training_mode

__all__ = [
    "DreamHeads",
    "MASK_VALUE",
    "add_missing_params",
    "find_feature_layer",
    "greedy_assignment",
    "pool_features",
    "wrap_model",
]

#: Logit given to classes without a head at evaluation: finite, so argmax stays defined, and
#: representable in fp16 autocast.
MASK_VALUE = -1e4


def greedy_assignment(counts: Tensor) -> list[tuple[int, int]]:
    """Greedy ``(row, col)`` pairs by largest count, each row and column once; ties go to the
    lower row, then the lower column. ``counts``: ``(new classes, free heads)``."""
    n_rows, n_cols = counts.shape
    if n_cols < n_rows:
        raise ValueError(f"{n_rows} new classes but only {n_cols} free heads")
    c = counts.detach().to(torch.float64).cpu().clone()
    pairs = []
    for _ in range(n_rows):
        r, k = divmod(int(torch.argmax(c)), n_cols)
        pairs.append((r, k))
        c[r, :], c[:, k] = -1.0, -1.0
    return sorted(pairs)


def pool_features(f: Tensor) -> Tensor:
    """``(B, C, ...)`` features -> ``(B, C)`` (global average over the spatial dimensions)."""
    return f.flatten(2).mean(2) if f.dim() > 2 else f.flatten(1)


def _module_device(m: nn.Module) -> torch.device:
    p = next(m.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class DreamHeads(nn.Module):
    """Wrap a classifier so that its output space holds one head per class + dream-only heads.

    The head space has ``n_classes + n_extra_heads`` heads. The first heads are the wrapped
    model's own output units; if it has fewer than needed, the others come from a linear head
    (``extra_head``) on the pooled output of ``feature_layer`` (read with a forward hook that lives
    only during the call, so the module stays picklable).

    Sizing: the model's output width is read from its last ``nn.Linear`` (or from one dry forward
    when ``input_shape`` is given). The extra head needs the feature width: with ``input_shape``
    it is built at once; without, :meth:`build` sizes it from the data (``D2LPlugin`` calls it
    with the first experience's image shape, before the optimizer is made). A model that needs an
    extra head but has no ``feature_layer`` fails here, saying what to pass; no zero-width layer
    is ever built.

    ``class_to_head`` (a buffer, saved in ``state_dict``) maps class ``c`` to its head (-1 while
    unassigned); ``dream_heads`` (buffer) lists the free heads that currently host a dream.

    Outputs:

    * :meth:`forward_heads` -- logits of all heads (and optionally the features).
    * :meth:`forward` -- class space: column ``c`` is the logit of the head of class ``c``; classes
      with no head get :data:`MASK_VALUE`. In training mode one column per dream head is appended
      (``n_classes + j`` is dream head ``dream_heads[j]``), so the real samples' cross-entropy sees
      the dream heads as competitors. Before any assignment the map is the identity (no mask).

    Args:
        model: the user's classifier (any ``nn.Module`` returning ``(B, n_out)`` logits).
        n_classes: classes of the stream.
        n_extra_heads: extra dream-only heads (they may later be assigned to real classes too).
        feature_layer: module name whose output gives the features (dream losses, extra head).
        input_shape: ``(C, H, W)`` of the inputs: sizes everything now (one dry forward);
            ``None`` defers what needs it to :meth:`build`.
        mask_value: logit of classes without a head.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        n_classes: int,
        n_extra_heads: int = 0,
        feature_layer: str | None = None,
        input_shape: Sequence[int] | None = None,
        mask_value: float = MASK_VALUE,
    ):
        super().__init__()
        if n_classes < 1 or n_extra_heads < 0:
            raise ValueError(
                f"need n_classes >= 1 and n_extra_heads >= 0, got {n_classes}, {n_extra_heads}"
            )
        self.net = model
        self.n_classes = int(n_classes)
        self.n_extra_heads = int(n_extra_heads)
        self.n_heads = int(n_classes + n_extra_heads)
        self.feature_layer = feature_layer
        self.mask_value = float(mask_value)
        if feature_layer is not None:
            get_module(model, feature_layer)  # clear error listing the names
        self.register_buffer("class_to_head", torch.full((self.n_classes,), -1, dtype=torch.long))
        self.register_buffer("dream_heads", torch.empty(0, dtype=torch.long))
        self.extra_head: nn.Linear | None = None
        self.input_shape: tuple[int, ...] | None = None
        self.n_out: int | None = None
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if input_shape is not None:
            self.build(input_shape)
        elif linears:
            self.n_out = int(linears[-1].out_features)
            self._check_feature_layer()
        elif feature_layer is None:
            raise ValueError(
                f"cannot tell how many outputs {type(model).__name__} has (no nn.Linear): pass "
                "input_shape=(C, H, W) so DreamHeads can run one dry forward"
            )

    def _check_feature_layer(self) -> None:
        if self.n_out is not None and self.n_out < self.n_heads and self.feature_layer is None:
            raise ValueError(
                f"{type(self.net).__name__} has {self.n_out} outputs but {self.n_heads} heads are "
                f"needed ({self.n_classes} classes + {self.n_extra_heads} extra): pass "
                "feature_layer=<module name> so the missing heads can be a linear head on its "
                "features"
            )

    @property
    def needs_build(self) -> bool:
        """Whether :meth:`build` must still run (output or extra-head width unknown)."""
        return self.n_out is None or (self.n_out < self.n_heads and self.extra_head is None)

    @torch.no_grad()
    def build(self, input_shape: Sequence[int]) -> bool:
        """Size the wrapper for inputs of ``input_shape`` ``(C, H, W)`` (one eval-mode dry forward).

        Creates ``extra_head`` when the model has fewer outputs than heads. Idempotent; returns
        whether parameters were added (the optimizer must then learn of them).
        """
        shape = tuple(int(s) for s in input_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"input_shape must be (C, H, W) with positive sizes, got {shape}")
        if not self.needs_build:
            self.input_shape = self.input_shape or shape
            return False
        with training_mode(self.net, False):
            x = torch.zeros(2, *shape, device=_module_device(self.net))
            if self.feature_layer is None:
                out, feat_dim = self.net(x), 0
            else:
                with capture_features(self.net, self.feature_layer) as hook:
                    out = self.net(x)
                    feat_dim = int(pool_features(hook.pop()).shape[1])
        if out.dim() != 2:
            raise ValueError(
                f"the model must return (B, n_out) logits, got shape {tuple(out.shape)}"
            )
        self.n_out = int(out.shape[1])
        self.input_shape = shape
        self._check_feature_layer()
        if self.n_out >= self.n_heads:
            return False
        if feat_dim < 1:
            raise ValueError(
                f"feature_layer={self.feature_layer!r} gives {feat_dim} features for inputs "
                f"{shape}: pick a layer with a non-empty output"
            )
        self.extra_head = nn.Linear(feat_dim, self.n_heads - self.n_out).to(
            _module_device(self.net)
        )
        return True

    # ---- state -----------------------------------------------------------------------------------

    @property
    def assigned(self) -> bool:
        """Whether any class has a head (before that, :meth:`forward` is the identity map)."""
        return bool((self.class_to_head >= 0).any())

    def seen_heads(self) -> list[int]:
        """Heads of the classes assigned so far (class order)."""
        return [int(h) for h in self.class_to_head.tolist() if h >= 0]

    def free_heads(self) -> list[int]:
        """Heads not given to any class (they may host dreams)."""
        taken = set(self.seen_heads())
        return [h for h in range(self.n_heads) if h not in taken]

    def set_dream_heads(self, heads: Sequence[int]) -> None:
        taken = set(self.seen_heads())
        bad = [int(h) for h in heads if int(h) in taken or not 0 <= int(h) < self.n_heads]
        if bad:
            raise ValueError(f"dream heads {bad} are assigned to real classes or out of range")
        self.dream_heads = torch.tensor(
            [int(h) for h in heads], dtype=torch.long, device=self.class_to_head.device
        )

    def assign(self, mapping: dict[int, int]) -> None:
        """Give head ``mapping[c]`` to class ``c`` (checked: free head, class unassigned)."""
        taken = set(self.seen_heads())
        for c, h in mapping.items():
            if not 0 <= c < self.n_classes:
                raise ValueError(f"class {c} out of range 0..{self.n_classes - 1}")
            if self.class_to_head[c] >= 0:
                raise ValueError(f"class {c} already has head {int(self.class_to_head[c])}")
            if h in taken or not 0 <= h < self.n_heads:
                raise ValueError(f"head {h} is not free")
            self.class_to_head[c] = h
            taken.add(h)
        keep = [int(h) for h in self.dream_heads.tolist() if h not in taken]
        self.set_dream_heads(keep)

    # ---- forward ---------------------------------------------------------------------------------

    def forward_heads(self, x: Tensor, *, return_features: bool = False):
        """Logits of all ``n_heads`` heads; with ``return_features`` also ``(B, F)`` features."""
        if self.needs_build:
            if self.n_out is None or not self.training:
                self.build(x.shape[1:])  # sized from the data (no parameters when none needed)
            else:
                raise RuntimeError(
                    "DreamHeads' extra head is not sized yet: pass input_shape=(C, H, W) to "
                    "DreamHeads, or call build((C, H, W)) before making the optimizer (D2L and "
                    "D2LPlugin do it from the first experience)"
                )
        need_feats = return_features or self.extra_head is not None
        if need_feats and self.feature_layer is None:
            raise ValueError("features were requested but DreamHeads has no feature_layer")
        if need_feats:
            with capture_features(self.net, self.feature_layer) as hook:
                out = self.net(x)
                feats = pool_features(hook.pop())
        else:
            out, feats = self.net(x), None
        logits = out[:, : min(self.n_out, self.n_heads)]
        if self.extra_head is not None:
            logits = torch.cat([logits, self.extra_head(feats)], dim=1)
        return (logits, feats) if return_features else logits

    def to_output(self, head_logits: Tensor, *, with_dreams: bool) -> Tensor:
        """Head logits -> class-space logits (+ dream-head columns when ``with_dreams``)."""
        if not self.assigned:
            out = head_logits[:, : self.n_classes]
        else:
            idx = self.class_to_head.clamp(min=0)
            out = head_logits[:, idx]
            has = (self.class_to_head >= 0).unsqueeze(0)
            out = torch.where(has, out, torch.full_like(out, self.mask_value))
        if with_dreams and self.dream_heads.numel() > 0:
            out = torch.cat([out, head_logits[:, self.dream_heads]], dim=1)
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.to_output(self.forward_heads(x), with_dreams=self.training)

    def training_targets(self, labels: str, head_labels: Tensor) -> Tensor:
        """Training-output columns of dream images labelled with heads: with ``labels=
        "source_class"`` a seen head's class, else the dream column (:meth:`dream_targets`)."""
        if labels == "source_class":
            dev = head_labels.device
            lut = torch.full((self.n_heads,), -1, dtype=torch.long, device=dev)
            known = (self.class_to_head >= 0).nonzero().flatten().to(dev)
            lut[self.class_to_head[known].to(dev)] = known
            return lut[head_labels]
        return self.dream_targets(head_labels)

    def dream_targets(self, head_labels: Tensor) -> Tensor:
        """Training-output column (``n_classes + j``) of dream images labelled with heads."""
        lut = torch.full((self.n_heads,), -1, dtype=torch.long, device=head_labels.device)
        lut[self.dream_heads.to(head_labels.device)] = torch.arange(
            self.dream_heads.numel(), device=head_labels.device
        )
        cols = lut[head_labels]
        if (cols < 0).any():
            raise ValueError("some dream labels are not current dream heads")
        return self.n_classes + cols


# ---- wrapping a user's classifier ----------------------------------------------------------------


def find_feature_layer(model: nn.Module, input_shape: Sequence[int] | None = None) -> str:
    """The module whose output is the learner's features: ``"features"`` when the model has one;
    else, with ``input_shape``, the module whose output feeds the last ``nn.Linear`` (one dry
    forward: the outermost module returning that very tensor, else the last one called with as
    many values per sample, e.g. a ResNet's ``avgpool``)."""
    modules = dict(model.named_modules())
    if "features" in modules:
        return "features"
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    found = _feeding_module(model, linears[-1], input_shape) if linears and input_shape else None
    if found is not None:
        return found
    names = sorted((n for n in modules if n), key=lambda n: n.count("."))[:12]
    raise ValueError(
        f"D2L cannot tell which layer of {type(model).__name__} gives its features (no module "
        "'features', no module feeding a last nn.Linear): pass feature_layer=<module name>, "
        f"e.g. one of {', '.join(names)}"
    )


@torch.no_grad()
def _feeding_module(model: nn.Module, linear: str, input_shape: Sequence[int]) -> str | None:
    """Name of the module whose output is the input of module ``linear`` (one dry forward)."""
    outputs: list[tuple[str, Tensor]] = []
    fed: list[tuple[int, Tensor]] = []  # (modules finished before the call, the input)

    def keep(name):
        def hook(_module, _inputs, out):
            if isinstance(out, Tensor):
                outputs.append((name, out))

        return hook

    modules = dict(model.named_modules())
    handles = [m.register_forward_hook(keep(n)) for n, m in modules.items() if n and n != linear]
    feed = modules[linear].register_forward_pre_hook(lambda _m, i: fed.append((len(outputs), i[0])))
    handles.append(feed)
    try:
        with training_mode(model, False):
            model(torch.zeros(2, *input_shape, device=_module_device(model)))
    finally:
        for h in handles:
            h.remove()
    if not fed:
        return None
    done, x = fed[-1]
    same = [n for n, out in outputs[:done] if out is x]
    if same:  # e.g. a Sequential body and its last Flatten: the outermost name
        return min(same, key=lambda n: n.count("."))
    width = x[0].numel()
    before = [n for n, out in outputs[:done] if out.dim() > 1 and out[0].numel() == width]
    return before[-1] if before else None


def add_missing_params(optimizer: torch.optim.Optimizer, model: nn.Module) -> int:
    """Add ``model``'s trainable parameters the optimizer lacks as a new param group (with the
    optimizer's defaults); returns how many were added."""
    have = {id(p) for g in optimizer.param_groups for p in g["params"]}
    new = [p for p in model.parameters() if p.requires_grad and id(p) not in have]
    if new:
        optimizer.add_param_group({"params": new})
    return len(new)


def wrap_model(
    model: nn.Module,
    *,
    n_classes: int | None = None,
    n_extra_heads: int = 0,
    feature_layer: str | None = None,
    image_shape: Sequence[int] | None = None,
) -> DreamHeads:
    """``model`` in :class:`DreamHeads` (unchanged when it already is one). ``n_classes``
    defaults to the out features of its last ``nn.Linear``, ``feature_layer`` to
    :func:`find_feature_layer`'s answer."""
    if isinstance(model, DreamHeads):
        return model
    if n_classes is None:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(
                "cannot infer the number of classes: pass n_classes=benchmark.n_classes"
            )
        n_classes = int(linears[-1].out_features)
    return DreamHeads(
        model,
        n_classes=n_classes,
        n_extra_heads=n_extra_heads,
        feature_layer=feature_layer or find_feature_layer(model, image_shape),
        input_shape=image_shape,
    )
