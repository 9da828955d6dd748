"""Every feature of a chunk of (user, candidate) pairs, from one fitted state.

`FeatureBuilder` is built once from the events of a state (the ranker's training
history, or a bundle's whole history): the item-side columns, the transition
matrices, the category table and the event-time index. `transform` then computes
every feature column for any chunk of users and their candidates: the batch job
calls it with thousands of users, a request with one, and both get the same values.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import scipy.sparse as sp

from features.affinity import user_category_affinity
from features.batch import Candidates, Histories
from features.lm import lm_pair_features
from features.popularity import item_age, item_popularity
from features.sequence import Transitions, sequence_follow, transitions
from features.time_aware import EventTimeIndex, popularity_before_user_time
from features.user import item_mean_user_activity, user_activity


class FeatureBuilder:
    """Point-in-time features at `now` from `events` (u, i, t sorted by u then t).

    item_cats: (i, cat) rows, one per category of an item."""

    def __init__(
        self,
        events: pl.DataFrame,
        n_items: int,
        now: int,
        item_cats: pl.DataFrame,
        *,
        max_gap: int = 5,
        last_n: int = 10,
        decay: float = 0.8,
        recent_cats: int = 20,
    ) -> None:
        self.n_items = n_items
        self.now = int(now)
        self.last_n = last_n
        self.decay = decay
        self.recent_cats = recent_cats
        lev = events.lazy()
        # item-side columns (NaN: no events)
        self.item_cols: dict[str, np.ndarray] = {}
        for frame in (item_popularity(lev, self.now), item_age(lev, self.now),
                      item_mean_user_activity(lev)):  # fmt: skip
            df = frame.collect()
            idx = df["i"].to_numpy()
            for c in df.columns:
                if c == "i":
                    continue
                col = np.full(n_items, np.nan)
                col[idx] = df[c].cast(pl.Float64).to_numpy()
                self.item_cols[c] = col
        u = events["u"].to_numpy()
        i = events["i"].to_numpy().astype(np.int64)
        t = events["t"].to_numpy().astype(np.int64)
        self.trans = Transitions(transitions(u, i, n_items, max_gap))
        self.occurrences = np.bincount(i, minlength=n_items).astype(np.float64)
        self.time_index = EventTimeIndex.build(i, t)
        self.item_cats = category_matrix(item_cats, n_items)

    def transform(
        self, h: Histories, c: Candidates, sim_vectors: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """Every feature column of the pairs of `c` (users of `h`, each with at least
        one event), the language model's similarities when `sim_vectors` is given."""
        rows = c.rows
        cols: dict[str, np.ndarray] = {k: v[c.items] for k, v in self.item_cols.items()}
        for k, v in user_activity(h, self.now).items():
            cols[k] = v[rows]
        cols |= popularity_before_user_time(self.time_index, h, c)
        cols |= sequence_follow(
            self.trans, self.occurrences, h, c, last_n=self.last_n, decay=self.decay
        )
        cols |= user_category_affinity(self.item_cats, h, c, self.recent_cats)
        since = cols["user_days_since_last"]
        cols["item_age_at_user_days"] = cols["item_age_days"] - since
        cols["item_idle_at_user_days"] = cols["item_idle_days"] - since
        if sim_vectors is not None:
            cols |= lm_pair_features(sim_vectors, h, c)
        return cols


def category_matrix(item_cats: pl.DataFrame, n_items: int) -> sp.csr_matrix:
    """[n_items, n_categories] binary from (i, cat) rows."""
    if item_cats.height:
        codes = item_cats["cat"].cast(pl.Categorical).to_physical().to_numpy().astype(np.int64)
        m = sp.csr_matrix(
            (np.ones(len(codes)), (item_cats["i"].to_numpy(), codes)),
            shape=(n_items, int(codes.max()) + 1),
        )
    else:
        m = sp.csr_matrix((n_items, 1))
    m.sum_duplicates()
    m.data[:] = 1.0
    return m
