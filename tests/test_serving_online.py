"""A request (a chunk of one user) gets the batch job's candidates, features and scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

from recsys.candidates import top_lists, top_n
from recsys.data import I, U
from recsys.online import OnlineRanker
from recsys.pipeline import Pipeline


@pytest.fixture(scope="module")
def loaded(bundle_dir: Path) -> Pipeline:
    return Pipeline.load(str(bundle_dir))


@pytest.fixture(scope="module")
def online(loaded: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> OnlineRanker:
    return OnlineRanker(loaded, tree_cache=tmp_path_factory.mktemp("trees"))


def test_a_chunk_of_one_gives_every_value_of_a_chunk_of_many(loaded: Pipeline) -> None:
    """The batch job ranks thousands of users per chunk and a request ranks one, with
    the same kernels: every candidate and every column must be the same to the bit,
    whoever shares the chunk."""
    p = loaded
    users = np.arange(0, len(p.user_index_), 7)[:40]
    many = p.candidate_features(users)
    cols = [c for c in many.columns if c not in (U, I)]
    assert set(p.ranker_.features_) <= set(cols)
    for u in users.tolist():
        one = p.candidate_features(np.array([u]))
        f = many.filter(pl.col(U) == u)
        assert one.height == f.height > 0
        for c in [I, *cols]:
            np.testing.assert_array_equal(one[c].to_numpy(), f[c].to_numpy(), err_msg=f"{c}, {u}")


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


def test_top_lists_take_the_best_unseen_items_ties_by_index() -> None:
    """Each source's list: the same items in the same order as a plain sort, ties
    included (scores with many equal values, zeros of both signs, -inf, NaN, +inf,
    seen items)."""
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
        seen = sp.csr_matrix((rng.random(S.shape) < 0.3).astype(np.float32))
        n = int(rng.integers(1, n_items + 10))
        ptr, items = top_lists(S.copy(), seen, n)
        for j in range(len(S)):
            ok = np.isfinite(S[j]) & (seen[j].toarray()[0] == 0)
            cand = np.flatnonzero(ok)
            want = cand[np.lexsort((cand, -S[j][cand]))][:n]
            np.testing.assert_array_equal(items[ptr[j] : ptr[j + 1]], want, err_msg=f"{trial}")


def test_top_lists_of_long_rows_equal_a_plain_sort() -> None:
    """Rows of thousands of items (the bound from group maxima leaves a few to sort):
    ties at the n-th score, rows mostly -inf or seen, all equal, fewer than n left."""
    rng = np.random.default_rng(3)
    for trial in range(30):
        n_items, n = int(rng.integers(300, 5000)), int(rng.integers(1, 150))
        kinds = [
            rng.standard_normal(n_items),
            rng.integers(0, 3, n_items).astype(np.float64),  # many ties
            np.where(rng.random(n_items) < 0.99, -np.inf, rng.random(n_items)),
            np.zeros(n_items),
            np.where(rng.random(n_items) < 0.5, np.nan, rng.standard_normal(n_items)),
        ]
        S = np.stack([kinds[int(k)] for k in rng.integers(0, len(kinds), 6)])
        S = S.astype(np.float32 if trial % 2 else np.float64)
        seen = sp.csr_matrix((rng.random(S.shape) < rng.random() * 0.9).astype(np.float32))
        ptr, items = top_lists(S.copy(), seen, n)
        for j in range(len(S)):
            ok = np.isfinite(S[j]) & (seen[j].toarray()[0] == 0)
            cand = np.flatnonzero(ok)
            want = cand[np.lexsort((cand, -S[j][cand]))][:n]
            np.testing.assert_array_equal(items[ptr[j] : ptr[j + 1]], want, err_msg=f"{trial}")


def test_segment_top_is_the_head_of_a_full_sort() -> None:
    """The ranker's top-k of each user's candidates: a full sort's first k (score
    descending, ties by position), with ties, empty rows and non-finite scores."""
    from recsys.candidates import segment_top

    rng = np.random.default_rng(4)
    for trial in range(60):
        lens = rng.integers(0, 400, int(rng.integers(1, 30)))
        ptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        vals = rng.integers(-5, 5, int(ptr[-1])).astype(np.float64)
        if trial % 3 == 0:
            vals = rng.standard_normal(int(ptr[-1]))
        if trial % 7 == 0 and len(vals):
            vals[rng.random(len(vals)) < 0.1] = -np.inf
        k = int(rng.integers(1, 30))
        got_ptr, got = segment_top(vals, ptr, k)
        for r in range(len(lens)):
            seg = np.arange(ptr[r], ptr[r + 1])
            want = seg[np.lexsort((seg, -vals[seg]))][:k]
            np.testing.assert_array_equal(
                got[got_ptr[r] : got_ptr[r + 1]], want, err_msg=f"{trial}"
            )


def test_sparse_rows_sort_a_product_and_sum_duplicates() -> None:
    """SparseRows keeps a matrix canonical (sorted, duplicates summed) whether it comes
    sorted, unsorted (a product) or with duplicates: the same entries as scipy's, by
    the key sort of a request's few entries as by the passes through CSC of a chunk's."""
    from recsys.candidates import SparseRows, canonical_rows

    rng = np.random.default_rng(5)
    A = sp.random(30, 200, density=0.05, format="csr", random_state=1, dtype=np.float32)
    B = sp.random(200, 300, density=0.05, format="csr", random_state=2, dtype=np.float32)
    lens = rng.integers(0, 12, 30)  # unsorted rows with repeated columns
    dup = sp.csr_matrix(
        (rng.random(lens.sum()).astype(np.float32), rng.integers(0, 20, lens.sum()),
         np.r_[0, np.cumsum(lens)]),
        shape=(30, 300),
    )  # fmt: skip
    for M in (A @ B, dup, sp.csr_matrix(A.toarray())):
        want = M.copy()
        want.sum_duplicates()
        for got in (SparseRows(M.copy()).S, canonical_rows(M.copy(), small=0)):
            assert got.has_canonical_format
            np.testing.assert_array_equal(got.indptr, want.indptr)
            np.testing.assert_array_equal(got.indices, want.indices)
            np.testing.assert_array_equal(got.data, want.data)


def test_row_product_has_the_bits_of_scipys_product() -> None:
    """A request's one-row product (ItemKNN, EASE, next item) equals scipy's product of
    that row to the bit: the same columns, the same float32 sums (added in the row's
    order), columns summing to exactly 0 dropped; by the sort and by the dense row."""
    from recsys.candidates import canonical_rows, row_product

    rng = np.random.default_rng(6)
    n = 400
    for trial in range(120):
        dtype = np.float64 if trial % 5 == 0 else np.float32
        M = sp.random(n, n, density=rng.random() * 0.2, format="csr", random_state=trial)
        M = M.astype(dtype)
        M.data = (rng.standard_normal(M.nnz) * 100).astype(dtype)
        if trial % 4 == 0 and M.nnz:  # exact cancellations: x and -x in one column
            M.data[: M.nnz // 2] = np.round(M.data[: M.nnz // 2])
            M = sp.csr_matrix(sp.vstack([M[: n // 2], -M[: n // 2]]))
        cols = np.unique(rng.integers(0, n, int(rng.integers(0, 60))))
        if trial % 4 == 0:
            cols = np.unique(np.concatenate([cols, cols[cols < n // 2] + n // 2]))
        w = None if trial % 2 else rng.random(len(cols)).astype(np.float32)
        x = sp.csr_matrix(
            (np.ones(len(cols), np.float32) if w is None else w, cols.astype(np.int32),
             np.array([0, len(cols)], np.int32)),
            shape=(1, n),
        )  # fmt: skip
        want = canonical_rows(x @ M)
        for small in (0, 4096):
            got = row_product(cols, w, M, small=small)
            assert got.shape == want.shape and got.data.dtype == want.dtype, trial
            np.testing.assert_array_equal(got.indices, want.indices, err_msg=f"{trial}")
            np.testing.assert_array_equal(
                got.data.view(np.uint8), want.data.view(np.uint8), err_msg=f"{trial}"
            )


def test_a_request_scores_each_source_as_a_chunk_does(
    loaded: Pipeline, online: OnlineRanker
) -> None:
    """A chunk of one user (a request) takes its own product for the sparse sources
    and its own exact scores for the product ones (ALS, the language model); its row
    is the same, to the bit, as that user's row in a chunk of several."""
    from features.batch import Histories
    from recsys.candidates import EASE, ProductRows, SparseRows, source_rows

    rng = np.random.default_rng(7)
    n_items = online.n_items
    states = [online.user_state(u) for u in range(0, 40, 2)]
    states += [  # unknown users; known users with fresh events, repeats included
        online.user_state(-1, (rng.integers(0, n_items, 4), np.full(4, online.now))),
        online.user_state(3, (np.array([5, 5, 5]), online.now + np.arange(1, 4))),
    ]
    other = online.user_state(1)
    # the fixture's EASE is dense (a small catalogue); a sparse one as a large one keeps
    sources = [*loaded.sources_, EASE(keep=8).fit(loaded.history_)]
    checked: set[str] = set()
    for st in states:
        pair = Histories(
            np.array([0, len(st.items), len(st.items) + len(other.items)]),
            np.concatenate([st.items, other.items]),
            np.concatenate([st.times, other.times]),
            np.array([st.user, other.user]),
            np.array([st.fresh, other.fresh]),
        )
        for s in sources:
            one = source_rows(s, st.chunk, n_items)
            if isinstance(one, ProductRows):
                both = source_rows(s, pair, n_items)
                assert isinstance(both, ProductRows)
                items = np.arange(n_items)
                got = one.at(np.zeros(n_items, np.int64), items)
                want_p = both.at(np.zeros(n_items, np.int64), items)
                np.testing.assert_array_equal(got.view(np.uint8), want_p.view(np.uint8), s.name)
                checked.add(s.name)
            if not isinstance(one, SparseRows):
                continue
            want = source_rows(s, pair, n_items).S[0]
            np.testing.assert_array_equal(one.S.indices, want.indices, err_msg=s.name)
            np.testing.assert_array_equal(
                one.S.data.view(np.uint8), want.data.view(np.uint8), err_msg=s.name
            )
            checked.add(s.name)
    assert {"itemknn", "ease", "next", "als"} <= checked


