"""Explanations: the list is the recommended one, and contributions + bias add up to
the ranker's score of every item."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl

from recsys.explain import explain


def _user_with_history(synth_data) -> str:  # type: ignore[no-untyped-def]
    inter, _ = synth_data
    return inter.group_by("user_id").len().sort(["len", "user_id"], descending=True)["user_id"][0]


def test_contributions_plus_bias_add_up_to_the_score(fitted, synth_data) -> None:  # type: ignore[no-untyped-def]
    user = _user_with_history(synth_data)
    e = explain(fitted, user, k=10)
    recs = fitted.recommend([user], k=10)
    assert e.items["item_id"].to_list() == recs["item_id"].to_list()
    assert np.allclose(e.items["score"].to_numpy(), recs["score"].to_numpy())
    assert (e.items["source"] == "ranker").all()
    n_feat = len(fitted.ranker_.features_)
    assert e.contributions.height == 10 * n_feat
    total = (
        e.contributions.group_by("rank")
        .agg(pl.col("contribution").sum())
        .join(e.items.select("rank", "score", "bias"), on="rank")
    )
    assert np.allclose(total["contribution"] + total["bias"], total["score"], atol=1e-9)
    # top contributions are the largest in magnitude
    top = e.top_contributions(3).filter(pl.col("rank") == 1)["contribution"].abs().to_numpy()
    rest = e.contributions.filter(pl.col("rank") == 1)["contribution"].abs().to_numpy()
    assert top.min() >= np.sort(rest)[-3] - 1e-12
    assert (
        e.similar["history_item_id"]
        .is_in(synth_data[0].filter(pl.col("user_id") == user)["item_id"].implode())
        .all()
    )
    json.dumps(e.to_dict(), default=str)


def test_unknown_user_gets_the_fallback_without_contributions(fitted) -> None:  # type: ignore[no-untyped-def]
    e = explain(fitted, "no-such-user", k=5)
    assert not e.known and e.items.height == 5
    assert (e.items["source"] == "fallback").all() and e.contributions.height == 0


def test_cli_explain_prints_a_table(bundle_dir: Path, synth_data) -> None:  # type: ignore[no-untyped-def]
    user = _user_with_history(synth_data)
    recsys = str(Path(sys.executable).with_name("recsys"))
    r = subprocess.run(
        [recsys, "explain", "--bundle", str(bundle_dir), "--user", str(user), "--k", "3"],
        capture_output=True, text=True, timeout=300, env=os.environ | {"COLUMNS": "200"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert f"user {user}" in r.stdout and "bias" in r.stdout
