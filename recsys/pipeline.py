"""The two-stage pipeline: candidate sources -> point-in-time features -> LambdaRank.

`fit` splits its own input in time: the last part of each user's history becomes the
ranker's targets (and, for a share of users, its early-stopping data); the sources
and features see only the part before. The sources are then refitted on everything
for recommending.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm

from features.batch import Candidates, Histories, segment_index, segment_offsets
from features.builder import FeatureBuilder
from recsys import bundle
from recsys.candidates import (
    ALS,
    EASE,
    History,
    ItemKNN,
    MostPopular,
    NextItem,
    RecentPopular,
    Source,
    candidates,
    segment_top,
)
from recsys.config import PipelineConfig
from recsys.data import I, IdIndex, T, U, to_internal
from recsys.lm.cold import ColdPool, cold_needed, cold_pool, merge, n_slots
from recsys.memory import release_free_memory, rss_gib
from recsys.ranker import Ranker
from recsys.resources import usable_cpus
from recsys.schema import ITEM, USER, DataError

if TYPE_CHECKING:
    from recsys.lm.model import LanguageModel

log = logging.getLogger("recsys")

CATEGORY_COLUMNS = ("genres", "genre", "category", "categories", "subcategory", "section")
# the language model's ranker columns: its source's score and rank ("lm" source), their
# rank among the candidates, the similarities of features.lm, and any column named like
# them (`lm_*`, `*_lm`, `*_lm_*`) that an `OnlineRanker.lm_features` hook adds
LM_FEATURE = re.compile(r"(^|_)lm(_|$)")
# from this many users at once, recommending compiles the ranker's trees (seconds, once
# per bundle and machine) rather than evaluating them with LightGBM's predict
COMPILE_USERS = 2000


def is_lm_feature(name: str) -> bool:
    return LM_FEATURE.search(name) is not None


@contextmanager
def stage(name: str, timings: dict[str, float]) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
    release_free_memory()  # what the stage freed, before the next one allocates its own
    now, peak = rss_gib()
    log.info("stage %-22s %7.1f s   RSS %.2f GiB, peak %.2f GiB", name, timings[name], now, peak)


def make_sources(cfg: PipelineConfig, lm: LanguageModel | None = None) -> list[Source]:
    """The configured sources, plus the language model's nearest items when it is given."""
    s = cfg.sources
    known: dict[str, Source] = {
        "pop": MostPopular(),
        "recent_pop": RecentPopular(s.recent_window_days),
        "itemknn": ItemKNN(k=s.itemknn_k),
        "ease": EASE(l2=s.ease_l2, max_items=s.ease_max_items, keep=s.ease_keep),
        "als": ALS(factors=s.als_factors, iterations=s.als_iterations, seed=cfg.seed),
        "next": NextItem(
            max_gap=s.next_max_gap, last_n=s.next_last_n, decay=s.next_decay, keep=s.next_keep
        ),
    }
    unknown = [n for n in s.use if n not in known]
    if unknown:
        raise ValueError(f"unknown candidate source(s) {unknown}; known: {sorted(known)}")
    out = [known[n] for n in s.use]
    if lm is not None:
        from recsys.lm.source import LMNearest

        out.append(LMNearest(lm, cold_slots=lm.config.cold_slots))
    return out


def item_categories(
    items: pl.DataFrame, item_index: IdIndex, columns: list[str] | None
) -> pl.DataFrame:
    """(i, cat) rows from the items' category columns, values split on '|' or ','."""
    cols = (
        columns
        if columns is not None
        else [c for c in items.columns if c.lower() in CATEGORY_COLUMNS]
    )
    cols = [c for c in cols if c in items.columns and items[c].dtype == pl.String]
    if not cols:
        return pl.DataFrame(schema={"i": pl.Int32, "cat": pl.String})
    m = items.select(ITEM, *cols).join(item_index.frame(ITEM, "i"), on=ITEM)
    parts = [
        m.select(
            "i",
            (pl.lit(c + ":") + pl.col(c).str.split_exact("\x00", 0).struct.field("field_0")).alias(
                "_raw"
            ),
        )
        for c in cols
    ]
    raw = pl.concat(parts).drop_nulls()
    return (
        raw.with_columns(pl.col("_raw").str.replace_all(",", "|").str.split("|").alias("cat"))
        .explode("cat")
        .with_columns(pl.col("cat").str.strip_chars())
        .filter(~pl.col("cat").str.ends_with(":") & (pl.col("cat").str.len_chars() > 0))
        .with_columns(
            # the column prefix stays on the first token only; put it on every token
            pl.when(pl.col("cat").str.contains(":"))
            .then(pl.col("cat"))
            .otherwise(pl.col("_raw").str.split(":").list.first() + ":" + pl.col("cat"))
            .alias("cat")
        )
        .select(pl.col("i").cast(pl.Int32), "cat")
        .unique()
    )


