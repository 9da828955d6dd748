"""Sequence-aware features: does the candidate follow the user's last items?"""

from __future__ import annotations

import polars as pl


def transitions(ev: pl.LazyFrame, max_gap: int) -> pl.LazyFrame:
    """(prev, next, weight): item `next` followed `prev` within `max_gap` steps of the
    same user's history, each occurrence weighted 1/gap. Events sorted by (u, t)."""
    parts = [
        ev.select(
            pl.col("i").alias("prev"),
            pl.col("i").shift(-g).over("u").alias("next"),
            pl.lit(1.0 / g).alias("weight"),
        ).filter(pl.col("next").is_not_null() & (pl.col("next") != pl.col("prev")))
        for g in range(1, max_gap + 1)
    ]
    return pl.concat(parts).group_by("prev", "next").agg(pl.col("weight").sum())


def last_items(ev: pl.LazyFrame, last_n: int, decay: float) -> pl.LazyFrame:
    """(u, prev, pos, w): each user's last `last_n` items, pos 0 = most recent,
    weighted decay**pos."""
    return (
        ev.group_by("u")
        .agg(pl.col("i").tail(last_n).reverse().alias("prev"))
        .explode("prev")
        .with_columns(pl.int_range(pl.len()).over("u").alias("pos"))
        .with_columns((pl.lit(decay) ** pl.col("pos")).alias("w"))
    )


def sequence_follow(
    ev: pl.LazyFrame,
    pairs: pl.LazyFrame,
    trans: pl.LazyFrame,
    *,
    last_n: int = 10,
    decay: float = 0.8,
) -> pl.LazyFrame:
    """How strongly each candidate follows the user's last items in everyone's histories.

    seq_follow: recency-weighted sum of transition weights from the last items;
    seq_follow_norm: the same, each normalised by how often that last item occurs;
    seq_follow_last: transition weight from the most recent item alone;
    seq_precede: the reverse direction (the candidate tends to come *before* them).
    """
    occ = ev.group_by("i").agg(pl.len().alias("occ")).rename({"i": "prev"})
    last = last_items(ev, last_n, decay).join(occ, on="prev", how="left")
    fwd = (
        last.join(trans, on="prev", how="inner")
        .rename({"next": "i"})
        .group_by("u", "i")
        .agg(
            (pl.col("w") * pl.col("weight")).sum().alias("seq_follow"),
            (pl.col("w") * pl.col("weight") / pl.col("occ")).sum().alias("seq_follow_norm"),
            pl.col("weight").filter(pl.col("pos") == 0).sum().alias("seq_follow_last"),
            pl.col("pos").min().alias("seq_follow_nearest"),
        )
    )
    back = (
        last.join(trans.rename({"prev": "next", "next": "prev"}), on="prev", how="inner")
        .rename({"next": "i"})
        .group_by("u", "i")
        .agg((pl.col("w") * pl.col("weight")).sum().alias("seq_precede"))
    )
    p = pairs.select("u", "i")
    return (
        p.join(fwd, on=["u", "i"], how="left")
        .join(back, on=["u", "i"], how="left")
        .with_columns(
            pl.col("seq_follow", "seq_follow_norm", "seq_follow_last", "seq_precede").fill_null(
                0.0
            ),
            pl.col("seq_follow_nearest").fill_null(last_n),
        )
    )
