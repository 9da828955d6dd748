"""Time-aware popularity: the candidate's popularity in the window before the user's
*own* last event, rather than before the global cutoff."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from features.batch import Candidates, EndTimeMemo, Histories

DAY = 86_400
_SHIFT = 34  # item index in the high bits, time offset or event rank in the low 34
# the upop_* windows: the last N days before a user's end time, and the last share of all events
UPOP_DAYS: tuple[float, ...] = (1, 7, 30, 180)
UPOP_SHARES: tuple[float, ...] = (0.002, 0.01, 0.05)


def popularity_before_user_time(
    index: EventTimeIndex, h: Histories, c: Candidates
) -> dict[str, np.ndarray]:
    """Per candidate pair (u, i), with t_u the user's last event time:

    upop_{w}d         events on i in (t_u - w days, t_u]
    upop_share_{w}d   that count over all events in the same window
    upop_last{s}      share of the last s*N events up to t_u (N = all events) that were
                      on i: the same idea on a clock that ticks per event, so it means
                      the same on busy and quiet data sets

    Counting is a binary search in events sorted by (item, time), so the cost is
    O(pairs log events) whatever the windows; a chunk of one user whose windows hold
    few events counts them directly (the same integers).
    """
    t_end = np.repeat(h.last_t, np.diff(c.ptr))
    if len(h) == 1:
        direct = index.counts_at_one_time(c.items, int(h.last_t[0]))
        if direct is not None:
            return direct
    return index.counts(c.items, t_end)


BLOCK = 64  # keys per block of the two-level search
TWO_LEVEL_MIN = 2048  # queries from which the two-level search pays
TWO_LEVEL_MIN_KEYS = 1 << 22  # keys (32 MiB) past which a plain search misses the cache


def searchsorted_right(a: np.ndarray, coarse: np.ndarray, v: np.ndarray) -> np.ndarray:
    """`np.searchsorted(a, v, side="right")`, the same integers, for a large sorted `a`
    with `coarse = a[::BLOCK]`. Many queries spread over tens of millions of keys make a
    plain search miss the cache at most of its steps; here a search in the small coarse
    array (it stays in the cache) finds each query's block, and six halvings inside that
    block finish it (4x faster for 11,000 queries into 10M keys). Few queries, or keys
    that fit the cache (1M events: 8 MiB), go to numpy's search, which is faster there."""
    if len(v) < TWO_LEVEL_MIN or len(a) < max(TWO_LEVEL_MIN_KEYS, 1):
        return np.searchsorted(a, v, side="right")
    n = len(a)
    b = np.searchsorted(coarse, v, side="right") - 1  # a[b * BLOCK] <= v < a[(b+1) * BLOCK]
    lo = np.maximum(b, 0) * BLOCK  # the answer lies in (lo, hi]; 0 when v < a[0]
    hi = np.where(b < 0, 0, np.minimum(lo + BLOCK, n))
    for _ in range(BLOCK.bit_length() - 1):
        mid = (lo + hi) >> 1
        below = a[np.minimum(mid, n - 1)] <= v
        lo = np.where(below, mid, lo)
        hi = np.where(below, hi, mid)
    return hi