def feature_matrix(cols: dict[str, np.ndarray], names: list[str], n: int) -> np.ndarray:
    """The ranker's float32 input [n, len(names)] from feature columns of length n."""
    X = np.empty((n, len(names)), dtype=np.float32)
    for j, c in enumerate(names):
        X[:, j] = cols[c]
    return X


def chunk_features(
    sources: list[Source],
    fb: FeatureBuilder,
    b: Histories,
    n_items: int,
    per_source: int,
    lm: LanguageModel | None = None,
) -> Candidates:
    """Every candidate of a chunk of users (each with at least one event) with its
    source columns and every feature: the rows the ranker scores."""
    c = candidates(sources, b, n_items, per_source)
    c.cols |= fb.transform(b, c, lm.similarity_vectors if lm is not None else None)
    return c


def chunk_users(n_items: int, n_sources: int, budget_mb: float) -> int:
    """Users per chunk so that the sources' dense rows (and the selection's
    temporaries, about 2.5 times as much) stay within `budget_mb`."""
    per_user = max(n_items, 1) * max(n_sources, 1) * 4 * 2.5
    return int(min(4096, max(1, budget_mb * 2**20 // per_user)))


class Pipeline:
    """Fit on canonical interactions and items; recommend top-k for any user ids."""

    def __init__(self, config: PipelineConfig | None = None) -> None:
        self.config = config or PipelineConfig()
        # the manifest of the bundle this pipeline was loaded from; empty when fitted here
        self.manifest_: dict[str, Any] = {}

    # -- fitting -----------------------------------------------------------------
    def fit(self, interactions: pl.DataFrame, items: pl.DataFrame) -> Pipeline:
        from recsys.split import split_last_fraction

        cfg = self.config
        self.timings_: dict[str, float] = {}
        t_all = time.perf_counter()
        with stage("prepare", self.timings_):
            self.items_ = items
            self.item_index_ = IdIndex(items[ITEM])
            self.user_index_ = IdIndex.from_values(interactions[USER])
            ev = to_internal(interactions, self.user_index_, self.item_index_)
            if len(ev) == 0:
                raise DataError("no interactions left to fit on", file="interactions")
            self.item_cats_ = item_categories(items, self.item_index_, cfg.category_columns)
            hist, targets = split_last_fraction(ev, cfg.target_fraction)
            train_users = np.intersect1d(
                targets[U].unique().to_numpy(), hist[U].unique().to_numpy()
            ).astype(np.int64)
            log.info(
                "fit: %d events, %d users, %d items; ranker targets: %d events of %d users",
                len(ev),
                len(self.user_index_),
                len(self.item_index_),
                len(targets),
                len(train_users),
            )
        n_u, n_i = len(self.user_index_), len(self.item_index_)
        h_in = History(hist, n_u, n_i)
        del hist
        self.lm_ = None
        if cfg.use_lm:
            # fitted once, before the ranker's targets, and kept for recommending: item
            # vectors come from text, user vectors from whatever history is given
            from recsys.lm.model import LanguageModel

            with stage("language model", self.timings_):
                self.lm_ = LanguageModel(cfg.lm, cfg.seed).fit(h_in, items)
        if cfg.new_item_every and self.lm_ is None and "new_item_every" in cfg.model_fields_set:
            log.warning("new_item_every is set but there is no language model: no new-item slots")
        with stage("sources (targets)", self.timings_):
            sources_in = [s.fit(h_in) for s in make_sources(cfg, self.lm_)]
        with stage("features (targets)", self.timings_):
            fb_in = self._feature_builder(h_in)
            X, y, groups, names = self._ranker_data(sources_in, fb_in, h_in, targets, train_users)
            del fb_in, sources_in
        with stage("ranker", self.timings_):
            rc = cfg.ranker
            lm_cols = [c for c in names if is_lm_feature(c)]
            if lm_cols and rc.lm_gain != 1:
                log.info(
                    "ranker: the language model's %d features at %.2f of their split gain",
                    len(lm_cols),
                    rc.lm_gain,
                )
            self.ranker_ = Ranker(
                n_estimators=rc.n_estimators,
                learning_rate=rc.learning_rate,
                num_leaves=rc.num_leaves,
                min_child_samples=rc.min_child_samples,
                subsample=rc.subsample,
                colsample_bytree=rc.colsample_bytree,
                early_stopping_rounds=rc.early_stopping_rounds,
                valid_fraction=rc.valid_fraction,
                n_folds=rc.n_folds,
                fold_users=rc.fold_users,
                refit=rc.refit,
                seed=cfg.seed,
                feature_gain=dict.fromkeys(lm_cols, rc.lm_gain),
            ).fit(X, y, groups, names)
            del X, y, groups
        del h_in
        self.history_ = History(ev, n_u, n_i)
        if self.lm_ is not None and cfg.lm.refresh_epochs:
            with stage("language model (refresh)", self.timings_):
                self.lm_.refresh(self.history_)
        with stage("sources (all)", self.timings_):
            self.sources_ = [s.fit(self.history_) for s in make_sources(cfg, self.lm_)]
            self.fallback_ = self._fallback_items()
        log.info("fit done in %.1f s", time.perf_counter() - t_all)
        return self

    def _ranker_data(
        self,
        sources: list[Source],
        fb: FeatureBuilder,
        h: History,
        targets: pl.DataFrame,
        train_users: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
        """The ranker's examples: every candidate of the training users (those with a
        target among their candidates), features as float32, a chunk of users at a time.

        Users are sampled (seeded) when there are more than `max_train_users`, and the
        examples stop at `ranker_max_rows`: the ranker learns from a sample of users as
        well as from all of them, at a fraction of the time and memory."""
        cfg = self.config
        per = cfg.sources.per_source
        n_i = h.n_items
        # a random order, so that the users reached when ranker_max_rows stops the
        # examples are a random sample (the rows are put back in user order below)
        rng = np.random.default_rng(cfg.seed)
        if len(train_users) > cfg.max_train_users:
            train_users = rng.choice(train_users, cfg.max_train_users, replace=False)
        else:
            train_users = rng.permutation(train_users)
        t_keys = np.unique(
            targets[U].to_numpy().astype(np.int64) * n_i + targets[I].to_numpy().astype(np.int64)
        )
        bs = chunk_users(n_i, len(sources), cfg.chunk_memory_mb)
        Xs: list[np.ndarray] = []
        ys: list[np.ndarray] = []
        gs: list[np.ndarray] = []
        names: list[str] | None = None
        rows = hits = n_targets = n_pairs = n_users = 0
        src_hits = dict.fromkeys([s.name for s in sources], 0)
        bar = tqdm(total=len(train_users), desc="ranker examples", unit="user", leave=False)
        for a in range(0, len(train_users), bs):
            users = train_users[a : a + bs]
            b = h.histories(users)
            c = chunk_features(sources, fb, b, n_i, per, self.lm_)
            u_of = users[c.rows]
            keys = u_of * n_i + c.items
            at = np.searchsorted(t_keys, keys)
            label = (at < len(t_keys)) & (t_keys[np.minimum(at, len(t_keys) - 1)] == keys)
            # candidate recall, for the log
            lo, hi = np.searchsorted(t_keys, [users.min() * n_i, (users.max() + 1) * n_i])
            tk = t_keys[lo:hi]
            n_targets += int(np.isin(tk // n_i, users).sum())
            hits += int(label.sum())
            for s in sources:
                src_hits[s.name] += int((label & (c.cols[f"{s.name}_rank"] <= per)).sum())
            n_pairs += len(c)
            n_users += len(users)
            # users with a target among their candidates teach the ranker something
            has_pos = np.zeros(len(users), dtype=bool)
            has_pos[c.rows[label]] = True
            keep = has_pos[c.rows]
            if names is None:
                names = [k for k in c.cols if k not in (U, I)]
            Xs.append(feature_matrix({k: v[keep] for k, v in c.cols.items()}, names,
                                     int(keep.sum())))  # fmt: skip
            ys.append(label[keep].astype(np.int8))
            gs.append(u_of[keep])
            rows += int(keep.sum())
            bar.update(len(users))
            if rows >= cfg.ranker_max_rows:
                log.info(
                    "ranker examples: %d rows reached after %d of %d users (ranker_max_rows)",
                    rows,
                    n_users,
                    len(train_users),
                )
                break
        bar.close()
        log.info(
            "candidate recall: union %.3f with %.0f candidates/user; by source %s",
            hits / max(n_targets, 1),
            n_pairs / max(n_users, 1),
            ", ".join(f"{k} {v / max(n_targets, 1):.3f}" for k, v in src_hits.items()),
        )
        g = np.concatenate(gs) if gs else np.zeros(0, np.int64)
        o = np.argsort(g, kind="stable")
        g = g[o]
        X = np.concatenate(Xs)[o] if Xs else np.zeros((0, 0), np.float32)
        del Xs
        y = np.concatenate(ys)[o] if ys else np.zeros(0, np.int8)
        log.info(
            "ranker data: %d rows, %d users, %d positives, %d features",
            len(X),
            len(np.unique(g)),
            int(y.sum()),
            len(names or []),
        )
        if not len(X):
            raise DataError(
                "no user has a ranker target among their candidates", file="interactions"
            )
        return X, y, g, names or []

    @property
    def lm(self) -> LanguageModel | None:
        """The fitted language model, or None (switched off, or a bundle without one)."""
        return getattr(self, "lm_", None)

    def _feature_builder(self, h: History) -> FeatureBuilder:
        s = self.config.sources
        return FeatureBuilder(
            h.ev, h.n_items, int(h.now or 0), self.item_cats_,
            max_gap=s.next_max_gap, last_n=s.next_last_n, decay=s.next_decay,
        )  # fmt: skip

    @property
    def features(self) -> FeatureBuilder:
        """The features' item-side state of the fitted history (built once)."""
        cached = getattr(self, "_features", None)
        h = self.history_
        if cached is None or cached[0] is not h or cached[1] is not self.item_cats_:
            cached = self._features = (h, self.item_cats_, self._feature_builder(h))
        return cached[2]

    @property
    def chunk_size(self) -> int:
        """Users per chunk of candidates and features (from `chunk_memory_mb`)."""
        return chunk_users(self.history_.n_items, len(self.sources_), self.config.chunk_memory_mb)

    def _fallback_items(self) -> np.ndarray:
        """For users without history: recent popularity at the end of the log, then all-time."""
        h = self.history_
        recent = RecentPopular(30.0).fit(h).counts_at(np.array([int(h.now or 0)]), h.n_items)[0]
        pop = np.bincount(h.items, minlength=h.n_items).astype(np.float64)
        return np.lexsort((-pop, -recent))

    # -- recommending --------------------------------------------------------------
    def rank_chunk(
        self, b: Histories, predict: Callable[[np.ndarray], np.ndarray] | None = None
    ) -> tuple[Candidates, np.ndarray]:
        """Every candidate of a chunk of users (each with at least one event) with its
        features, and the ranker's scores (`predict`: another evaluator of the same
        trees, e.g. compiled ones for a request)."""
        h = self.history_
        c = chunk_features(
            self.sources_, self.features, b, h.n_items, self.config.sources.per_source, self.lm
        )
        X = feature_matrix(c.cols, self.ranker_.features_, len(c))
        scores = (predict or self.ranker_.predict)(X) if len(c) else np.zeros(0)
        return c, np.asarray(scores, dtype=np.float64)

    def candidate_features(self, users: np.ndarray) -> pl.DataFrame:
        """(u, i, every source column and feature) of the given user indices (users
        with history): the rows the ranker scores."""
        users = np.asarray(users, dtype=np.int64)
        c = chunk_features(
            self.sources_, self.features, self.history_.histories(users), self.history_.n_items,
            self.config.sources.per_source, self.lm,
        )  # fmt: skip
        return pl.DataFrame({U: users[c.rows].astype(np.int32), I: c.items.astype(np.int32)}
                            | c.cols)  # fmt: skip

    def compiled_trees(self, threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
        """The ranker's trees compiled to native code (lleaves; cached on disk under
        `RECSYS_TREE_CACHE`), on `threads` threads (None: every core): about five times
        LightGBM's own predict on the same rows, and the same scores (checked on the
        first chunk, once per compiled model and cache)."""
        cached = getattr(self, "_compiled", None)
        if cached is None or cached[0] is not self.ranker_:
            from recsys.trees import TreeEnsemble

            t0 = time.perf_counter()
            te = TreeEnsemble(self.ranker_)
            log.info("ranker trees compiled in %.1f s (%s)", time.perf_counter() - t0, te.backend)
            cached = self._compiled = (self.ranker_, te, [te.checked])
        te, checked = cached[1], cached[2]
        te.n_jobs = threads or usable_cpus()

        def predict(X: np.ndarray) -> np.ndarray:
            if not checked[0]:
                te.check(X[:2000], atol=1e-6)
                checked[0] = True
            return te.predict(X)

        return predict

    def recommend_indices(
        self, users: np.ndarray, k: int, compiled: bool | None = None, threads: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k item indices and scores for user indices (-1 = unknown user).

        `compiled`: evaluate the trees compiled (`compiled_trees`, on `threads`); None:
        for requests of `COMPILE_USERS` users or more."""
        h = self.history_
        users = np.asarray(users, dtype=np.int64)
        out_items = np.full((len(users), k), -1, dtype=np.int64)
        out_scores = np.full((len(users), k), np.nan, dtype=np.float64)
        has_hist = np.zeros(len(users), dtype=bool)
        known = users >= 0
        has_hist[known] = h.user_last_t[users[known]] >= 0
        warm = np.unique(users[has_hist])
        bs = self.chunk_size
        if compiled is None:
            compiled = len(warm) >= COMPILE_USERS
        predict = self.compiled_trees(threads) if compiled and len(warm) else None
        for a in range(0, len(warm), bs):
            chunk = warm[a : a + bs]
            items, scores = self.top_k(h.histories(chunk), k, predict)
            at = np.searchsorted(chunk, users)
            rows = np.flatnonzero(
                has_hist & (at < len(chunk)) & (chunk[np.minimum(at, len(chunk) - 1)] == users)
            )
            out_items[rows] = items[at[rows]]
            out_scores[rows] = scores[at[rows]]
        # fallback: users without history, and topping up short lists
        for r in range(len(users)):
            n = int((out_items[r] >= 0).sum())
            if n == k:
                continue
            seen = set(h.X[users[r]].indices.tolist()) if users[r] >= 0 else set()
            seen |= set(out_items[r, :n].tolist())
            extra = [i for i in self.fallback_[: k + len(seen) + 1].tolist() if i not in seen][
                : k - n
            ]
            out_items[r, n : n + len(extra)] = extra
            base = float(np.nanmin(out_scores[r, :n], initial=np.inf)) if n else 0.0
            base = 0.0 if not np.isfinite(base) else base
            out_scores[r, n : n + len(extra)] = base - 1.0 - np.arange(len(extra))
        return out_items, out_scores

    def top_k(
        self, b: Histories, k: int, predict: Callable[[np.ndarray], np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """[len(b), k] items (-1: none) and scores of a chunk of users with history:
        the ranker's order (ties by item index), with the new-item slots merged in."""
        c, s = self.rank_chunk(b, predict)
        items = np.full((len(b), k), -1, dtype=np.int64)
        scores = np.full((len(b), k), np.nan, dtype=np.float64)
        # each row's best k pairs, by score descending, then item (pairs are ascending)
        tptr, top = segment_top(s, c.ptr, k)
        cold = self._cold_lists(b, k)
        after = self.new_item_after
        if cold is None:
            rows, pos = segment_index(tptr), segment_offsets(tptr)
            items[rows, pos] = c.items[top]
            scores[rows, pos] = s[top]
            return items, scores
        for r in range(len(b)):
            seg = top[tptr[r] : tptr[r + 1]]
            its, scs = merge(c.items[seg], s[seg], cold[r], self.new_item_every, k, after)
            items[r, : len(its)] = its
            scores[r, : len(its)] = scs
        return items, scores

    @property
    def new_item_every(self) -> int:
        """Every n-th place of a list goes to an item without interactions (0: off)."""
        n = getattr(self, "new_item_every_", None)
        return int(self.config.new_item_every if n is None else n)

    @new_item_every.setter
    def new_item_every(self, n: int) -> None:
        self.new_item_every_ = n

    @property
    def new_item_after(self) -> int:
        """Places at the head of a list that new-item slots leave to the ranker."""
        n = getattr(self, "new_item_after_", None)
        return int(self.config.new_item_after if n is None else n)

    @new_item_after.setter
    def new_item_after(self, n: int) -> None:
        self.new_item_after_ = n

    def _cold_lists(self, b: Histories, k: int) -> list[np.ndarray] | None:
        """Each user's best items without interactions for the new-item slots of a
        k-long list, by the language model (None: slots off, or nothing to place)."""
        every, after = self.new_item_every, self.new_item_after
        if n_slots(k, every, after) < 1 or self.lm is None:
            return None
        X, tv = self.history_.X, self.lm.text_vectors_
        cached = getattr(self, "_cold_pool_", None)
        if cached is None or cached[0] is not X or cached[1] is not tv:  # not per chunk
            cached = self._cold_pool_ = (X, tv, ColdPool(cold_pool(X), tv))
        pool = cached[2]
        if len(pool) == 0:
            return None
        items, _ = pool.rows(self.lm.user_vectors_for(b), cold_needed(k, every, after))
        return list(items)

    def recommend(
        self,
        user_ids: Sequence[object] | pl.Series,
        k: int = 10,
        batch_size: int = 2000,
        progress: bool = False,
    ) -> pl.DataFrame:
        """(user_id, item_id, rank, score): k rows per user, ids as given."""
        if k < 1:
            raise ValueError("k must be at least 1")
        ids = user_ids if isinstance(user_ids, pl.Series) else pl.Series(USER, list(user_ids))
        ids = ids.rename(USER)
        uidx = self.user_index_.lookup(ids)
        frames = []
        bar = tqdm(total=len(ids), desc="recommend", unit="user", disable=not progress)
        for s in range(0, len(ids), batch_size):
            items, scores = self.recommend_indices(uidx[s : s + batch_size], k)
            frames.append(self.lists_frame(ids[s : s + batch_size], items, scores))
            bar.update(len(items))
        bar.close()
        return (
            pl.concat(frames)
            if frames
            else self.lists_frame(ids[:0], np.zeros((0, k), np.int64), np.zeros((0, k)))
        )

    def lists_frame(self, ids: pl.Series, items: np.ndarray, scores: np.ndarray) -> pl.DataFrame:
        """(user_id, item_id, rank, score) rows of `recommend_indices`' arrays."""
        n, k = items.shape
        return (
            pl.DataFrame(
                {
                    USER: ids.gather(np.repeat(np.arange(n), k)),
                    ITEM: self.item_index_.take(items.ravel().clip(0)),
                    "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), n),
                    "score": scores.ravel(),
                    "_valid": items.ravel() >= 0,
                }
            )
            .filter(pl.col("_valid"))
            .drop("_valid")
        )

    # -- persistence -----------------------------------------------------------------
    def save(self, path: str | Path, manifest_fields: dict[str, Any] | None = None) -> Path:
        """Write the fitted pipeline as a bundle (`recsys.bundle`: a temporary sibling
        directory, the manifest with every file's checksum, then a rename).
        `manifest_fields` join the manifest (e.g. the pseudonym record of the data)."""
        fields = dict(manifest_fields or {})

        def write_files(d: Path) -> dict[str, Any]:
            extra = self._write_files(d)
            taken = sorted(set(fields) & (set(extra) | bundle.MANIFEST_KEYS))
            if taken:
                raise ValueError(f"manifest fields {taken} are the bundle writer's own")
            return extra | fields

        return bundle.write(path, self.config, self.fingerprint(), write_files)

    def fingerprint(self) -> str:
        """sha256 over the training events and the catalogue ids the pipeline was fitted on."""
        h = hashlib.sha256()
        ev = self.history_.ev
        for col in (U, I, T):
            h.update(np.ascontiguousarray(ev[col].to_numpy()).tobytes())
        h.update(self.item_index_.ids.cast(pl.String).str.join("\x1f").item().encode())
        return h.hexdigest()

    def _write_files(self, d: Path) -> dict[str, Any]:
        """The bundle's artifacts, written into `d`; returns extra manifest fields."""
        pl.DataFrame({USER: self.user_index_.ids}).write_parquet(d / "users.parquet")
        self.items_.write_parquet(d / "items.parquet")
        self.history_.ev.write_parquet(d / "history.parquet")
        self.item_cats_.write_parquet(d / "item_categories.parquet")
        tensors: dict[str, np.ndarray] = {"fallback": self.fallback_.astype(np.int64)}
        for s in self.sources_:
            for k, v in s.state().items():
                tensors[f"{s.name}.{k}"] = np.ascontiguousarray(v)
        save_file(tensors, str(d / "sources.safetensors"))
        models = []
        for f, b in enumerate(self.ranker_.boosters_):
            name = f"ranker-{f}.txt"
            b.save_model(str(d / name))
            models.append(name)
        self.ranker_.importances().write_parquet(d / "importances.parquet")
        lm = self.lm.save(d) if self.lm is not None else None
        return {
            "lm": lm,
            "ranker": {
                "features": self.ranker_.features_,
                "models": models,
                "validation_ndcg@10": self.ranker_.best_score_,
            },
            "timings_s": {k: round(v, 3) for k, v in getattr(self, "timings_", {}).items()},
        }

    @staticmethod
    def load(path: str | Path) -> Pipeline:
        """Load a bundle, verifying its checksums first (`recsys.bundle.BundleError`
        for a missing, damaged or foreign one)."""
        d = Path(path)
        manifest = bundle.read_manifest(d)
        stored = dict(manifest["config"])
        # bundles from before `new_item_after` placed their slots from the list's head
        stored.setdefault("new_item_after", 0)
        cfg = PipelineConfig.model_validate(stored)
        p = Pipeline(cfg)
        p.user_index_ = IdIndex(pl.read_parquet(d / "users.parquet")[USER])
        p.items_ = pl.read_parquet(d / "items.parquet")
        p.item_index_ = IdIndex(p.items_[ITEM])
        p.item_cats_ = pl.read_parquet(d / "item_categories.parquet")
        ev = pl.read_parquet(d / "history.parquet")
        p.history_ = History(ev, len(p.user_index_), len(p.item_index_))
        tensors = load_file(str(d / "sources.safetensors"))
        p.fallback_ = tensors["fallback"]
        p.sources_ = []
        p.lm_ = None
        if manifest.get("lm"):
            from recsys.lm.model import LanguageModel

            p.lm_ = LanguageModel.load(d, manifest["lm"], cfg.lm, cfg.seed)
        for s in make_sources(cfg, p.lm_):
            prefix = f"{s.name}."
            state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            p.sources_.append(s.load_state(state, p.history_))
        p.ranker_ = Ranker.from_texts(
            [(d / name).read_text() for name in manifest["ranker"]["models"]],
            manifest["ranker"]["features"],
            float(manifest["ranker"]["validation_ndcg@10"]),
        )
        p.manifest_ = manifest
        return p
