"""The recommend contract on a small synthetic data set."""

from __future__ import annotations

import sys

import numpy as np
import polars as pl
import pytest

from recsys.candidates import History, MostPopular, source_top_k
from recsys.data import IdIndex, to_canonical, to_internal
from recsys.metrics import summarize
from recsys.pipeline import Pipeline
from recsys.split import split_last_fraction


def test_lists_have_k_unseen_items_and_keep_string_ids(fitted, synth_data) -> None:  # type: ignore[no-untyped-def]
    inter, _ = synth_data
    users = inter["user_id"].unique().head(50)
    recs = fitted.recommend(users, k=10)
    assert recs.columns == ["user_id", "item_id", "rank", "score"]
    assert recs.schema["user_id"] == pl.String and recs.schema["item_id"] == pl.String
    per_user = recs.group_by("user_id").agg(
        pl.col("rank").sort(), pl.col("item_id").n_unique().alias("n")
    )
    assert per_user.height == 50
    assert all(r == list(range(1, 11)) for r in per_user["rank"].to_list())
    assert per_user["n"].min() == 10
    seen = inter.select("user_id", "item_id").unique()
    assert recs.join(seen, on=["user_id", "item_id"], how="semi").height == 0
    # scores decrease along the list
    for _, g in recs.group_by("user_id"):
        s = g.sort("rank")["score"].to_numpy()
        assert np.all(np.diff(s) <= 1e-9)


def test_unknown_users_get_a_fallback_list(fitted) -> None:  # type: ignore[no-untyped-def]
    recs = fitted.recommend(pl.Series("user_id", ["nobody", "nobody-else"]), k=5)
    assert recs.group_by("user_id").len()["len"].to_list() == [5, 5]
    assert recs.filter(pl.col("user_id") == "nobody")["item_id"].n_unique() == 5


def test_pipeline_beats_most_popular_on_held_out_events(synth_data, fast_config) -> None:  # type: ignore[no-untyped-def]
    inter, items = synth_data
    users = IdIndex.from_values(inter["user_id"])
    item_index = IdIndex(items["item_id"])
    hist, test = split_last_fraction(to_internal(inter, users, item_index), 0.2)
    p = Pipeline(fast_config).fit(to_canonical(hist, users, item_index), items)
    u = np.sort(test["u"].unique().to_numpy()).astype(np.int64)
    recs, _ = p.recommend_indices(p.user_index_.lookup(users.take(u)), 10)
    ours = summarize(recs, u, test, 10, len(item_index))["ndcg@10"]
    h = History(hist, len(users), len(item_index))
    pop = MostPopular().fit(h)
    base = summarize(source_top_k(pop, h, u, 10), u, test, 10, len(item_index))["ndcg@10"]
    assert ours > 1.2 * base, (ours, base)


def test_ranker_refit_trains_one_model_with_the_folds_mean_tree_count() -> None:
    """`[ranker] refit`: the folds choose the number of trees, one model on every user
    predicts (what a serving bundle evaluates per request), and it still ranks."""
    from recsys.ranker import Ranker

    rng = np.random.default_rng(0)
    n_users, per_user = 120, 30
    X = rng.standard_normal((n_users * per_user, 4)).astype(np.float32)
    y = (X[:, 0] + 0.5 * rng.standard_normal(len(X)) > 1.0).astype(int)
    groups = np.repeat(np.arange(n_users), per_user)
    df = pl.DataFrame(X, schema=["a", "b", "c", "d"])
    kw = dict(n_estimators=60, learning_rate=0.1, min_child_samples=5, early_stopping_rounds=10)
    folds = Ranker(**kw).fit(X, y, groups, df.columns)  # type: ignore[arg-type]
    one = Ranker(refit=True, **kw).fit(X, y, groups, df.columns)  # type: ignore[arg-type]
    assert len(folds.boosters_) == 3
    assert len(one.boosters_) == 1
    assert one.fold_trees_ == folds.fold_trees_
    assert one.boosters_[0].num_trees() == round(float(np.mean(folds.fold_trees_)))
    s = one.predict(X)
    assert np.corrcoef(s, X[:, 0])[0, 1] > 0.8


def test_ranker_feature_gain_scales_a_features_splits() -> None:
    """`feature_gain` (what `[ranker] lm_gain` sets for the language model's columns):
    at 0 the ranker never splits on the feature, however telling; below 1 it still
    uses a feature that carries the signal alone; unnamed features keep their gain."""
    from recsys.ranker import Ranker

    rng = np.random.default_rng(1)
    n_users, per_user = 100, 30
    X = rng.standard_normal((n_users * per_user, 3)).astype(np.float32)
    # "a" tells the targets apart best, "b" less well, "c" not at all
    y = (X[:, 0] + 0.7 * X[:, 1] + 0.3 * rng.standard_normal(len(X)) > 1.2).astype(int)
    groups = np.repeat(np.arange(n_users), per_user)
    df = pl.DataFrame(X, schema=["a", "b", "c"])
    kw = dict(n_estimators=40, learning_rate=0.1, min_child_samples=5, early_stopping_rounds=40)

    def gains(r: Ranker) -> dict[str, float]:
        imp = np.sum([b.feature_importance("gain") for b in r.boosters_], axis=0)
        return dict(zip(r.features_, imp.tolist(), strict=True))

    free = gains(Ranker(**kw).fit(X, y, groups, df.columns))  # type: ignore[arg-type]
    off = gains(Ranker(feature_gain={"a": 0.0}, **kw).fit(X, y, groups, df.columns))  # type: ignore[arg-type]
    half = gains(Ranker(feature_gain={"a": 0.5}, **kw).fit(X, y, groups, df.columns))  # type: ignore[arg-type]
    assert free["a"] > free["b"] > 0
    assert off["a"] == 0 and off["b"] > 0
    assert half["a"] > 0
    assert half["a"] / sum(half.values()) < free["a"] / sum(free.values())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and glibc")
def test_memory_figures_and_heap_release_on_linux() -> None:
    """The fit's logs say resident memory from /proc (now) and getrusage (peak); freed
    blocks allocated while large blocks are mapped on their own leave the process."""
    from recsys.memory import mapped_large_blocks, release_free_memory, rss_gib

    now, peak = rss_gib()
    assert 0.01 < now <= peak + 0.01  # (the kernel updates the peak at its own pace)
    with mapped_large_blocks():
        blocks = [np.ones(300_000) for _ in range(400)]  # 2.4 MB each, about 0.9 GiB
        grown = rss_gib()[0]
        del blocks
    release_free_memory()
    assert grown - rss_gib()[0] > 0.7
