"""Language-model features of candidate pairs, from item and user vectors.

The vectors come from the language model (unit length); these functions only see
numpy arrays and polars frames, so the same definitions serve the offline path and a
single-user request.
"""

from __future__ import annotations

import itertools

import numpy as np
import polars as pl

LM_SIM_COLUMNS = ("lm_sim_last", "lm_sim_max", "lm_sim_mean_recent")
SIM_HISTORY = 100  # the most recent items the similarity features look at


def lm_pair_features(
    pairs: pl.DataFrame,
    item_vectors: np.ndarray,
    histories: dict[int, np.ndarray],
    max_history: int = SIM_HISTORY,
) -> pl.DataFrame:
    """(u, i, lm_sim_last, lm_sim_max, lm_sim_mean_recent) for candidate pairs.

    item_vectors: a unit vector per item index (the pipeline passes the language
    model's `similarity_vectors`, its text vectors).
    histories: user -> item indices, most recent first (the history before the cutoff).
    lm_sim_last: cosine with the user's most recent item; lm_sim_max: best match among
    the last `max_history` items; lm_sim_mean_recent: mean cosine with the last 10.
    Users without history get nulls.
    """
    u = pairs["u"].to_numpy()
    i = pairs["i"].to_numpy()
    n = len(u)
    last = np.full(n, np.nan, dtype=np.float32)
    best = np.full(n, np.nan, dtype=np.float32)
    mean = np.full(n, np.nan, dtype=np.float32)
    if n:
        order = np.argsort(u, kind="stable")
        bounds = np.flatnonzero(np.r_[True, u[order][1:] != u[order][:-1], True])
        for a, b in itertools.pairwise(bounds):
            rows = order[a:b]
            h = histories.get(int(u[rows[0]]))
            if h is None or len(h) == 0:
                continue
            last[rows], best[rows], mean[rows] = lm_similarities(
                i[rows], item_vectors, h, max_history
            )
    return pl.DataFrame(
        {
            "u": pairs["u"],
            "i": pairs["i"],
            **dict(zip(LM_SIM_COLUMNS, (last, best, mean), strict=True)),
        }
    )


def lm_similarities(
    items: np.ndarray,
    item_vectors: np.ndarray,
    history: np.ndarray,
    max_history: int = SIM_HISTORY,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`lm_pair_features`' three columns for one user: the candidates `items` against
    `history` (item indices, most recent first, not empty), as float32 arrays
    (lm_sim_last, lm_sim_max, lm_sim_mean_recent). The serving path calls this
    directly, without building frames per request."""
    h = history[:max_history]
    s = item_vectors[items] @ item_vectors[h].T  # [cands, hist]
    return s[:, 0], s.max(axis=1), s[:, :10].mean(axis=1)


def lm_candidate_rank(pairs: pl.LazyFrame, score: str = "lm_score") -> pl.LazyFrame:
    """The rank of each candidate's LM score among the same user's candidates (1 = best)."""
    return pairs.with_columns(
        pl.col(score).rank("min", descending=True).over("u").alias("lm_cand_rank")
    )
