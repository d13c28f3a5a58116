"""Keep freed memory for reuse: glibc's malloc settings for a long-running training process.

By default glibc gives large freed blocks back to the OS (blocks over its mmap threshold are
unmapped; a free top of heap over the trim threshold is released), so every training step
page-faults its activation buffers back in, and the kernel zeroes each page first. Measured
in the WAN benchmark: a swarm agent's trainer took about 900 page faults per sample. Keeping
the memory turns those into reuse; the price is a resident size that stays at its peak.

Every block, however large, comes from the heap: glibc maps blocks over 32 MiB (the cap of its
mmap threshold) on their own and unmaps them at free, so a 64 MiB decoded tensor or a large
model's activation would still be faulted in, and zeroed, at every use.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger("spotrain.agents")

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_MAX = -4
KEEP_FREE_BYTES = 1 << 30  # free top of heap kept before any is returned to the OS


def keep_freed_memory() -> bool:
    """Set once, before training allocates; False where malloc is not glibc's."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        logger.info("no glibc mallopt here: freed memory goes back to the OS as usual")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; a fixed trim threshold also stops glibc adjusting it.
    # No block mapped on its own (where the heap cannot grow, glibc still falls back to a mapping).
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_FREE_BYTES))
