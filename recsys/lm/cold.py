"""New-item slots: items without interactions placed into ranked lists.

A ranker trained on behaviour has no reason to put an item nobody has met into a
top-k: its other features are empty, and on merit such an item rarely wins a place.
Catalogues still need new items shown. With `new_item_every = n` and `new_item_after = a`,
places a + n, a + 2n, ... of a list go to the user's best items without interactions,
ranked by the language model: the user vector against the item's text-only vector (the
same score as the `lm` source, without per-item offsets, which new items do not have).
The first `a` places and the others keep the ranker's order. The default (n = 5 after
a = 10: places 15, 20, ..., 50) leaves every top-10 as the ranker made it, so the
lists' NDCG@10 on items with behaviour does not move, and gives new items 8 of a
top-50's places. A list's first k places are the same whatever length is asked for, so
the online path can merge once and cut to any k.

The offline path (`Pipeline.recommend_indices`) and the online path
(`recsys.online.OnlineRanker.rank`) both `merge` a ranked list with `cold_order`'s (online:
`ColdPool.order`, the same order with the vectors widened once).
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
    return ColdPool(pool, text_vectors).rows(user_vectors, n)


def n_slots(length: int, every: int, after: int = 0) -> int:
    """New-item places in the first `length` places of a list."""
    return max(0, length - after) // every if every >= 1 else 0


def _kinds(n_ranked: int, n_cold: int, every: int, after: int, total: int) -> np.ndarray:
    """Which places (of at most `total`) take a cold item when `n_ranked` ranked and
    `n_cold` cold items, all distinct, are merged: slot places while cold items remain,
    every place once the ranked items have run out."""
    p = np.arange(1, n_ranked + n_cold + 1)
    slot = (p > after) & ((p - after) % every == 0)
    slot &= np.cumsum(slot) <= n_cold
    # the place of the last ranked item; after it, the rest of the cold items
    last = int(np.searchsorted(np.cumsum(~slot), n_ranked)) + 1 if n_ranked else 0
    kinds = np.concatenate([slot[:last], np.ones(n_cold - int(slot[:last].sum()), dtype=bool)])
    return kinds[:total]


def _walk(
    ranked: np.ndarray, cold: np.ndarray, every: int, length: int | None, after: int
) -> tuple[np.ndarray, np.ndarray]:
    """The merged list and, per place, the index into `ranked` it came from (-1: from
    `cold`). Places are filled in order, so a list of k is the first k places of a
    longer one; an item already placed is skipped where it comes again, so a cold item
    the ranker put in the list keeps the ranker's place and no slot repeats it.

    Both inputs hold distinct items, so an item comes twice only when it is in both;
    the merge of the two lists is laid out at once, and the later place of the first
    item placed twice is taken out of its list (which moves only later places) until
    none is (a few rounds: the ranker rarely ranks a cold item)."""
    total = len(ranked) + len(cold) if length is None else length
    r_src = np.arange(len(ranked), dtype=np.int64)
    c_items = np.asarray(cold, dtype=np.int64)
    while True:
        r_items = ranked[r_src]
        kinds = _kinds(len(r_src), len(c_items), every, after, total)
        n_c = int(kinds.sum())
        out = np.empty(len(kinds), dtype=np.int64)
        src = np.full(len(kinds), -1, dtype=np.int64)
        out[kinds] = c_items[:n_c]
        out[~kinds] = r_items[: len(kinds) - n_c]
        src[~kinds] = r_src[: len(kinds) - n_c]
        order = np.argsort(out, kind="stable")
        again = order[1:][out[order[1:]] == out[order[:-1]]]  # later places of repeats
        if not len(again):
            return out, src
        at = int(again.min())
        if kinds[at]:  # placed by the ranker before its slot: drop it from the cold list
            c_items = np.delete(c_items, int(kinds[:at].sum()))
        else:  # placed in a slot before the ranker reached it
            r_src = np.delete(r_src, int((~kinds[:at]).sum()))


def interleave(
    ranked: np.ndarray, cold: np.ndarray, every: int, length: int | None = None, after: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Merge one user's ranked items with their cold items: places (1-based) p > `after`
    with (p - after) divisible by `every` take the next cold item while any remain, the
    others the next ranked item. Returns (items, is_cold), at most `length` long
    (default: everything). An item is placed once, at its first place: a cold item the
    ranker ranked before its slot stays where the ranker put it."""
    if every < 1 or len(cold) == 0:
        out = ranked if length is None else ranked[:length]
        return out, np.zeros(len(out), dtype=bool)
    out, src = _walk(ranked, cold, every, length, after)
    return out, src < 0


