"""Item popularity, trend and age, at the cutoff `now` (epoch seconds)."""

from __future__ import annotations

import polars as pl

DAY = 86_400


def item_popularity(
    ev: pl.LazyFrame, now: int, windows_days: tuple[int, ...] = (7, 30, 365)
) -> pl.LazyFrame:
    """(i, pop_all, pop_{w}d..., pop_share_all, trend_7_30): counts before `now`."""
    aggs = [pl.len().alias("pop_all")]
    for w in windows_days:
        aggs.append((pl.col("t") > now - w * DAY).sum().alias(f"pop_{w}d"))
    total = ev.select(pl.len().alias("n_total"))
    out = ev.group_by("i").agg(aggs).join(total, how="cross")
    out = out.with_columns(
        (pl.col("pop_all") / pl.col("n_total")).alias("pop_share_all"),
    ).drop("n_total")
    if 7 in windows_days and 30 in windows_days:
        out = out.with_columns(
            ((pl.col("pop_7d") + 1) / (pl.col("pop_30d") - pl.col("pop_7d") + 4)).alias(
                "trend_7_30"
            )
        )
    return out


def item_age(ev: pl.LazyFrame, now: int) -> pl.LazyFrame:
    """(i, item_age_days, item_idle_days): since the first and the last event."""
    return ev.group_by("i").agg(
        ((now - pl.col("t").min()) / DAY).alias("item_age_days"),
        ((now - pl.col("t").max()) / DAY).alias("item_idle_days"),
    )
