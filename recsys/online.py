"""The online path: candidates -> features -> scores for one user, in numpy.

`OnlineRanker` is built once from a fitted pipeline. Everything that does not depend
on the user (item popularity and age, transitions, categories, the event-time index,
the sources' matrices) is computed at build time with the offline code itself; per
request only the user's own history is touched. The values equal those of
`recsys.pipeline.build_features` for the same state (tests/test_serving_online.py
holds every feature column of the ranker to that).

A user is a `UserState`: their events in time order, and the bundle's user index when
they have one. Fresh events make a new state; nothing here is mutated per request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import scipy.sparse as sp

from features.lm import LM_SIM_COLUMNS, SIM_HISTORY, lm_similarities
from features.popularity import DAY, item_age, item_popularity
from features.sequence import transitions
from features.time_aware import UPOP_DAYS, UPOP_SHARES, EventTimeIndex
from features.user import item_mean_user_activity
from recsys.candidates import ALS, EASE, ItemKNN, MostPopular, NextItem, RecentPopular
from recsys.data import I, T, U
from recsys.lm.cold import cold_pool, merge_ranked
from recsys.lm.source import LMNearest
from recsys.pipeline import Pipeline

if TYPE_CHECKING:
    from recsys.lm.model import LanguageModel

try:  # the C++ row gather behind scipy's `csr[rows]`, without its per-call overhead
    from scipy.sparse._sparsetools import csr_row_index as _csr_row_index
except ImportError:  # pragma: no cover - a scipy that moved it: the numpy gather
    _csr_row_index = None

log = logging.getLogger("recsys")

RECENT_CATS = 20  # features.affinity.user_category_affinity's recent_n


@dataclass(frozen=True)
class UserState:
    """One user's events, oldest first, and their row in the bundle (-1: none)."""

    items: np.ndarray  # int64 item indices
    times: np.ndarray  # int64 epoch seconds
    user: int = -1
    fresh: bool = False  # events beyond the bundle's history (ALS factors are re-solved)
    # per-request values computed once from the state (the LM's user vector)
    memo: dict[object, np.ndarray] = field(default_factory=dict, compare=False, repr=False)

    @property
    def last_t(self) -> int:
        return int(self.times[-1]) if len(self.times) else -1

    @cached_property
    def seen(self) -> np.ndarray:
        """The distinct items, ascending."""
        return np.unique(self.items)


@dataclass
class Ranked:
    """Every candidate of one request, best first."""

    items: np.ndarray  # int64 item indices
    scores: np.ndarray  # float64


