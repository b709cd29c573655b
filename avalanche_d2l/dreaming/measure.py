"""Measuring a call: wall time and peak memory (:func:`peak_memory`), FLOPs
(:func:`count_flops`) and the bytes autograd saves for backward (:func:`saved_activation_bytes`).
:mod:`.preflight` measures the passes of a run with them; :mod:`.paper_cost` sizes the paper's
runs from their counts."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "GiB",
    "Measure",
    "count_flops",
    "largest_block_bytes",
    "peak_memory",
    "saved_activation_bytes",
]

GiB = 2**30


def _rss_bytes(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux ``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class Measure:
    """Seconds and peak memory of one measured call.

    Attributes:
        seconds: wall time (devices synchronised).
        peak_bytes: ``{device: bytes}``: CUDA ``max_memory_allocated`` per CUDA device used, and
            ``"cpu_rss"``: the process's peak resident memory during the call (Linux), including
            everything already resident before it.
        rss_before: resident memory before the call (``"cpu_rss"`` minus this is what it added).
    """

    seconds: float = 0.0
    peak_bytes: dict[str, int] = field(default_factory=dict)
    rss_before: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "peak_gib": {k: v / GiB for k, v in self.peak_bytes.items()},
            "rss_before_gib": None if self.rss_before is None else self.rss_before / GiB,
        }


@contextmanager
def peak_memory(devices: list[torch.device]) -> Iterator[Measure]:
    """Context measuring wall time and peak memory of its body on ``devices`` (and CPU RSS)."""
    m = Measure()
    cuda = sorted({d for d in devices if d.type == "cuda"}, key=str)
    for d in cuda:
        torch.cuda.synchronize(d)
        torch.cuda.reset_peak_memory_stats(d)
    reset = _reset_peak_rss()
    m.rss_before = _rss_bytes("VmRSS")
    t0 = time.perf_counter()
    try:
        yield m
    finally:
        for d in cuda:
            torch.cuda.synchronize(d)
        m.seconds = time.perf_counter() - t0
        for d in cuda:
            m.peak_bytes[str(d)] = int(torch.cuda.max_memory_allocated(d))
        hwm = _rss_bytes("VmHWM") if reset else None
        if hwm is not None:
            # the kernel updates the high-water mark lazily (it can trail VmRSS by a few pages)
            now = _rss_bytes("VmRSS") or 0
            m.peak_bytes["cpu_rss"] = max(hwm, now, m.rss_before or 0)


def count_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of ``fn()`` (forward and backward), by ``torch.utils.flop_counter.FlopCounterMode``.

    Works on the meta device, so the FLOPs of a full-size model at full size are counted without
    memory or time (matmuls, convolutions and attention; elementwise work is not counted).
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def saved_activation_bytes(fn: Callable[[], Any], *, exclude: Iterable[Tensor] = ()) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn()`` runs its forward.

    The memory a graph holds at the end of the forward, each storage counted once, leaving out
    the storages of ``exclude`` (pass the models' parameters: weights saved for the input
    gradient are not activations). Run ``fn`` on the meta device to size a full model at full
    size for free. Backward transients (recomputed checkpoint segments, gradients) come on top.
    """
    skip = {t.untyped_storage()._cdata for t in exclude}
    seen: set[int] = set()
    total = 0

    def pack(t: Tensor):
        nonlocal total
        st = t.untyped_storage()
        key = st._cdata
        if key not in skip and key not in seen:
            seen.add(key)
            total += st.nbytes() if t.device.type != "meta" else t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def largest_block_bytes(
    fn: Callable[[], Any], blocks: Iterable[torch.nn.Module], *, exclude: Iterable[Tensor] = ()
) -> int:
    """The most bytes autograd saves inside one of ``blocks`` while ``fn()`` runs its forward.

    With gradient checkpointing, the backward pass recomputes one checkpointed block at a time
    and holds that block's activations on top of the checkpoints; run ``fn`` *without*
    checkpointing and pass the blocks that would be checkpointed to size that transient (the
    largest block's). Storages are counted once per block; ``exclude`` as in
    :func:`saved_activation_bytes`.
    """
    skip = {t.untyped_storage()._cdata for t in exclude}
    stack: list[int] = []
    totals: dict[int, int] = {}
    seen: dict[int, set[int]] = {}
    handles = []

    def enter(i: int):
        def hook(module, args) -> None:
            stack.append(i)

        return hook

    def leave(module, args, output) -> None:
        stack.pop()

    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(enter(i)))
        handles.append(block.register_forward_hook(leave))

    def pack(t: Tensor):
        st = t.untyped_storage()
        key = st._cdata
        if stack and key not in skip:
            block = stack[-1]
            if key not in seen.setdefault(block, set()):
                seen[block].add(key)
                size = st.nbytes() if t.device.type != "meta" else t.numel() * t.element_size()
                totals[block] = totals.get(block, 0) + size
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
    finally:
        for h in handles:
            h.remove()
    return max(totals.values(), default=0)
