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


def tied_holdout_share(hist: pl.DataFrame, hold: pl.DataFrame) -> float:
    """The share of held-out events whose time equals the time of their user's last
    training event: for them, no time tells held-out from training, and the order of
    the input's rows decided which was held out. (Users without training events do not
    count as tied.)"""
    if hold.height == 0:
        return 0.0
    last = hist.group_by(U).agg(pl.col(T).max().alias("_last"))
    tied = hold.join(last, on=U, how="left").select((pl.col(T) == pl.col("_last")).sum())
    return float(tied.item() or 0) / hold.height
