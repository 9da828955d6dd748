"""The online path (numpy, one user) gives the offline path's features and scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

from recsys.candidates import top_n
from recsys.data import I, U
from recsys.online import OnlineRanker, top_rows
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
            if c.endswith("_rank"):  # each source's list: the same items, the same order
                np.testing.assert_array_equal(on, off, err_msg=f"{c}, user {u}")
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


def test_long_histories_take_the_matrix_vector_product_with_the_same_scores(
    loaded: Pipeline, online: OnlineRanker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ItemKNN and EASE rows for a long history come from the transposed matrix times
    the history's indicator: the same float32 values, to the bit, as the scattered sum
    of the history's rows and as the offline sources."""
    import recsys.online as online_mod

    users = np.arange(0, len(loaded.user_index_), 5)[:30]
    rows = {}
    for share in (np.inf, 0.0):  # every history by scattering, then by the product
        monkeypatch.setattr(online_mod, "MATVEC_SHARE", share)
        rows[share] = np.stack([online.source_scores(online.user_state(int(u))) for u in users])
    np.testing.assert_array_equal(rows[0.0], rows[np.inf])
    h = loaded.history_
    for r, s in enumerate(online.sources):
        if s.name in ("itemknn", "ease"):
            np.testing.assert_array_equal(rows[0.0][:, r], s.scores(users, h), err_msg=s.name)


def test_online_top_rows_equal_offline_top_n() -> None:
    """The candidate lists: the same items in the same order, ties included (scores
    with many equal values, zeros of both signs, -inf, NaN, +inf, seen items)."""
    rng = np.random.default_rng(0)
    for trial in range(400):
        n_items = int(rng.integers(1, 120))
        rows = [
            rng.integers(-3, 4, n_items).astype(np.float32),
            ((rng.random(n_items) < 0.2) * rng.integers(1, 4, n_items)).astype(np.float32),
            rng.standard_normal(n_items).astype(np.float32),
            rng.integers(-1, 2, n_items).astype(np.float32) * np.float32(0.0),
        ]
        S = np.stack([rows[int(k)] for k in rng.integers(0, 4, 3)])
        for v, share in ((-np.inf, 0.2), (np.nan, 0.05), (np.inf, 0.05)):
            if rng.random() < 0.4:
                S[rng.random(S.shape) < share] = v
        seen = np.flatnonzero(rng.random(n_items) < 0.3)
        n = int(rng.integers(1, n_items + 10))
        mask = np.zeros((len(S), n_items), dtype=np.float32)
        mask[:, seen] = 1
        items, _ = top_n(S, sp.csr_matrix(mask), n)
        got = top_rows(S.copy(), seen, n)
        for j in range(len(S)):
            np.testing.assert_array_equal(got[j], items[j][items[j] >= 0], err_msg=f"{trial}")


def test_online_source_lists_equal_top_n_with_fresh_events(online: OnlineRanker) -> None:
    """Each source's list (its ranks among the candidates) is `top_n` of the source's
    row, for bundle users and for users with fresh events (new end times, new items)."""
    rng = np.random.default_rng(1)
    n = online.per_source
    for u in range(0, 60, 3):
        extra = None
        if u % 2:
            k = int(rng.integers(1, 6))
            t = online.now + np.sort(rng.integers(1, 10 * 86400, k))
            extra = (rng.integers(0, online.n_items, k), t)
        st = online.user_state(u, extra)
        cands, cols = online.candidates(st)
        S = online.source_scores(st)
        mask = np.zeros((1, online.n_items), dtype=np.float32)
        mask[0, st.seen] = 1
        for r, s in enumerate(online.sources):
            items, _ = top_n(S[r : r + 1], sp.csr_matrix(mask), n)
            want = items[0][items[0] >= 0]
            rank = cols[f"{s.name}_rank"]
            listed = rank <= n
            got = cands[listed][np.argsort(rank[listed])]
            np.testing.assert_array_equal(got, want, err_msg=f"{s.name}, user {u}")


def test_compiled_trees_equal_lightgbm(online: OnlineRanker) -> None:
    _, X = online.feature_matrix(online.user_state(0))
    assert online.trees.check(X) <= 1e-9


@pytest.mark.slow
def test_language_model_features_and_scores_online(  # type: ignore[no-untyped-def]
    synth_data, tiny_bert: Path, tmp_path: Path
) -> None:
    """A pipeline with the LM: its source, its features and the scores match too."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from recsys.config import PipelineConfig

    inter, items = synth_data
    cfg = PipelineConfig.model_validate(
        {
            "sources": {"per_source": 50, "als_iterations": 3},
            "ranker": {"n_estimators": 60, "early_stopping_rounds": 20},
            "lm": {
                "model": str(tiny_bert),
                "dim": 16,
                "epochs": 1,
                "encoder_epochs": 0,
                "batch_size": 128,
                "negatives": 64,
                "max_length": 32,
                "cpu_train_layers": 1,
                "checkpoints": False,
                "device": "cpu",
                "cpu_threads": 1,
            },
        }
    )
    p = Pipeline(cfg).fit(inter, items)
    assert p.lm_ is not None
    online = OnlineRanker(p, tree_cache=tmp_path / "trees")
    users = np.arange(0, len(p.user_index_), 11)[:20]
    pairs = p._candidates(p.sources_, p.history_, users)
    feats = build_features(p.history_, pairs, p.item_cats_, p.config, p.lm_)
    feats = feats.with_columns(pl.Series("score", p.ranker_.predict(feats)))
    lm_cols = [c for c in feats.columns if c.startswith("lm_")]
    assert "lm_score" in lm_cols and "lm_sim_max" in lm_cols
    for u in users.tolist():
        st = online.user_state(u)
        cands, cols = online.candidates(st)
        cols.update(online.feature_columns(st, cands))
        f = feats.filter(pl.col(U) == u)
        np.testing.assert_array_equal(f[I].to_numpy(), cands)
        for c in [c for c in feats.columns if c not in (U, I, "score")]:
            if c == "lm_cand_rank":
                # a rank among near-equal LM scores may move by the ties within float error
                v = f["lm_score"].to_numpy().astype(np.float64)
                near = (np.abs(v[:, None] - v[None, :]) <= 1e-5).sum(axis=1)
                off = f[c].cast(pl.Float64).to_numpy()
                assert np.all(np.abs(np.asarray(cols[c]) - off) < near), f"{c}, user {u}"
                continue
            np.testing.assert_allclose(
                np.asarray(cols[c], dtype=np.float64),
                f[c].cast(pl.Float64).to_numpy(),
                rtol=1e-4,
                atol=1e-5,
                err_msg=f"{c}, user {u}",
            )
        ranked = online.rank(st)
        on = dict(zip(ranked.items.tolist(), ranked.scores.tolist(), strict=True))
        # the LM features sit within float error of the offline ones, but an untrained
        # tiny LM gives many near-equal scores, and a tree threshold between two of them
        # (or a rank among them) can send a candidate down another branch: most agree
        got = np.array([on[int(i)] for i in f[I].to_list()])
        assert np.mean(np.abs(got - f["score"].to_numpy()) < 1e-6) > 0.75
