"""This process's memory: its resident size for the logs (now and at its peak), and glibc
heap settings that hand freed memory back to the system during long fits."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Iterator
from typing import Any


def rss_gib() -> tuple[float, float]:
    """Resident memory of this process now and at its peak so far, in GiB (0.0 where
    the platform does not say: no `resource` module, no /proc)."""
    now = peak = 0.0
    try:
        import resource

        ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = ru / (2**30 if sys.platform == "darwin" else 2**20)  # bytes on macOS, else KiB
        with open("/proc/self/statm") as f:
            now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ImportError, OSError, ValueError):
        pass
    return now, peak


def release_free_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's `malloc_trim`; nothing
    elsewhere). Freed tensors of a few MB stay in glibc's heaps (its threshold for
    mapping large blocks directly grows with the blocks freed), and batch passes on
    worker threads leave them in several arenas: on ml-latest-small the language
    model's fit held 2 GiB of such free memory, which later stages then added to."""
    trim = _libc_function("malloc_trim")
    if trim:
        trim(0)


# glibc's mallopt parameter; its threshold's ceiling (what it grows to by default)
_M_MMAP_THRESHOLD = -3
_MMAP_CEILING = 32 << 20


@contextlib.contextmanager
def mapped_large_blocks(threshold: int = 1 << 20) -> Iterator[None]:
    """Inside the block, allocations of `threshold` bytes and more get their own mapping,
    returned to the system when freed (glibc; nothing elsewhere). glibc raises that
    threshold to the largest block freed (up to 32 MiB), after which a pass over batches
    of growing length (item texts sorted by length) leaves every batch's tensors in the
    heap: the language model's item-table pass grew a fit on ml-latest-small by 1.2 GiB.
    On leaving, the threshold is set to glibc's ceiling, where it stands after any large
    pass by default (a fixed threshold of 1 MiB everywhere slowed training by 40%)."""
    mallopt = _libc_function("mallopt")
    if mallopt:
        mallopt(_M_MMAP_THRESHOLD, threshold)
    try:
        yield
    finally:
        if mallopt:
            mallopt(_M_MMAP_THRESHOLD, _MMAP_CEILING)


@functools.cache
def _libc_function(name: str) -> Any:
    """A function of glibc by name, or None (another C library, another system)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None
