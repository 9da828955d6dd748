"""Candidate generators: one small class per source, all behind one interface.

Each source is fitted on a `History` (the events before a cutoff) and scores every
item for a batch of users as a dense row, so the same object serves as a retrieval
stage (top-N of its row), as a ranker feature (its score for any candidate) and as
an evaluation baseline (top-k of its row).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import polars as pl
import scipy.sparse as sp

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

    def __post_init__(self) -> None:
        self.X = user_item_matrix(self.ev, self.n_users, self.n_items, binary=True)
        last = self.ev.group_by(U).agg(pl.col(T).max())
        self.user_last_t = np.full(self.n_users, -1, dtype=np.int64)
        self.user_last_t[last[U].to_numpy()] = last[T].to_numpy()
        if self.now is None:
            t_max = self.ev[T].max()
            self.now = int(t_max) if isinstance(t_max, int) else 0

    @classmethod
    def before(cls, ev: pl.DataFrame, cutoff: int, n_users: int, n_items: int) -> History:
        """The state at `cutoff` (epoch seconds): only events strictly before it."""
        return cls(ev.filter(pl.col(T) < cutoff), n_users, n_items, now=cutoff)

    def last_items(self, users: np.ndarray, n: int) -> list[np.ndarray]:
        """Each user's last `n` items, most recent first."""
        sub = (
            self.ev.filter(pl.col(U).is_in(users.tolist()))
            .group_by(U, maintain_order=True)
            .agg(pl.col(I).tail(n).reverse())
        )
        by_user = dict(zip(sub[U].to_list(), sub[I].to_list(), strict=True))
        return [np.asarray(by_user.get(int(u), []), dtype=np.int64) for u in users]


class Source(Protocol):
    name: str

    def fit(self, h: History) -> Source: ...

    def scores(self, users: np.ndarray, h: History) -> np.ndarray:
        """Dense [len(users), n_items] float32 scores; higher is better."""
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
        counts = np.bincount(h.ev[I].to_numpy(), minlength=h.n_items).astype(np.float32)
        self.counts_ = counts
        return self

    def scores(self, users: np.ndarray, h: History) -> np.ndarray:
        return np.broadcast_to(self.counts_, (len(users), h.n_items)).copy()

    def state(self) -> dict[str, np.ndarray]:
        return {}  # cheap: refitted from the history on load

    def load_state(self, state: dict[str, np.ndarray], h: History) -> MostPopular:
        return self.fit(h)


class RecentPopular:
    """Counts in the `window_days` before each user's own last event: what was being
    consumed around the time the user was last active, not around the global end."""

    name = "recent_pop"

    def __init__(self, window_days: float = 14.0) -> None:
        self.window_days = window_days

    def fit(self, h: History) -> RecentPopular:
        order = np.argsort(h.ev[T].to_numpy(), kind="stable")
        self.t_sorted_ = h.ev[T].to_numpy()[order]
        self.i_sorted_ = h.ev[I].to_numpy()[order]
        return self

    def counts_at(self, t_end: np.ndarray, n_items: int) -> np.ndarray:
        w = int(self.window_days * 86400)
        out = np.zeros((len(t_end), n_items), dtype=np.float32)
        cache: dict[tuple[int, int], np.ndarray] = {}
        his = np.searchsorted(self.t_sorted_, t_end, side="right")
        los = np.searchsorted(self.t_sorted_, t_end - w, side="left")
        for r, (lo, hi) in enumerate(zip(los.tolist(), his.tolist(), strict=True)):
            row = cache.get((lo, hi))
            if row is None:
                row = np.bincount(self.i_sorted_[lo:hi], minlength=n_items).astype(np.float32)
                if len(cache) < 4096:
                    cache[(lo, hi)] = row
            out[r] = row
        return out

    def scores(self, users: np.ndarray, h: History) -> np.ndarray:
        t_end = h.user_last_t[users].copy()
        t_end[t_end < 0] = int(h.now or 0)
        return self.counts_at(t_end, h.n_items)

    def state(self) -> dict[str, np.ndarray]:
        return {}  # cheap: refitted from the history on load

    def load_state(self, state: dict[str, np.ndarray], h: History) -> RecentPopular:
        return self.fit(h)


