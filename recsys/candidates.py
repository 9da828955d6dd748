"""Candidate generators: one small class per source, all behind one interface.

Each source is fitted on a `History` (the events before a cutoff) and scores every
item for a chunk of users (`features.batch.Histories`: their events, whoever they
are: the bundle's users, or a request's fresh history) as a dense row, so the same
object serves as a retrieval stage (top-N of its row), as a ranker feature (its score
for any candidate) and as an evaluation baseline (top-k of its row).

`candidates` takes each source's top-N unseen items for a chunk of users and returns
their union with every source's score and rank: the batch job calls it with a chunk
whose size a memory budget sets, a request with a chunk of one.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import polars as pl
import scipy.sparse as sp

from features.batch import (
    Candidates,
    EndTimeMemo,
    Histories,
    gather_rows,
    lookup,
    segment_index,
    segment_offsets,
)
from features.lm import candidate_rank
from recsys.data import I, T, U, user_item_matrix

log = logging.getLogger("recsys")


@dataclass
class History:
    """Everything before the cutoff, in the forms the sources need."""

    ev: pl.DataFrame  # internal events (u, i, t), sorted by (u, t)
    n_users: int
    n_items: int
    now: int | None = None  # the cutoff; defaults to the last event time
    X: sp.csr_matrix = field(init=False)  # users x items, binary
    user_last_t: np.ndarray = field(init=False)  # -1 for users without history
    # each user's events as CSR-like arrays over `ev` (user u: ptr[u]:ptr[u + 1])
    ptr: np.ndarray = field(init=False)
    items: np.ndarray = field(init=False)
    times: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.X = user_item_matrix(self.ev, self.n_users, self.n_items, binary=True)
        u = self.ev[U].to_numpy()
        self.items = self.ev[I].to_numpy().astype(np.int64)
        self.times = self.ev[T].to_numpy().astype(np.int64)
        self.ptr = np.searchsorted(u, np.arange(self.n_users + 1), side="left").astype(np.int64)
        self.user_last_t = np.full(self.n_users, -1, dtype=np.int64)
        has = np.diff(self.ptr) > 0
        self.user_last_t[has] = self.times[self.ptr[1:][has] - 1]
        if self.now is None:
            self.now = int(self.times.max()) if len(self.times) else 0

    @classmethod
    def before(cls, ev: pl.DataFrame, cutoff: int, n_users: int, n_items: int) -> History:
        """The state at `cutoff` (epoch seconds): only events strictly before it."""
        return cls(ev.filter(pl.col(T) < cutoff), n_users, n_items, now=cutoff)

    def histories(self, users: np.ndarray) -> Histories:
        """The events of `users` (user indices; -1: none) as a chunk."""
        users = np.asarray(users, dtype=np.int64)
        known = users >= 0
        lo = np.where(known, self.ptr[np.maximum(users, 0)], 0)
        hi = np.where(known, self.ptr[np.maximum(users, 0) + 1], 0)
        lens = hi - lo
        ptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        at = np.repeat(lo - ptr[:-1], lens) + np.arange(int(ptr[-1]))
        return Histories(ptr, self.items[at], self.times[at], users, np.zeros(len(users), bool))

    def last_items(self, users: np.ndarray, n: int) -> list[np.ndarray]:
        """Each user's last `n` items, most recent first."""
        return self.histories(users).last_list(n)


class Source(Protocol):
    name: str

    def fit(self, h: History) -> Source: ...

    def scores(self, b: Histories, n_items: int) -> np.ndarray:
        """Dense [len(b), n_items] float32 scores; higher is better."""
        ...

    def state(self) -> dict[str, np.ndarray]:
        """Learned arrays, for the bundle."""
        ...

    def load_state(self, state: dict[str, np.ndarray], h: History) -> Source:
        """Restore from `state()` (sources that are cheap to fit refit from `h`)."""
        ...


class MostPopular:
    """Interaction counts over the whole history (the MostPop baseline)."""

    name = "pop"

    def fit(self, h: History) -> MostPopular:
        self.counts_ = np.bincount(h.items, minlength=h.n_items).astype(np.float32)
        self.order_ = np.argsort(-self.counts_, kind="stable")
        return self

    def scores(self, b: Histories, n_items: int) -> np.ndarray:
        return np.broadcast_to(self.counts_, (len(b), n_items)).copy()

    def rows(self, b: Histories, n_items: int) -> OrderRows:
        return OrderRows(self.counts_, self.order_[self.order_ < n_items], len(b))

    def state(self) -> dict[str, np.ndarray]:
        return {}  # cheap: refitted from the history on load

    def load_state(self, state: dict[str, np.ndarray], h: History) -> MostPopular:
        return self.fit(h)


