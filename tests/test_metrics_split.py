from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from recsys.metrics import summarize
from recsys.split import split_last_fraction, tied_holdout_share


def _ev(rows: list[tuple[int, int, int]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema={"u": pl.Int32, "i": pl.Int32, "t": pl.Int64}, orient="row")


def test_metrics_match_hand_computed_values() -> None:
    # user 0: relevant {3, 7}; list [3, 1, 7]; user 1: relevant {5}; list [1, 2, 4]
    truth = _ev([(0, 3, 0), (0, 7, 0), (1, 5, 0)])
    recs = np.array([[3, 1, 7], [1, 2, 4]])
    m = summarize(recs, np.array([0, 1]), truth, k=3, n_items=10)
    dcg0 = 1 + 1 / math.log2(4)
    idcg0 = 1 + 1 / math.log2(3)
    assert m["ndcg@3"] == pytest.approx((dcg0 / idcg0 + 0) / 2)
    assert m["recall@3"] == pytest.approx((1.0 + 0) / 2)
    assert m["hr@3"] == pytest.approx(0.5)
    assert m["mrr@3"] == pytest.approx(0.5)
    assert m["coverage"] == pytest.approx(5 / 10)


def test_split_holds_out_last_fifth_at_least_one() -> None:
    ev = _ev([(0, i, i) for i in range(10)] + [(1, 0, 5)] + [(2, i, 100 - i) for i in range(3)])
    ev = ev.sort(["u", "t"])
    hist, hold = split_last_fraction(ev, 0.2)
    assert sorted(hold.filter(pl.col("u") == 0)["i"].to_list()) == [8, 9]
    # a single event goes to the holdout; three events hold out one, the latest in time
    assert hold.filter(pl.col("u") == 1).height == 1 and hist.filter(pl.col("u") == 1).height == 0
    assert hold.filter(pl.col("u") == 2)["t"].to_list() == [100]
    assert hist.height + hold.height == ev.height


def test_tied_holdout_share_counts_held_out_events_timed_as_the_last_training_one() -> None:
    from recsys.report import markdown

    # user 0: held out at t=2, trained up to t=2 (tied); user 1: 5 after 4; user 2: one
    # event, held out with nothing to tie with; user 3: two of ten held out, both at 7,
    # the time of the last trained one (tied)
    rows = [(0, 1, 1), (0, 2, 2), (0, 3, 2), (1, 1, 4), (1, 2, 5), (2, 1, 3)]
    rows += [(3, i, min(i, 7)) for i in range(10)]
    hist, hold = split_last_fraction(_ev(rows).sort(["u", "t"], maintain_order=True), 0.2)
    assert hold.height == 5
    assert tied_holdout_share(hist, hold) == pytest.approx(3 / 5)
    assert tied_holdout_share(hist, hold.clear()) == 0.0
    d = {"k": 10, "models": {}, "users": 4, "items": 10, "train_events": 11, "test_events": 5}
    assert "held-out events have the same time" not in markdown(d | {"tied_holdout": 0.0})
    assert "60.0% of the held-out events have the same time" in markdown(d | {"tied_holdout": 0.6})
