"""Memory figures for the logs: this process's resident memory, now and at its peak."""

from __future__ import annotations

import os
import sys
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
    global _TRIM
    if _TRIM is None:
        _TRIM = False
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
            except (OSError, AttributeError):
                pass
    if _TRIM:
        _TRIM(0)


_TRIM: Any = None
