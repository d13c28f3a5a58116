"""Keep freed memory for reuse: glibc's malloc settings for a long-running training process.

By default glibc gives large freed blocks back to the OS (blocks over its mmap threshold are
unmapped; a free top of heap over the trim threshold is released), so every training step
page-faults its activation buffers back in, and the kernel zeroes each page first. Measured
in the WAN benchmark: a swarm agent's trainer took about 900 page faults per sample. Keeping
the memory turns those into reuse; the price is a resident size that stays at its peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger("spotrain.agents")

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
KEEP_FREE_BYTES = 1 << 30  # free top of heap kept before any is returned to the OS
LARGEST_HEAP_BLOCK = 32 << 20  # glibc's cap for the mmap threshold on 64-bit; bigger blocks are mapped


def keep_freed_memory() -> bool:
    """Raise the thresholds once, before training allocates; False where malloc is not glibc's."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        logger.info("no glibc mallopt here: freed memory goes back to the OS as usual")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; setting the thresholds also stops glibc adjusting them
    return bool(mallopt(M_MMAP_THRESHOLD, LARGEST_HEAP_BLOCK)) and bool(mallopt(M_TRIM_THRESHOLD, KEEP_FREE_BYTES))
