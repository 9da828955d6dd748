"""The synthetic data: canonical schema, determinism, and each signal of the story.

Every signal check also runs on data with that one effect switched off (a `Story` knob)
and must fail there: the checks measure the effect, not an accident of the data.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
import typer
from typer.testing import CliRunner

from recsys.schema import read_interactions, read_items
from recsys.synth import Story, generate

SIZES = {"n_users": 200, "n_items": 150, "n_events": 5000}


def _load(path: Path, seed: int = 0, **story: float) -> tuple[pl.DataFrame, pl.DataFrame]:
    ip, tp = generate(path, seed=seed, progress=False, story=Story(**story), **SIZES)  # type: ignore[arg-type]
    return pl.read_parquet(ip), pl.read_parquet(tp)


def _events(inter: pl.DataFrame, items: pl.DataFrame) -> pl.DataFrame:
    """Events with their item's category and release, in each user's time order."""
    cols = items.select("item_id", "category", "released_at")
    return inter.join(cols, on="item_id").sort("user_id", "timestamp")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[pl.DataFrame, pl.DataFrame]:
    return _load(tmp_path_factory.mktemp("synth_default"))


def _ablated(tmp_path: Path, **story: float) -> pl.DataFrame:
    return _events(*_load(tmp_path, **story))


def test_canonical_dtypes_and_sizes(data: tuple[pl.DataFrame, pl.DataFrame]) -> None:
    inter, items = data
    assert inter.schema == pl.Schema(
        {
            "user_id": pl.String,
            "item_id": pl.String,
            "timestamp": pl.Datetime("us", "UTC"),
            "event": pl.String,
        }
    )
    for col in ("item_id", "title", "description", "category", "tags"):
        assert items.schema[col] == pl.String
    assert items.schema["released_at"] == pl.Datetime("us", "UTC")
    assert inter.height == SIZES["n_events"] and items.height == SIZES["n_items"]
    assert inter["user_id"].n_unique() == SIZES["n_users"]
    assert inter["user_id"].str.contains(r"^u\d{6}$").all()
    assert items["item_id"].str.contains(r"^i\d{5}$").all()
    assert items["item_id"].is_unique().all()
    assert inter.null_count().sum_horizontal().item() == 0
    assert items.null_count().sum_horizontal().item() == 0
    assert set(inter["event"].unique()) == {"view", "click", "purchase"}
    shares = inter["event"].value_counts(normalize=True).sort("proportion")
    assert shares["event"].to_list() == ["purchase", "click", "view"]  # a skewed mix
    assert items["tags"].str.contains(r"^[a-z]+(\|[a-z]+)+$").all()
    start, end = inter["timestamp"].min(), inter["timestamp"].max()
    assert str(start)[:10] >= "2024-01-01" and (end - start).days <= 180  # type: ignore[operator]


def test_readers_accept_the_files(tmp_path: Path) -> None:
    ip, tp = generate(tmp_path, progress=False, **SIZES)  # type: ignore[arg-type]
    items = read_items(tp)
    inter = read_interactions(ip, items=items)
    assert inter.height == SIZES["n_events"]


def test_deterministic_per_seed_and_different_across_seeds(
    tmp_path: Path, data: tuple[pl.DataFrame, pl.DataFrame]
) -> None:
    again = _load(tmp_path / "again")
    other = _load(tmp_path / "other", seed=1)
    assert again[0].equals(data[0]) and again[1].equals(data[1])
    assert not other[0].equals(data[0]) and not other[1].equals(data[1])


def test_no_event_before_its_item_release_and_cold_items_exist(
    data: tuple[pl.DataFrame, pl.DataFrame],
) -> None:
    inter, items = data
    ev = _events(inter, items)
    assert ev.height == inter.height  # every event names a catalogue item
    assert (ev["timestamp"] >= ev["released_at"]).all()
    start = inter["timestamp"].min()
    assert (items["released_at"] <= start).any()  # some items exist from the start
    assert (items["released_at"] > start).any()  # others are released over time
    assert items.height > inter["item_id"].n_unique()  # items nobody met yet


def _top_decile_share(ev: pl.DataFrame) -> float:
    counts = ev.group_by("item_id").len()["len"].sort(descending=True)
    return counts.head(SIZES["n_items"] // 10).sum() / ev.height


def test_popularity_is_skewed(data: tuple[pl.DataFrame, pl.DataFrame], tmp_path: Path) -> None:
    assert _top_decile_share(_events(*data)) > 0.30
    assert _top_decile_share(_ablated(tmp_path, zipf_exponent=0.0)) < 0.30


def _top2_share(ev: pl.DataFrame) -> float:
    """Share of a user's events in their two most frequent categories (users with >= 10)."""
    per = (
        ev.group_by("user_id", "category")
        .len()
        .sort("len", descending=True)
        .group_by("user_id")
        .agg(top2=pl.col("len").head(2).sum(), n=pl.col("len").sum())
        .filter(pl.col("n") >= 10)
    )
    return per["top2"].sum() / per["n"].sum()


def _taste_lift(ev: pl.DataFrame) -> float:
    """Top-2 share over that of the same events with categories shuffled across users."""
    shuffled = ev.with_columns(pl.col("category").shuffle(seed=1))
    return _top2_share(ev) - _top2_share(shuffled)