def test_source_lists_with_fresh_events(loaded: Pipeline, online: OnlineRanker) -> None:
    """Each source's list (its ranks among the candidates) is `top_n` of the source's
    row, for bundle users and for users with fresh events (new end times, new items)."""
    rng = np.random.default_rng(1)
    p = loaded
    n = p.config.sources.per_source
    for u in range(0, 60, 3):
        extra = None
        if u % 2:
            k = int(rng.integers(1, 6))
            t = online.now + np.sort(rng.integers(1, 10 * 86400, k))
            extra = (rng.integers(0, online.n_items, k), t)
        st = online.user_state(u, extra)
        cands, cols = online.candidates(st)
        for s in p.sources_:
            b = st.chunk
            items, _ = top_n(s.scores(b, online.n_items), b.seen(online.n_items), n)
            want = items[0][items[0] >= 0]
            rank = cols[f"{s.name}_rank"]
            listed = rank <= n
            got = cands[listed][np.argsort(rank[listed])]
            np.testing.assert_array_equal(got, want, err_msg=f"{s.name}, user {u}")


def test_fresh_events_move_the_users_time_features(online: OnlineRanker) -> None:
    """A fresh event is a new last event: recency and activity follow it (not the
    bundle's state of the user)."""
    st = online.user_state(0)
    item = int(online.pipeline.fallback_[0])
    t = online.now + 3 * 86400
    fresh = online.user_state(0, (np.array([item]), np.array([t])))
    _, before = online.candidates(st)
    _, after = online.candidates(fresh)
    assert after["user_n"][0] == before["user_n"][0] + 1
    assert after["user_days_since_last"][0] == 0.0
    assert before["user_days_since_last"][0] >= 0.0


