"""Processes, devices and precision of a dreaming phase.

The process group of a run started by ``torchrun`` / ``accelerate launch`` is initialised once by
:func:`init_process_group` through Avalanche's :class:`~avalanche.distributed.DistributedHelper`
(NCCL when the run's device is a GPU, each process on the GPU of its ``LOCAL_RANK``; gloo on
CPU), so Avalanche's own loaders shard the training data. :func:`num_processes` and
:func:`process_index` initialise it on first use when the environment asks for several
processes. Dreaming uses them to shard the dream classes of a phase across processes and to
gather prompts and dream sets (accelerate's ``split_between_processes`` and ``gather_object``),
so every process ends with the same full result; only
:func:`is_main_process` writes files. The learner's side (gradients averaged, sharded batches) is
:mod:`avalanche_d2l.distributed`.

Mixed precision is resolved here (``"auto"``: bf16 on a GPU that supports it, fp16 on an older GPU,
none on CPU) and applied by the dreamer as a ``torch.autocast`` region around its UNet/VAE calls,
the region ``Accelerator(mixed_precision=...)`` opens. We do not build an ``Accelerator`` for it:
``AcceleratorState`` is a process-wide singleton that refuses a second, different
``mixed_precision``, and the dreamer and the learner may want different ones. fp16 needs loss
scaling for the prompt gradients (small ones flush to zero without it):
:class:`PromptLossScaler`.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "PRECISIONS",
    "PromptLossScaler",
    "autocast",
    "distributed_state",
    "gather_object",
    "init_process_group",
    "is_main_process",
    "launched_distributed",
    "num_processes",
    "precision_dtype",
    "process_index",
    "resolve_precision",
    "set_seed",
    "shard",
    "wait_for_everyone",
]

#: Accepted precision names: ``"auto"`` resolves per device (:func:`resolve_precision`).
PRECISIONS = ("auto", "no", "fp16", "bf16")
_DTYPES = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------
# precision


def resolve_precision(precision: str | None, device: str | torch.device) -> str:
    """``"no"``, ``"fp16"`` or ``"bf16"`` for ``precision`` on ``device``.

    ``"auto"`` (or ``None``) is bf16 on a CUDA device that supports it, fp16 on an older CUDA
    device, and no mixed precision elsewhere (CPU autocast is slower than fp32 for these models).
    """
    p = "auto" if precision is None else str(precision)
    if p not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if p != "auto":
        return p
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        with torch.cuda.device(dev):
            return "bf16" if _native_bf16() else "fp16"
    return "no"


def _native_bf16() -> bool:
    """bf16 in hardware on the current CUDA device (torch's default also counts emulated bf16,
    which is slower than fp16 on GPUs without it)."""
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch < 2.3 has no emulation and no keyword
        return bool(torch.cuda.is_bf16_supported())


def precision_dtype(precision: str) -> torch.dtype | None:
    """Compute dtype of a resolved precision (``None`` for ``"no"``: float32)."""
    if precision not in _DTYPES:
        raise ValueError(
            f"resolve the precision first (one of {sorted(_DTYPES)}), got {precision!r}"
        )
    return _DTYPES[precision]


def autocast(precision: str, device: str | torch.device):
    """The ``torch.autocast`` region of a resolved precision on ``device`` (no-op for ``"no"``)."""
    dtype = precision_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


class PromptLossScaler:
    """Dynamic loss scaling for the prompt gradients under fp16, one decision per prompt.

    The loss is multiplied by a power of two before ``backward`` (so small fp16 gradients inside
    the UNet do not flush to zero) and the prompt gradients are divided by it before the optimiser
    step. A prompt whose gradient is not finite skips that step (its gradient is dropped) and the
    scale halves; after ``growth_interval`` clean steps it doubles. Unlike ``torch.amp.GradScaler``,
    which skips the whole optimiser step, one overflowing prompt does not hold back the others, so
    the result of a class does not depend on which other classes share its process.

    Args:
        enabled: ``False`` makes every method a pass-through (fp32 / bf16).
        init_scale: first scale (a power of two).
        growth_interval: clean steps before the scale doubles.
    """

    def __init__(self, *, enabled: bool, init_scale: float = 2.0**14, growth_interval: int = 100):
        self.enabled = bool(enabled)
        self.scale = float(init_scale) if enabled else 1.0
        self.growth_interval = int(growth_interval)
        self._clean = 0
        self.skipped = 0

    def scale_loss(self, loss: Tensor) -> Tensor:
        return loss * self.scale if self.enabled else loss

    def unscale_(self, params: Iterable[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
        """Divide the gradients by the scale; return the params whose gradient is not finite
        (their gradient is set to ``None`` so the optimiser skips them)."""
        bad = []
        if not self.enabled:
            return bad
        for p in params:
            if p.grad is None:
                continue
            p.grad.div_(self.scale)
            if not torch.isfinite(p.grad).all():
                p.grad = None
                bad.append(p)
        if bad:
            self.skipped += len(bad)
            self.scale = max(self.scale / 2.0, 1.0)
            self._clean = 0
        else:
            self._clean += 1
            if self._clean >= self.growth_interval:
                self.scale *= 2.0
                self._clean = 0
        return bad

    def state(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "scale": self.scale, "skipped": self.skipped}


# ------------------------------------------------------------------------------------------------
# processes


def launched_distributed() -> bool:
    """True when the environment of ``accelerate launch`` / ``torchrun`` asks for > 1 process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _wants_cpu() -> bool:
    flag = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
    return flag or not torch.cuda.is_available()


