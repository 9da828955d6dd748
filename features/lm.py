"""Language-model features of candidate pairs, from item vectors.

The vectors come from the language model (unit length); these functions only see
numpy arrays, so the same definitions serve the batch job and a single request.
"""

from __future__ import annotations

import numpy as np

from features.batch import Candidates, Histories

LM_SIM_COLUMNS = ("lm_sim_last", "lm_sim_max", "lm_sim_mean_recent")
SIM_HISTORY = 100  # the most recent items the similarity features look at


def lm_pair_features(
    item_vectors: np.ndarray, h: Histories, c: Candidates, max_history: int = SIM_HISTORY
) -> dict[str, np.ndarray]:
    """lm_sim_last, lm_sim_max, lm_sim_mean_recent for every candidate pair.

    item_vectors: a unit vector per item index (the pipeline passes the language
    model's `similarity_vectors`, its text vectors).
    lm_sim_last: cosine with the user's most recent item; lm_sim_max: best match among
    the last `max_history` items; lm_sim_mean_recent: mean cosine with the last 10.
    Users without history get NaN."""
    n = len(c)
    out = [np.full(n, np.nan, dtype=np.float32) for _ in LM_SIM_COLUMNS]
    lptr, last = h.last(max_history)
    for r in range(len(h)):
        a, b = c.ptr[r], c.ptr[r + 1]
        hist = last[lptr[r] : lptr[r + 1]]
        if b == a or len(hist) == 0:
            continue
        for col, v in zip(out, lm_similarities(c.items[a:b], item_vectors, hist), strict=True):
            col[a:b] = v
    return dict(zip(LM_SIM_COLUMNS, out, strict=True))


def lm_similarities(
    items: np.ndarray,
    item_vectors: np.ndarray,
    history: np.ndarray,
    max_history: int = SIM_HISTORY,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three similarity columns for one user: the candidates `items` against
    `history` (item indices, most recent first, not empty), as float32 arrays
    (lm_sim_last, lm_sim_max, lm_sim_mean_recent)."""
    hist = history[:max_history]
    s = item_vectors[items] @ item_vectors[hist].T  # [cands, hist]
    return s[:, 0], s.max(axis=1), s[:, :10].mean(axis=1)


def candidate_rank(scores: np.ndarray, ptr: np.ndarray) -> np.ndarray:
    """The rank of each score among its own segment's (one user's candidates), best
    = 1, equal scores sharing the best rank among them (rank "min", descending)."""
    n = len(scores)
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    rows = np.repeat(np.arange(len(ptr) - 1, dtype=np.int64), np.diff(ptr))
    o = np.lexsort((scores, rows))  # by row, then score ascending
    vs, rs = scores[o], rows[o]
    new_run = np.r_[True, (vs[1:] != vs[:-1]) | (rs[1:] != rs[:-1])]
    starts = np.flatnonzero(new_run)
    run_end = np.r_[starts[1:], n] - 1  # last element of each run of equal scores
    end_of = run_end[np.cumsum(new_run) - 1]
    rank = np.empty(n, dtype=np.float64)
    rank[o] = ptr[rs + 1] - end_of  # 1 + the number of greater scores in the row
    return rank
