"""A CPU engine's process keeps the memory it frees for its next step instead of handing it back to the kernel,
until it sleeps.

glibc serves every allocation over its mmap threshold (at most 32 MiB) with a fresh mapping and unmaps it on free,
so each step's large activations (SmolLM2's gate/up output of a 4096-token prefill: 50 MB) came back as new pages: a
page fault every 4 KiB and the kernel zeroing them, 18 ms of that linear's 86 (the kernel itself 67) and about a
tenth of the prefill. With mmap off for allocations and the heap's top never trimmed below 1 GiB, the next step's
tensors reuse the same pages (after a few steps: torch's aligned allocations do not fit a freed chunk of exactly
their size, so the heap first grows by a few of them until freed neighbours coalesce). vLLM's CPU build gets the
same from tcmalloc, which it preloads. A sleeping engine hands its freed cache back (`release_freed_memory`). The
GPU's memory has torch's caching allocator; this is only for the host heap of engines that compute on the CPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

logger = logging.getLogger("kvbox.engine")

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_KEEP_BYTES = 1 << 30


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        libc = None
    if libc is None or not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):  # glibc's, not musl's
        logger.debug("no glibc malloc: the CPU engine's heap keeps the allocator's defaults")
        return None
    return libc


@functools.cache
def keep_freed_memory() -> bool:
    """Tells glibc's malloc (where it is the allocator) to keep freed memory in the heap; False elsewhere."""
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD,
                                                                                          _KEEP_BYTES))


def release_freed_memory() -> bool:
    """Hands the heap's free pages back to the kernel (glibc's malloc_trim): whether any were."""
    libc = _glibc()
    return libc is not None and bool(libc.malloc_trim(0))
