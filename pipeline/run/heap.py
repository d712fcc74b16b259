"""Heap settings for CPU inference processes (glibc ``malloc``).

A convolution's activations for a batch of 224x224 images are tens to hundreds of MiB. glibc
serves blocks above its mmap threshold (at most 32 MiB by default, adjusted dynamically) with a
fresh ``mmap`` and unmaps them on free, so every forward pass page-faults its activations in
again: on a 2-core machine that doubles the time of a CPU forward pass. Raising the mmap and trim
thresholds keeps freed blocks in the heap for the next batch. The heap then stays at the size of
the largest batch's working set, which is bounded by ``max_batch`` and not by the number of
images, so peak memory of a run is unchanged.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools

__all__ = ["trim_heap", "tune_heap"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
MMAP_THRESHOLD_BYTES = 1 << 30  # blocks below this come from the reusable heap
TRIM_THRESHOLD_BYTES = 2**31 - 1  # free heap kept before giving memory back (int for mallopt)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    with contextlib.suppress(OSError, TypeError):
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim"):
            return lib
    return None  # not glibc (musl, macOS): nothing to tune


def tune_heap() -> bool:
    """Keep freed activation buffers in this process's heap for reuse (glibc only).

    Returns:
        True when both thresholds were set; False when the C library is not glibc or refused.
    """
    lib = _libc()
    if lib is None:
        return False
    return bool(
        lib.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        and lib.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )


def trim_heap() -> None:
    """Give free heap memory back to the OS now (glibc only; a no-op elsewhere)."""
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)