def test_compiled_trees_equal_lightgbm(online: OnlineRanker) -> None:
    _, X = online.feature_matrix(online.user_state(0))
    assert online.trees.check(X) <= 1e-9


@pytest.mark.slow
def test_language_model_features_and_scores_online(  # type: ignore[no-untyped-def]
    synth_data, tiny_bert: Path, tmp_path: Path
) -> None:
    """A pipeline with the LM: its source and features are the same for a chunk of one,
    and a request's scores are the batch job's."""
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
    many = p.candidate_features(users)
    lm_cols = [c for c in many.columns if c.startswith("lm_")]
    assert "lm_score" in lm_cols and "lm_sim_max" in lm_cols
    offline = p.recommend(p.user_index_.take(users), k=10)
    for u in users.tolist():
        one = p.candidate_features(np.array([u]))
        f = many.filter(pl.col(U) == u)
        for c in [I, *lm_cols]:
            np.testing.assert_array_equal(one[c].to_numpy(), f[c].to_numpy(), err_msg=f"{c}, {u}")
        ranked = online.rank(online.user_state(u))
        uid = p.user_index_.take(np.array([u]))[0]
        want = offline.filter(pl.col("user_id") == uid)
        on = dict(zip(ranked.items.tolist(), ranked.scores.tolist(), strict=True))
        got = np.array([on[int(j)] for j in p.item_index_.lookup(want["item_id"])])
        np.testing.assert_allclose(got, want["score"].to_numpy(), rtol=1e-9, atol=1e-9)


