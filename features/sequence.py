"""Sequence-aware features: does the candidate follow the user's last items?"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from features.batch import Candidates, Histories


def transitions(users: np.ndarray, items: np.ndarray, n_items: int, max_gap: int) -> sp.csr_matrix:
    """[n_items, n_items] float64: item b followed item a within `max_gap` steps of the
    same user's history, each occurrence weighted 1/gap. Events sorted by (user, time).

    Built one gap at a time, so memory stays at a few arrays the size of the events."""
    u = np.asarray(users)
    i = np.asarray(items).astype(np.int64)
    out = sp.csr_matrix((n_items, n_items), dtype=np.float64)
    for g in range(1, max_gap + 1):
        if len(i) <= g:
            break
        ok = (u[:-g] == u[g:]) & (i[:-g] != i[g:])
        prev, nxt = i[:-g][ok], i[g:][ok]
        m = sp.csr_matrix((np.full(len(prev), 1.0 / g), (prev, nxt)), shape=(n_items, n_items))
        m.sum_duplicates()
        out = out + m
    out.sum_duplicates()
    out.sort_indices()
    return out


SEQ_COLUMNS = (
    "seq_follow",
    "seq_follow_norm",
    "seq_follow_last",
    "seq_follow_nearest",
    "seq_precede",
)


class Transitions:
    """`transitions` as CSR, and its transpose: the weights from one item to a set of
    items (or from a set to it) are a binary search in one short sorted row."""

    def __init__(self, trans: sp.csr_matrix) -> None:
        trans = trans.tocsr()
        trans.sum_duplicates()  # also sorts each row's indices
        self.fwd = trans.astype(np.float64)
        self.back = self.fwd.T.tocsr()
        self.back.sum_duplicates()
        self.n_items = trans.shape[0]

    @staticmethod
    def _row(m: sp.csr_matrix, item: int, items: np.ndarray) -> np.ndarray:
        lo, hi = m.indptr[item], m.indptr[item + 1]
        cols = m.indices[lo:hi]
        out = np.zeros(len(items))
        if hi == lo or len(items) == 0:
            return out
        if hi - lo < len(items):  # search the shorter of the two sorted lists in the other
            at = np.minimum(np.searchsorted(items, cols), len(items) - 1)
            hit = items[at] == cols
            out[at[hit]] = m.data[lo:hi][hit]
        else:
            at = np.minimum(np.searchsorted(cols, items), hi - lo - 1)
            hit = cols[at] == items
            out[hit] = m.data[lo:hi][at[hit]]
        return out

    def following(self, prev: int, items: np.ndarray) -> np.ndarray:
        """Weights of prev -> each of `items` (sorted)."""
        return self._row(self.fwd, prev, items)

    def preceding(self, nxt: int, items: np.ndarray) -> np.ndarray:
        """Weights of each of `items` (sorted) -> nxt."""
        return self._row(self.back, nxt, items)


def sequence_follow(
    trans: Transitions,
    occurrences: np.ndarray,
    h: Histories,
    c: Candidates,
    *,
    last_n: int = 10,
    decay: float = 0.8,
) -> dict[str, np.ndarray]:
    """How strongly each candidate follows the user's last items in everyone's histories.

    trans: the `transitions` of the fitted state; occurrences: events per item there.
    seq_follow: recency-weighted (decay**j for the j-th most recent of the last
    `last_n` items) sum of transition weights from the last items;
    seq_follow_norm: the same, each normalised by how often that last item occurs;
    seq_follow_last: transition weight from the most recent item alone;
    seq_follow_nearest: the position of the most recent item the candidate follows
    (`last_n` when none); seq_precede: the reverse direction (the candidate tends to
    come *before* them).

    Per user, each last item's row is searched for the candidates (sorted), so the
    cost follows the candidates and the last items, not how many items follow a
    popular one."""
    n = len(c)
    out = {k: np.zeros(n) for k in SEQ_COLUMNS}
    out["seq_follow_nearest"][:] = last_n
    lptr, last = h.last(last_n)
    for r in range(len(h)):
        a, b = c.ptr[r], c.ptr[r + 1]
        prev = last[lptr[r] : lptr[r + 1]]
        if b == a or len(prev) == 0:
            continue
        cands = c.items[a:b]
        F = np.stack([trans.following(int(p), cands) for p in prev.tolist()])
        B = np.stack([trans.preceding(int(p), cands) for p in prev.tolist()])
        w = decay ** np.arange(len(prev), dtype=np.float64)
        occ = occurrences[prev].astype(np.float64)
        wn = np.divide(
            w, occ, out=np.zeros_like(w), where=occ > 0
        )  # an unseen item follows nothing
        out["seq_follow"][a:b] = w @ F
        out["seq_follow_norm"][a:b] = wn @ F
        out["seq_follow_last"][a:b] = F[0]
        present = F != 0
        out["seq_follow_nearest"][a:b] = np.where(
            present.any(axis=0), present.argmax(axis=0), last_n
        )
        out["seq_precede"][a:b] = w @ B
    return out
