"""User activity and recency at the cutoff `now` (epoch seconds)."""

from __future__ import annotations

import polars as pl

DAY = 86_400


def user_activity(ev: pl.LazyFrame, now: int) -> pl.LazyFrame:
    """(u, user_n, user_days_since_last, user_span_days, user_last_day_n, user_last_t).

    user_last_day_n counts the user's events in the day before their own last event:
    a user in the middle of a burst behaves differently from one back after months.
    """
    return ev.group_by("u").agg(
        pl.len().alias("user_n"),
        ((now - pl.col("t").max()) / DAY).alias("user_days_since_last"),
        ((pl.col("t").max() - pl.col("t").min()) / DAY).alias("user_span_days"),
        (pl.col("t") > pl.col("t").max() - DAY).sum().alias("user_last_day_n"),
        pl.col("t").max().alias("user_last_t"),
    )


def item_mean_user_activity(ev: pl.LazyFrame) -> pl.LazyFrame:
    """(i, item_user_n_mean): how active, on average, the item's users are."""
    n = ev.group_by("u").agg(pl.len().alias("_n"))
    return (
        ev.join(n, on="u")
        .group_by("i")
        .agg(pl.col("_n").cast(pl.Float64).log1p().mean().alias("item_user_n_logmean"))
    )
