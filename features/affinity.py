"""Category affinity of the user against the candidate's categories."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from features.batch import Candidates, Histories, gather_rows, lookup, segment_index, segment_max

AFFINITY_COLUMNS = ("cat_aff_mean", "cat_aff_max", "cat_aff_recent_max", "item_n_cats")

# users x categories up to which the shares are counted in dense arrays: a request (one
# user) or a chunk over a short category list, where sorting the (user, category) keys
# and searching them cost more than the array (8 MB at this size)
DENSE_CELLS = 1 << 20


def user_category_affinity(
    item_cats: sp.csr_matrix,
    h: Histories,
    c: Candidates,
    recent_n: int = 20,
    dense_cells: int = DENSE_CELLS,
) -> dict[str, np.ndarray]:
    """cat_aff_mean, cat_aff_max, cat_aff_recent_max, item_n_cats per candidate pair.

    item_cats: [n_items, n_categories] binary. A user's affinity to a category is the
    share of their events on items in it (over all their events, or over their last
    `recent_n`, divided by `recent_n`); a candidate gets the mean and the max over its
    own categories (0 for a category the user never met). Up to `dense_cells` users x
    categories the shares are counted in dense arrays, else as sorted (user, category)
    keys; both give the same values."""
    n_cats = item_cats.shape[1]
    n = len(c)
    rptr, recent = h.last(recent_n)
    # each candidate's categories, as (user, category) cells
    n_c, cats, _ = gather_rows(item_cats, c.items)
    pair = np.repeat(np.arange(n, dtype=np.int64), n_c)
    q = c.rows[pair] * n_cats + cats
    shares = _dense_shares if len(h) * n_cats <= dense_cells else _sparse_shares
    a = shares(item_cats, h.ptr, h.items, np.maximum(h.lengths, 1), q)
    ra = shares(item_cats, rptr, recent, np.full(len(h), recent_n), q)
    ptr = np.concatenate([[0], np.cumsum(n_c)]).astype(np.int64)
    return {
        "cat_aff_mean": np.where(
            n_c > 0, np.bincount(pair, weights=a, minlength=n) / np.maximum(n_c, 1), 0.0
        ),
        "cat_aff_max": segment_max(a, ptr),
        "cat_aff_recent_max": segment_max(ra, ptr),
        "item_n_cats": n_c.astype(np.float64),
    }


def _cells(item_cats: sp.csr_matrix, ptr: np.ndarray, items: np.ndarray) -> np.ndarray:
    """The (user, category) cell of each category of each user's events."""
    lens, cats, _ = gather_rows(item_cats, items)
    return np.repeat(segment_index(ptr), lens) * item_cats.shape[1] + cats


def _dense_shares(
    item_cats: sp.csr_matrix, ptr: np.ndarray, items: np.ndarray, per: np.ndarray, q: np.ndarray
) -> np.ndarray:
    """Each cell of `q`: the user's events in the category over the user's `per`; 0 where
    they met no item of it. Counted for every cell in a dense array."""
    B, n_cats = len(ptr) - 1, item_cats.shape[1]
    k = np.bincount(_cells(item_cats, ptr, items), minlength=B * n_cats).reshape(B, n_cats)
    return (k / per[:, None]).ravel()[q]


def _sparse_shares(
    item_cats: sp.csr_matrix,
    ptr: np.ndarray,
    items: np.ndarray,
    per: np.ndarray,
    q: np.ndarray,
) -> np.ndarray:
    """`_dense_shares` from the sorted cells the users met, searched for `q`."""
    keys, k = np.unique(_cells(item_cats, ptr, items), return_counts=True)
    return lookup(keys, k / per[keys // item_cats.shape[1]], q)