def test_sparse_rows_take_the_same_lists_as_dense_rows() -> None:
    """A source held sparse (stored entries; every other eligible item scores 0, the
    rest -inf) lists the same items as its dense row: positives, then the zeros in
    index order, then the negatives, never a seen item."""
    from recsys.candidates import SparseRows

    rng = np.random.default_rng(2)
    for trial in range(300):
        n_rows, n_items = int(rng.integers(1, 6)), int(rng.integers(1, 80))
        dense = rng.integers(-2, 3, (n_rows, n_items)).astype(np.float32)
        dense[rng.random(dense.shape) < 0.5] = 0.0
        eligible = None
        if rng.random() < 0.5:
            eligible = np.flatnonzero(rng.random(n_items) < 0.7)
        S = sp.csr_matrix(dense)
        if rng.random() < 0.3:  # an explicitly stored zero
            S.data[rng.random(len(S.data)) < 0.1] = 0.0
        full = S.toarray()
        if eligible is not None:
            out = np.ones(n_items, bool)
            out[eligible] = False
            full[:, out] = -np.inf
            S = S.multiply(~out[None, :]).tocsr()
        seen = sp.csr_matrix((rng.random((n_rows, n_items)) < 0.2).astype(np.float32))
        n = int(rng.integers(1, n_items + 5))
        got = SparseRows(S, eligible).top(seen, n)
        want = top_lists(full.copy(), seen, n)
        np.testing.assert_array_equal(got[0], want[0], err_msg=f"{trial}")
        np.testing.assert_array_equal(got[1], want[1], err_msg=f"{trial}")


def test_product_rows_list_the_exact_scores_top_and_one_user_alone_the_same() -> None:
    """A product source's top comes from a float32 BLAS product and its error bound:
    it must be the top of the exact scores (ties by index, never a seen item), and a
    user's scores must have the same bits alone as in a chunk."""
    from recsys.candidates import ItemMatrix, ProductRows

    rng = np.random.default_rng(3)
    for trial in range(200):
        n_rows, n_items, d = (
            int(rng.integers(1, 9)),
            int(rng.integers(1, 400)),
            int(rng.integers(1, 70)),
        )
        U = rng.standard_normal((n_rows, d)).astype(np.float32)
        V = rng.standard_normal((n_items, d)).astype(np.float32)
        if trial % 3 == 0:  # near-equal and equal scores: few distinct, nearly parallel items
            base = rng.standard_normal(d).astype(np.float32)
            V = (base + 1e-6 * rng.integers(-2, 3, (n_items, 1))).astype(np.float32)
        if trial % 5 == 0:
            V[rng.random(n_items) < 0.3] = 0.0  # exact ties at zero
        rows = ProductRows(U, ItemMatrix(V), n_items)
        exact = rows.dense()
        seen = sp.csr_matrix((rng.random((n_rows, n_items)) < 0.2).astype(np.float32))
        n = int(rng.integers(1, n_items + 5))
        got = rows.top(seen, n)
        want = top_lists(exact.copy(), seen, n)
        np.testing.assert_array_equal(got[0], want[0], err_msg=f"{trial}")
        np.testing.assert_array_equal(got[1], want[1], err_msg=f"{trial}")
        for r in range(n_rows):
            alone = ProductRows(U[r : r + 1], ItemMatrix(V), n_items).dense()[0]
            assert alone.tobytes() == exact[r].tobytes(), f"{trial}, row {r}"
        # the exact scores are the float64 product rounded once to float32
        ref = (U.astype(np.float64) @ V.T.astype(np.float64)).astype(np.float32)
        np.testing.assert_allclose(exact, ref, rtol=0, atol=1e-6 * np.abs(ref).max(initial=1))


