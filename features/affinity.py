"""Category affinity of the user against the candidate's categories."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from features.batch import Candidates, Histories, gather_rows, lookup, segment_index, segment_max

AFFINITY_COLUMNS = ("cat_aff_mean", "cat_aff_max", "cat_aff_recent_max", "item_n_cats")


def user_category_affinity(
    item_cats: sp.csr_matrix, h: Histories, c: Candidates, recent_n: int = 20
) -> dict[str, np.ndarray]:
    """cat_aff_mean, cat_aff_max, cat_aff_recent_max, item_n_cats per candidate pair.

    item_cats: [n_items, n_categories] binary. A user's affinity to a category is the
    share of their events on items in it (over all their events, or over their last
    `recent_n`, divided by `recent_n`); a candidate gets the mean and the max over its
    own categories (0 for a category the user never met)."""
    n_cats = item_cats.shape[1]
    n = len(c)
    # the user's share of events per category, over all their events and the recent ones
    lens, cats, _ = gather_rows(item_cats, h.items)
    rows = np.repeat(segment_index(h.ptr), lens)
    keys, k = np.unique(rows * n_cats + cats, return_counts=True)
    aff = k / np.maximum(h.lengths, 1)[keys // n_cats]
    rptr, recent = h.last(recent_n)
    lens, cats, _ = gather_rows(item_cats, recent)
    rows = np.repeat(segment_index(rptr), lens)
    rkeys, rk = np.unique(rows * n_cats + cats, return_counts=True)
    raff = rk / recent_n
    # each candidate's categories
    n_c, cats, _ = gather_rows(item_cats, c.items)
    pair = np.repeat(np.arange(n, dtype=np.int64), n_c)
    q = c.rows[pair] * n_cats + cats
    a = lookup(keys, aff, q)
    ra = lookup(rkeys, raff, q)
    ptr = np.concatenate([[0], np.cumsum(n_c)]).astype(np.int64)
    return {
        "cat_aff_mean": np.where(
            n_c > 0, np.bincount(pair, weights=a, minlength=n) / np.maximum(n_c, 1), 0.0
        ),
        "cat_aff_max": segment_max(a, ptr),
        "cat_aff_recent_max": segment_max(ra, ptr),
        "item_n_cats": n_c.astype(np.float64),
    }
