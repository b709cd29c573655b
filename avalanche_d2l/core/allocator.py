"""The process's CPU memory allocator: keep freed memory for reuse instead of returning it.

PyTorch's CPU tensors come from the C library's ``malloc``. With glibc's defaults, a buffer of a
few megabytes (a batch of 64 feature maps of 32 x 16 x 16 floats is 2 MiB) is often given back to
the operating system when it is freed and taken again on the next step, so every step touches
fresh pages: thousands of page faults per training step, paid inside the elementwise operations
that first write them. Raising glibc's two thresholds keeps such buffers in the process's heap
(the effect PyTorch's CPU performance guide gets by switching to jemalloc or tcmalloc). It changes
where memory comes from, never a computed value. The price: up to ``trim_threshold_mb`` of freed
memory stays with the process, and its peak resident memory may be a few percent higher.

:func:`reuse_freed_memory` is called by the ``avalanche-d2l`` command, ``python -m avalanche_d2l``
and the runner's worker processes; library users call it themselves (once, at the start of the
process). ``AVALANCHE_D2L_MALLOC=default`` in the environment leaves glibc's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

__all__ = ["ENV_VAR", "reuse_freed_memory"]

#: Set to ``default`` to leave the C library's allocator settings as they are.
ENV_VAR = "AVALANCHE_D2L_MALLOC"

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_applied: dict | None = None


def reuse_freed_memory(mmap_threshold_mb: int = 256, trim_threshold_mb: int = 512) -> dict:
    """Keep freed CPU memory in the process for reuse (glibc only; idempotent).

    Args:
        mmap_threshold_mb: allocations below this come from the heap, not from fresh mappings.
        trim_threshold_mb: free memory at the top of the heap kept before any is returned.

    Returns:
        What was done: ``{"allocator": "glibc", "mmap_threshold_mb": ..., "trim_threshold_mb":
        ...}``, or ``{"allocator": "unchanged", "reason": ...}`` (not glibc, or switched off by
        ``AVALANCHE_D2L_MALLOC=default``).
    """
    global _applied
    if not (1 <= int(mmap_threshold_mb) <= 2047 and 1 <= int(trim_threshold_mb) <= 2047):
        raise ValueError(
            "reuse_freed_memory: give both thresholds in MiB between 1 and 2047 (mallopt takes "
            f"an int of bytes), got {mmap_threshold_mb} and {trim_threshold_mb}"
        )
    if _applied is not None:  # already set in this process (mallopt cannot be undone here)
        return dict(_applied)
    if os.environ.get(ENV_VAR, "").strip().lower() == "default":
        return {"allocator": "unchanged", "reason": f"{ENV_VAR}=default"}
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return {"allocator": "unchanged", "reason": "not glibc"}
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # the mmap threshold first: setting either one switches glibc's own adjustment off, and a
    # trim threshold alone (mappings still from 128 KiB up) makes page faults far more frequent
    ok = libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold_mb) * 2**20) == 1
    ok = ok and libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold_mb) * 2**20) == 1
    if not ok:
        return {"allocator": "unchanged", "reason": "mallopt refused the thresholds"}
    _applied = {
        "allocator": "glibc",
        "mmap_threshold_mb": int(mmap_threshold_mb),
        "trim_threshold_mb": int(trim_threshold_mb),
    }
    return dict(_applied)
