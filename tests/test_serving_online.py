"""The online path (numpy, one user) gives the offline path's features and scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys.data import I, U
from recsys.online import OnlineRanker
from recsys.pipeline import Pipeline, build_features


@pytest.fixture(scope="module")
def loaded(bundle_dir: Path) -> Pipeline:
    return Pipeline.load(str(bundle_dir))


@pytest.fixture(scope="module")
def online(loaded: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> OnlineRanker:
    return OnlineRanker(loaded, tree_cache=tmp_path_factory.mktemp("trees"))


def test_every_feature_column_has_the_same_values_online(
    loaded: Pipeline, online: OnlineRanker
) -> None:
    p = loaded
    users = np.arange(0, len(p.user_index_), 7)[:40]
    pairs = p._candidates(p.sources_, p.history_, users)
    feats = build_features(p.history_, pairs, p.item_cats_, p.config)
    offline_cols = [c for c in feats.columns if c not in (U, I)]
    # a feature added offline without an online version fails here, by name
    assert set(p.ranker_.features_) <= set(offline_cols)
    for u in users.tolist():
        st = online.user_state(u)
        cands, cols = online.candidates(st)
        cols.update(online.feature_columns(st, cands))
        f = feats.filter(pl.col(U) == u)
        np.testing.assert_array_equal(f[I].to_numpy(), cands, err_msg=f"candidates of user {u}")
        missing = [c for c in offline_cols if c not in cols]
        assert not missing, f"features without an online version: {missing}"
        for c in offline_cols:
            off = f[c].cast(pl.Float64).to_numpy()
            on = np.asarray(cols[c], dtype=np.float64)
            # float32 matrix products (ALS) differ in the last bit between batch sizes
            np.testing.assert_allclose(on, off, rtol=1e-5, atol=1e-6, err_msg=f"{c}, user {u}")


def test_online_scores_equal_offline_scores(loaded: Pipeline, online: OnlineRanker) -> None:
    p = loaded
    ids = p.user_index_.ids[:60]
    k = 20
    offline = p.recommend(ids, k=k)
    for uid in ids.to_list():
        u = int(p.user_index_.lookup(pl.Series([uid]))[0])
        ranked = online.rank(online.user_state(u))
        on = dict(zip(ranked.items.tolist(), ranked.scores.tolist(), strict=True))
        off = offline.filter(pl.col("user_id") == uid)
        off_idx = p.item_index_.lookup(off["item_id"])
        got = np.array([on[int(j)] for j in off_idx])
        np.testing.assert_allclose(got, off["score"].to_numpy(), rtol=1e-9, atol=1e-9)
        # and the online top-k is the offline top-k (up to the order of exact ties)
        top = np.sort(ranked.scores[:k])[::-1]
        np.testing.assert_allclose(top, np.sort(off["score"].to_numpy())[::-1], atol=1e-9)


def test_compiled_trees_equal_lightgbm(online: OnlineRanker) -> None:
    _, X = online.feature_matrix(online.user_state(0))
    assert online.trees.check(X) <= 1e-9
