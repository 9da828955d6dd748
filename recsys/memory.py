"""Memory figures for the logs: this process's resident memory, now and at its peak."""

from __future__ import annotations

import os
import sys


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
