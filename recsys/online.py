"""The online path: one user's candidates, features and scores, for a request.

`OnlineRanker` is built once from a fitted pipeline. A request is a chunk of one: the
pipeline's own candidate and feature kernels (`Pipeline.rank_chunk`) run on the user's
events, the same code the batch job runs on thousands of users, so the same state
gives the same features and scores on both paths. What differs is the evaluator of
the ranker's trees: compiled with lleaves (checked against LightGBM's scores at every
load), which is much cheaper than LightGBM's predict for a few hundred rows.

A user is a `UserState`: their events in time order, and the bundle's user index when
they have one. Fresh events make a new state; nothing here is mutated per request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from features.batch import Histories
from recsys.lm.cold import ColdPool, cold_pool, merge_ranked
from recsys.pipeline import Pipeline, feature_matrix

log = logging.getLogger("recsys")


@dataclass(frozen=True)
class UserState:
    """One user's events, oldest first, and their row in the bundle (-1: none)."""

    items: np.ndarray  # int64 item indices
    times: np.ndarray  # int64 epoch seconds
    user: int = -1
    fresh: bool = False  # events beyond the bundle's history (ALS factors are re-solved)

    @property
    def last_t(self) -> int:
        return int(self.times[-1]) if len(self.times) else -1

    @cached_property
    def seen(self) -> np.ndarray:
        """The distinct items, ascending."""
        return np.unique(self.items)

    @cached_property
    def chunk(self) -> Histories:
        """The state as a chunk of one user (what the pipeline's kernels take)."""
        return Histories.one(self.items, self.times, self.user, self.fresh)


@dataclass
class Ranked:
    """Every candidate of one request, best first."""

    items: np.ndarray  # int64 item indices
    scores: np.ndarray  # float64


class OnlineRanker:
    """The pipeline's candidates, features and ranker for one user at a time, with
    the trees compiled for small batches."""

    def __init__(self, p: Pipeline, tree_cache: Path | None = None) -> None:
        from recsys.trees import TreeEnsemble

        h = p.history_
        self.pipeline = p
        self.n_items = h.n_items
        self.now = int(h.now or 0)
        self.features = list(p.ranker_.features_)
        self.lm = p.lm  # the language model, when the bundle has one
        # new-item slots (recsys.lm.cold): items without interactions in the bundle
        self.new_item_every = p.new_item_every if self.lm is not None else 0
        self.new_item_after = p.new_item_after
        self._cold_pool = ColdPool(
            cold_pool(h.X) if self.new_item_every else np.zeros(0, np.int64),
            self.lm.text_vectors_ if self.lm is not None else np.zeros((0, 0), np.float32),
        )
        self._hist_ptr, self._hist_items, self._hist_times = h.ptr, h.items, h.times
        p.features  # noqa: B018 - the item-side state, built now rather than in a request
        self.trees = TreeEnsemble(p.ranker_, cache_dir=tree_cache)

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

    # -- candidates and features ------------------------------------------------------
    def candidates(self, state: UserState) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(candidate items ascending, every column: source scores and ranks, features)."""
        from recsys.pipeline import chunk_features

        p = self.pipeline
        c = chunk_features(
            p.sources_, p.features, state.chunk, self.n_items, p.config.sources.per_source, self.lm
        )
        return c.items, c.cols

    def feature_matrix(self, state: UserState) -> tuple[np.ndarray, np.ndarray]:
        """(candidate items, [n_candidates, n_features] float32 in the ranker's order)."""
        cands, cols = self.candidates(state)
        return cands, feature_matrix(cols, self.features, len(cands))

    def rank(self, state: UserState) -> Ranked:
        """Every candidate of a user with history, best first (ties: item index)."""
        c, s = self.pipeline.rank_chunk(state.chunk, predict=self.trees.predict)
        if len(c) == 0:
            return Ranked(c.items, np.zeros(0))
        order = np.argsort(-s, kind="stable")
        return self.with_new_items(state, c.items[order], s[order])

    def with_new_items(self, state: UserState, items: np.ndarray, scores: np.ndarray) -> Ranked:
        """The ranked candidates (best first) with the new-item slots merged in, as
        `Pipeline.recommend_indices` places them (none without slots)."""
        if len(self._cold_pool):
            lm = self.lm
            assert lm is not None, "new-item slots without a language model"
            uvec = lm.user_vectors_for(state.chunk)[0]
            items, scores = merge_ranked(
                items, scores, uvec, self._cold_pool,
                self.new_item_every, seen=state.items, after=self.new_item_after,
            )  # fmt: skip
        return Ranked(items, scores)
