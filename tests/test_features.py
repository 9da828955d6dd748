"""Point-in-time correctness and the meaning of the sequence- and time-aware features."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
from polars.testing import assert_frame_equal

from features.batch import Candidates, Histories
from features.builder import FeatureBuilder
from features.sequence import Transitions, sequence_follow, transitions
from features.time_aware import EventTimeIndex, popularity_before_user_time
from recsys.candidates import History
from recsys.config import PipelineConfig
from recsys.data import IdIndex, to_internal
from recsys.pipeline import chunk_features, item_categories, make_sources


def test_appending_later_events_changes_nothing(synth_data) -> None:  # type: ignore[no-untyped-def]
    inter, items = synth_data
    users = IdIndex.from_values(inter["user_id"])
    item_index = IdIndex(items["item_id"])
    ev = to_internal(inter, users, item_index)
    t = ev["t"].sort()
    cutoff = int(t[int(len(t) * 0.7)])
    early = ev.filter(pl.col("t") < cutoff)
    later = ev.filter(pl.col("t") >= cutoff)
    assert later.height > 1000
    cfg = PipelineConfig.model_validate({"sources": {"als_iterations": 2, "per_source": 30}})
    cats = item_categories(items, item_index, None)

    def features_at(events: pl.DataFrame) -> pl.DataFrame:
        h = History.before(
            events.sort(["u", "t"], maintain_order=True), cutoff, len(users), len(item_index)
        )
        srcs = [s.fit(h) for s in make_sources(cfg)]
        u = np.unique(early["u"].to_numpy())[:80].astype(np.int64)
        fb = FeatureBuilder(h.ev, h.n_items, int(h.now or 0), cats)
        c = chunk_features(srcs, fb, h.histories(u), h.n_items, 30)
        return pl.DataFrame({"u": u[c.rows], "i": c.items} | c.cols)

    before = features_at(early)
    after = features_at(pl.concat([early, later]))
    assert before.height > 0
    assert_frame_equal(before, after)
    # and the later events do matter once the cutoff moves past them
    h_late = History(ev, len(users), len(item_index))
    assert h_late.X.nnz > History(early.sort(["u", "t"]), len(users), len(item_index)).X.nnz


def _ev(rows: list[tuple[int, int, int]]) -> pl.DataFrame:
    return pl.DataFrame(
        rows, schema={"u": pl.Int32, "i": pl.Int32, "t": pl.Int64}, orient="row"
    ).sort(["u", "t"])


def _chunk(
    ev: pl.DataFrame, users: list[int], cands: list[list[int]]
) -> tuple[Histories, Candidates]:
    """The users' histories in `ev` and their candidate items (ascending)."""
    h = History(ev, int(ev["u"].max()) + 1, 100)
    b = h.histories(np.array(users))
    ptr = np.concatenate([[0], np.cumsum([len(c) for c in cands])])
    return b, Candidates(ptr, np.concatenate([np.sort(c) for c in cands]).astype(np.int64), {})


def test_sequence_follow_counts_successors_in_other_histories() -> None:
    # users 0 and 1 watch 1 then 2; user 2 has just watched 1
    ev = _ev([(0, 1, 0), (0, 2, 1), (1, 1, 0), (1, 3, 1), (1, 2, 2), (2, 1, 5)])
    b, c = _chunk(ev, [2], [[2, 3, 4]])
    tr = transitions(ev["u"].to_numpy(), ev["i"].to_numpy(), 100, max_gap=2)
    occ = np.bincount(ev["i"].to_numpy(), minlength=100).astype(np.float64)
    f = sequence_follow(Transitions(tr), occ, b, c, last_n=3, decay=0.5)
    # 2 follows 1 at gap 1 (user 0) and gap 2 (user 1): 1 + 1/2; 3 follows 1 at gap 1 once
    assert f["seq_follow_last"].tolist() == [1.5, 1.0, 0.0]
    # normalised by how often item 1 occurs (3 times)
    assert np.allclose(f["seq_follow_norm"], [0.5, 1 / 3, 0.0])
    assert f["seq_follow_nearest"].tolist() == [0, 0, 3]


def test_time_aware_popularity_uses_the_users_own_time() -> None:
    day = 86_400
    # item 7 is busy around day 10, item 8 around day 100
    rows = [(10 + k, 7, 10 * day - k) for k in range(5)] + [
        (20 + k, 8, 100 * day - k) for k in range(3)
    ]
    rows += [
        (0, 9, 10 * day + 1),
        (1, 9, 100 * day + 1),
    ]  # user 0 active at day 10, user 1 at day 100
    ev = _ev(rows)
    b, c = _chunk(ev, [0, 1], [[7, 8], [7, 8]])
    index = EventTimeIndex.build(ev["i"].to_numpy(), ev["t"].to_numpy())
    f = popularity_before_user_time(index, b, c)
    assert f["upop_7d"].tolist() == [5, 0, 0, 3]
    # a chunk of one user counts the same
    for r in range(2):
        one = popularity_before_user_time(
            index, b.take(np.array([r])), _chunk(ev, [r], [[7, 8]])[1]
        )
        assert one["upop_7d"].tolist() == f["upop_7d"][2 * r : 2 * r + 2].tolist()


