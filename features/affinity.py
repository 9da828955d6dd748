"""Category affinity of the user against the candidate's categories."""

from __future__ import annotations

import polars as pl


def user_category_affinity(
    ev: pl.LazyFrame, item_cats: pl.LazyFrame, pairs: pl.LazyFrame, recent_n: int = 20
) -> pl.LazyFrame:
    """(u, i, cat_aff_mean, cat_aff_max, cat_aff_recent_max, item_n_cats).

    item_cats: (i, cat), one row per category of an item. A user's affinity to a
    category is the share of their history (or their last `recent_n` items) in it.
    """
    hist = ev.select("u", "i").join(item_cats, on="i", how="inner")
    n_u = ev.group_by("u").agg(pl.len().alias("_n"))
    prof = (
        hist.group_by("u", "cat")
        .agg(pl.len().alias("_k"))
        .join(n_u, on="u")
        .with_columns((pl.col("_k") / pl.col("_n")).alias("aff"))
    )
    recent = ev.group_by("u").agg(pl.col("i").tail(recent_n)).explode("i")
    rprof = (
        recent.join(item_cats, on="i", how="inner")
        .group_by("u", "cat")
        .agg(pl.len().alias("_k"))
        .with_columns((pl.col("_k") / recent_n).alias("raff"))
    )
    pc = pairs.select("u", "i").join(item_cats, on="i", how="inner")
    agg = (
        pc.join(prof.select("u", "cat", "aff"), on=["u", "cat"], how="left")
        .join(rprof.select("u", "cat", "raff"), on=["u", "cat"], how="left")
        .group_by("u", "i")
        .agg(
            pl.col("aff").fill_null(0).mean().alias("cat_aff_mean"),
            pl.col("aff").fill_null(0).max().alias("cat_aff_max"),
            pl.col("raff").fill_null(0).max().alias("cat_aff_recent_max"),
            pl.len().alias("item_n_cats"),
        )
    )
    return (
        pairs.select("u", "i")
        .join(agg, on=["u", "i"], how="left")
        .with_columns(
            pl.col("cat_aff_mean", "cat_aff_max", "cat_aff_recent_max").fill_null(0.0),
            pl.col("item_n_cats").fill_null(0),
        )
    )
