"""Scale check of the synthetic generator: throughput, wall time and peak memory.

    .venv/bin/python benchmarks/synth_scale.py --events 10000000

Users and items scale with the events unless given (about 75 events per user and
200 events per item, near the default data set's ratios).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

from recsys.synth import generate


def _peak_rss_mb() -> float:
    """Peak resident memory of this process; ru_maxrss is KiB on Linux, bytes on macOS."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--users", type=int, default=None, help="default: events // 75")
    ap.add_argument("--items", type=int, default=None, help="default: events // 200, >= 1500")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    users = args.users or max(1, args.events // 75)
    items = args.items or max(1500, args.events // 200)

    with tempfile.TemporaryDirectory(prefix="synth_scale_") as d:
        t0 = time.perf_counter()
        inter, cat = generate(
            Path(d),
            n_users=users,
            n_items=items,
            n_events=args.events,
            seed=args.seed,
            progress=not args.no_progress,
        )
        wall = time.perf_counter() - t0
        print(f"events      {args.events:,} ({users:,} users, {items:,} items)")
        print(f"wall time   {wall:.1f} s")
        print(f"throughput  {args.events / wall:,.0f} events/s")
        print(f"peak RSS    {_peak_rss_mb():,.0f} MiB")
        print(f"interactions.parquet  {inter.stat().st_size / 2**20:,.1f} MiB")
        print(f"items.parquet         {cat.stat().st_size / 2**20:,.1f} MiB")


if __name__ == "__main__":
    main()
