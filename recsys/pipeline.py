"""The two-stage pipeline: candidate sources -> point-in-time features -> LambdaRank.

`fit` splits its own input in time: the last part of each user's history becomes the
ranker's targets (and, for a share of users, its early-stopping data); the sources
and features see only the part before. The sources are then refitted on everything
for recommending.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from features.affinity import user_category_affinity
from features.lm import SIM_HISTORY, lm_candidate_rank, lm_pair_features
from features.popularity import item_age, item_popularity
from features.sequence import sequence_follow, transitions
from features.time_aware import popularity_before_user_time
from features.user import item_mean_user_activity, user_activity
from recsys.candidates import (
    ALS,
    EASE,
    History,
    ItemKNN,
    MostPopular,
    NextItem,
    RecentPopular,
    Source,
    top_n,
)
from recsys.config import PipelineConfig
from recsys.data import I, IdIndex, U, to_internal
from recsys.lm.cold import cold_order, cold_pool, merge
from recsys.ranker import Ranker
from recsys.schema import ITEM, USER, DataError

if TYPE_CHECKING:
    from recsys.explain import Explanation
    from recsys.lm.model import LanguageModel

log = logging.getLogger("recsys")

CATEGORY_COLUMNS = ("genres", "genre", "category", "categories", "subcategory", "section")
# the language model's ranker columns: its source's score and rank ("lm" source), their
# rank among the candidates, the similarities of features.lm, and any column named like
# them (`lm_*`, `*_lm`, `*_lm_*`) that an `OnlineRanker.lm_features` hook adds
LM_FEATURE = re.compile(r"(^|_)lm(_|$)")


def is_lm_feature(name: str) -> bool:
    return LM_FEATURE.search(name) is not None


@contextmanager
def stage(name: str, timings: dict[str, float]) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
    log.info("stage %-22s %7.1f s", name, timings[name])


def make_sources(cfg: PipelineConfig, lm: LanguageModel | None = None) -> list[Source]:
    """The configured sources, plus the language model's nearest items when it is given."""
    s = cfg.sources
    known: dict[str, Source] = {
        "pop": MostPopular(),
        "recent_pop": RecentPopular(s.recent_window_days),
        "itemknn": ItemKNN(k=s.itemknn_k),
        "ease": EASE(l2=s.ease_l2, max_items=s.ease_max_items, keep=s.ease_keep),
        "als": ALS(factors=s.als_factors, iterations=s.als_iterations, seed=cfg.seed),
        "next": NextItem(max_gap=s.next_max_gap, last_n=s.next_last_n, decay=s.next_decay),
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


def generate_candidates(
    sources: list[Source], h: History, users: np.ndarray, per_source: int
) -> pl.DataFrame:
    """Union of each source's top-`per_source` unseen items, with every source's score
    and rank (per_source + 1 where that source did not retrieve the item)."""
    names = [s.name for s in sources]
    mats = {s.name: s.scores(users, h) for s in sources}
    seen = h.X[users]
    n_users, n_items = len(users), h.n_items
    union = np.zeros((n_users, n_items), dtype=bool)
    ranks = {}
    for name in names:
        top, _ = top_n(mats[name], seen, per_source)
        r = np.full((n_users, n_items), per_source + 1, dtype=np.int32)
        rows = np.repeat(np.arange(n_users), top.shape[1]).reshape(top.shape)
        ok = top >= 0
        r[rows[ok], top[ok]] = np.tile(np.arange(1, top.shape[1] + 1), (n_users, 1))[ok]
        union[rows[ok], top[ok]] = True
        ranks[name] = r
    rr, cc = np.nonzero(union)
    cols: dict[str, np.ndarray] = {U: users[rr].astype(np.int32), I: cc.astype(np.int32)}
    for name in names:
        sc = mats[name][rr, cc]
        cols[f"{name}_score"] = np.where(np.isfinite(sc), sc, np.nan).astype(np.float32)
        cols[f"{name}_rank"] = ranks[name][rr, cc]
    return pl.DataFrame(cols)


def build_features(
    h: History,
    pairs: pl.DataFrame,
    item_cats: pl.DataFrame,
    cfg: PipelineConfig,
    lm: LanguageModel | None = None,
) -> pl.DataFrame:
    """Candidate pairs (with source columns) + every point-in-time feature (and the
    language model's, when it is given)."""
    ev = h.ev.lazy()
    now = int(h.now or 0)
    p = pairs.lazy()
    users_t = user_activity(ev, now)
    trans = transitions(ev, cfg.sources.next_max_gap)
    out = (
        p.join(item_popularity(ev, now), on=I, how="left")
        .join(item_age(ev, now), on=I, how="left")
        .join(item_mean_user_activity(ev), on=I, how="left")
        .join(users_t, on=U, how="left")
        .join(
            popularity_before_user_time(ev, p, users_t.select(U, "user_last_t")),
            on=[U, I],
            how="left",
        )
        .join(
            sequence_follow(
                ev, p, trans, last_n=cfg.sources.next_last_n, decay=cfg.sources.next_decay
            ),
            on=[U, I],
            how="left",
        )
        .join(user_category_affinity(ev, item_cats.lazy(), p), on=[U, I], how="left")
        .with_columns(
            (pl.col("item_age_days") - pl.col("user_days_since_last")).alias(
                "item_age_at_user_days"
            ),
            (pl.col("item_idle_days") - pl.col("user_days_since_last")).alias(
                "item_idle_at_user_days"
            ),
        )
        .drop("user_last_t")
    )
    if lm is not None:
        out = lm_candidate_rank(out).join(lm_features(lm, h, pairs).lazy(), on=[U, I], how="left")
    return out.collect().sort([U, I])


def lm_features(lm: LanguageModel, h: History, pairs: pl.DataFrame) -> pl.DataFrame:
    """Similarities of each candidate to the user's history, in the space of the LM's
    text vectors (`LanguageModel.similarity_vectors`)."""
    users = np.unique(pairs[U].to_numpy())
    hists = h.last_items(users, SIM_HISTORY)
    return lm_pair_features(
        pairs.select(U, I), lm.similarity_vectors, dict(zip(users.tolist(), hists, strict=True))
    )


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
            )
            rng = np.random.default_rng(cfg.seed)
            if len(train_users) > cfg.max_train_users:
                train_users = np.sort(rng.choice(train_users, cfg.max_train_users, replace=False))
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
        self.lm_ = None
        if cfg.use_lm:
            # fitted once, before the ranker's targets, and kept for recommending: item
            # vectors come from text, user vectors from whatever history is given
            from recsys.lm.model import LanguageModel

            with stage("language model", self.timings_):
                self.lm_ = LanguageModel(cfg.lm, cfg.seed).fit(h_in, items)
        if cfg.new_item_every and self.lm_ is None:
            log.warning("new_item_every is set but there is no language model: no new-item slots")
        with stage("sources (targets)", self.timings_):
            sources_in = [s.fit(h_in) for s in make_sources(cfg, self.lm_)]
        with stage("candidates (targets)", self.timings_):
            pairs = self._candidates(sources_in, h_in, train_users)
            self._log_candidate_recall(pairs, targets.filter(pl.col(U).is_in(train_users.tolist())))
        with stage("features (targets)", self.timings_):
            feats = build_features(h_in, pairs, self.item_cats_, cfg, self.lm_)
            labels = (
                feats.select(U, I)
                .join(
                    targets.select(U, I).unique().with_columns(pl.lit(1).alias("y")),
                    on=[U, I],
                    how="left",
                )["y"]
                .fill_null(0)
                .to_numpy()
            )
            has_pos = (
                feats.select(U)
                .with_columns(pl.Series("y", labels))
                .group_by(U)
                .agg(pl.col("y").max())
            )
            keep_users = has_pos.filter(pl.col("y") > 0)[U]
            mask = feats[U].is_in(keep_users.implode()).to_numpy()
            feats, labels = feats.filter(pl.Series(mask)), labels[mask]
            log.info(
                "ranker data: %d rows, %d users, %d positives, %d features",
                len(feats),
                feats[U].n_unique(),
                int(labels.sum()),
                len(self.feature_columns(feats)),
            )
        with stage("ranker", self.timings_):
            rc = cfg.ranker
            cols = self.feature_columns(feats)
            lm_cols = [c for c in cols if is_lm_feature(c)]
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
                refit=rc.refit,
                seed=cfg.seed,
                feature_gain=dict.fromkeys(lm_cols, rc.lm_gain),
            ).fit(feats.select(cols), labels, feats[U].to_numpy())
        with stage("sources (all)", self.timings_):
            self.history_ = History(ev, n_u, n_i)
            self.sources_ = [s.fit(self.history_) for s in make_sources(cfg, self.lm_)]
            self.fallback_ = self._fallback_items()
        log.info("fit done in %.1f s", time.perf_counter() - t_all)
        return self

    @property
    def lm(self) -> LanguageModel | None:
        """The fitted language model, or None (switched off, or a bundle without one)."""
        return getattr(self, "lm_", None)

    @staticmethod
    def feature_columns(feats: pl.DataFrame) -> list[str]:
        return [c for c in feats.columns if c not in (U, I)]

    def _candidates(self, sources: list[Source], h: History, users: np.ndarray) -> pl.DataFrame:
        per = self.config.sources.per_source
        bs = max(1, min(1024, int(2e7 // max(h.n_items * len(sources), 1))))
        parts = [
            generate_candidates(sources, h, users[s : s + bs], per)
            for s in range(0, len(users), bs)
        ]
        return pl.concat(parts) if parts else pl.DataFrame()

    def _log_candidate_recall(self, pairs: pl.DataFrame, targets: pl.DataFrame) -> None:
        t = targets.select(U, I).unique()
        hit = t.join(pairs.select(U, I), on=[U, I], how="semi")
        per_source = {}
        for name in [c[: -len("_rank")] for c in pairs.columns if c.endswith("_rank")]:
            got = pairs.filter(pl.col(f"{name}_rank") <= self.config.sources.per_source).select(
                U, I
            )
            per_source[name] = len(t.join(got, on=[U, I], how="semi")) / max(len(t), 1)
        log.info(
            "candidate recall: union %.3f with %.0f candidates/user; by source %s",
            len(hit) / max(len(t), 1),
            len(pairs) / max(pairs[U].n_unique(), 1),
            ", ".join(f"{k} {v:.3f}" for k, v in per_source.items()),
        )

    def _fallback_items(self) -> np.ndarray:
        """For users without history: recent popularity at the end of the log, then all-time."""
        h = self.history_
        recent = RecentPopular(30.0).fit(h).counts_at(np.array([int(h.now or 0)]), h.n_items)[0]
        pop = np.bincount(h.ev[I].to_numpy(), minlength=h.n_items).astype(np.float64)
        return np.lexsort((-pop, -recent))

    # -- recommending --------------------------------------------------------------
    def candidate_features(self, users: np.ndarray) -> pl.DataFrame:
        """Every candidate of the given user indices (users with history) with its
        source columns and features: the rows the ranker scores."""
        pairs = self._candidates(self.sources_, self.history_, users)
        return build_features(self.history_, pairs, self.item_cats_, self.config, self.lm)

    def recommend_indices(
        self, users: np.ndarray, k: int, feats: pl.DataFrame | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k item indices and scores for user indices (-1 = unknown user).

        `feats`: `candidate_features` of these users, when the caller already has them.
        """
        h = self.history_
        out_items = np.full((len(users), k), -1, dtype=np.int64)
        out_scores = np.full((len(users), k), np.nan, dtype=np.float64)
        has_hist = np.zeros(len(users), dtype=bool)
        known = users >= 0
        has_hist[known] = h.user_last_t[users[known]] >= 0
        warm = np.unique(users[has_hist])
        if len(warm):
            if feats is None:
                feats = self.candidate_features(warm)
            scored = feats.select(U, I).with_columns(
                pl.Series("score", self.ranker_.predict(feats))
            )
            top = (
                scored.sort([U, "score"], descending=[False, True])
                .group_by(U, maintain_order=True)
                .agg(pl.col(I).head(k), pl.col("score").head(k))
            )
            pos = {int(u): r for r, u in enumerate(top[U].to_list())}
            top_items, top_scores = top[I].to_list(), top["score"].to_list()
            cold = self._cold_lists(warm, k)
            for r, u in enumerate(users.tolist()):
                j = pos.get(u) if has_hist[r] else None
                if j is None:
                    continue
                its, scs = np.asarray(top_items[j], np.int64), np.asarray(top_scores[j])
                if cold is not None:  # new-item slots: NaN scores (not the ranker's)
                    its, scs = merge(its, scs, cold[u], self.new_item_every, k)
                out_items[r, : len(its)] = its
                out_scores[r, : len(its)] = scs
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

    @property
    def new_item_every(self) -> int:
        """Every n-th place of a list goes to an item without interactions (0: off)."""
        n = getattr(self, "new_item_every_", None)
        return int(self.config.new_item_every if n is None else n)

    @new_item_every.setter
    def new_item_every(self, n: int) -> None:
        self.new_item_every_ = n

    def _cold_lists(self, users: np.ndarray, k: int) -> dict[int, np.ndarray] | None:
        """Each user's best items without interactions for the new-item slots of a
        k-long list, by the language model (None: slots off, or nothing to place)."""
        every = self.new_item_every
        if every < 1 or self.lm is None or k < every:
            return None
        X = self.history_.X
        cached = getattr(self, "_cold_pool_", None)
        if cached is None or cached[0] is not X:  # once per history, not per chunk
            cached = self._cold_pool_ = (X, cold_pool(X))
        pool = cached[1]
        if len(pool) == 0:
            return None
        uv = self.lm.user_vectors(users, self.history_)
        items, _ = cold_order(uv, self.lm.text_vectors_, pool, k // every)
        return dict(zip(users.tolist(), items, strict=True))

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
            n = len(items)
            frames.append(
                pl.DataFrame(
                    {
                        USER: ids[s : s + batch_size].gather(np.repeat(np.arange(n), k)),
                        ITEM: self.item_index_.take(items.ravel().clip(0)),
                        "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), n),
                        "score": scores.ravel(),
                        "_valid": items.ravel() >= 0,
                    }
                )
                .filter(pl.col("_valid"))
                .drop("_valid")
            )
            bar.update(n)
        bar.close()
        return pl.concat(frames) if frames else pl.DataFrame()

    def explain(self, user_id: object, k: int = 10, n_similar: int = 3) -> Explanation:
        """The user's top-k with each item's feature contributions (they add up, with
        the bias, to the score) and similar history items: a `recsys.explain.Explanation`."""
        from recsys.explain import explain

        return explain(self, user_id, k=k, n_similar=n_similar)

    # -- persistence -----------------------------------------------------------------
    def save(self, path: str) -> None:
        """Write the fitted pipeline as a bundle (see `recsys.bundle`)."""
        from recsys import bundle

        bundle.save(self, path)

    @staticmethod
    def load(path: str) -> Pipeline:
        """Load a bundle, verifying its checksums."""
        from recsys import bundle

        return bundle.load(path)