@dataclass(frozen=True)
class EventTimeIndex:
    """Events sorted by (item, time) and by time, for counting an item's events in a
    window by binary search. Built once; the online path queries it per request."""

    key_t: np.ndarray  # (item << _SHIFT) | (t - t_min), sorted
    key_r: np.ndarray  # (item << _SHIFT) | rank by time (1-based), sorted
    t_sorted: np.ndarray
    i_by_time: np.ndarray  # the items of the events in the same (time, item) order
    t_min: int
    t_max: int
    n_items: int
    item_ptr: np.ndarray  # item i's events are key_t[item_ptr[i]:item_ptr[i + 1]] (and key_r's)
    coarse_t: np.ndarray  # key_t[::BLOCK], for `searchsorted_right`
    coarse_r: np.ndarray  # key_r[::BLOCK]
    # every item's counts in windows that requests share (the bundle's "now" of every
    # user without a history of their own; any time past the data), by the windows'
    # positions: 7 arrays of n_items for each of the last 2 positions asked twice
    memo: EndTimeMemo[list[np.ndarray]] = field(
        default_factory=lambda: EndTimeMemo(size=2, after=2), compare=False, repr=False
    )

    @classmethod
    def build(cls, items: np.ndarray, times: np.ndarray) -> EventTimeIndex:
        item = np.asarray(items).astype(np.int64)
        t = np.asarray(times).astype(np.int64)
        n = len(t)
        t_min = int(t.min()) if n else 0
        by_time = np.lexsort((item, t))
        rank = np.empty(n, dtype=np.int64)
        rank[by_time] = np.arange(1, n + 1)
        key_t = np.sort((item << _SHIFT) | (t - t_min))
        key_r = np.sort((item << _SHIFT) | rank)
        return cls(
            key_t=key_t,
            key_r=key_r,
            t_sorted=t[by_time],
            i_by_time=item[by_time],
            t_min=t_min,
            t_max=int(t.max()) if n else 0,
            n_items=int(item.max()) + 1 if n else 0,
            item_ptr=np.concatenate(
                [[0], np.cumsum(np.bincount(item, minlength=int(item.max()) + 1 if n else 0))]
            ).astype(np.int64),
            coarse_t=key_t[::BLOCK].copy(),
            coarse_r=key_r[::BLOCK].copy(),
        )

    def counts(
        self,
        items: np.ndarray,
        t_end: np.ndarray,
        windows_days: tuple[float, ...] = UPOP_DAYS,
        windows_share: tuple[float, ...] = UPOP_SHARES,
    ) -> dict[str, np.ndarray]:
        """The upop_* columns for query items with their users' end times.

        The queries are put in (item, end time) order once: every search below then
        runs over ascending keys (binary searches that walk little memory), and the
        answers go back to the given order at the end."""
        key_t, key_r, t_sorted, t_min = self.key_t, self.key_r, self.t_sorted, self.t_min
        n = len(t_sorted)
        qi = np.asarray(items).astype(np.int64)
        t_end = np.asarray(t_end).astype(np.int64)
        o = np.lexsort((t_end, qi))
        qi, t_end = qi[o], t_end[o]
        base = qi << _SHIFT
        limit = (1 << _SHIFT) - 1
        known = qi < len(self.item_ptr) - 1
        lo_t = np.where(known, self.item_ptr[np.minimum(qi, len(self.item_ptr) - 1)], n)
        lo_r = lo_t

        def item_count_until(x: np.ndarray) -> np.ndarray:  # events on qi with time <= x
            off = np.clip(x - t_min, -1, limit)
            return searchsorted_right(key_t, self.coarse_t, base + off) - lo_t

        def item_count_until_rank(r: np.ndarray) -> np.ndarray:  # events on qi with rank <= r
            off = np.clip(r, 0, limit)
            return searchsorted_right(key_r, self.coarse_r, base + off) - lo_r

        # the totals depend on the end time alone: one search per distinct end time
        ends, inv = np.unique(t_end, return_inverse=True)
        end_all = np.searchsorted(t_sorted, ends, side="right")[inv]
        end_item = item_count_until(t_end)
        cols: dict[str, np.ndarray] = {}
        for w in windows_days:
            start = t_end - int(w * DAY)
            cnt = end_item - item_count_until(start)
            tot = end_all - np.searchsorted(t_sorted, ends - int(w * DAY), side="right")[inv]
            cols[f"upop_{w:g}d"] = cnt
            cols[f"upop_share_{w:g}d"] = cnt / (tot + 1.0)
        for s in windows_share:
            size = max(1, int(np.ceil(n * s)))
            cnt = end_item - item_count_until_rank(end_all - size)
            cols[f"upop_last{s:g}"] = cnt / size
        back = np.empty_like(o)
        back[o] = np.arange(len(o))
        return {k: v[back] for k, v in cols.items()}

    def counts_at_one_time(self, items: np.ndarray, t_end: int) -> dict[str, np.ndarray] | None:
        """`counts` for one end time: each window is a slice of the events in time
        order, counted per item by a bincount (the same integers as the binary
        searches). Where the windows hold too many events for that to pay, every item's
        counts in the same windows asked for before (`memo`), else None."""
        if t_end - self.t_min >= (1 << _SHIFT) - 1:  # beyond the index's time offsets
            return None
        n_items = max(self.n_items, int(items.max()) + 1 if len(items) else 0)
        end_all, starts_d, starts_r = self._windows(t_end)
        if end_all - min(starts_d + starts_r) <= 64 * max(len(items), 1) + n_items:
            counts = self._window_counts(end_all, starts_d + starts_r, n_items, items)
            return self._columns(end_all, starts_d, counts)
        if n_items > self.n_items:  # items beyond the index: none of their events here
            return None
        # the counts depend on the windows' positions alone: every end time past the
        # data (events posted now) has the same ones
        every = self.memo.get(
            (end_all, *starts_d, *starts_r), lambda: self._every_item(end_all, starts_d + starts_r)
        )
        if every is None:
            return None
        return self._columns(end_all, starts_d, [c[items].astype(np.int64) for c in every])

    def _every_item(self, end_all: int, starts: list[int]) -> list[np.ndarray]:
        """Each window's count of every item's events, read-only, int32 while the
        events fit (7 windows x 4 bytes per item: 2.8 MB at 100,000 items)."""
        dtype = np.int32 if len(self.t_sorted) < 2**31 else np.int64
        out = []
        for c in self._window_counts(end_all, starts, self.n_items):
            c = c.astype(dtype)
            c.setflags(write=False)
            out.append(c)
        return out

    def _windows(self, t_end: int) -> tuple[int, list[int], list[int]]:
        """The events up to `t_end` (time order) and where each window starts."""
        t_sorted, n = self.t_sorted, len(self.t_sorted)
        end_all = int(np.searchsorted(t_sorted, t_end, side="right"))
        starts_d = np.searchsorted(
            t_sorted, [t_end - int(w * DAY) for w in UPOP_DAYS], side="right"
        ).tolist()
        sizes = [max(1, int(np.ceil(n * s))) for s in UPOP_SHARES]
        return end_all, starts_d, [max(0, end_all - size) for size in sizes]

    def _window_counts(
        self, end_all: int, starts: list[int], n_items: int, items: np.ndarray | None = None
    ) -> list[np.ndarray]:
        """The events of `items` (None: every item) in each window (`starts` to
        `end_all` in time order), counted from the windows' slices."""
        by_time = self.i_by_time
        out = []
        for lo in starts:
            cnt = np.bincount(by_time[lo:end_all], minlength=n_items)
            out.append(cnt if items is None else cnt[items])
        return out

    def _columns(
        self, end_all: int, starts_d: list[int], counts: list[np.ndarray]
    ) -> dict[str, np.ndarray]:
        """The upop_* columns from the windows' counts (the day windows', then the
        share windows')."""
        n = len(self.t_sorted)
        sizes = [max(1, int(np.ceil(n * s))) for s in UPOP_SHARES]
        cols: dict[str, np.ndarray] = {}
        for w, lo, cnt in zip(UPOP_DAYS, starts_d, counts[: len(UPOP_DAYS)], strict=True):
            cols[f"upop_{w:g}d"] = cnt
            cols[f"upop_share_{w:g}d"] = cnt / ((end_all - lo) + 1.0)
        for s, size, cnt in zip(UPOP_SHARES, sizes, counts[len(UPOP_DAYS) :], strict=True):
            cols[f"upop_last{s:g}"] = cnt / size
        return cols
