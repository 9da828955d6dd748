"""New-item slots: items without interactions placed into ranked lists.

A ranker trained on behaviour has no reason to put an item nobody has met into a
top-k: its other features are empty, and on merit such an item rarely wins a place.
Catalogues still need new items shown. With `new_item_every = n`, every n-th place of
a list (places n, 2n, ...) goes to the user's best item without interactions, ranked
by the language model: the user vector against the item's text-only vector (the same
score as the `lm` source, without per-item offsets, which new items do not have). The
other places keep the ranker's order. A list's first k places are the same whatever
length is asked for, so the online path can merge once and cut to any k.

The offline path (`Pipeline.recommend_indices`) and the online path
(`recsys.online.OnlineRanker.rank`) both `merge` a ranked list with `cold_order`'s.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def cold_pool(X: sp.csr_matrix) -> np.ndarray:
    """Indices of items without any interaction in the users x items matrix `X`."""
    return np.flatnonzero(np.bincount(X.indices, minlength=X.shape[1]) == 0)


def cold_order(
    user_vectors: np.ndarray, text_vectors: np.ndarray, pool: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each user's best `n` items of `pool`, best first: (items [U, n'], scores [U, n'])
    with n' = min(n, len(pool)); ties go to the lower item index."""
    n = min(n, len(pool))
    items = np.zeros((len(user_vectors), max(n, 0)), dtype=np.int64)
    scores = np.zeros((len(user_vectors), max(n, 0)), dtype=np.float32)
    if n <= 0:
        return items, scores
    # float64 products rounded to float32: the float32 product's last bit depends on
    # how many users are multiplied at once (one online, many offline), which would
    # break ties between equal scores differently in the two paths
    tv = text_vectors[pool].T.astype(np.float64)
    step = max(1, (1 << 21) // len(pool))  # users per chunk: about 16 MB of scores
    for a in range(0, len(user_vectors), step):
        S = (user_vectors[a : a + step].astype(np.float64) @ tv).astype(np.float32)
        order = np.lexsort((np.broadcast_to(pool, S.shape), -S), axis=1)[:, :n]
        items[a : a + step] = pool[order]
        scores[a : a + step] = np.take_along_axis(S, order, axis=1)
    return items, scores


def interleave(
    ranked: np.ndarray, cold: np.ndarray, every: int, length: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Merge one user's ranked items with their cold items: places (1-based) divisible
    by `every` take the next cold item while any remain, the others the next ranked
    item. Returns (items, is_cold), at most `length` long (default: everything).
    Cold items already in `ranked` are skipped there."""
    if every < 1 or len(cold) == 0:
        out = ranked if length is None else ranked[:length]
        return out, np.zeros(len(out), dtype=bool)
    ranked = ranked[~np.isin(ranked, cold)]
    total = len(ranked) + len(cold) if length is None else length
    # how many cold places fit before the ranked items run out
    n_cold = min(len(cold), total // every)
    n_warm = min(len(ranked), total - n_cold)
    # places beyond the last ranked item hold the remaining cold items in order
    is_cold = np.zeros(n_warm + n_cold, dtype=bool)
    pos = np.arange(1, len(is_cold) + 1)
    slots = np.flatnonzero(pos % every == 0)[:n_cold]
    extra = n_cold - len(slots)
    is_cold[slots] = True
    if extra > 0:
        is_cold[len(is_cold) - extra :] = True
    out = np.empty(len(is_cold), dtype=np.int64)
    out[is_cold] = cold[:n_cold]
    out[~is_cold] = ranked[:n_warm]
    return out, is_cold


def merge(
    items: np.ndarray, scores: np.ndarray, cold: np.ndarray, every: int, length: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """`interleave` with the scores carried along: the ranked items keep theirs, the
    cold items get NaN (the ranker did not place them)."""
    merged, is_cold = interleave(items, cold, every, length)
    out = np.full(len(merged), np.nan)
    out[~is_cold] = scores[~np.isin(items, cold)][: int((~is_cold).sum())]
    return merged, out


def merge_ranked(
    items: np.ndarray,
    scores: np.ndarray,
    user_vector: np.ndarray,
    text_vectors: np.ndarray,
    pool: np.ndarray,
    every: int,
    seen: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One user's whole ranked list (items, scores) with the new-item slots merged in:
    the online form of what `Pipeline.recommend_indices` does for a k-long list (its
    first k places are the same). `seen` items are left out of the pool."""
    if every < 1 or len(pool) == 0:
        return items, scores
    if seen is not None and len(seen):
        pool = pool[~np.isin(pool, seen)]
    n = len(items) // max(every - 1, 1) + 1  # enough for every slot of the whole list
    cold, _ = cold_order(user_vector.reshape(1, -1), text_vectors, pool, n)
    return merge(items, scores, cold[0], every)