def init_process_group(device: str | torch.device | None = None) -> bool:
    """Initialise the process group asked for by ``torchrun`` / ``accelerate launch``.

    Avalanche's ``DistributedHelper.init_distributed`` does it on one machine. On several machines
    the group is initialised here instead, since Avalanche 0.6 would put process ``RANK`` on GPU
    ``cuda:RANK`` rather than on ``cuda:LOCAL_RANK``. A GPU ``device`` gives NCCL with this
    process on ``cuda:LOCAL_RANK`` (more processes than GPUs: they share them, through gloo); a
    CPU one gloo. A group that already exists is kept.

    Args:
        device: the run's device; ``None``: CPU under ``accelerate launch --cpu`` or when no GPU
            is present, else GPU.

    Returns:
        True when several processes run (a group exists after the call).
    """
    if _dist_ready():
        return torch.distributed.get_world_size() > 1
    if not launched_distributed():
        return False
    from avalanche.distributed import DistributedHelper

    cuda = not _wants_cpu() if device is None else torch.device(device).type == "cuda"
    world = int(os.environ["WORLD_SIZE"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    backend, shared = "gloo", False
    if cuda:
        gpus = torch.cuda.device_count()
        shared = local_world > gpus
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % gpus)
        if shared:  # NCCL refuses two processes on one GPU
            warnings.warn(
                f"{local_world} processes on {gpus} GPU(s): they share GPUs and communicate "
                f"through gloo; start {gpus} per machine for speed",
                stacklevel=2,
            )
        else:
            backend = "nccl"
    if local_world == world and not shared:
        with _quiet_seeding():
            DistributedHelper.init_distributed(random_seed=0, backend=backend, use_cuda=cuda)
    else:
        torch.distributed.init_process_group(backend=backend)
        DistributedHelper.use_cuda = cuda
    return _dist_ready()


@contextlib.contextmanager
def _quiet_seeding():
    """``init_distributed`` reseeds every generator; keep the caller's random state."""
    import random

    import numpy as np

    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def distributed_state(*, cpu: bool | None = None):
    """The process-wide :class:`accelerate.PartialState` (for code that uses ``accelerate``).

    Under ``accelerate launch`` / ``torchrun`` its first construction initialises the process
    group unless :func:`init_process_group` already did (a group that exists is used as it is).

    Args:
        cpu: force CPU processes (gloo); ``None``: CPU when ``accelerate launch --cpu`` asked
            for it or no CUDA device is available.
    """
    from accelerate import PartialState

    return PartialState(cpu=_wants_cpu() if cpu is None else cpu)


def num_processes() -> int:
    """Number of processes of this run (1 without a process group)."""
    if _dist_ready() or init_process_group():
        return torch.distributed.get_world_size()
    return 1


def process_index() -> int:
    """Index of this process (0 without a process group)."""
    if _dist_ready() or init_process_group():
        return torch.distributed.get_rank()
    return 0


def is_main_process() -> bool:
    """True in the process that writes caches, checkpoints and results (process 0)."""
    return process_index() == 0


def wait_for_everyone() -> None:
    """Barrier across processes (no-op with one process)."""
    if num_processes() > 1:
        torch.distributed.barrier()


def shard(items: Sequence[Any]) -> list:
    """This process's share of ``items``: accelerate's ``split_between_processes`` (contiguous
    blocks; when they do not divide, the first processes take one more). All of them with one
    process."""
    items = list(items)
    if num_processes() == 1:
        return items
    with distributed_state().split_between_processes(items) as mine:
        return list(mine)


def gather_object(obj: Any) -> list[Any]:
    """``[obj of process 0, obj of process 1, ...]`` on every process (``[obj]`` alone), through
    accelerate's ``gather_object``.

    Objects are pickled (tensors: move them to the CPU first to keep the transfer device-free).
    """
    n = num_processes()
    if n == 1:
        return [obj]
    from accelerate.utils import gather_object as gather

    distributed_state()  # accelerate's operations read its process-wide state
    out = gather([obj])
    if len(out) != n:
        raise RuntimeError(
            f"accelerate gathered {len(out)} objects from {n} processes: its state does not see "
            "this run's process group (start the run with torchrun or accelerate launch)"
        )
    return out


def set_seed(seed: int, *, device_specific: bool = False) -> None:
    """:func:`~avalanche_d2l.core.seeding.seed_everything`, with the process index added to
    ``seed`` when ``device_specific`` (per-process randomness; dreaming does not need it: its
    noise is drawn from per-class generators, the same in every process)."""
    from ..core.seeding import seed_everything

    seed_everything(int(seed) + (process_index() if device_specific else 0))