class ItemKNN:
    """Item-item cosine similarity, `k` neighbours kept per item (0 keeps all)."""

    name = "itemknn"

    def __init__(self, k: int = 100, shrink: float = 0.0) -> None:
        self.k = k
        self.shrink = shrink

    def fit(self, h: History) -> ItemKNN:
        X = h.X.tocsc().astype(np.float32)
        norms = np.sqrt(np.asarray(X.multiply(X).sum(axis=0)).ravel())
        G = (X.T @ X).tocsr().astype(np.float32)
        G.setdiag(0)
        G.eliminate_zeros()
        G = G.tocoo()
        denom = norms[G.row] * norms[G.col] + self.shrink + 1e-9
        S = sp.csr_matrix((G.data / denom, (G.row, G.col)), shape=G.shape)
        self.sim_ = _keep_top_k_per_row(S, self.k) if self.k else S
        return self

    def scores(self, users: np.ndarray, h: History) -> np.ndarray:
        return np.asarray((h.X[users] @ self.sim_.T).todense(), dtype=np.float32)

    def state(self) -> dict[str, np.ndarray]:
        return _csr_state(self.sim_, "sim")

    def load_state(self, state: dict[str, np.ndarray], h: History) -> ItemKNN:
        self.sim_ = _csr_from_state(state, "sim")
        return self


