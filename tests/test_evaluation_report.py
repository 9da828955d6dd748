"""The evaluation report: extended metrics agree with the headline ones, the folder
holds the plots, and report.md states the confidence interval."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys.analysis import bootstrap, hits_matrix, metrics_at, popularity_deciles


@pytest.fixture(scope="module")
def report(synth_data, fast_config):  # type: ignore[no-untyped-def]
    from recsys.evaluate import evaluate

    inter, items = synth_data
    return evaluate(inter, items, fast_config, n_boot=200)


def test_metrics_at_k_match_hand_computed_values() -> None:
    truth = pl.DataFrame(
        {"u": [0, 0, 1], "i": [3, 7, 5], "t": [0, 0, 0]},
        schema={"u": pl.Int32, "i": pl.Int32, "t": pl.Int64},
    )
    recs = np.array([[3, 1, 7], [1, 2, 5]])
    hits, n_rel = hits_matrix(recs, np.array([0, 1]), truth, n_items=10)
    m = metrics_at(hits, n_rel, ks=(1, 3))
    assert n_rel.tolist() == [2, 1]
    assert m["hr@1"].tolist() == [1.0, 0.0]
    assert m["recall@3"].tolist() == [1.0, 1.0]
    assert m["mrr@3"].tolist() == pytest.approx([1.0, 1 / 3])
    assert m["ndcg@3"][1] == pytest.approx(1 / math.log2(4))


def test_deciles_are_equal_sized_and_start_at_the_most_popular() -> None:
    dec = popularity_deciles(np.arange(100, dtype=float))
    assert dec[99] == 1 and dec[0] == 10
    assert np.bincount(dec)[1:].tolist() == [10] * 10


def test_bootstrap_interval_holds_the_mean_and_pairs_users() -> None:
    rng = np.random.default_rng(0)
    a = rng.random(500)
    ci, paired = bootstrap({"a": a, "b": a + 0.01}, "a", n_boot=300)
    assert ci["a"]["lo"] < a.mean() < ci["a"]["hi"]
    # the same users resampled for both: the paired difference has no spread
    assert paired["b"]["lo"] == pytest.approx(0.01) and paired["b"]["hi"] == pytest.approx(0.01)
    assert paired["b"]["wins"] == 1.0


def test_extended_metrics_agree_with_the_headline_table(report) -> None:  # type: ignore[no-untyped-def]
    a = report.analysis
    assert set(a["at_k"]) == set(report.rows)
    for name, row in report.rows.items():
        for m in ("ndcg", "recall", "hr", "mrr"):
            assert a["at_k"][name][f"{m}@10"] == pytest.approx(row[f"{m}@10"])
        assert a["beyond"][name]["coverage@10"] == pytest.approx(row["coverage"])
        assert sum(a["exposure"]["slot_share"][name]) == pytest.approx(1.0)
        ci = a["bootstrap"]["ci"][name]
        assert ci["lo"] <= ci["mean"] <= ci["hi"]
    assert sum(a["user_segments"]["users"]) == report.n_users
    assert sum(a["exposure"]["interaction_share"]) == pytest.approx(1.0)
    assert set(a["paired"]) == set(report.rows) - {"EASE"}
    per = report.per_user()
    assert per.height == report.n_users and "EASE" in per.columns


def test_report_folder_has_plots_and_states_the_interval(report, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from recsys.evaluate import write_report

    write_report(report, tmp_path)
    pngs = sorted(tmp_path.glob("*.png"))
    assert len(pngs) >= 5
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    md = (tmp_path / "report.md").read_text()
    assert "95% CI" in md and "paired difference" in md
    for p in pngs:
        assert f"({p.name})" in md or f"`{p.name}`" in md
    d = json.loads((tmp_path / "metrics.json").read_text())
    assert d["analysis"]["bootstrap"]["ci"]["EASE"]["hi"] > 0
    pipe = next(n for n in report.rows if n.startswith("recsys"))
    assert d["importances"][pipe][0]["gain"] > 0


def test_lists_mark_held_out_hits_as_the_metrics_count_them(report) -> None:  # type: ignore[no-untyped-def]
    per = report.per_user()
    users = per.sort("EASE", descending=True)["user_id"].head(3).to_list()
    lists = report.lists(users, k=10)
    assert set(lists["model"].unique()) == set(report.rows)
    hr = lists.group_by("user_id", "model").agg(pl.col("hit").any())
    ease = hr.filter(pl.col("model") == "EASE").sort("user_id")
    want = per.filter(pl.col("user_id").is_in(users)).sort("user_id")["EASE"] > 0
    assert ease["hit"].to_list() == want.to_list()
    assert report.held_out(users)["user_id"].n_unique() == 3


def test_report_states_the_ablation_when_it_ran(report) -> None:  # type: ignore[no-untyped-def]
    from recsys.report import ablation_table, markdown

    d = report.to_dict()
    pipe = next(n for n in report.rows if n.startswith("recsys"))
    ci = d["analysis"]["bootstrap"]["ci"]
    ci["variant"] = dict(ci[pipe], mean=ci[pipe]["mean"] - 0.01)
    d["models"]["variant"] = d["models"][pipe]
    d["analysis"]["beyond"]["variant"] = d["analysis"]["beyond"][pipe]
    d["ablation"] = {
        "with": pipe,
        "without": "variant",
        "paired": {"diff": 0.01, "lo": 0.002, "hi": 0.018, "p": 0.01, "wins": 0.3, "losses": 0.2},
    }
    md = markdown(d)
    assert f"`{pipe}` against `variant`" in md and "+0.0100" in md
    assert ablation_table(d).height == 2


def test_report_says_what_machine_it_ran_on(report) -> None:  # type: ignore[no-untyped-def]
    from recsys.report import markdown
    from recsys.resources import machine

    d = report.to_dict()
    assert d["machine"] == machine()  # fast_config fits no language model: no "lm"
    assert f"Run on: {d['machine']['cpu']}" in markdown(d)
    d["machine"] = {
        "cpu": "Some CPU",
        "arch": "x86_64",
        "usable_cpus": 2,
        "flags": ["avx2", "avx512_bf16"],
        "isa_limits": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
        "lm": "int8-mixed on cpu",
    }
    line = next(s for s in markdown(d).splitlines() if s.startswith("Run on:"))
    assert line == (
        "Run on: Some CPU (x86_64), 2 usable CPUs; CPU flags: avx2 avx512_bf16; instruction "
        "sets limited by ONEDNN_MAX_CPU_ISA=AVX2; the language model encoded the items in "
        "int8-mixed on cpu."
    )
    del d["machine"]  # a metrics.json written before the machine was recorded
    assert "Run on:" not in markdown(d)