class OnlineRanker:
    """Candidate sources, features and ranker of a fitted `Pipeline`, for one user at
    a time. `lm_features` is the hook for the language model: a callable
    (state, candidate items) -> {column: values} merged into the feature columns."""

    def __init__(self, p: Pipeline, tree_cache: Path | None = None) -> None:
        h = p.history_
        cfg = p.config
        self.pipeline = p
        self.n_items = h.n_items
        self.now = int(h.now or 0)
        self.per_source = cfg.sources.per_source
        self.last_n = cfg.sources.next_last_n
        self.decay = cfg.sources.next_decay
        self.sources = p.sources_
        self.features = list(p.ranker_.features_)
        self.lm_features: Callable[[UserState, np.ndarray], dict[str, np.ndarray]] | None = None
        self.lm = getattr(p, "lm_", None)  # the language model, when the bundle has one
        # new-item slots (recsys.lm.cold): items without interactions in the bundle
        self.new_item_every = p.new_item_every if self.lm is not None else 0
        self._cold_pool = cold_pool(h.X) if self.new_item_every else np.zeros(0, np.int64)

        ev = h.ev
        lev = ev.lazy()
        # user histories as CSR-like arrays over the bundle's events (sorted by u, t)
        u = ev[U].to_numpy().astype(np.int64)
        self._hist_items = ev[I].to_numpy().astype(np.int64)
        self._hist_times = ev[T].to_numpy().astype(np.int64)
        self._hist_ptr = np.searchsorted(u, np.arange(h.n_users + 1), side="left")

        # item-side features, with the offline functions themselves (NaN: no events)
        self._item_cols: dict[str, np.ndarray] = {}
        for frame in (
            item_popularity(lev, self.now),
            item_age(lev, self.now),
            item_mean_user_activity(lev),
        ):
            df = frame.collect()
            idx = df[I].to_numpy()
            for c in df.columns:
                if c == I:
                    continue
                col = np.full(self.n_items, np.nan)
                col[idx] = df[c].cast(pl.Float64).to_numpy()
                self._item_cols[c] = col

        # sequence features: raw transition weights (float64, as in features.sequence)
        tr = transitions(lev, cfg.sources.next_max_gap).collect()
        self._trans = sp.csr_matrix(
            (
                tr["weight"].to_numpy().astype(np.float64),
                (tr["prev"].to_numpy(), tr["next"].to_numpy()),
            ),
            shape=(self.n_items, self.n_items),
        )
        self._trans_t = self._trans.T.tocsr()
        self._occ = np.bincount(self._hist_items, minlength=self.n_items).astype(np.float64)

        # categories: items x categories, binary
        cats = p.item_cats_
        if cats.height:
            codes = cats["cat"].cast(pl.Categorical).to_physical().to_numpy().astype(np.int64)
            n_cats = int(codes.max()) + 1
            self._ic = sp.csr_matrix(
                (np.ones(len(codes)), (cats["i"].to_numpy(), codes)),
                shape=(self.n_items, n_cats),
            )
        else:
            self._ic = sp.csr_matrix((self.n_items, 1))
        self._ic.sum_duplicates()
        self._n_cats = np.diff(self._ic.indptr)

        self._time_index = EventTimeIndex.build(self._hist_items, self._hist_times)
        # the same events in the index's time order (t, then item): a window of time
        # or of the last events is a slice here, counted per item with one bincount
        by_time = np.lexsort((self._hist_items, self._hist_times))
        self._items_by_time = self._hist_items[by_time]

        # per-source prepared state
        # ItemKNN: (what `X @ sim_.T` multiplies by, its transpose for `_row_sum_any`)
        self._knn: dict[str, tuple[sp.csr_matrix, sp.csr_matrix]] = {}
        # EASE: (position of each item among the source's items (-1: none), B's transpose)
        self._ease: dict[str, tuple[np.ndarray, sp.csr_matrix | None]] = {}
        # ALS: (Y'Y, Y' as a contiguous float64 array)
        self._als: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        # RecentPopular rows by end time, with their positive items in candidate order
        self._recent: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        # sources whose scores do not depend on the user: items by (score desc, index)
        self._orders: dict[str, np.ndarray] = {}
        self._ranks = np.arange(1, self.per_source + 1, dtype=np.int32)
        for s in self.sources:
            if isinstance(s, MostPopular):
                self._orders[s.name] = np.argsort(-s.counts_, kind="stable")
            if isinstance(s, ItemKNN):
                self._knn[s.name] = (s.sim_.T.tocsr(), _sorted_csr(s.sim_))
            elif isinstance(s, EASE):
                pos = np.full(self.n_items, -1, dtype=np.int64)
                pos[s.items_] = np.arange(len(s.items_))
                BT = _sorted_csr(s.B_.T) if sp.issparse(s.B_) else None
                self._ease[s.name] = (pos, BT)
            elif isinstance(s, ALS):
                Y = s.item_factors_.astype(np.float64)
                self._als[s.name] = (Y.T @ Y, np.ascontiguousarray(Y.T))
            elif not isinstance(s, MostPopular | RecentPopular | NextItem | LMNearest):
                raise TypeError(f"no online version of candidate source {s.name!r}")

        from recsys.trees import TreeEnsemble

        self.trees = TreeEnsemble(p.ranker_.boosters_, cache_dir=tree_cache)

    # -- state -------------------------------------------------------------------
    def user_state(self, u: int, extra: tuple[np.ndarray, np.ndarray] | None = None) -> UserState:
        """The bundle's events of user `u` (-1: none) followed by `extra` (items, times)."""
        if u >= 0:
            lo, hi = self._hist_ptr[u], self._hist_ptr[u + 1]
            items, times = self._hist_items[lo:hi], self._hist_times[lo:hi]
        else:
            items, times = np.zeros(0, np.int64), np.zeros(0, np.int64)
        if extra is not None and len(extra[0]):
            items = np.concatenate([items, np.asarray(extra[0], dtype=np.int64)])
            times = np.concatenate([times, np.asarray(extra[1], dtype=np.int64)])
            order = np.argsort(times, kind="stable")
            return UserState(items[order], times[order], u, fresh=True)
        return UserState(items, times, u)

    def seen(self, state: UserState) -> np.ndarray:
        return state.seen

    # -- candidates -----------------------------------------------------------------
    def source_scores(self, state: UserState) -> np.ndarray:
        """[n_sources, n_items] float32, the same arithmetic as each source's `scores`.

        The sparse sources add up only the rows of the user's items, in the order and
        float32 arithmetic of scipy's sparse product (so the values are bit-identical
        to `X @ M`), without building the sparse product and densifying it."""
        out = np.empty((len(self.sources), self.n_items), dtype=np.float32)
        seen = self.seen(state)
        for r, s in enumerate(self.sources):
            if isinstance(s, MostPopular):
                out[r] = s.counts_
            elif isinstance(s, RecentPopular):
                out[r] = self._recent_row(s, state)[0]
            elif isinstance(s, ItemKNN):
                M, MT = self._knn[s.name]
                out[r] = _row_sum_any(M, MT, seen)
            elif isinstance(s, EASE):
                out[r] = -np.inf
                pos, BT = self._ease[s.name]
                p = pos[seen]
                p = p[p >= 0]
                if sp.issparse(s.B_):
                    out[r, s.items_] = _row_sum_any(s.B_, BT, p)
                else:
                    xk = sp.csr_matrix(
                        (np.ones(len(p), np.float32), p, np.array([0, len(p)])),
                        shape=(1, len(s.items_)),
                    )
                    out[r, s.items_] = np.asarray(xk @ s.B_, np.float32)
            elif isinstance(s, ALS):
                f = self._als_factor(s, state).astype(np.float64)  # as ALS.scores
                out[r] = (f @ self._als[s.name][1])[0]
            elif isinstance(s, NextItem):
                last = state.items[-s.last_n :][::-1]
                wv = (s.decay ** np.arange(len(last))).astype(np.float32)
                if len(np.unique(last)) == len(last):  # the CSR row of NextItem.scores
                    o = np.argsort(last)
                    rows, wts = last[o], wv[o]
                else:  # repeated items: let scipy sum them as NextItem.scores does
                    w = sp.csr_matrix(
                        (wv, (np.zeros(len(last), dtype=np.int64), last)),
                        shape=(1, self.n_items),
                    )
                    rows, wts = w.indices.astype(np.int64), w.data
                out[r] = _row_sum(s.trans_, rows, wts)
            elif isinstance(s, LMNearest):
                uvec = self._user_vector(s.model, state)
                out[r] = (uvec @ s.model.item_vectors_.T).astype(np.float32)[0]
        return out

    def _user_vector(self, lm: LanguageModel, state: UserState) -> np.ndarray:
        """The language model's user vector ([1, d]) over the state's recent items, once
        per state (the LM source and the new-item slots both use it)."""
        v = state.memo.get(lm)
        if v is None:
            hist = state.items[-lm.config.history_len :][::-1]
            v = state.memo[lm] = lm.user_vectors_from([hist])
        return v

    def _recent_row(self, s: RecentPopular, state: UserState) -> tuple[np.ndarray, np.ndarray]:
        """RecentPopular's row for the user's last event time, and its items with a
        positive count by (count descending, index); the rest of its order is the zeros
        in index order (counts are finite and >= 0). Cached by end time."""
        t_end = state.last_t if state.last_t >= 0 else self.now
        hit = self._recent.get(t_end)
        if hit is None:
            row = s.counts_at(np.array([t_end]), self.n_items)[0]
            pos = np.flatnonzero(row > 0)
            hit = (row, pos[np.lexsort((pos, -row[pos]))].astype(np.int32))
            if len(self._recent) >= 4096:
                self._recent.clear()
            self._recent[t_end] = hit
        return hit

    def _als_factor(self, s: ALS, state: UserState) -> np.ndarray:
        """The fitted factor of a bundle user; for new or fresh histories, the ALS
        least-squares solution against the fixed item factors."""
        if state.user >= 0 and not state.fresh:
            return s.user_factors_[[state.user]]
        seen = self.seen(state)
        if len(seen) == 0:
            return np.zeros((1, s.item_factors_.shape[1]), dtype=np.float32)
        Y = s.item_factors_[seen].astype(np.float64)
        YtY, _ = self._als[s.name]
        A = YtY + s.alpha * (Y.T @ Y)
        A[np.diag_indices_from(A)] += s.regularization
        b = (1.0 + s.alpha) * Y.sum(axis=0)
        return np.linalg.solve(A, b).astype(np.float32)[None, :]

    def candidates(self, state: UserState) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Union of each source's top-`per_source` unseen items (sorted by index), with
        `{source}_score` and `{source}_rank` columns, as `generate_candidates`.

        Each source's list is `recsys.candidates.top_n`'s (score descending, ties by
        index). The popularity sources walk their items in that order (precomputed, or
        cached by end time) past the seen ones; the other rows are partitioned together,
        and a row whose n-th score is tied beyond the partition takes the tied items
        in index order."""
        S = self.source_scores(state)
        seen = self.seen(state)
        free = np.ones(self.n_items, dtype=bool)
        free[seen] = False
        n = min(self.per_source, self.n_items)
        tops: list[np.ndarray | None] = [None] * len(self.sources)
        rest = []
        for r, s in enumerate(self.sources):
            if isinstance(s, MostPopular):
                head = self._orders[s.name][: n + len(seen)]
                tops[r] = head[free[head]][:n]
            elif isinstance(s, RecentPopular):
                row, positive = self._recent_row(s, state)
                head = positive[: n + len(seen)]
                top = head[free[head]][:n]
                if len(top) < n:  # then the zero counts, by index
                    zeros = np.flatnonzero((row == 0) & free)[: n - len(top)]
                    top = np.concatenate([top, zeros])
                tops[r] = top
            else:
                rest.append(r)
        if rest:
            for r, t in zip(rest, top_rows(S[rest], seen, n), strict=True):
                tops[r] = t
        lists = [t for t in tops if t is not None]
        assert len(lists) == len(tops), "a source without its list"
        # the union, ascending: a mark per item (cheaper than np.unique here)
        mark = np.zeros(self.n_items, dtype=bool)
        for t in lists:
            mark[t] = True
        cands = np.flatnonzero(mark)
        nc = len(cands)
        at = np.empty(self.n_items, dtype=np.int64)
        at[cands] = np.arange(nc)
        sc = S[:, cands]
        sc[~np.isfinite(sc)] = np.nan
        ranks = np.full((len(self.sources), nc), self.per_source + 1, dtype=np.int32)
        cols: dict[str, np.ndarray] = {}
        for r, (s, t) in enumerate(zip(self.sources, lists, strict=True)):
            ranks[r, at[t]] = self._ranks[: len(t)]
            cols[f"{s.name}_score"] = sc[r]
            cols[f"{s.name}_rank"] = ranks[r]
        if "lm_score" in cols:  # features.lm.lm_candidate_rank: rank "min", best = 1
            v = cols["lm_score"]
            asc = np.sort(v)
            cols["lm_cand_rank"] = (len(v) - np.searchsorted(asc, v, side="right") + 1).astype(
                np.float64
            )
        return cands.astype(np.int64), cols

    # -- features ---------------------------------------------------------------------
    def feature_columns(self, state: UserState, cands: np.ndarray) -> dict[str, np.ndarray]:
        """Every feature column for (state, cands) except the sources' own."""
        cols: dict[str, np.ndarray] = {c: v[cands] for c, v in self._item_cols.items()}
        items, times = state.items, state.times
        last_t = int(times.max())
        now = max(self.now, last_t)
        # features.user.user_activity
        days_since_last = (now - last_t) / DAY
        user = {
            "user_n": float(len(items)),
            "user_days_since_last": days_since_last,
            "user_span_days": (last_t - int(times.min())) / DAY,
            "user_last_day_n": float(np.count_nonzero(times > last_t - DAY)),
        }
        nc = len(cands)
        for c, v in user.items():
            cols[c] = np.full(nc, v)
        # features.time_aware.popularity_before_user_time
        upop = self._upop_counts(cands, last_t)
        if upop is None:
            upop = self._time_index.counts(cands, np.full(nc, last_t))
        for c, counts in upop.items():
            cols[c] = np.asarray(counts, dtype=np.float64)
        # features.sequence.sequence_follow
        last = items[-self.last_n :][::-1]
        w = self.decay ** np.arange(len(last), dtype=np.float64)
        at = np.full(self.n_items, -1, dtype=np.int64)
        at[cands] = np.arange(nc)
        F = _rows_at(self._trans, last, at, nc)
        B = _rows_at(self._trans_t, last, at, nc)
        cols["seq_follow"] = w @ F
        cols["seq_follow_norm"] = (w / self._occ[last]) @ F
        cols["seq_follow_last"] = F[0] if len(last) else np.zeros(nc)
        present = F != 0
        cols["seq_follow_nearest"] = np.where(
            present.any(axis=0), present.argmax(axis=0), self.last_n
        ).astype(np.float64)
        cols["seq_precede"] = w @ B
        # features.affinity.user_category_affinity
        # (binary rows: the category counts are small integers, exact in any order)
        ic = self._ic
        n_cats = ic.shape[1]
        _, hc, hv = _gather(ic, items)
        aff = np.bincount(hc, weights=hv, minlength=n_cats) / len(items)
        _, rc, rv = _gather(ic, items[-RECENT_CATS:])
        raff = np.bincount(rc, weights=rv, minlength=n_cats) / RECENT_CATS
        n_c, sub_cats, _ = _gather(ic, cands)
        sub_ptr = np.concatenate([[0], np.cumsum(n_c)])
        rows = np.repeat(np.arange(nc), n_c)
        a = aff[sub_cats]
        cols["cat_aff_mean"] = np.where(
            n_c > 0, np.bincount(rows, weights=a, minlength=nc) / np.maximum(n_c, 1), 0.0
        )
        cols["cat_aff_max"] = _segment_max(a, sub_ptr)
        cols["cat_aff_recent_max"] = _segment_max(raff[sub_cats], sub_ptr)
        cols["item_n_cats"] = n_c.astype(np.float64)
        # pipeline.build_features' derived columns
        cols["item_age_at_user_days"] = cols["item_age_days"] - days_since_last
        cols["item_idle_at_user_days"] = cols["item_idle_days"] - days_since_last
        if self.lm is not None:  # pipeline.lm_features, the same function for one user
            hist = items[-SIM_HISTORY:][::-1]
            sims = lm_similarities(cands, self.lm.similarity_vectors, hist)
            for c, sim in zip(LM_SIM_COLUMNS, sims, strict=True):
                cols[c] = sim.astype(np.float64)
        if self.lm_features is not None:
            cols.update(self.lm_features(state, cands))
        return cols

    def _upop_counts(self, cands: np.ndarray, t_end: int) -> dict[str, np.ndarray] | None:
        """`EventTimeIndex.counts` for one end time: each window is a slice of the events
        in time order, counted per item by a bincount (the same integers as the index's
        binary searches). None where the windows hold too many events for that to pay."""
        ix = self._time_index
        t_sorted, by_time = ix.t_sorted, self._items_by_time
        n = len(t_sorted)
        if t_end - ix.t_min >= (1 << 34) - 1:  # beyond the index's time offsets
            return None
        end_all = int(np.searchsorted(t_sorted, t_end, side="right"))
        starts_d = np.searchsorted(
            t_sorted, [t_end - int(w * DAY) for w in UPOP_DAYS], side="right"
        ).tolist()
        sizes = [max(1, int(np.ceil(n * s))) for s in UPOP_SHARES]
        starts_r = [max(0, end_all - size) for size in sizes]
        if end_all - min(starts_d + starts_r) > 64 * max(len(cands), 1) + self.n_items:
            return None
        cols: dict[str, np.ndarray] = {}
        for w, lo in zip(UPOP_DAYS, starts_d, strict=True):
            cnt = np.bincount(by_time[lo:end_all], minlength=self.n_items)[cands]
            cols[f"upop_{w:g}d"] = cnt
            cols[f"upop_share_{w:g}d"] = cnt / ((end_all - lo) + 1.0)
        for s, size, lo in zip(UPOP_SHARES, sizes, starts_r, strict=True):
            cnt = np.bincount(by_time[lo:end_all], minlength=self.n_items)[cands]
            cols[f"upop_last{s:g}"] = cnt / size
        return cols

    def feature_matrix(self, state: UserState) -> tuple[np.ndarray, np.ndarray]:
        """(candidate items, [n_candidates, n_features] float32 in the ranker's order;
        column-major: each column is written in one contiguous pass)."""
        cands, cols = self.candidates(state)
        cols.update(self.feature_columns(state, cands))
        return cands, self.matrix(cols, len(cands))

    def matrix(self, cols: dict[str, np.ndarray], n: int) -> np.ndarray:
        """The ranker's float32 input from feature columns of length `n`."""
        Xt = np.empty((len(self.features), n), dtype=np.float32)
        for j, c in enumerate(self.features):
            Xt[j] = cols[c]
        return Xt.T

    def rank(self, state: UserState) -> Ranked:
        """Every candidate of a user with history, best first."""
        cands, X = self.feature_matrix(state)
        if len(cands) == 0:
            return Ranked(cands, np.zeros(0))
        s = self.trees.predict(X)
        order = np.argsort(-s, kind="stable")
        items, scores = cands[order], s[order]
        if len(self._cold_pool):  # new-item slots, as Pipeline.recommend_indices places them
            lm = self.lm
            assert lm is not None, "new-item slots without a language model"
            uvec = self._user_vector(lm, state)[0]
            items, scores = merge_ranked(
                items, scores, uvec, lm.text_vectors_, self._cold_pool,
                self.new_item_every, seen=state.items,
            )  # fmt: skip
        return Ranked(items, scores)