class EASE:
    """EASE (Steck 2019): a closed-form item-item linear model, on at most `max_items`
    most popular items (others score -inf from this source)."""

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
        Xk = h.X[:, keep].astype(np.float32)
        G: np.ndarray = np.asarray(
            (Xk.T @ Xk).todense(), dtype=np.float64 if self.double else np.float32
        )
        G[np.diag_indices_from(G)] += self.l2
        P = _spd_inverse(G)
        B = P / (-np.diag(P))
        B[np.diag_indices_from(B)] = 0.0
        self.items_ = keep
        if self.keep and self.keep < len(keep):
            # the largest weights of each column carry the score; the rest is noise
            self.B_ = _keep_top_k_per_row(
                sp.csr_matrix(np.abs(B.T)), self.keep, signed=B.T
            ).T.tocsr()
        else:
            self.B_ = B.astype(np.float32)
        return self

    def scores(self, users: np.ndarray, h: History) -> np.ndarray:
        out = np.full((len(users), h.n_items), -np.inf, dtype=np.float32)
        Xu = h.X[users][:, self.items_]
        s = Xu @ self.B_
        out[:, self.items_] = s.toarray() if sp.issparse(s) else np.asarray(s, dtype=np.float32)
        return out

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
    """Implicit-feedback matrix factorisation (the `implicit` library's ALS)."""

    name = "als"

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

    def scores(self, users: np.ndarray, h: History) -> np.ndarray:
        # float64 products rounded to float32: the same values for one user as for a
        # batch (a float32 product's last bit depends on the BLAS kernel the batch
        # size picks, which reorders near-equal scores between online and offline)
        U64 = self.user_factors_[users].astype(np.float64)
        return (U64 @ self.item_factors_.T.astype(np.float64)).astype(np.float32)

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
    `last_n` items, weighted `decay**j` for the j-th most recent.
    """

    name = "next"

    def __init__(self, max_gap: int = 5, last_n: int = 10, decay: float = 0.8) -> None:
        self.max_gap = max_gap
        self.last_n = last_n
        self.decay = decay

    def fit(self, h: History) -> NextItem:
        from features.sequence import transitions

        tr = transitions(h.ev.lazy(), self.max_gap).collect()
        M = sp.csr_matrix(
            (
                tr["weight"].to_numpy().astype(np.float32),
                (tr["prev"].to_numpy(), tr["next"].to_numpy()),
            ),
            shape=(h.n_items, h.n_items),
        )
        occ = np.bincount(h.ev[I].to_numpy(), minlength=h.n_items).astype(np.float32)
        self.trans_ = sp.diags(1.0 / np.maximum(occ, 1.0)) @ M
        self.trans_ = self.trans_.tocsr()
        return self

    def scores(self, users: np.ndarray, h: History) -> np.ndarray:
        last = h.last_items(users, self.last_n)
        rows, cols, vals = [], [], []
        for r, items in enumerate(last):
            rows.append(np.full(len(items), r))
            cols.append(items)
            vals.append(self.decay ** np.arange(len(items)))
        W = sp.csr_matrix(
            (
                np.concatenate(vals).astype(np.float32) if vals else np.zeros(0, np.float32),
                (
                    np.concatenate(rows) if rows else np.zeros(0, int),
                    np.concatenate(cols) if cols else np.zeros(0, int),
                ),
            ),
            shape=(len(users), h.n_items),
        )
        return np.asarray((W @ self.trans_).todense(), dtype=np.float32)

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


def _spd_inverse(G: np.ndarray) -> np.ndarray:
    """Inverse of a symmetric positive definite matrix through its Cholesky factor."""
    from scipy.linalg import lapack

    potrf, potri = (
        (lapack.spotrf, lapack.spotri) if G.dtype == np.float32 else (lapack.dpotrf, lapack.dpotri)
    )
    c, info = potrf(G, lower=True)
    if info != 0:
        return np.linalg.inv(G)
    inv, info = potri(c, lower=True, overwrite_c=True)
    if info != 0:
        return np.linalg.inv(G)
    return np.tril(inv) + np.tril(inv, -1).T


def _keep_top_k_per_row(
    S: sp.csr_matrix, k: int, signed: np.ndarray | None = None
) -> sp.csr_matrix:
    """Keep the k largest entries of each row (values from `signed` when given)."""
    S = S.tocsr()
    indptr, indices, data = S.indptr, S.indices, S.data
    new_rows, new_cols, new_vals = [], [], []
    for r in range(S.shape[0]):
        lo, hi = indptr[r], indptr[r + 1]
        if hi - lo == 0:
            continue
        d = data[lo:hi]
        c = indices[lo:hi]
        if hi - lo > k:
            top = np.argpartition(-d, k - 1)[:k]
            d, c = d[top], c[top]
        new_rows.append(np.full(len(c), r))
        new_cols.append(c)
        new_vals.append(d if signed is None else signed[r, c])
    if not new_rows:
        return sp.csr_matrix(S.shape, dtype=np.float32)
    return sp.csr_matrix(
        (
            np.concatenate(new_vals).astype(np.float32),
            (np.concatenate(new_rows), np.concatenate(new_cols)),
        ),
        shape=S.shape,
    )


def top_n(scores: np.ndarray, seen: sp.csr_matrix, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-n items per row, never an item in `seen` (rows aligned), nor one without a
    finite score: by score descending, ties by item index ascending (so the list does
    not depend on how it is computed; `recsys.online` takes the same lists by cheaper
    means). Slots beyond the row's eligible items are -1 (score -inf)."""
    s = np.array(scores, copy=True)
    r, c = seen.nonzero()
    s[r, c] = -np.inf
    s[~np.isfinite(s)] = -np.inf
    n_rows, n_items = s.shape
    n = min(n, n_items)
    items = np.full((n_rows, n), -1, dtype=np.int64)
    vals = np.full((n_rows, n), -np.inf, dtype=s.dtype)
    if n == 0 or n_rows == 0:
        return items, vals
    # the n-th largest score of each row: every item above it is taken, and of the
    # items equal to it the first ones by index, until the row has n
    kth = -np.partition(-s, n - 1, axis=1)[:, n - 1]
    sel = s > kth[:, None]
    short = n - sel.sum(axis=1)
    tr, tc = np.nonzero((s == kth[:, None]) & np.isfinite(kth)[:, None])
    pos = np.arange(len(tr)) - np.searchsorted(tr, tr)
    keep = pos < short[tr]
    sel[tr[keep], tc[keep]] = True
    rr, cc = np.nonzero(sel)
    vv = s[rr, cc]
    o = np.lexsort((cc, -vv, rr))
    rr, cc, vv = rr[o], cc[o], vv[o]
    pos = np.arange(len(rr)) - np.searchsorted(rr, rr)
    items[rr, pos] = cc
    vals[rr, pos] = vv
    return items, vals