def test_requests_sharing_an_end_time_count_what_a_chunk_counts() -> None:
    """Every user without a history of their own ends at the bundle's "now": from the
    second such request on, the counts come from every item's columns kept for that
    time, and must be the integers (and shares) the binary searches give a chunk."""
    rng = np.random.default_rng(3)
    day = 86_400
    n = 6_000  # windows far larger than one user's candidates: no direct count
    rows = list(
        zip(
            rng.integers(0, 300, n).tolist(),
            rng.integers(0, 80, n).tolist(),
            (200 * day - rng.integers(0, 200 * day, n)).tolist(),
            strict=True,
        )
    )
    ev = _ev(rows)
    index = EventTimeIndex.build(ev["i"].to_numpy(), ev["t"].to_numpy())
    now = int(ev["t"].max())
    cands = [np.sort(rng.choice(80, 30, replace=False)) for _ in range(4)]
    for r, items in enumerate(cands):
        b = Histories.one(np.array([1, 2]), np.array([now - 5, now]))
        c = Candidates(np.array([0, len(items)]), items.astype(np.int64), {})
        got = popularity_before_user_time(index, b, c)
        want = index.counts(items, np.full(len(items), now))
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{k}, request {r}")
            assert got[k].dtype == want[k].dtype
            got[k][:] = -1  # a request's columns are its own
    assert len(index.memo._vals) == 1  # kept from the second request on
    # a time past every event (an event posted now) counts what a chunk counts
    later = now + 400 * 86_400
    items = cands[0]
    b = Histories.one(np.array([1]), np.array([later]))
    c = Candidates(np.array([0, len(items)]), items.astype(np.int64), {})
    for _ in range(2):
        got = popularity_before_user_time(index, b, c)
        want = index.counts(items, np.full(len(items), later))
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.parametrize("n", [0, 1, 63, 64, 65, 1_000, 200_003])
def test_two_level_search_gives_numpys_positions(n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import features.time_aware as ta
    from features.time_aware import BLOCK, TWO_LEVEL_MIN, searchsorted_right

    monkeypatch.setattr(ta, "TWO_LEVEL_MIN_KEYS", 0)  # the two levels for any size here

    rng = np.random.default_rng(n)
    a = np.sort(rng.integers(0, 3 * n + 1, n)).astype(np.int64)  # with repeated keys
    v = np.concatenate(
        [rng.integers(-5, 3 * n + 6, 3 * TWO_LEVEL_MIN), a[:100], a[-100:], a[::BLOCK]]
    )
    for q in (np.sort(v), v, v[:10]):  # sorted, in any order, and few queries
        got = searchsorted_right(a, a[::BLOCK].copy(), q)
        assert np.array_equal(got, np.searchsorted(a, q, side="right"))


def test_category_affinity_is_the_users_share_of_events_per_category() -> None:
    from features.affinity import user_category_affinity

    # items 0, 1: category 0; item 2: categories 0 and 1; item 3: category 2; item 4: none
    cats = sp.csr_matrix((np.ones(5), ([0, 1, 2, 2, 3], [0, 0, 0, 1, 2])), shape=(5, 3))
    # a user who met items 0, 1, 3, 3 (the last two are the recent ones, recent_n 2)
    h = Histories(
        np.array([0, 4]), np.array([0, 1, 3, 3]), np.arange(4), np.array([0]), np.array([False])
    )
    c = Candidates(np.array([0, 3]), np.array([2, 3, 4]), {})
    for dense in (0, 1 << 20):  # sorted keys, dense arrays
        got = user_category_affinity(cats, h, c, recent_n=2, dense_cells=dense)
        # item 2: categories 0 (2 of 4 events) and 1 (none); item 3: 2 of 4, and both
        # recent; item 4 has no category
        np.testing.assert_array_equal(got["cat_aff_mean"], [0.25, 0.5, 0.0])
        np.testing.assert_array_equal(got["cat_aff_max"], [0.5, 0.5, 0.0])
        np.testing.assert_array_equal(got["cat_aff_recent_max"], [0.0, 1.0, 0.0])
        np.testing.assert_array_equal(got["item_n_cats"], [2.0, 1.0, 0.0])


@pytest.mark.parametrize("n_users", [1, 7])
def test_category_affinity_counts_the_same_in_dense_arrays_and_sorted_keys(n_users: int) -> None:
    """A request (dense arrays) and a large chunk (sorted keys) get the same bits."""
    from features.affinity import user_category_affinity

    rng = np.random.default_rng(n_users)
    for n_cats in (1, 5, 40):
        n_items = 60
        per_item = np.minimum(rng.integers(0, 4, n_items), n_cats)
        rows = np.repeat(np.arange(n_items), per_item)
        cols = np.concatenate([rng.choice(n_cats, k, replace=False) for k in per_item])
        cats = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n_items, n_cats))
        lens = rng.integers(1, 30, n_users)
        ptr = np.concatenate([[0], np.cumsum(lens)])
        h = Histories(ptr, rng.integers(0, n_items, ptr[-1]), np.arange(ptr[-1]),
                      np.arange(n_users), np.zeros(n_users, bool))  # fmt: skip
        cands = [np.sort(rng.choice(n_items, rng.integers(1, 40), replace=False)) for _ in lens]
        c = Candidates(np.concatenate([[0], np.cumsum([len(x) for x in cands])]),
                       np.concatenate(cands).astype(np.int64), {})  # fmt: skip
        keyed = user_category_affinity(cats, h, c, recent_n=6, dense_cells=0)
        dense = user_category_affinity(cats, h, c, recent_n=6)
        assert keyed.keys() == dense.keys()
        for k in keyed:
            np.testing.assert_array_equal(dense[k], keyed[k], err_msg=k)