def top_rows(S: np.ndarray, seen: np.ndarray, n: int) -> list[np.ndarray]:
    """`recsys.candidates.top_n` of each row of `S` (modified in place) with the same
    `seen` items: the first `n` unseen items with a finite score, by score descending
    then index. The rows are partitioned together; a row whose n-th score is tied
    beyond the partition takes the tied items in index order."""
    n = min(n, S.shape[1])
    S[~np.isfinite(S)] = -np.inf
    S[:, seen] = -np.inf
    if n == 0:
        return [np.zeros(0, np.int64) for _ in range(len(S))]
    part = np.argpartition(-S, n - 1, axis=1)[:, :n]
    ps = np.take_along_axis(S, part, axis=1)
    kth = ps.min(axis=1)
    at_kth = kth[:, None]
    tied = np.count_nonzero(at_kth == S, axis=1) > np.count_nonzero(ps == at_kth, axis=1)
    for j in np.flatnonzero(tied & (kth > -np.inf)).tolist():
        m = S[j]
        above = np.flatnonzero(m > kth[j])
        part[j] = np.concatenate([above, np.flatnonzero(m == kth[j])[: n - len(above)]])
        ps[j] = m[part[j]]
    # by score descending, then index: sort by index, then a stable sort by score
    part.sort(axis=1)
    ps = np.take_along_axis(S, part, axis=1)
    o = np.argsort(-ps, axis=1, kind="stable")
    part = np.take_along_axis(part, o, axis=1)
    ps = np.take_along_axis(ps, o, axis=1)
    return [part[j][ps[j] > -np.inf] for j in range(len(S))]