def test_text_category_predicts_who_meets_an_item(
    data: tuple[pl.DataFrame, pl.DataFrame], tmp_path: Path
) -> None:
    assert _taste_lift(_events(*data)) > 0.18
    assert _taste_lift(_ablated(tmp_path, taste_concentration=1000.0)) < 0.15


def _same_category_next(ev: pl.DataFrame) -> float:
    same_user = ev["user_id"] == ev["user_id"].shift(1)
    same_cat = ev["category"] == ev["category"].shift(1)
    return (same_user & same_cat).sum() / same_user.sum()


def _sequence_lift(ev: pl.DataFrame) -> float:
    """Consecutive same-category share over that of each user's events in random order."""
    shuffled = ev.with_columns(pl.col("category").shuffle(seed=1).over("user_id"))
    return _same_category_next(ev) - _same_category_next(shuffled)


def test_consecutive_events_stay_in_a_category(
    data: tuple[pl.DataFrame, pl.DataFrame], tmp_path: Path
) -> None:
    ev = _events(*data)
    assert _same_category_next(ev) > 0.4
    assert _sequence_lift(ev) > 0.18
    assert _sequence_lift(_ablated(tmp_path, stay_prob=0.0, companion_prob=0.0)) < 0.05


def _direction_asymmetry(ev: pl.DataFrame) -> float:
    """Mean |n(A->B) - n(B->A)| / (n(A->B) + n(B->A)) over pairs met >= 8 times.

    Companions are directed (B follows A, not the other way), topic drift is not.
    """
    nxt = ev.with_columns(pl.col("item_id").shift(-1).over("user_id").alias("next"))
    pairs = (
        nxt.filter(pl.col("next").is_not_null() & (pl.col("next") != pl.col("item_id")))
        .group_by("item_id", "next")
        .agg(ab=pl.len().cast(pl.Int64))
    )
    rev = pairs.rename({"item_id": "next", "next": "item_id", "ab": "ba"})
    both = (
        pairs.join(rev, on=["item_id", "next"], how="left")
        .with_columns(pl.col("ba").fill_null(0))
        .filter(pl.col("ab") + pl.col("ba") >= 8)
    )
    return ((both["ab"] - both["ba"]).abs() / (both["ab"] + both["ba"])).mean()  # type: ignore[return-value]


def test_companion_items_follow_each_other(
    data: tuple[pl.DataFrame, pl.DataFrame], tmp_path: Path
) -> None:
    assert _direction_asymmetry(_events(*data)) > 0.30
    assert _direction_asymmetry(_ablated(tmp_path, companion_prob=0.0)) < 0.26


def _launch_lift(ev: pl.DataFrame, window_days: int = 21) -> float:
    """Share of events in an item's first weeks, over that share under constant appeal."""
    start, end = ev["timestamp"].min(), ev["timestamp"].max()
    late = ev.filter(pl.col("released_at") > start).select(
        age=(pl.col("timestamp") - pl.col("released_at")).dt.total_days(),
        left=(pl.lit(end) - pl.col("released_at")).dt.total_days(),
    )
    observed = (late["age"] <= window_days).mean()
    expected = (window_days / late["left"].clip(lower_bound=window_days)).mean()
    return observed / expected  # type: ignore[operator]


def test_appeal_peaks_after_release_and_decays(
    data: tuple[pl.DataFrame, pl.DataFrame], tmp_path: Path
) -> None:
    assert _launch_lift(_events(*data)) > 1.7
    assert _launch_lift(_ablated(tmp_path, decay_days=1e9, ramp_days=1e-6)) < 1.6


def test_item_text_comes_from_topic_vocabularies(data: tuple[pl.DataFrame, pl.DataFrame]) -> None:
    """Items of one category share words that items of other categories rarely use."""
    _, items = data
    words = items.select(
        "category", word=pl.col("description").str.to_lowercase().str.extract_all(r"[a-z]+")
    ).explode("word")
    per_cat = words.group_by("word").agg(pl.col("category").n_unique().alias("cats"))
    typical = per_cat.filter(pl.col("cats") <= 3).height / per_cat.height
    assert typical > 0.6  # most words belong to a few topics; filler words to many
    assert items["category"].n_unique() == 20


def test_cli_writes_the_files(tmp_path: Path) -> None:
    from recsys.cli.synth import synth

    app = typer.Typer()
    app.command("synth")(synth)
    app.command("noop")(lambda: None)  # two commands: `synth` stays a subcommand
    args = ["synth", "--out", str(tmp_path), "--users", "50", "--items", "40", "--events", "800"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "800 rows" in result.output and "40 rows" in result.output
    assert pl.read_parquet(tmp_path / "interactions.parquet").height == 800
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic writes


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o077, 0o600)])
def test_cli_files_get_the_permissions_of_the_umask(tmp_path: Path, mask: int, mode: int) -> None:
    import os
    import stat

    from recsys.cli.synth import synth

    app = typer.Typer()
    app.command("synth")(synth)
    app.command("noop")(lambda: None)
    args = ["synth", "--out", str(tmp_path), "--users", "20", "--items", "10", "--events", "100"]
    old = os.umask(mask)
    try:
        result = CliRunner().invoke(app, args)
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    for name in ("interactions.parquet", "items.parquet"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


def test_rejects_empty_sizes(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        generate(tmp_path, n_events=0, progress=False)
