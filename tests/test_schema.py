"""The data boundary: what validation accepts, normalises and refuses, and how it says so."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys.schema import (
    DataError,
    read_interactions,
    read_items,
    validate_interactions,
    validate_items,
    write_parquet_atomic,
)

UTC = dt.UTC
T0 = dt.datetime(2021, 3, 4, 5, 6, 7, tzinfo=UTC)
T1 = dt.datetime(2021, 3, 5, 0, 0, 0, tzinfo=UTC)
EXPECTED = [T0, T1]


def _events(**cols: object) -> pl.DataFrame:
    base: dict[str, object] = {
        "user_id": ["u1", "u2", "u1"],
        "item_id": ["a", "b", "c"],
        "timestamp": [T0, T0, T1],
    }
    base.update(cols)
    return pl.DataFrame(base)


def _write(df: pl.DataFrame, path: Path) -> Path:
    df.write_parquet(path)
    return path


# ------------------------------------------------------------------------- bad input


def test_missing_required_column_names_column_and_columns_found(tmp_path: Path) -> None:
    p = _write(
        _events().drop("timestamp").with_columns(pl.lit(1).alias("ts")), tmp_path / "i.parquet"
    )
    with pytest.raises(DataError) as e:
        read_interactions(p)
    msg = str(e.value)
    assert str(p) in msg and "'timestamp'" in msg and "user_id, item_id, ts" in msg


def test_null_user_ids_name_the_rows(tmp_path: Path) -> None:
    p = _write(_events(user_id=["u1", None, "u3"]), tmp_path / "i.parquet")
    with pytest.raises(DataError) as e:
        read_interactions(p)
    assert e.value.column == "user_id" and e.value.rows == [1]
    assert str(p) in str(e.value) and "row(s) 1" in str(e.value)


def test_null_item_ids(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        validate_interactions(_events(item_id=[None, "b", None]))
    assert e.value.column == "item_id" and e.value.rows == [0, 2]


def test_null_timestamps() -> None:
    with pytest.raises(DataError) as e:
        validate_interactions(_events(timestamp=[T0, None, T1]), source="log.parquet")
    assert e.value.column == "timestamp" and e.value.rows == [1]
    assert "log.parquet" in str(e.value) and "null" in str(e.value)


def test_unparseable_timestamp_strings_show_rows_and_values() -> None:
    df = _events(timestamp=["2021-03-04 05:06:07", "yesterday", "31/31/2021"])
    with pytest.raises(DataError) as e:
        validate_interactions(df, source="log.csv")
    msg = str(e.value)
    assert e.value.rows == [1, 2] and "'yesterday'" in msg and "column 'timestamp'" in msg


def test_duplicate_item_ids_named_with_rows(tmp_path: Path) -> None:
    items = pl.DataFrame({"item_id": ["a", "b", "a", "c", "b"], "title": list("vwxyz")})
    p = _write(items, tmp_path / "items.parquet")
    with pytest.raises(DataError) as e:
        read_items(p)
    msg = str(e.value)
    assert str(p) in msg and "'a' at rows 0, 2" in msg and "'b' at rows 1, 4" in msg


def test_unknown_item_ids_are_an_error_that_suggests_dropping() -> None:
    items = validate_items(pl.DataFrame({"item_id": ["a", "b"]}))
    with pytest.raises(DataError) as e:
        validate_interactions(_events(), source="log.parquet", items=items)
    msg = str(e.value)
    assert e.value.rows == [2] and "'c'" in msg and "--drop-unknown-items" in msg
    assert "1 row(s)" in msg


def test_unknown_item_ids_dropped_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    items = validate_items(pl.DataFrame({"item_id": ["a", "b"]}))
    with caplog.at_level(logging.WARNING, logger="recsys"):
        out = validate_interactions(_events(), items=items, drop_unknown_items=True)
    assert out["item_id"].to_list() == ["a", "b"]
    assert "dropped 1 interaction" in caplog.text


def test_label_must_be_0_or_1() -> None:
    with pytest.raises(DataError) as e:
        validate_interactions(_events(label=[0, 1, 2]))
    assert e.value.column == "label" and e.value.rows == [2]


def test_non_numeric_rating() -> None:
    with pytest.raises(DataError) as e:
        validate_interactions(_events(rating=["4.5", "great", "3"]))
    assert e.value.column == "rating" and e.value.rows == [1] and "'great'" in str(e.value)


def test_empty_table(tmp_path: Path) -> None:
    p = _write(_events().head(0), tmp_path / "i.parquet")
    with pytest.raises(DataError, match="empty") as e:
        read_interactions(p)
    assert str(p) in str(e.value)


def test_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "nope.parquet"
    with pytest.raises(DataError, match="not found") as e:
        read_items(p)
    assert str(p) in str(e.value)


def test_corrupt_parquet_is_a_data_error(tmp_path: Path) -> None:
    p = tmp_path / "bad.parquet"
    p.write_bytes(b"PAR1 this is not really parquet")
    with pytest.raises(DataError, match="cannot read") as e:
        read_interactions(p)
    assert str(p) in str(e.value)


def test_float_ids_are_refused() -> None:
    with pytest.raises(DataError, match="string or integer"):
        validate_interactions(_events(item_id=[1.0, 2.0, 3.0]))


def test_string_ids_against_integer_catalogue_must_all_convert() -> None:
    items = validate_items(pl.DataFrame({"item_id": [1, 2, 3]}))
    ok = validate_interactions(_events(item_id=["1", "2", "3"]), items=items)
    assert ok["item_id"].dtype == pl.Int64
    with pytest.raises(DataError, match="not integers") as e:
        validate_interactions(_events(item_id=["1", "x2", "3"]), items=items)
    assert e.value.rows == [1]


# ---------------------------------------------------------------------- accepted forms

_EPOCHS = [int(t.timestamp()) for t in EXPECTED]
_NAIVE = [t.replace(tzinfo=None) for t in EXPECTED]

TIMESTAMP_FORMS: dict[str, pl.Series] = {
    "datetime_ns_tz": pl.Series(EXPECTED).cast(pl.Datetime("ns", "UTC")),
    "datetime_ms_other_tz": pl.Series(EXPECTED)
    .cast(pl.Datetime("ms", "UTC"))
    .dt.convert_time_zone("America/New_York"),
    "datetime_us_naive": pl.Series(_NAIVE, dtype=pl.Datetime("us")),
    "datetime_ns_naive": pl.Series(_NAIVE, dtype=pl.Datetime("ns")),
    "datetime_ms_naive": pl.Series(_NAIVE, dtype=pl.Datetime("ms")),
    "epoch_seconds": pl.Series(_EPOCHS),
    "epoch_seconds_int32": pl.Series(_EPOCHS, dtype=pl.Int32),
    "epoch_ms": pl.Series([e * 1000 for e in _EPOCHS]),
    "epoch_us": pl.Series([e * 1_000_000 for e in _EPOCHS]),
    "epoch_ns": pl.Series([e * 1_000_000_000 for e in _EPOCHS]),
    "epoch_float_seconds": pl.Series([float(e) for e in _EPOCHS]),
    "iso_z": pl.Series(["2021-03-04T05:06:07Z", "2021-03-05T00:00:00Z"]),
    "iso_offset": pl.Series(["2021-03-04T07:06:07+02:00", "2021-03-04T19:00:00-05:00"]),
    "iso_naive_space": pl.Series(["2021-03-04 05:06:07", "2021-03-05 00:00:00"]),
    "iso_mixed_date_and_time": pl.Series(["2021-03-04 05:06:07", "2021-03-05"]),
    "us_am_pm": pl.Series(["3/4/2021 5:06:07 AM", "3/5/2021 12:00:00 AM"]),
}


@pytest.mark.parametrize("form", list(TIMESTAMP_FORMS))
def test_timestamp_forms_give_the_same_utc_instants(form: str) -> None:
    df = pl.DataFrame(
        {"user_id": ["u", "u"], "item_id": ["a", "b"], "timestamp": TIMESTAMP_FORMS[form]}
    )
    out = validate_interactions(df)
    assert out["timestamp"].dtype == pl.Datetime("us", "UTC")
    assert out["timestamp"].to_list() == EXPECTED


def test_date_timestamps_are_midnight_utc() -> None:
    df = pl.DataFrame({"user_id": ["u"], "item_id": ["a"], "timestamp": [dt.date(2021, 3, 5)]})
    assert validate_interactions(df)["timestamp"].to_list() == [T1]


def test_ids_kept_as_given_and_optional_columns_normalised() -> None:
    df = pl.DataFrame(
        {
            "user_id": pl.Series([10, 20], dtype=pl.UInt32),
            "item_id": ["007", "A7"],
            "timestamp": _EPOCHS,
            "rating": [4, 5],
            "label": [True, False],
            "event": pl.Series(["click", "view"], dtype=pl.Categorical),
            "impression_id": [1, 2],
            "junk": ["x", "y"],
        }
    )
    out = validate_interactions(df)
    assert out.schema == pl.Schema(
        {
            "user_id": pl.Int64,
            "item_id": pl.String,
            "timestamp": pl.Datetime("us", "UTC"),
            "event": pl.String,
            "rating": pl.Float64,
            "impression_id": pl.String,
            "label": pl.Int8,
        }
    )
    assert out["user_id"].to_list() == [10, 20] and out["item_id"].to_list() == ["007", "A7"]
    assert out["label"].to_list() == [1, 0]


def test_csv_ids_keep_leading_zeros_and_numeric_ids_stay_integers(tmp_path: Path) -> None:
    (tmp_path / "items.csv").write_text("item_id,title\n007,Bond\n42,Answer\n")
    (tmp_path / "i.csv").write_text(
        "user_id,item_id,timestamp\n1,007,2021-03-04T05:06:07Z\n2,42,2021-03-05T00:00:00Z\n"
    )
    items = read_items(tmp_path / "items.csv")
    inter = read_interactions(tmp_path / "i.csv", items=items)
    assert items["item_id"].to_list() == ["007", "42"]
    assert inter["user_id"].dtype == pl.Int64 and inter["item_id"].to_list() == ["007", "42"]
    assert inter["timestamp"].to_list() == EXPECTED


def test_integer_interactions_ids_follow_a_string_catalogue() -> None:
    items = validate_items(pl.DataFrame({"item_id": ["1", "2", "3"]}))
    out = validate_interactions(_events(item_id=[1, 2, 3]), items=items)
    assert out["item_id"].to_list() == ["1", "2", "3"]


def test_items_list_columns_joined_and_textless_items_allowed() -> None:
    items = pl.DataFrame(
        {
            "item_id": pl.Series([1, 2, 3], dtype=pl.Int32),
            "genres": [["Drama", "War"], [], None],
            "price": [1.5, 2.0, None],
        }
    )
    out = validate_items(items)
    assert out.schema == pl.Schema({"item_id": pl.Int64, "genres": pl.String, "price": pl.Float64})
    assert out["genres"].to_list() == ["Drama|War", None, None]
    assert validate_items(pl.DataFrame({"item_id": ["x"]})).columns == ["item_id"]


def test_write_parquet_atomic_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "t.parquet"
    write_parquet_atomic(pl.DataFrame({"a": [1]}), target)
    write_parquet_atomic(pl.DataFrame({"a": [2, 3]}), target)
    assert pl.read_parquet(target)["a"].to_list() == [2, 3]
    assert [p.name for p in target.parent.iterdir()] == ["t.parquet"]


# ----------------------------------------------------------------------- permissions


@pytest.mark.parametrize(
    ("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)]
)
def test_atomic_writes_get_the_permissions_of_the_umask(
    tmp_path: Path, mask: int, file_mode: int, dir_mode: int
) -> None:
    """mkstemp makes 0600 files and mkdtemp 0700 folders; what is renamed into place
    gets what a plain write would: 0666 / 0777 less the umask."""
    import os
    import stat

    from recsys import bundle
    from recsys.config import PipelineConfig
    from recsys.schema import current_umask

    def files(d: Path) -> dict[str, object]:
        from safetensors.numpy import save_file

        (d / "table.parquet").write_bytes(b"")
        save_file({"a": np.zeros(2)}, str(d / "arrays.safetensors"))  # (made 0600 by it)
        return {}

    old = os.umask(mask)
    try:
        assert current_umask() == mask
        table = write_parquet_atomic(pl.DataFrame({"a": [1]}), tmp_path / "t.parquet")
        b = bundle.write(tmp_path / "bundle", PipelineConfig(), "fp", files)
    finally:
        os.umask(old)
    assert stat.S_IMODE(table.stat().st_mode) == file_mode
    assert stat.S_IMODE(b.stat().st_mode) == dir_mode
    for f in b.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == file_mode, f.name
