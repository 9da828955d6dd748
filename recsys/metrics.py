"""Top-k ranking metrics over users, binary relevance (the DESIGN.md protocol)."""

from __future__ import annotations

import numpy as np
import polars as pl

from recsys.data import I, U


def per_user_metrics(
    recs: np.ndarray, rec_users: np.ndarray, truth: pl.DataFrame, k: int
) -> pl.DataFrame:
    """Metrics per user.

    recs: [n_users, >=k] item indices ranked best first (-1 = empty slot);
    rec_users: the user index of each row; truth: internal frame with (u, i) held out.
    """
    recs = recs[:, :k]
    rel_sets = truth.group_by(U).agg(pl.col(I).unique())
    rel = dict(zip(rel_sets[U].to_list(), rel_sets[I].to_list(), strict=True))
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    rows = []
    for row, u in zip(recs, rec_users.tolist(), strict=True):
        items = rel.get(u)
        if not items:
            continue
        hits = np.isin(row, np.fromiter(items, dtype=np.int64))
        n_rel = len(items)
        dcg = float((hits * discounts[: len(row)]).sum())
        idcg = float(discounts[: min(n_rel, k)].sum())
        first = np.flatnonzero(hits)
        rows.append(
            (
                u,
                dcg / idcg,
                hits.sum() / n_rel,
                float(hits.any()),
                1.0 / (first[0] + 1) if len(first) else 0.0,
            )
        )
    return pl.DataFrame(
        rows,
        schema={
            "u": pl.Int32,
            "ndcg": pl.Float64,
            "recall": pl.Float64,
            "hr": pl.Float64,
            "mrr": pl.Float64,
        },
        orient="row",
    )


def summarize(
    recs: np.ndarray, rec_users: np.ndarray, truth: pl.DataFrame, k: int, n_items: int
) -> dict[str, float]:
    """Mean metrics over users that have held-out items, plus catalogue coverage."""
    per = per_user_metrics(recs, rec_users, truth, k)
    top = recs[:, :k]
    coverage = len(np.unique(top[top >= 0])) / max(n_items, 1)
    return {
        f"ndcg@{k}": _mean(per["ndcg"]),
        f"recall@{k}": _mean(per["recall"]),
        f"hr@{k}": _mean(per["hr"]),
        f"mrr@{k}": _mean(per["mrr"]),
        "coverage": coverage,
        "users": float(len(per)),
    }


def _mean(s: pl.Series) -> float:
    """The mean of a numeric column; 0 for no rows."""
    m = s.mean()
    return float(m) if isinstance(m, int | float) else 0.0
