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
    n_items = item_cats.shape[0]
    n = len(c)
    ic = item_cats.astype(np.float64)
    prof = (h.counts(n_items).astype(np.float64) @ ic).tocsr()
    prof.sort_indices()
    prof.data /= np.repeat(np.maximum(h.lengths, 1), np.diff(prof.indptr))
    rptr, recent = h.last(recent_n)
    rc = sp.csr_matrix(
        (np.ones(len(recent)), (np.repeat(np.arange(len(h)), np.diff(rptr)), recent)),
        shape=(len(h), n_items),
    )
    rprof = (rc @ ic).tocsr()
    rprof.data /= recent_n
    n_c, cats, _ = gather_rows(item_cats, c.items)
    pair = np.repeat(np.arange(n, dtype=np.int64), n_c)
    row = c.rows[pair]
    a = _lookup(prof, row, cats)
    ra = _lookup(rprof, row, cats)
    ptr = np.concatenate([[0], np.cumsum(n_c)]).astype(np.int64)
    return {
        "cat_aff_mean": np.where(
            n_c > 0, np.bincount(pair, weights=a, minlength=n) / np.maximum(n_c, 1), 0.0
        ),
        "cat_aff_max": segment_max(a, ptr),
        "cat_aff_recent_max": segment_max(ra, ptr),
        "item_n_cats": n_c.astype(np.float64),
    }


def _lookup(m: sp.csr_matrix, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """m[rows, cols] for a CSR matrix (0 where not stored)."""
    m.sum_duplicates()
    keys = segment_index(m.indptr.astype(np.int64)) * m.shape[1] + m.indices.astype(np.int64)
    return lookup(keys, m.data, rows.astype(np.int64) * m.shape[1] + cols.astype(np.int64))