def merge(
    items: np.ndarray,
    scores: np.ndarray,
    cold: np.ndarray,
    every: int,
    length: int | None = None,
    after: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """`interleave` with the scores carried along: the ranked items keep theirs, the
    cold items in slots get NaN (the ranker did not place them)."""
    if every < 1 or len(cold) == 0:
        n = len(items) if length is None else min(length, len(items))
        return items[:n], scores[:n].astype(np.float64)
    out, src = _walk(items, cold, every, length, after)
    sc = np.full(len(out), np.nan)
    sc[src >= 0] = scores[src[src >= 0]]
    return out, sc


def cold_needed(length: int, every: int, after: int = 0) -> int:
    """Cold items to rank for the slots of a list of `length` places: one per slot,
    and as many again as places, for those the ranker already placed (skipped)."""
    slots = n_slots(length, every, after)
    return slots + length if slots else 0


class ColdPool:
    """The items without interactions with their text vectors gathered, transposed and
    widened to float64 once: `rows` orders them for a chunk of users (`cold_order`),
    `order` for one user less the items they have met (a request), the same way."""

    def __init__(self, pool: np.ndarray, text_vectors: np.ndarray) -> None:
        self.items = np.asarray(pool, dtype=np.int64)
        self.tv = np.ascontiguousarray(text_vectors[self.items].T, dtype=np.float64)

    def __len__(self) -> int:
        return len(self.items)

    def scores(self, user_vectors: np.ndarray) -> np.ndarray:
        """[U, len(pool)] float32. Float64 products rounded to float32: the float32
        product's last bit depends on how many users are multiplied at once (one
        online, many offline), which would break ties between equal scores
        differently in the two paths."""
        return (user_vectors.astype(np.float64) @ self.tv).astype(np.float32)

    def rows(self, user_vectors: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Each user's best `n` items, best first: (items [U, n'], scores [U, n']) with
        n' = min(n, len(pool)); ties go to the lower item index."""
        pool = self.items
        n = min(n, len(pool))
        items = np.zeros((len(user_vectors), max(n, 0)), dtype=np.int64)
        scores = np.zeros((len(user_vectors), max(n, 0)), dtype=np.float32)
        if n <= 0:
            return items, scores
        step = max(1, (1 << 21) // len(pool))  # users per chunk: about 16 MB of scores
        for a in range(0, len(user_vectors), step):
            S = self.scores(user_vectors[a : a + step])
            order = np.lexsort((np.broadcast_to(pool, S.shape), -S), axis=1)[:, :n]
            items[a : a + step] = pool[order]
            scores[a : a + step] = np.take_along_axis(S, order, axis=1)
        return items, scores

    def order(self, user_vector: np.ndarray, n: int, seen: np.ndarray | None = None) -> np.ndarray:
        """One user's best `n` items not in `seen`, best first (`rows` of the pool less
        `seen`, without gathering its vectors again)."""
        S = self.scores(user_vector.reshape(1, -1))[0]
        items = self.items
        if seen is not None and len(seen):
            keep = ~np.isin(items, seen)
            S, items = S[keep], items[keep]
        return items[np.lexsort((items, -S))[: max(0, min(n, len(items)))]]


def merge_ranked(
    items: np.ndarray,
    scores: np.ndarray,
    user_vector: np.ndarray,
    pool: ColdPool,
    every: int,
    seen: np.ndarray | None = None,
    after: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """One user's whole ranked list (items, scores) with the new-item slots merged in:
    the online form of what `Pipeline.recommend_indices` does for a k-long list (its
    first k places are the same). `seen` items are left out of the pool."""
    if every < 1 or len(pool) == 0:
        return items, scores
    # as long as the ranked list with its slots, and a few cold items after it where
    # it is short; each of its first k places is that of a k-long list offline
    length = len(items) + len(items) // max(every - 1, 1) + 1
    cold = pool.order(user_vector, max(cold_needed(length, every, after), 1), seen)
    return merge(items, scores, cold, every, length, after)
