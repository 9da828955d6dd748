"""User activity and recency at the cutoff `now` (epoch seconds)."""

from __future__ import annotations

import numpy as np
import polars as pl

from features.batch import Histories

DAY = 86_400


def user_activity(h: Histories, now: int) -> dict[str, np.ndarray]:
    """Per user of the chunk (each with at least one event): user_n,
    user_days_since_last, user_span_days, user_last_day_n.

    `now` is the cutoff; a history that runs past it (fresh events) is taken at its own
    last event. user_last_day_n counts the user's events in the day before their own
    last event: a user in the middle of a burst behaves differently from one back after
    months."""
    last_t, first_t = h.last_t, h.first_t
    now_u = np.maximum(now, last_t)
    # events after (last_t - DAY) of each user: one binary search over (user, time) keys
    t0 = int(h.times.min()) - DAY - 1 if len(h.times) else 0
    span = (int(h.times.max()) - t0 + 1) if len(h.times) else 1
    rows = np.repeat(np.arange(len(h), dtype=np.int64), h.lengths)
    keys = rows * span + (h.times - t0)
    q = np.arange(len(h), dtype=np.int64) * span + (last_t - DAY - t0)
    last_day_n = h.ptr[1:] - np.searchsorted(keys, q, side="right")
    return {
        "user_n": h.lengths.astype(np.float64),
        "user_days_since_last": (now_u - last_t) / DAY,
        "user_span_days": (last_t - first_t) / DAY,
        "user_last_day_n": last_day_n.astype(np.float64),
    }


def item_mean_user_activity(ev: pl.LazyFrame) -> pl.LazyFrame:
    """(i, item_user_n_logmean): how active, on average, the item's users are."""
    n = ev.group_by("u").agg(pl.len().alias("_n"))
    return (
        ev.join(n, on="u")
        .group_by("i")
        .agg(pl.col("_n").cast(pl.Float64).log1p().mean().alias("item_user_n_logmean"))
    )