def test_one_users_top_by_item_norms_is_the_exact_top() -> None:
    """A request's top from item vectors whose norms spread widely (ALS's factors)
    scans the items by norm and stops where no item left can reach the top. It must
    give the exact scores' top all the same: ties by index, near-ties, seen items,
    long vectors pointing away, fewer eligible items than asked."""
    from recsys.candidates import ItemMatrix, ProductRows

    rng = np.random.default_rng(11)
    scanned = 0
    for trial in range(60):
        n_items, d = int(rng.integers(4096, 9000)), int(rng.integers(2, 40))
        V = rng.standard_normal((n_items, d)).astype(np.float32)
        V *= (rng.pareto(1.5, n_items) * 0.01 + 1e-4).astype(np.float32)[:, None]
        u = rng.standard_normal((1, d)).astype(np.float32)
        if trial % 4 == 1:  # the longest vectors point away from the user
            V[np.argsort(-np.linalg.norm(V, axis=1))[:50]] = -10 * u
        if trial % 4 == 2:  # scores a float32 product cannot order: the top's margin
            near = rng.random(n_items) < 0.05  # many directions, one exact score
            R = rng.standard_normal((int(near.sum()), d))
            R[R @ u[0] < 0] *= -1
            R /= np.maximum(R @ u[0].astype(np.float64), 0.1)[:, None]
            V[near] = (R * 3.0).astype(np.float32)
        if trial % 4 == 3:  # exact ties (score 0) among items of different norms
            u = np.eye(1, d, dtype=np.float32)
            V[:, 0] = np.where(rng.random(n_items) < 0.6, 0.0, -np.abs(V[:, 0]))
            V[rng.random(n_items) < 0.001, 0] = 1.0
        frac = [0.0, 0.01, 0.3, 0.9995][trial // 4 % 4]
        seen = sp.csr_matrix((rng.random((1, n_items)) < frac).astype(np.float32))
        n = int(rng.choice([1, 10, 100, 500, n_items]))
        items = ItemMatrix(V)
        assert items.prunable
        rows = ProductRows(u, items, n_items)
        got = rows.top(seen, n)
        want = top_lists(rows.dense(), seen, n)
        np.testing.assert_array_equal(got[0], want[0], err_msg=f"{trial}")
        np.testing.assert_array_equal(got[1], want[1], err_msg=f"{trial}")
        scanned += items._by_norm is not None
    assert scanned == 60
    # unit vectors (text) have nothing to skip: the full product serves them
    assert not ItemMatrix(rng.standard_normal((5000, 8)).astype(np.float32) * 0 + 1).prunable


def test_a_checked_tree_cache_spares_workers_lightgbm(  # type: ignore[no-untyped-def]
    bundle_dir: Path, tmp_path: Path, fresh_process_lists
) -> None:
    """The batch job's workers load the bundle and evaluate compiled trees; once the
    cache holds the trees and the note that they equal LightGBM's, a new process
    ranks without importing LightGBM (1-2 s of each worker's start), and the lists
    are the same as the first process's, which checked."""
    runs = fresh_process_lists(bundle_dir, tmp_path / "trees", 30)
    assert runs[0]["lightgbm"], "the first process checks the compiled trees against LightGBM"
    assert list((tmp_path / "trees").glob("*.checked"))
    assert not runs[1]["lightgbm"]
    assert runs[1]["items"] == runs[0]["items"]


def test_compiled_trees_where_the_check_cannot_be_noted(loaded: Pipeline, tmp_path: Path) -> None:
    """A cache the check cannot write its note into (a read-only mount; here the
    note's name is taken by a directory, which stops root too): the check runs and
    passes, ranking goes on, and the next process will check again."""
    from recsys.trees import TreeEnsemble

    cache = tmp_path / "trees"
    te = TreeEnsemble(loaded.ranker_, cache_dir=cache)
    for note in te._checked:
        (note / "taken").mkdir(parents=True)
    X = np.zeros((3, len(loaded.ranker_.features_)), dtype=np.float32)
    assert te.check(X, atol=1e-6) <= 1e-6
    assert not te.checked
    assert not TreeEnsemble(loaded.ranker_, cache_dir=cache).checked


def test_requests_sharing_a_window_get_the_recent_counts_of_their_own(
    loaded: Pipeline, online: OnlineRanker
) -> None:
    """Users without a history of their own share the bundle's "now", so recent
    popularity keeps their window's row; each request still gets its own top (seen
    items excluded) and scores, as if counted afresh."""
    from recsys.candidates import RecentPopular, source_rows

    src = next(s for s in loaded.sources_ if isinstance(s, RecentPopular))
    n = online.n_items
    rng = np.random.default_rng(5)
    for r in range(4):
        seen_items = rng.choice(n, 5, replace=False)
        st = online.user_state(-1, (seen_items, np.full(5, online.now)))
        b = st.chunk
        got = source_rows(src, b, n)
        lo, hi = src._bounds(src._t_end(b))
        want = src._rows(lo, hi, n)  # counted afresh
        gp, gi = got.top(b.seen(n), 50)
        wp, wi = want.top(b.seen(n), 50)
        np.testing.assert_array_equal(gp, wp, err_msg=f"request {r}")
        np.testing.assert_array_equal(gi, wi, err_msg=f"request {r}")
        assert not np.isin(gi, seen_items).any()
        probe = np.arange(n)
        np.testing.assert_array_equal(got.at(np.zeros(n, np.int64), probe),
                                      want.at(np.zeros(n, np.int64), probe))  # fmt: skip
    assert (int(lo[0]), int(hi[0]), n) in src._memo._vals  # the one window, kept