class RecentPopular:
    """Counts in the `window_days` before each user's own last event: what was being
    consumed around the time the user was last active, not around the global end.

    A row is a difference of two cumulative counts; these are kept at checkpoints
    (every `step_` events in time order, within `checkpoint_bytes`), so a row costs
    at most two short counts and a subtraction whatever the window holds."""

    name = "recent_pop"

    def __init__(self, window_days: float = 14.0, checkpoint_bytes: int = 256 << 20) -> None:
        self.window_days = window_days
        self.checkpoint_bytes = checkpoint_bytes

    def fit(self, h: History) -> RecentPopular:
        order = np.argsort(h.times, kind="stable")
        self.t_sorted_ = h.times[order]
        self.i_sorted_ = h.items[order].astype(np.int32)
        self.now_ = int(h.now or 0)
        self._cum: np.ndarray | None = None
        # one user's rows by window (`rows`): requests share windows; a refit starts afresh
        self._memo: EndTimeMemo[DenseRows | SparseRows] = EndTimeMemo(size=8)
        return self

    def _checkpoints(self, n_items: int) -> tuple[np.ndarray, int]:
        n = len(self.t_sorted_)
        if self._cum is None or self._cum.shape[1] != n_items:
            per = max(1, n_items * 4)
            k = max(1, min(n // 4 + 1, self.checkpoint_bytes // per))
            step = max(1024, -(-n // k))
            cum = np.zeros((n // step + 1, n_items), dtype=np.int32)
            for j in range(1, len(cum)):
                cum[j] = cum[j - 1] + np.bincount(
                    self.i_sorted_[(j - 1) * step : j * step], minlength=n_items
                )
            self._cum, self._step = cum, step
        return self._cum, self._step

    def _bounds(self, t_end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each window's events: positions lo:hi in time order."""
        w = int(self.window_days * 86400)
        t_end = np.asarray(t_end, dtype=np.int64)
        hi = np.searchsorted(self.t_sorted_, t_end, side="right")
        lo = np.searchsorted(self.t_sorted_, t_end - w, side="left")
        return lo.astype(np.int64), hi.astype(np.int64)

    def _dense(self, lo: np.ndarray, hi: np.ndarray, n_items: int) -> np.ndarray:
        """[len(lo), n_items] float32 counts: checkpoint differences, corrected by the
        events between each bound and its checkpoint."""
        cum, step = self._checkpoints(n_items)
        a, b = lo // step, hi // step
        out = cum[b] - cum[a]
        flat = out.reshape(-1)
        ii = self.i_sorted_
        for sign, start, end in ((1, b * step, hi), (-1, a * step, lo)):
            bounds = zip(start.tolist(), end.tolist(), strict=True)
            segs = [r * n_items + ii[s:e].astype(np.int64) for r, (s, e) in enumerate(bounds)]
            if segs:
                np.add.at(flat, np.concatenate(segs), np.int32(sign))
        return out.astype(np.float32)

    def _sparse(self, lo: np.ndarray, hi: np.ndarray, n_items: int) -> sp.csr_matrix:
        """The same counts as a CSR matrix, counted directly in each window."""
        parts = [np.unique(self.i_sorted_[s:e], return_counts=True)
                 for s, e in zip(lo.tolist(), hi.tolist(), strict=True)]  # fmt: skip
        ptr = np.concatenate([[0], np.cumsum([len(p[0]) for p in parts])]).astype(np.int64)
        items = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
        counts = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.float32)
        return sp.csr_matrix(
            (counts.astype(np.float32), items.astype(np.int64), ptr), shape=(len(parts), n_items)
        )

    def counts_at(self, t_end: np.ndarray, n_items: int) -> np.ndarray:
        lo, hi = self._bounds(t_end)
        if len(lo) and (hi - lo).mean() > n_items / 8:
            return self._dense(lo, hi, n_items)
        return self._sparse(lo, hi, n_items).toarray()

    def _t_end(self, b: Histories) -> np.ndarray:
        t_end = b.last_t
        t_end[t_end < 0] = self.now_
        return t_end

    def scores(self, b: Histories, n_items: int) -> np.ndarray:
        return self.counts_at(self._t_end(b), n_items)

    def rows(self, b: Histories, n_items: int) -> SparseRows | DenseRows:
        """Dense rows where the windows hold more events than an eighth of the items
        (most items then have a count), else sparse ones."""
        lo, hi = self._bounds(self._t_end(b))
        if len(lo) == 1:  # a request: its window's counts are likely another's too
            key = (int(lo[0]), int(hi[0]), n_items)
            r = self._memo.get(key, lambda: self._rows(lo, hi, n_items))
            assert r is not None  # computed at the first request
            # top_lists marks a dense row's seen items: each request its own copy
            return DenseRows(r.S.copy(), finite=True) if isinstance(r, DenseRows) else r
        return self._rows(lo, hi, n_items)

    def _rows(self, lo: np.ndarray, hi: np.ndarray, n_items: int) -> DenseRows | SparseRows:
        if len(lo) and (hi - lo).mean() > n_items / 8:
            return DenseRows(self._dense(lo, hi, n_items), finite=True)
        return SparseRows(self._sparse(lo, hi, n_items))

    def state(self) -> dict[str, np.ndarray]:
        return {}  # cheap: refitted from the history on load

    def load_state(self, state: dict[str, np.ndarray], h: History) -> RecentPopular:
        return self.fit(h)


class ItemKNN:
    """Item-item cosine similarity, `k` neighbours kept per item (0 keeps all).

    The co-occurrence counts are computed a block of items at a time and cut to each
    item's `k` neighbours before the next block, so memory follows the kept
    neighbours, not the full item x item product."""

    name = "itemknn"

    def __init__(self, k: int = 100, shrink: float = 0.0, block_nnz: int = 20_000_000) -> None:
        self.k = k
        self.shrink = shrink
        self.block_nnz = block_nnz

    def fit(self, h: History) -> ItemKNN:
        X = h.X.astype(np.float32)
        Xc = X.tocsc()
        norms = np.sqrt(np.asarray(X.multiply(X).sum(axis=0)).ravel())
        # work per item: the events of its users (what its row of X'X costs)
        user_len = np.diff(X.indptr).astype(np.int64)
        cs = np.concatenate([[0], np.cumsum(user_len[Xc.indices])])
        cost = cs[Xc.indptr[1:]] - cs[Xc.indptr[:-1]]
        blocks = _blocks(cost, self.block_nnz)
        parts = []
        for a, b in blocks:
            G = (Xc[:, a:b].T @ X).tocoo()
            keep = G.row + a != G.col  # no self-similarity
            r, c, g = G.row[keep], G.col[keep], G.data[keep]
            s = g / (norms[r + a] * norms[c] + self.shrink + 1e-9)
            S = sp.csr_matrix((s.astype(np.float32), (r, c)), shape=(b - a, h.n_items))
            parts.append(_keep_top_k_per_row(S, self.k) if self.k else S)
        self.sim_ = (
            sp.vstack(parts, format="csr")
            if parts
            else sp.csr_matrix((h.n_items, h.n_items), dtype=np.float32)
        )
        return self

    @property
    def sim_t(self) -> sp.csr_matrix:
        """The similarity's transpose as CSR (what a users x items product multiplies)."""
        c = getattr(self, "_sim_t", None)
        if c is None or c[0] is not self.sim_:
            c = self._sim_t = (self.sim_, self.sim_.T.tocsr())
        return c[1]

    def rows(self, b: Histories, n_items: int) -> SparseRows:
        seen = b.seen(n_items)
        if len(b) == 1:
            return SparseRows(row_product(seen.indices, None, self.sim_t))
        return SparseRows(seen @ self.sim_t)

    def scores(self, b: Histories, n_items: int) -> np.ndarray:
        return self.rows(b, n_items).dense()

    def state(self) -> dict[str, np.ndarray]:
        return _csr_state(self.sim_, "sim")

    def load_state(self, state: dict[str, np.ndarray], h: History) -> ItemKNN:
        self.sim_ = _csr_from_state(state, "sim")
        return self


class EASE:
    """EASE (Steck 2019): a closed-form item-item linear model, on at most `max_items`
    most popular items (others score -inf from this source).

    The Gram matrix is built dense a block of columns at a time, inverted in place
    (Cholesky), and each column cut to its `keep` largest weights a block at a time:
    memory is one max_items x max_items array."""

    name = "ease"

    def __init__(
        self, l2: float = 200.0, max_items: int = 20_000, keep: int = 0, double: bool = False
    ) -> None:
        self.l2 = l2
        self.max_items = max_items
        self.keep = keep
        self.double = double  # float64 inversion: twice the time, for reference numbers

    def fit(self, h: History) -> EASE:
        counts = np.asarray(h.X.sum(axis=0)).ravel()
        keep = np.flatnonzero(counts > 0)
        if len(keep) > self.max_items:
            keep = keep[np.argsort(-counts[keep], kind="stable")[: self.max_items]]
            keep.sort()
        self.items_ = keep
        self.n_items_ = h.n_items
        dtype = np.float64 if self.double else np.float32
        Xk = h.X[:, keep].astype(dtype).tocsc()
        m = len(keep)
        XkT = Xk.T.tocsr()
        # G in Fortran order: LAPACK factors and inverts it in place
        G = np.zeros((m, m), dtype=dtype, order="F")
        step = max(1, (64 << 20) // max(m * 8, 1))
        for a in range(0, m, step):
            G[:, a : a + step] = (XkT @ Xk[:, a : a + step]).toarray()
        G[np.diag_indices_from(G)] += self.l2
        P = _spd_inverse_inplace(G)
        diag = np.diag(P).copy()
        if self.keep and self.keep < m:
            # the largest weights of each column carry the score; the rest is noise
            self.B_ = _top_weights_per_column(P, diag, self.keep)
        else:
            P /= -diag[None, :]
            P[np.diag_indices_from(P)] = 0.0
            self.B_ = np.ascontiguousarray(P, dtype=np.float32)
        return self

    def rows(self, b: Histories, n_items: int) -> SparseRows | DenseRows:
        pos = self._positions(n_items)
        seen = b.seen(n_items)
        p = pos[seen.indices]
        ok = p >= 0
        if len(b) == 1 and sp.issparse(self.B_):
            # a row's positions ascend with its items, and back (`items_` is sorted)
            r = row_product(p[ok], None, self.B_)
            return SparseRows(OneRow(self.items_[r.indices], r.data, n_items), self.items_)
        rows = segment_index(seen.indptr.astype(np.int64))
        # built as CSR: each row's positions ascend with its items (`items_` is sorted)
        Xu = sp.csr_matrix(
            (np.ones(int(ok.sum()), np.float32), p[ok].astype(np.int32),
             np.concatenate([[0], np.cumsum(np.bincount(rows[ok], minlength=len(b)))])
             .astype(np.int32)),
            shape=(len(b), len(self.items_)),
        )  # fmt: skip
        s = Xu @ self.B_
        if sp.issparse(s):
            s = canonical_rows(s)
            # columns back to item indices (ascending, as `items_` is)
            S = sp.csr_matrix((s.data, self.items_[s.indices], s.indptr), shape=(len(b), n_items))
            S.has_sorted_indices = S.has_canonical_format = True  # as `s` is: no second pass
            return SparseRows(S, eligible=self.items_)
        out = np.full((len(b), n_items), -np.inf, dtype=np.float32)
        out[:, self.items_] = np.asarray(s, dtype=np.float32)
        return DenseRows(out)

    def _positions(self, n_items: int) -> np.ndarray:
        """[n_items] each item's column in the model (-1: not modelled), kept."""
        c = getattr(self, "_pos", None)
        if c is None or c[0] is not self.items_ or len(c[1]) != n_items:
            pos = np.full(n_items, -1, dtype=np.int64)
            pos[self.items_] = np.arange(len(self.items_))
            c = self._pos = (self.items_, pos)
        return c[1]

    def scores(self, b: Histories, n_items: int) -> np.ndarray:
        r = self.rows(b, n_items)
        return r.dense() if isinstance(r, SparseRows) else r.S

    def state(self) -> dict[str, np.ndarray]:
        st = {"items": self.items_.astype(np.int64)}
        if sp.issparse(self.B_):
            st |= _csr_state(self.B_, "B")
        else:
            st["B"] = self.B_
        return st

    def load_state(self, state: dict[str, np.ndarray], h: History) -> EASE:
        self.items_ = state["items"]
        self.B_ = state["B"] if "B" in state else _csr_from_state(state, "B")
        return self


class ALS:
    """Implicit-feedback matrix factorisation (the `implicit` library's ALS).

    A user the model has no factor for, or whose history has grown since the fit,
    gets the ALS least-squares solution against the fixed item factors."""

    name = "als"
    finite_scores = True  # products of finite factors

    def __init__(
        self,
        factors: int = 64,
        regularization: float = 0.05,
        alpha: float = 2.0,
        iterations: int = 15,
        seed: int = 0,
    ) -> None:
        self.factors = factors
        self.regularization = regularization
        self.alpha = alpha
        self.iterations = iterations
        self.seed = seed

    def fit(self, h: History) -> ALS:
        from implicit.cpu.als import AlternatingLeastSquares
        from threadpoolctl import threadpool_limits

        # one thread: implicit's multithreaded solver is not reproducible run to run
        with threadpool_limits(1, "blas"), warnings.catch_warnings():
            # the BLAS pool is limited right here; implicit's check (in the constructor
            # and in fit) looks at the global one
            warnings.filterwarnings("ignore", message="OpenBLAS is configured")
            model = AlternatingLeastSquares(
                factors=self.factors,
                regularization=self.regularization,
                alpha=self.alpha,
                iterations=self.iterations,
                random_state=self.seed,
                num_threads=1,
            )
            model.fit(h.X.astype(np.float32), show_progress=False)
        self.user_factors_ = np.asarray(model.user_factors, dtype=np.float32)
        self.item_factors_ = np.asarray(model.item_factors, dtype=np.float32)
        return self

    def user_factors(self, b: Histories, n_items: int) -> np.ndarray:
        """[len(b), factors] float32: the fitted factor of a known user with no fresh
        events, else the least-squares solution against the item factors."""
        Y = self.item_factors_
        out = np.zeros((len(b), Y.shape[1]), dtype=np.float32)
        fitted = (b.users >= 0) & (b.users < len(self.user_factors_)) & ~b.fresh
        out[fitted] = self.user_factors_[b.users[fitted]]
        solve = np.flatnonzero(~fitted & (b.lengths > 0))
        if len(solve):
            cache = getattr(self, "_yty", None)
            if cache is None or cache[0] is not Y:
                Y64 = Y.astype(np.float64)
                cache = self._yty = (Y, Y64.T @ Y64)
            YtY = cache[1]
            seen = b.seen(n_items)  # the chunk's (shared with the other sources)
            for r in solve.tolist():
                items = seen.indices[seen.indptr[r] : seen.indptr[r + 1]]
                Yu = Y[items].astype(np.float64)
                A = YtY + self.alpha * (Yu.T @ Yu)
                A[np.diag_indices_from(A)] += self.regularization
                rhs = (1.0 + self.alpha) * Yu.sum(axis=0)
                out[r] = np.linalg.solve(A, rhs).astype(np.float32)
        return out

    def rows(self, b: Histories, n_items: int) -> ProductRows:
        """User factors against item factors, the same for one user as in a chunk."""
        Y = ItemMatrix.cached(self, self.item_factors_)
        return ProductRows(self.user_factors(b, n_items), Y, n_items)

    def scores(self, b: Histories, n_items: int) -> np.ndarray:
        return self.rows(b, n_items).dense()

    def state(self) -> dict[str, np.ndarray]:
        return {"user_factors": self.user_factors_, "item_factors": self.item_factors_}

    def load_state(self, state: dict[str, np.ndarray], h: History) -> ALS:
        self.user_factors_ = state["user_factors"]
        self.item_factors_ = state["item_factors"]
        return self


class NextItem:
    """What follows the user's last items in everyone's histories.

    Transition weights count item b following item a within `max_gap` steps (1/gap each),
    normalised by how often a occurs; a user's score sums the rows of their last
    `last_n` items, weighted `decay**j` for the j-th most recent. Each item keeps its
    `keep` strongest successors (0: all), so a user's row costs at most
    `last_n * keep` entries however popular their last items are.
    """

    name = "next"

    def __init__(
        self, max_gap: int = 5, last_n: int = 10, decay: float = 0.8, keep: int = 0
    ) -> None:
        self.max_gap = max_gap
        self.last_n = last_n
        self.decay = decay
        self.keep = keep

    def fit(self, h: History) -> NextItem:
        from features.sequence import transitions

        M = transitions(h.ev[U].to_numpy(), h.items, h.n_items, self.max_gap).astype(np.float32)
        occ = np.bincount(h.items, minlength=h.n_items).astype(np.float32)
        self.trans_ = (sp.diags(1.0 / np.maximum(occ, 1.0)) @ M).tocsr()
        if self.keep:
            self.trans_ = _keep_top_k_per_row(self.trans_, self.keep)
        return self

    def rows(self, b: Histories, n_items: int) -> SparseRows:
        ptr, last = b.last(self.last_n)
        w = (self.decay ** segment_offsets(ptr).astype(np.float64)).astype(np.float32)
        if len(b) == 1:
            o = np.argsort(last, kind="stable")
            if len(o) < 2 or bool((np.diff(last[o]) > 0).all()):  # distinct: nothing to sum
                return SparseRows(row_product(last[o], w[o], self.trans_))
        W = sp.csr_matrix((w, (segment_index(ptr), last)), shape=(len(b), n_items))
        return SparseRows(W @ self.trans_)

    def scores(self, b: Histories, n_items: int) -> np.ndarray:
        return self.rows(b, n_items).dense()

    def state(self) -> dict[str, np.ndarray]:
        return _csr_state(self.trans_, "trans")

    def load_state(self, state: dict[str, np.ndarray], h: History) -> NextItem:
        self.trans_ = _csr_from_state(state, "trans")
        return self


def _csr_state(m: sp.spmatrix, name: str) -> dict[str, np.ndarray]:
    m = sp.csr_matrix(m)
    return {
        f"{name}.indptr": m.indptr.astype(np.int64),
        f"{name}.indices": m.indices.astype(np.int64),
        f"{name}.data": m.data.astype(np.float32),
        f"{name}.shape": np.asarray(m.shape, dtype=np.int64),
    }


def _csr_from_state(state: dict[str, np.ndarray], name: str) -> sp.csr_matrix:
    shape = tuple(int(x) for x in state[f"{name}.shape"])
    return sp.csr_matrix(
        (state[f"{name}.data"], state[f"{name}.indices"], state[f"{name}.indptr"]), shape=shape
    )


def _spd_inverse_inplace(G: np.ndarray) -> np.ndarray:
    """Inverse of a symmetric positive definite matrix through its Cholesky factor,
    in G's own memory where LAPACK allows it (G in Fortran order)."""
    from scipy.linalg import lapack

    potrf, potri = (
        (lapack.spotrf, lapack.spotri) if G.dtype == np.float32 else (lapack.dpotrf, lapack.dpotri)
    )
    c, info = potrf(G, lower=True, overwrite_a=True, clean=False)
    if info != 0:
        return np.asfortranarray(np.linalg.inv(G))
    inv, info = potri(c, lower=True, overwrite_c=True)
    if info != 0:
        return np.asfortranarray(np.linalg.inv(G))
    # the inverse is in the lower triangle: mirror it into the upper, a block at a time
    m = len(inv)
    step = 1024
    for a in range(0, m, step):
        b = min(a + step, m)
        d = inv[a:b, a:b]
        d[np.triu_indices(b - a, 1)] = d.T[np.triu_indices(b - a, 1)]
        inv[:a, a:b] = inv[a:b, :a].T
    return inv


def _top_weights_per_column(P: np.ndarray, diag: np.ndarray, keep: int) -> sp.csr_matrix:
    """EASE's B = P / -diag(P) (zero diagonal), each column cut to its `keep` largest
    weights by magnitude, as a sparse [m, m] float32 matrix; a block of columns at a
    time, so no second dense m x m array is made."""
    m = len(P)
    rows_out, cols_out, vals_out = [], [], []
    step = max(1, (32 << 20) // max(m * 8, 1))
    for a in range(0, m, step):
        b = min(a + step, m)
        B = P[:, a:b] / -diag[a:b][None, :]
        B[np.arange(a, b), np.arange(b - a)] = 0.0
        top = np.argpartition(-np.abs(B), keep - 1, axis=0)[:keep]
        vals = np.take_along_axis(B, top, axis=0)
        cols = np.broadcast_to(np.arange(a, b), top.shape)
        nz = vals != 0
        rows_out.append(top[nz])
        cols_out.append(cols[nz])
        vals_out.append(vals[nz].astype(np.float32))
    return sp.csr_matrix(
        (np.concatenate(vals_out), (np.concatenate(rows_out), np.concatenate(cols_out))),
        shape=(m, m),
    )


def _blocks(cost: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Consecutive ranges of rows whose summed cost stays within `budget` (a row
    above it alone makes its own range)."""
    out, a, acc = [], 0, 0
    for j, c in enumerate(cost.tolist()):
        if acc and acc + c > budget:
            out.append((a, j))
            a, acc = j, 0
        acc += c
    if a < len(cost):
        out.append((a, len(cost)))
    return out


def _keep_top_k_per_row(S: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """Keep the k largest entries of each row (ties: the lower column index)."""
    S = S.tocsr()
    S.sum_duplicates()
    rows = segment_index(S.indptr.astype(np.int64))
    o = np.lexsort((S.indices, -S.data, rows))
    rank = segment_offsets(S.indptr.astype(np.int64))
    keep = o[rank < k]  # rank within the row after the sort
    out = sp.csr_matrix(
        (S.data[keep].astype(np.float32), (rows[keep], S.indices[keep])), shape=S.shape
    )
    out.sort_indices()
    return out


def _absent(a: np.ndarray, sorted_b: np.ndarray) -> np.ndarray:
    """Which elements of `a` are not in `sorted_b` (ascending): `~np.isin` for a short
    sorted set, without isin's per-call overhead (this runs per user and source)."""
    if len(sorted_b) == 0:
        return np.ones(len(a), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_b, a), len(sorted_b) - 1)
    return sorted_b[at] != a


def _best(items: np.ndarray, vals: np.ndarray, n: int) -> np.ndarray:
    """The `n` items of highest value, by value descending, ties by item ascending."""
    if n <= 0:
        return items[:0]
    if len(vals) > n:
        kth = -np.partition(-vals, n - 1)[n - 1]
        above = vals > kth
        tied = np.flatnonzero(vals == kth)
        tied = tied[np.argsort(items[tied], kind="stable")][: n - int(above.sum())]
        sel = np.concatenate([np.flatnonzero(above), tied])
        items, vals = items[sel], vals[sel]
    return items[np.lexsort((items, -vals))]


def _pack(lists: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-row arrays as (ptr, concatenated items)."""
    lens = [len(x) for x in lists]
    ptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    items = np.concatenate(lists).astype(np.int64) if lists else np.zeros(0, np.int64)
    return ptr, items


def top_lists(
    S: np.ndarray, seen: sp.csr_matrix, n: int, finite: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's top-n items, never an item in its row of `seen`, nor one without a
    finite score: by score descending, ties by item index ascending, as (ptr, items).
    `S` is modified in place (seen and non-finite entries become -inf).

    No full sort or selection of a row: a lower bound of each row's n-th score (the
    n-th largest of the maxima of disjoint groups of its items) leaves the items above
    it (about n), which are sorted; a row with fewer than n items above the bound
    takes the items at the bound (its n-th score then) in index order."""
    if not finite:  # (`finite`: the caller knows there is nothing to replace)
        S[~np.isfinite(S)] = -np.inf
    r = segment_index(seen.indptr.astype(np.int64))
    S[r, seen.indices] = -np.inf
    n = min(n, S.shape[1])
    if n == 0 or len(S) == 0:
        return np.zeros(len(S) + 1, np.int64), np.zeros(0, np.int64)
    B, m = S.shape
    bound = _nth_lower_bound(S, n)
    flat = np.flatnonzero(np.greater(S, bound[:, None]))
    rows, cols = flat // m, flat % m
    above = np.bincount(rows, minlength=B)
    # fewer than n above the bound: the n-th score is the bound; its first items by index
    short = np.flatnonzero((above < n) & (bound > -np.inf)).tolist()
    if short:
        tie_cols = [np.flatnonzero(S[j] == bound[j])[: n - above[j]] for j in short]
        tie_rows = np.repeat(np.array(short, dtype=np.int64), [len(t) for t in tie_cols])
        rows = np.concatenate([rows, tie_rows])
        cols = np.concatenate([cols, *tie_cols])
    o = _by_row_then_score(rows, S[rows, cols])  # (rows, cols) come ascending
    rows, cols = rows[o], cols[o]
    counts = np.bincount(rows, minlength=B)
    ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    keep = segment_offsets(ptr) < n
    counts = np.minimum(counts, n)
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), cols[keep].astype(np.int64)


def _nth_lower_bound(S: np.ndarray, n: int) -> np.ndarray:
    """A lower bound of each row's n-th largest value (1 <= n <= columns): the n-th
    largest of the maxima of disjoint groups of the row's columns. The row is halved
    while at least 2n groups stay (the halves' maxima are maxima of disjoint groups; a
    dropped odd column only loosens the bound), so no full row is selected or sorted."""
    M = S
    while M.shape[1] // 2 >= 2 * n:
        h = M.shape[1] // 2
        M = np.maximum(M[:, :h], M[:, h : 2 * h])
    w = M.shape[1]
    return np.partition(M, w - n, axis=1)[:, w - n]


def _by_row_then_score(rows: np.ndarray, vals: np.ndarray) -> np.ndarray:
    """The stable order by row, then value descending (pairs given in (row, item)
    order keep it among equal values); values finite."""
    if vals.dtype == np.float32 and len(rows) and rows[-1] < 2**31:
        # one sort of 64-bit keys: the row, then the value's order-preserving bits
        # inverted (+0.0 for -0.0 first: they are equal scores)
        v = (vals + np.float32(0)).view(np.uint32)
        asc = np.where(v >> 31 == 1, ~v, v | np.uint32(1 << 31))
        key = (rows.astype(np.uint64) << np.uint64(32)) | (~asc).astype(np.uint64)
        return np.argsort(key, kind="stable")
    o = np.argsort(-vals, kind="stable")
    return o[np.argsort(rows[o], kind="stable")]


def segment_top(vals: np.ndarray, ptr: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each segment's (a chunk row's pairs) best k positions into `vals`, by value
    descending, ties by position ascending, as (ptr, positions): `top_lists` of the
    segments laid out as dense rows (the order of a full sort, without one)."""
    lens = np.diff(ptr)
    B = len(lens)
    if not len(vals) or not np.isfinite(vals).all():  # a full sort keeps every value
        o = np.lexsort((np.arange(len(vals)), -vals, segment_index(ptr)))
        keep = segment_offsets(ptr) < k
        ptr_k = np.concatenate([[0], np.cumsum(np.minimum(lens, k))]).astype(np.int64)
        return ptr_k, o[keep]
    D = np.full((B, int(lens.max())), -np.inf, dtype=vals.dtype)
    D[segment_index(ptr), segment_offsets(ptr)] = vals
    tptr, pos = top_lists(D, sp.csr_matrix(D.shape, dtype=np.float32), k, finite=True)
    return tptr, pos + np.repeat(ptr[:-1], np.diff(tptr))


def top_n(scores: np.ndarray, seen: sp.csr_matrix, n: int) -> tuple[np.ndarray, np.ndarray]:
    """`top_lists` as a [rows, n] array of items (-1 beyond a row's eligible items)
    and their scores (-inf there); `scores` is left as it is."""
    S = np.array(scores, copy=True)
    ptr, items = top_lists(S, seen, n)
    n = min(n, S.shape[1])
    out = np.full((len(S), n), -1, dtype=np.int64)
    vals = np.full((len(S), n), -np.inf, dtype=S.dtype)
    rows = segment_index(ptr)
    pos = segment_offsets(ptr)
    out[rows, pos] = items
    vals[rows, pos] = S[rows, items]
    return out, vals


class DenseRows:
    """Scores as a dense [users, n_items] array (`finite`: no NaN or inf in it)."""

    def __init__(self, S: np.ndarray, finite: bool = False) -> None:
        self.S = S
        self.finite = finite

    def top(self, seen: sp.csr_matrix, n: int) -> tuple[np.ndarray, np.ndarray]:
        # seen and non-finite entries become -inf
        return top_lists(self.S, seen, n, finite=self.finite)

    def at(self, rows: np.ndarray, items: np.ndarray) -> np.ndarray:
        return self.S[rows, items]


class ItemMatrix:
    """Item vectors [items, d] (float32) as a product source multiplies them: their
    transpose (for BLAS), the rows (gathered and widened to float64 for exact scores:
    the same values as a float64 copy, at half the memory and half the bytes read),
    and the largest norm (for `ProductRows`' error bound)."""

    def __init__(self, V: np.ndarray) -> None:
        self.source = V
        self.V32 = np.ascontiguousarray(V, dtype=np.float32)
        self.Vt = np.ascontiguousarray(self.V32.T)
        norms = np.sqrt((self.V32.astype(np.float64) ** 2).sum(axis=1))  # (a passing copy)
        self.max_norm = float(norms.max(initial=0.0))
        self.finite = bool(np.isfinite(self.V32).all())
        self._norms = norms
        self._by_norm: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
        # whether a user's top can skip most items by their norms: the median norm is
        # under a tenth of the largest (ALS's factors; not unit text vectors)
        self.prunable = (
            self.finite and len(norms) >= 4096 and float(np.median(norms)) < 0.1 * self.max_norm
        )

    def by_norm(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(order, position of each item in it, norms in it, the transpose's columns in
        it): the items by norm descending, ties by index, made at a request's first
        use. The copy of the transpose costs as much memory again (5 MB for 20,000
        items and 64 factors); gathering its columns per request instead cost more
        than the full product."""
        if self._by_norm is None:
            order = np.argsort(-self._norms, kind="stable")
            where = np.empty_like(order)
            where[order] = np.arange(len(order))
            Vt = np.ascontiguousarray(self.Vt[:, order])
            self._by_norm = (order, where, self._norms[order], Vt)
        return self._by_norm

    @classmethod
    def cached(cls, owner: object, V: np.ndarray) -> ItemMatrix:
        """The matrix of `V`, kept on `owner` until it holds other vectors."""
        m = getattr(owner, "_item_matrix", None)
        if m is None or m.source is not V:
            m = cls(V)
            owner._item_matrix = m  # type: ignore[attr-defined]
        return m


def exact_products(U: np.ndarray, V: np.ndarray, rows: np.ndarray, items: np.ndarray) -> np.ndarray:
    """float32 [len(rows)]: U[rows] . V[items] in float64 (U float64; V's rows are
    widened to float64 when they are float32), each pair summed on its own (numpy's
    einsum loop over the d products, whose order depends on d alone), so a pair's
    score has the same bits whatever else is computed with it: a user alone as in a
    chunk. (A BLAS product's last bits depend on the kernel its shape picks, which
    would reorder near-equal scores.) Blocks of 1,024 pairs stay in the cache."""
    out = np.empty(len(rows), dtype=np.float32)
    if len(U) == 1:  # a request: its one row against each item, not gathered per pair
        u = U[0]
        for a in range(0, len(rows), 1024):
            out[a : a + 1024] = np.einsum("ij,j->i", V[items[a : a + 1024]], u, dtype=np.float64)
        return out
    for a in range(0, len(rows), 1024):
        Vb = V[items[a : a + 1024]].astype(np.float64, copy=False)
        out[a : a + 1024] = np.einsum("ij,ij->i", U[rows[a : a + 1024]], Vb)
    return out


class ProductRows:
    """Scores that are products of user and item vectors, `exact_products` of U and V.

    The top of each row comes from a float32 product with BLAS (a float64 one costs
    twice the time and memory traffic): it differs from the exact score by at most
    `err` = (d + 2) 2^-24 |u| max|v| (the bound of any summation order, with the final
    rounding), so every item of the exact top-n scores at least the row's n-th float32
    score less 2 err. Only those are scored exactly and ordered, so the top is the one
    `top_lists` gives on the exact scores, ties by item index included."""

    def __init__(self, U: np.ndarray, items: ItemMatrix, n_items: int) -> None:
        self.U = np.ascontiguousarray(U, dtype=np.float32)
        self.U64 = self.U.astype(np.float64)
        self.items = items
        self.n_items = min(n_items, len(items.V32))  # as a dense row's [:, :n_items]

    def exact(self, rows: np.ndarray, items: np.ndarray) -> np.ndarray:
        return exact_products(self.U64, self.items.V32, rows, items)

    def at(self, rows: np.ndarray, items: np.ndarray) -> np.ndarray:
        return self.exact(rows, items)

    def dense(self, block: int = 1 << 18) -> np.ndarray:
        """Every exact score [users, n_items], in blocks of about `block` pairs."""
        B, m = len(self.U), self.n_items
        out = np.empty((B, m), dtype=np.float32)
        step = max(1, block // max(B, 1))
        for a in range(0, m, step):
            cols = np.arange(a, min(m, a + step))
            r = np.repeat(np.arange(B), len(cols))
            out[:, a : a + len(cols)] = self.exact(r, np.tile(cols, B)).reshape(B, len(cols))
        return out

    def top(self, seen: sp.csr_matrix, n: int) -> tuple[np.ndarray, np.ndarray]:
        B, m = len(self.U), self.n_items
        n = min(n, m)
        if n == 0 or B == 0:
            return np.zeros(B + 1, np.int64), np.zeros(0, np.int64)
        if B == 1 and m == len(self.items.V32) and self.items.prunable:
            out = self._top_one_by_norm(seen, n)
            if out is not None:
                return out
        S = self.U @ self.items.Vt[:, :m]
        if not (self.items.finite and np.isfinite(S).all()):
            return top_lists(self.dense(), seen, n)  # the exact scores decide alone
        S[segment_index(seen.indptr.astype(np.int64)), seen.indices] = -np.inf
        unorm = np.sqrt((self.U64**2).sum(axis=1))
        err = (self.U.shape[1] + 2) * 2.0**-24 * unorm * self.items.max_norm
        bound = _nth_lower_bound(S, n).astype(np.float64)
        # twice the margin the proof needs, against the rounding of the threshold itself
        thr = np.where(np.isfinite(bound), bound - 4 * err, np.finfo(np.float32).min)
        flat = np.flatnonzero(np.greater_equal(S, thr.astype(np.float32)[:, None]))
        rows, cols = flat // m, flat % m
        o = _by_row_then_score(rows, self.exact(rows, cols))  # (rows, cols) ascending
        rows, cols = rows[o], cols[o]
        counts = np.bincount(rows, minlength=B)
        keep = segment_offsets(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)) < n
        counts = np.minimum(counts, n)
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), cols[keep]

    def _top_one_by_norm(self, seen: sp.csr_matrix, n: int) -> tuple[np.ndarray, np.ndarray] | None:
        """`top` of one user (a request), scanning the items by norm descending until
        no item left can reach the top: u.v <= |u| |v| (Cauchy-Schwarz, with a margin
        for the float64 rounding of both sides), and an item of the exact top n
        scores at least the n-th float32 score of the items scanned less `err`. ALS's
        factors are long for a few thousand items and short for the rest: on the 1M
        synthetic bundle (20,000 items) a user needs 2,500 of them at the median and
        5,800 at most, so most requests read one block of 4,096. The items kept hold
        every item that can be in the exact top (ties included), scored exactly and
        ordered as `top` orders them: the same list. None where a score is not
        finite (the full product's path decides then)."""
        order, where, norms, Vt = self.items.by_norm()
        m = len(order)
        u = self.U[0]
        unorm = float(np.sqrt((self.U64[0] ** 2).sum()))
        err = (self.U.shape[1] + 2) * 2.0**-24 * unorm * self.items.max_norm
        gone = np.sort(where[seen.indices[seen.indptr[0] : seen.indptr[1]]])
        S = np.empty(m, dtype=np.float32)
        a, step = 0, max(4096, 4 * n)
        while True:
            b = min(m, a + step)
            S[a:b] = u @ Vt[:, a:b]
            if not np.isfinite(S[a:b]).all():
                return None
            a, step = b, 2 * step
            seen_in = gone[: np.searchsorted(gone, a)]
            S[seen_in] = -np.inf
            # the n-th float32 score of the items scanned (-inf: fewer eligible)
            nth = float(np.partition(S[:a], a - n)[a - n]) if a - len(seen_in) >= n else -np.inf
            if a == m or unorm * float(norms[a]) * (1 + 1e-9) < nth - 4 * err:
                break
        S = S[:a]
        thr = np.float32(nth - 4 * err) if np.isfinite(nth) else np.finfo(np.float32).min
        cols = np.sort(order[np.flatnonzero(np.greater_equal(S, thr))])
        vals = self.exact(np.zeros(len(cols), np.int64), cols)
        top = cols[_by_row_then_score(np.zeros(len(cols), np.int64), vals)][:n]
        return np.array([0, len(top)], dtype=np.int64), top


def row_product(
    cols: np.ndarray, w: np.ndarray | None, M: sp.csr_matrix, small: int = 4096
) -> OneRow:
    """[1, M's columns], sorted columns: the row holding `w` (None: 1.0) at
    `cols` (distinct, ascending) times `M`, with the entries and bits of scipy's CSR
    product of that row, for a chunk of one user (a request) without scipy's product
    and its sort (0.07-0.17 -> 0.01-0.05 ms for a short history's row).

    scipy's product sums, for each output column, the products `w[j] * M[cols[j], k]`
    in the dtype of both in the order of `cols`, and drops the columns whose sum is
    exactly 0; `np.add.at` adds in the order given, one rounding per addition, so the
    same order gives the same sums. Up to `small` products the columns are found by a
    sort of the gathered ones (stable: their order is kept), beyond by a dense row."""
    if len(cols) == 1:
        lo, hi = M.indptr[cols[0]], M.indptr[cols[0] + 1]
        lens, k, v = np.array([hi - lo], dtype=np.int64), M.indices[lo:hi], M.data[lo:hi]
    else:
        lens, k, v = gather_rows(M, cols)
    dtype = np.result_type(M.dtype, np.float32 if w is None else w.dtype)
    v = v.astype(dtype, copy=False)
    if w is not None:
        v = v * np.repeat(w.astype(dtype, copy=False), lens)
    if len(k) <= small:
        o = np.argsort(k, kind="stable")
        ks = k[o]
        first = np.empty(len(ks), dtype=bool)
        first[:1] = True
        np.not_equal(ks[1:], ks[:-1], out=first[1:])
        acc = np.zeros(int(first.sum()), dtype=dtype)
        np.add.at(acc, np.cumsum(first) - 1, v[o])
        keep = acc != 0
        idx, vals = ks[first][keep], acc[keep]
    else:
        dense = np.zeros(M.shape[1], dtype=dtype)
        np.add.at(dense, k, v)
        idx = np.flatnonzero(dense)
        vals = dense[idx]
    return OneRow(idx, vals, M.shape[1])


class OneRow:
    """One row of sorted, distinct columns with the CSR fields `SparseRows` reads: a
    request's product without a scipy matrix, whose constructor's checks cost as much
    as the product itself (about 0.05 ms)."""

    has_sorted_indices = has_canonical_format = True

    def __init__(self, indices: np.ndarray, data: np.ndarray, n_cols: int) -> None:
        self.indices, self.data = indices, data
        self.indptr = np.array([0, len(indices)], dtype=np.int64)
        self.shape = (1, n_cols)

    def toarray(self) -> np.ndarray:
        out = np.zeros(self.shape, dtype=self.data.dtype)
        out[0, self.indices] = self.data
        return out

    todense = toarray


def canonical_rows(S: sp.spmatrix, small: int = 2048) -> sp.csr_matrix:
    """`S` as CSR with each row's indices sorted and no duplicates (summed in scipy's
    order). A product's rows come unsorted: up to `small` entries (a short history's
    rows) one sort of (row, index) keys orders them (about 0.05 ms against 0.09 for
    the passes below); beyond, through CSC and back sorts them in two linear passes
    (no arithmetic), which win from about 3,000 entries (16,000: 0.23 against 0.93 ms)
    and where sorting each row costs four times more. Either way the same entries, so
    the same matrix."""
    S = S.tocsr()
    if not S.has_sorted_indices:
        if S.nnz <= small:
            n = S.shape[1]
            keys = segment_index(S.indptr.astype(np.int64)) * n + S.indices
            o = np.argsort(keys, kind="stable")
            if len(o) < 2 or bool((np.diff(keys[o]) > 0).all()):
                T = sp.csr_matrix((S.data[o], S.indices[o], S.indptr), shape=S.shape)
                T.has_sorted_indices = True
                T.has_canonical_format = True
                return T
        else:
            T = S.tocsc().tocsr()
            if T.has_canonical_format:
                return T
    S.sum_duplicates()  # also sorts the indices (with duplicates to sum, it does it all)
    return S


class SparseRows:
    """Scores held sparse: the stored entries of a [users, n_items] CSR matrix, 0 for
    every other item of `eligible` (sorted item indices; None: all), -inf beyond it.
    The top of a row is found among its stored entries, without a dense row."""

    def __init__(self, S: sp.csr_matrix | OneRow, eligible: np.ndarray | None = None) -> None:
        self.S = S if isinstance(S, OneRow) else canonical_rows(S)
        self.eligible = eligible

    def top(self, seen: sp.csr_matrix, n: int) -> tuple[np.ndarray, np.ndarray]:
        S = self.S
        n_rows, n_items = S.shape
        n = min(n, n_items)
        ok = np.isfinite(S.data) & (S.data != 0)
        all_ok = bool(ok.all())
        pool = self.eligible
        out = []
        for j in range(n_rows):
            a, b = S.indptr[j], S.indptr[j + 1]
            cj, vj = S.indices[a:b], S.data[a:b]
            if not all_ok:
                cj, vj = cj[ok[a:b]], vj[ok[a:b]]
            sj = seen.indices[seen.indptr[j] : seen.indptr[j + 1]]
            pos = vj > 0
            # the best n + |seen| stored positives hold the best n unseen ones
            top = _best(cj[pos], vj[pos], n + len(sj))
            top = top[_absent(top, sj)][:n]
            if len(top) < n:
                # then the row's zeros (every other eligible unseen item) in index
                # order, then the negatives
                m = n - len(top)
                excl = np.union1d(sj, cj)
                head = (pool[: m + len(excl)] if pool is not None
                        else np.arange(min(n_items, m + len(excl))))  # fmt: skip
                zeros = head[_absent(head, excl)][:m]
                neg = _best(cj[~pos], vj[~pos], m - len(zeros) + len(sj))
                neg = neg[_absent(neg, sj)][: m - len(zeros)]
                top = np.concatenate([top, zeros, neg])
            out.append(top.astype(np.int64))
        return _pack(out)

    def at(self, rows: np.ndarray, items: np.ndarray) -> np.ndarray:
        S = self.S
        n_items = S.shape[1]
        keys = segment_index(S.indptr.astype(np.int64)) * n_items + S.indices
        q = rows.astype(np.int64) * n_items + items
        out = lookup(keys, S.data, q).astype(np.float32)
        if self.eligible is not None:
            ok = np.zeros(n_items, dtype=bool)
            ok[self.eligible] = True
            out[~ok[items]] = -np.inf
        return out

    def dense(self) -> np.ndarray:
        out = np.asarray(self.S.todense(), dtype=np.float32)
        if self.eligible is not None:
            ok = np.zeros(self.S.shape[1], dtype=bool)
            ok[self.eligible] = True
            out[:, ~ok] = -np.inf
        return out


class OrderRows:
    """Scores that are the same for every user (a popularity count): each user walks
    the one order (score descending, index) past the items they have met."""

    def __init__(self, counts: np.ndarray, order: np.ndarray, n_rows: int) -> None:
        self.counts, self.order, self.n_rows = counts, order, n_rows

    def top(self, seen: sp.csr_matrix, n: int) -> tuple[np.ndarray, np.ndarray]:
        out = []
        for r in range(self.n_rows):
            s = seen.indices[seen.indptr[r] : seen.indptr[r + 1]]
            head = self.order[: n + len(s)]
            out.append(head[_absent(head, s)][:n])
        return _pack(out)

    def at(self, rows: np.ndarray, items: np.ndarray) -> np.ndarray:
        return self.counts[items]


def source_rows(
    s: Source, b: Histories, n_items: int
) -> DenseRows | SparseRows | OrderRows | ProductRows:
    """A source's scores for a chunk in the form it computes them cheapest."""
    rows = getattr(s, "rows", None)
    if rows is not None:
        return rows(b, n_items)
    return DenseRows(s.scores(b, n_items), finite=getattr(s, "finite_scores", False))


def candidates(sources: list[Source], b: Histories, n_items: int, per_source: int) -> Candidates:
    """Union of each source's top-`per_source` unseen items for a chunk of users (each
    with at least one event), ascending per user, with every source's
    `{name}_score` (NaN where not finite) and `{name}_rank` (per_source + 1 where that
    source did not retrieve the item), and `lm_cand_rank` with the language model's
    source: the rank of its score among the user's candidates."""
    seen = b.seen(n_items)
    tops: list[tuple[np.ndarray, np.ndarray]] = []
    rows_all, items_all = [], []
    scored = []
    for s in sources:
        sr = source_rows(s, b, n_items)
        ptr, items = sr.top(seen, per_source)
        scored.append(sr)
        tops.append((ptr, items))
        rows_all.append(segment_index(ptr))
        items_all.append(items)
    keys = np.unique(
        np.concatenate(rows_all) * n_items + np.concatenate(items_all)
        if rows_all
        else np.zeros(0, np.int64)
    )
    rows = keys // n_items
    c = Candidates(
        np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(b)))]).astype(np.int64),
        keys % n_items,
        {},
    )
    for s, sr, (ptr, items), r in zip(sources, scored, tops, rows_all, strict=True):
        rank = np.full(len(c), per_source + 1, dtype=np.int32)
        rank[np.searchsorted(keys, r * n_items + items)] = segment_offsets(ptr) + 1
        sc = sr.at(rows, c.items)
        c.cols[f"{s.name}_score"] = np.where(np.isfinite(sc), sc, np.nan).astype(np.float32)
        c.cols[f"{s.name}_rank"] = rank
    if "lm_score" in c.cols:
        c.cols["lm_cand_rank"] = candidate_rank(c.cols["lm_score"], c.ptr)
    return c


def source_top_k(
    source: Source, h: History, users: np.ndarray, k: int, batch: int = 512
) -> np.ndarray:
    """[len(users), k] a fitted source's own top-k unseen items (-1 beyond a row's
    eligible items): a source as a recommender (the evaluation's baselines)."""
    parts = []
    for s in range(0, len(users), batch):
        b = h.histories(users[s : s + batch])
        ptr, items = source_rows(source, b, h.n_items).top(b.seen(h.n_items), k)
        out = np.full((len(b), min(k, h.n_items)), -1, dtype=np.int64)
        out[segment_index(ptr), segment_offsets(ptr)] = items
        parts.append(out)
    return np.concatenate(parts) if parts else np.zeros((0, k), np.int64)
