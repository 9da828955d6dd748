"""Point-in-time correctness and the meaning of the sequence- and time-aware features."""

from __future__ import annotations

import numpy as np
import polars as pl
from polars.testing import assert_frame_equal

from features.sequence import sequence_follow, transitions
from features.time_aware import popularity_before_user_time
from recsys.candidates import History
from recsys.config import PipelineConfig
from recsys.data import IdIndex, to_internal
from recsys.pipeline import build_features, generate_candidates, item_categories, make_sources


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
        pairs = generate_candidates(srcs, h, u, 30)
        return build_features(h, pairs, cats, cfg)

    before = features_at(early)
    after = features_at(pl.concat([early, later]))
    assert before.height > 0
    assert_frame_equal(before, after)
    # and the later events do matter once the cutoff moves past them
    h_late = History(ev, len(users), len(item_index))
    assert h_late.X.nnz > History(early.sort(["u", "t"]), len(users), len(item_index)).X.nnz


def _ev(rows: list[tuple[int, int, int]]) -> pl.LazyFrame:
    return (
        pl.DataFrame(rows, schema={"u": pl.Int32, "i": pl.Int32, "t": pl.Int64}, orient="row")
        .sort(["u", "t"])
        .lazy()
    )


def test_sequence_follow_counts_successors_in_other_histories() -> None:
    # users 0 and 1 watch 1 then 2; user 2 has just watched 1
    ev = _ev([(0, 1, 0), (0, 2, 1), (1, 1, 0), (1, 3, 1), (1, 2, 2), (2, 1, 5)])
    pairs = pl.DataFrame(
        {"u": [2, 2, 2], "i": [2, 3, 4]}, schema={"u": pl.Int32, "i": pl.Int32}
    ).lazy()
    f = (
        sequence_follow(ev, pairs, transitions(ev, max_gap=2), last_n=3, decay=0.5)
        .collect()
        .sort("i")
    )
    # 2 follows 1 at gap 1 (user 0) and gap 2 (user 1): 1 + 1/2; 3 follows 1 at gap 1 once
    assert f["seq_follow_last"].to_list() == [1.5, 1.0, 0.0]
    # normalised by how often item 1 occurs (3 times)
    assert np.allclose(f["seq_follow_norm"].to_list(), [0.5, 1 / 3, 0.0])


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
    pairs = pl.DataFrame(
        {"u": [0, 0, 1, 1], "i": [7, 8, 7, 8]}, schema={"u": pl.Int32, "i": pl.Int32}
    ).lazy()
    last = ev.group_by("u").agg(pl.col("t").max().alias("user_last_t"))
    f = popularity_before_user_time(ev, pairs, last, windows_days=(7,)).collect().sort("u", "i")
    assert f["upop_7d"].to_list() == [5, 0, 0, 3]
