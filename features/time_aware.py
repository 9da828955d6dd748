"""Time-aware popularity: the candidate's popularity in the window before the user's
*own* last event, rather than before the global cutoff."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

DAY = 86_400
_SHIFT = 34  # item index in the high bits, time offset or event rank in the low 34
# the upop_* windows: the last N days before a user's end time, and the last share of all events
UPOP_DAYS: tuple[float, ...] = (1, 7, 30, 180)
UPOP_SHARES: tuple[float, ...] = (0.002, 0.01, 0.05)


def popularity_before_user_time(
    ev: pl.LazyFrame,
    pairs: pl.LazyFrame,
    user_last_t: pl.LazyFrame,
    windows_days: tuple[float, ...] = (1, 7, 30, 180),
    windows_share: tuple[float, ...] = (0.002, 0.01, 0.05),
) -> pl.LazyFrame:
    """Per candidate pair (u, i), with t_u the user's last event time (`user_last_t`:
    u, user_last_t; users missing there are taken at the latest time):

    upop_{w}d         events on i in (t_u - w days, t_u]
    upop_share_{w}d   that count over all events in the same window
    upop_last{s}      share of the last s*N events up to t_u (N = all events) that were
                      on i: the same idea on a clock that ticks per event, so it means
                      the same on busy and quiet data sets

    Counting is a binary search in events sorted by (item, time), so the cost is
    O((events + pairs) log events) whatever the windows.
    """
    e = ev.select("i", "t").collect()
    p = pairs.select("u", "i").join(user_last_t, on="u", how="left").collect()
    index = EventTimeIndex.build(e["i"].to_numpy(), e["t"].to_numpy())
    qi = p["i"].to_numpy()
    t_end = p["user_last_t"].fill_null(index.t_max).to_numpy()
    cols = index.counts(qi, t_end, windows_days, windows_share)
    return pl.DataFrame({"u": p["u"], "i": p["i"], **cols}).lazy()


@dataclass(frozen=True)
class EventTimeIndex:
    """Events sorted by (item, time) and by time, for counting an item's events in a
    window by binary search. Built once; the online path queries it per request."""

    key_t: np.ndarray  # (item << _SHIFT) | (t - t_min), sorted
    key_r: np.ndarray  # (item << _SHIFT) | rank by time (1-based), sorted
    t_sorted: np.ndarray
    t_min: int
    t_max: int

    @classmethod
    def build(cls, items: np.ndarray, times: np.ndarray) -> EventTimeIndex:
        item = np.asarray(items).astype(np.int64)
        t = np.asarray(times).astype(np.int64)
        n = len(t)
        t_min = int(t.min()) if n else 0
        by_time = np.lexsort((item, t))
        rank = np.empty(n, dtype=np.int64)
        rank[by_time] = np.arange(1, n + 1)
        return cls(
            key_t=np.sort((item << _SHIFT) | (t - t_min)),
            key_r=np.sort((item << _SHIFT) | rank),
            t_sorted=t[by_time],
            t_min=t_min,
            t_max=int(t.max()) if n else 0,
        )

    def counts(
        self,
        items: np.ndarray,
        t_end: np.ndarray,
        windows_days: tuple[float, ...] = UPOP_DAYS,
        windows_share: tuple[float, ...] = UPOP_SHARES,
    ) -> dict[str, np.ndarray]:
        """The upop_* columns for query items with their users' end times."""
        key_t, key_r, t_sorted, t_min = self.key_t, self.key_r, self.t_sorted, self.t_min
        n = len(t_sorted)
        qi = np.asarray(items).astype(np.int64)
        t_end = np.asarray(t_end).astype(np.int64)
        base = qi << _SHIFT
        limit = (1 << _SHIFT) - 1
        lo_t = np.searchsorted(key_t, base, side="left")

        def item_count_until(x: np.ndarray) -> np.ndarray:  # events on qi with time <= x
            off = np.clip(x - t_min, -1, limit)
            return np.searchsorted(key_t, base + off, side="right") - lo_t

        def item_count_until_rank(r: np.ndarray) -> np.ndarray:  # events on qi with rank <= r
            off = np.clip(r, 0, limit)
            return np.searchsorted(key_r, base + off, side="right") - np.searchsorted(
                key_r, base, side="left"
            )

        end_item = item_count_until(t_end)
        end_all = np.searchsorted(t_sorted, t_end, side="right")
        cols: dict[str, np.ndarray] = {}
        for w in windows_days:
            start = t_end - int(w * DAY)
            cnt = end_item - item_count_until(start)
            tot = end_all - np.searchsorted(t_sorted, start, side="right")
            cols[f"upop_{w:g}d"] = cnt
            cols[f"upop_share_{w:g}d"] = cnt / (tot + 1.0)
        for s in windows_share:
            size = max(1, int(np.ceil(n * s)))
            cnt = end_item - item_count_until_rank(end_all - size)
            cols[f"upop_last{s:g}"] = cnt / size
        return cols
