"""Time-based splits. Per user, the last part of the history is held out."""

from __future__ import annotations

import polars as pl

from recsys.data import T, U


def split_last_fraction(
    ev: pl.DataFrame, fraction: float = 0.2, min_holdout: int = 1
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Per user, sort by time and hold out the last `fraction` of events (at least
    `min_holdout`). Expects internal events sorted by (u, t) as `to_internal` gives.

    Returns (history, holdout). Users with a single event land wholly in the holdout.
    """
    n = pl.len().over(U)
    pos = pl.int_range(pl.len()).over(U)
    n_hold = pl.max_horizontal(
        (n.cast(pl.Float64) * fraction).floor().cast(pl.Int64), pl.lit(min_holdout)
    )
    marked = ev.sort([U, T], maintain_order=True).with_columns((pos >= n - n_hold).alias("_hold"))
    hist = marked.filter(~pl.col("_hold")).drop("_hold")
    hold = marked.filter(pl.col("_hold")).drop("_hold")
    return hist, hold