def _gather(m: sp.csr_matrix, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The stored entries of CSR rows `rows`, in row order then stored order:
    (entries per row, column indices, values)."""
    lo = m.indptr[rows]
    lens = m.indptr[rows + 1] - lo
    total = int(lens.sum())
    if _csr_row_index is not None and m.indptr.dtype == m.indices.dtype:  # scipy's `m[rows]`
        cols = np.empty(total, dtype=m.indices.dtype)
        vals = np.empty(total, dtype=m.data.dtype)
        _csr_row_index(
            len(rows),
            rows.astype(m.indptr.dtype, copy=False),
            m.indptr,
            m.indices,
            m.data,
            cols,
            vals,
        )
        return lens, cols, vals
    starts = np.cumsum(lens) - lens
    at = np.arange(total) + np.repeat(lo - starts, lens)
    return lens, m.indices[at], m.data[at]


def _row_sum(m: sp.csr_matrix, rows: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Dense `w @ m[rows]` for a one-row `w` (`weights`, float32; default ones), summed
    entry by entry in the order and dtype of scipy's csr_matmat (rows in the given
    order, each row's entries as stored), so the values equal scipy's to the bit."""
    w = np.ones(len(rows), np.float32) if weights is None else weights
    out = np.zeros(m.shape[1], dtype=np.result_type(w.dtype, m.dtype))
    lens, cols, vals = _gather(m, rows)
    if weights is not None:
        vals = np.repeat(w.astype(out.dtype), lens) * vals
    np.add.at(out, cols, vals.astype(out.dtype, copy=False))
    return out


def _sorted_csr(m: sp.spmatrix) -> sp.csr_matrix:
    """`m` as CSR with each row's entries in column order (a copy where needed)."""
    c = sp.csr_matrix(m, copy=True)
    c.sort_indices()
    return c


# a scattered add costs about five times a matrix-vector product's step per stored
# entry (measured: 4.8 ns against 0.96 ns per entry on EASE's 2.5M-entry matrix)
MATVEC_SHARE = 0.2


def _row_sum_any(m: sp.csr_matrix, mT: sp.csr_matrix, rows: np.ndarray) -> np.ndarray:
    """`_row_sum(m, rows)` (ones as weights, `rows` ascending and distinct), or, for a
    long history whose rows hold more than `MATVEC_SHARE` of the matrix's entries, the
    product of the transpose `mT` (rows in column order) with the rows' indicator: each
    output then adds the same entries in the same order (rows ascending) and the
    indicator's zeros add nothing, so the values are the same to the bit, in time
    bounded by the matrix rather than by the history (the heaviest users' requests)."""
    lens = m.indptr[rows + 1] - m.indptr[rows]
    if int(lens.sum()) <= MATVEC_SHARE * m.nnz:
        return _row_sum(m, rows)
    x = np.zeros(m.shape[0], dtype=m.dtype)
    x[rows] = 1
    return np.asarray(mT @ x, dtype=m.dtype)


def _rows_at(m: sp.csr_matrix, rows: np.ndarray, at: np.ndarray, n: int) -> np.ndarray:
    """`m[rows].toarray()[:, cols]` where `at[col]` is the output column of `col` (-1:
    dropped): dense float64 [len(rows), n], entries added in scipy's order."""
    out = np.zeros((len(rows), n), dtype=m.dtype)
    lens, cols, vals = _gather(m, rows)
    flat = np.repeat(np.arange(0, len(rows) * n, n), lens) + at[cols]
    keep = at[cols] >= 0
    if m.has_canonical_format:  # no column twice in a row: each entry lands alone
        out.reshape(-1)[flat[keep]] = vals[keep]
    else:
        np.add.at(out.reshape(-1), flat[keep], vals[keep])
    return out


def _segment_max(vals: np.ndarray, indptr: np.ndarray) -> np.ndarray:
    """Max of each CSR row's values; 0 for empty rows."""
    out = np.zeros(len(indptr) - 1)
    nz = np.flatnonzero(np.diff(indptr) > 0)
    if len(nz):
        out[nz] = np.maximum.reduceat(vals, indptr[nz])
    return out
