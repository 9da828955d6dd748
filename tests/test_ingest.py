"""Converters to the canonical tables, on tiny fixtures in each public layout."""

from __future__ import annotations

import datetime as dt
import gzip
import json
import logging
import random
from pathlib import Path

import polars as pl
import pytest
import typer
from typer.testing import CliRunner

from recsys.cli.ingest import ingest_app
from recsys.ingest import ingest_amazon, ingest_csv, ingest_mind, ingest_movielens
from recsys.schema import DataError, read_interactions, read_items

SHARED_ML = Path(__file__).resolve().parents[1].parent / "shared/datasets/ml-latest-small"
UTC_US = pl.Datetime("us", "UTC")


def _read(out: tuple[Path, Path]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Read back through validation: the output must pass the same checks as `fit` input."""
    inter_path, items_path = out
    assert inter_path.name == "interactions.parquet" and items_path.name == "items.parquet"
    items = read_items(items_path)
    return read_interactions(inter_path, items=items), items


# ----------------------------------------------------------------------------- MovieLens


def _ml_latest(d: Path) -> Path:
    d.mkdir()
    (d / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n"
        "1,1,4.0,964982703\n1,2,3.5,964981247\n2,1,5.0,964983815\n2,3,0.5,1445714994\n"
    )
    (d / "movies.csv").write_text(
        "movieId,title,genres\n"
        "1,Toy Story (1995),Adventure|Animation|Children\n"
        '2,"Shawshank Redemption, The (1994)",Crime|Drama\n'
        "3,Untitled,(no genres listed)\n"
    )
    (d / "tags.csv").write_text(
        "userId,movieId,tag,timestamp\n"
        "1,1,Pixar,1\n2,1,pixar,2\n3,1,fun,3\n4,1, PIXAR ,4\n1,2,prison,5\n"
    )
    return d


def test_movielens_latest_layout(tmp_path: Path) -> None:
    inter, items = _read(ingest_movielens(_ml_latest(tmp_path / "ml"), tmp_path / "out"))
    assert inter.schema == pl.Schema(
        {"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": UTC_US, "rating": pl.Float64}
    )
    assert inter.height == 4 and inter["rating"].to_list() == [4.0, 3.5, 5.0, 0.5]
    assert inter["timestamp"][0] == dt.datetime.fromtimestamp(964982703, dt.UTC)
    assert items.height == 3 and items["item_id"].dtype == pl.Int64
    rows = {r["item_id"]: r for r in items.iter_rows(named=True)}
    assert rows[1]["tags"] == "pixar|fun"  # lowercased, deduplicated, most frequent first
    assert rows[1]["genres"] == "Adventure|Animation|Children"
    assert rows[2]["title"] == "Shawshank Redemption, The (1994)" and rows[2]["year"] == "1994"
    assert rows[3]["genres"] is None and rows[3]["tags"] is None


def _ml_100k(d: Path) -> Path:
    d.mkdir()
    (d / "u.data").write_text(
        "196\t242\t3\t881250949\n186\t302\t3\t891717742\n22\t242\t1\t878887116\n"
    )
    flags_242 = ["0"] * 19
    flags_242[5] = "1"  # Comedy
    flags_302 = ["0"] * 19
    flags_302[6] = flags_302[16] = "1"  # Crime, Thriller
    lines = [
        "242|Kolya (1996)|24-Jan-1997||http://us.imdb.com/x|" + "|".join(flags_242),
        "302|Señorita Extraviada (2001)|01-Jan-2001||http://x|" + "|".join(flags_302),
    ]
    (d / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    return d


def test_movielens_100k_layout_latin1(tmp_path: Path) -> None:
    src = _ml_100k(tmp_path / "ml-100k")
    inter, items = _read(ingest_movielens(src, tmp_path / "out"))
    assert inter.height == 3 and inter["user_id"].to_list() == [196, 186, 22]
    assert inter["timestamp"].dtype == UTC_US and inter["rating"].dtype == pl.Float64
    rows = {r["item_id"]: r for r in items.iter_rows(named=True)}
    assert rows[302]["title"] == "Señorita Extraviada (2001)"
    assert rows[302]["genres"] == "Crime|Thriller" and rows[242]["genres"] == "Comedy"


def test_movielens_unpacked_zip_parent_folder_is_accepted(tmp_path: Path) -> None:
    _ml_latest(tmp_path / "ml-latest-small")
    inter, _ = _read(ingest_movielens(tmp_path, tmp_path / "out"))
    assert inter.height == 4


def test_movielens_unrecognised_folder_lists_expected_files(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "readme.txt").write_text("hi")
    with pytest.raises(DataError) as e:
        ingest_movielens(tmp_path / "src", tmp_path / "out")
    msg = str(e.value)
    assert "ratings.csv" in msg and "u.data" in msg and "readme.txt" in msg
    assert not (tmp_path / "out" / "interactions.parquet").exists()


# ---------------------------------------------------------------------------------- MIND


def _mind(d: Path) -> Path:
    d.mkdir()
    (d / "news.tsv").write_text(
        'N1\tnews\tnewsus\tA "quoted" title\tAbstract one\thttp://u\t[]\t[]\n'
        "N2\tsports\tfootball\tTitle two\t\thttp://u\t[]\t[]\n"
        "N3\tnews\tnewsworld\tTitle three\tAbstract three\thttp://u\t[]\t[]\n"
    )
    (d / "behaviors.tsv").write_text(
        "1\tU1\t11/15/2019 8:55:22 AM\tN1 N2\tN3-1 N2-0\n"
        "2\tU2\t11/15/2019 9:00:00 AM\t\tN1-0 N3-1 N9-0\n"  # empty history, N9 unknown
        "3\tU1\t11/14/2019 10:00:00 PM\tN2 N3\tN1-1\n"  # earlier impression of U1
    )
    return d


def test_mind_layout(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="recsys"):
        out = ingest_mind(_mind(tmp_path / "mind"), tmp_path / "out")
    assert "dropped 1 interaction" in caplog.text  # N9 is not in news.tsv
    inter, items = _read(out)
    assert items.columns == ["item_id", "category", "subcategory", "title", "abstract"]
    assert items.height == 3 and items.filter(pl.col("item_id") == "N1")["title"][0] == (
        'A "quoted" title'
    )
    assert set(inter.columns) == {
        "user_id",
        "item_id",
        "timestamp",
        "event",
        "impression_id",
        "label",
    }
    assert inter["user_id"].dtype == pl.String and inter["label"].dtype == pl.Int8
    imp = inter.filter(pl.col("impression_id").is_not_null())
    assert imp.height == 5  # 2 + 2 (N9 dropped) + 1
    assert sorted(imp.select("impression_id", "item_id", "label").rows()) == [
        ("1", "N2", 0),
        ("1", "N3", 1),
        ("2", "N1", 0),
        ("2", "N3", 1),
        ("3", "N1", 1),
    ]
    assert set(imp["event"]) == {"impression_click", "impression_skip"}
    hist = inter.filter(pl.col("event") == "history_click").sort("timestamp")
    # U1's history across rows, in time order, deduplicated: N2, N3 (from row 3), N1 (row 1);
    # U2's empty history gives nothing.
    assert hist["user_id"].to_list() == ["U1"] * 3 and hist["item_id"].to_list() == [
        "N2",
        "N3",
        "N1",
    ]
    assert hist["label"].to_list() == [1, 1, 1]
    first = dt.datetime(2019, 11, 14, 22, 0, 0, tzinfo=dt.UTC)
    assert hist["timestamp"].to_list() == [first - dt.timedelta(seconds=s) for s in (3, 2, 1)]


# -------------------------------------------------------------------------------- Amazon


def _gz_lines(path: Path, lines: list[str]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _amazon_meta(d: Path) -> Path:
    rows = [
        json.dumps(
            {
                "asin": "B1",
                "title": "Wired",
                "brand": "Conde Nast",
                "category": ["Magazine Subscriptions", "Science &amp; Technology"],
                "description": ["<b>Wired</b> covers technology &amp; culture.", "", ""],
                "feature": [],
                "also_buy": ["B2"],
            }
        ),
        json.dumps(  # the 2018 magazine metadata has cut-off HTML in place of titles
            {
                "asin": "B2",
                "title": '<span class="a-size-medium a-color-secondary"',
                "brand": "",
                "category": ["Magazine Subscriptions", "Home & Garden"],
                "description": "Gardening ideas.<br>Every month.",
                "feature": ["12 issues", "Print"],
            }
        ),
        json.dumps({"asin": "B1", "title": "A later duplicate record", "brand": "x"}),
        # the 2014 files hold Python literals, not JSON
        "{'asin': 'B3', 'title': 'Chess Life', 'categories': [['Books', 'Games'], ['Games']]}",
    ]
    return _gz_lines(d / "meta_Magazine_Subscriptions.json.gz", rows)


def _review(user: str, item: str, ts: int, rating: float = 5.0) -> str:
    return json.dumps(
        {"reviewerID": user, "asin": item, "unixReviewTime": ts, "overall": rating, "vote": "2"}
    )


def test_amazon_reviews_and_meta(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    meta = _amazon_meta(tmp_path)
    reviews = _gz_lines(
        tmp_path / "Magazine_Subscriptions_5.json.gz",
        [
            _review("A1", "B1", 1_000_000_000, 4.0),
            _review("A1", "B2", 1_100_000_000),
            _review("A1", "B2", 1_100_000_000),  # repeated review: dropped
            _review("A2", "B3", 1_200_000_000, 1.0),
            _review("A2", "B9", 1_300_000_000),  # not in the metadata: empty text
            _review("A3", "B1", 1_400_000_000),
        ],
    )
    with caplog.at_level(logging.WARNING, logger="recsys"):
        out = ingest_amazon(reviews, meta, tmp_path / "out")
    assert "1 of 4 reviewed item(s) are not in" in caplog.text
    inter, items = _read(out)
    assert inter.schema == pl.Schema(
        {"user_id": pl.String, "item_id": pl.String, "timestamp": UTC_US, "rating": pl.Float64}
    )
    assert inter.select("user_id", "item_id").rows() == [
        ("A1", "B1"),
        ("A1", "B2"),
        ("A2", "B3"),
        ("A2", "B9"),
        ("A3", "B1"),
    ]
    assert inter["timestamp"][0] == dt.datetime.fromtimestamp(1_000_000_000, dt.UTC)
    assert inter["rating"].to_list() == [4.0, 5.0, 1.0, 5.0, 5.0]
    assert items.columns == ["item_id", "title", "brand", "category", "description", "features"]
    assert all(items[c].dtype == pl.String for c in items.columns)
    rows = {r["item_id"]: r for r in items.iter_rows(named=True)}
    assert sorted(rows) == ["B1", "B2", "B3", "B9"]  # reviewed items only
    assert rows["B1"]["title"] == "Wired" and rows["B1"]["brand"] == "Conde Nast"  # first wins
    assert rows["B1"]["category"] == "Magazine Subscriptions|Science & Technology"
    assert rows["B1"]["description"] == "Wired covers technology & culture."
    assert rows["B2"]["title"] is None and rows["B2"]["brand"] is None  # HTML only, empty
    assert rows["B2"]["description"] == "Gardening ideas. Every month."
    assert rows["B2"]["features"] == "12 issues|Print"
    assert rows["B3"]["category"] == "Books|Games"
    assert all(v is None for k, v in rows["B9"].items() if k != "item_id")


def test_amazon_ratings_csv_either_column_order_and_min_user_events(tmp_path: Path) -> None:
    meta = _amazon_meta(tmp_path)
    events = [("A1", "B1", 1_000_000_000), ("A1", "B2", 1_000_000_100), ("A2", "B3", 1_000_000_200)]
    (tmp_path / "ratings_2018.csv").write_text(  # item,user,rating,time, no header
        "".join(f"{i},{u},5.0,{t}\n" for u, i, t in events)
    )
    (tmp_path / "ratings_2014.csv").write_text(  # user,item,rating,time, no header
        "".join(f"{u},{i},5.0,{t}\n" for u, i, t in events)
    )
    a, _ = _read(ingest_amazon(tmp_path / "ratings_2018.csv", meta, tmp_path / "a"))
    b, _ = _read(ingest_amazon(tmp_path / "ratings_2014.csv", meta, tmp_path / "b"))
    assert a.equals(b) and a.select("user_id", "item_id").rows() == [(u, i) for u, i, _ in events]
    c, items = _read(
        ingest_amazon(tmp_path / "ratings_2018.csv", meta, tmp_path / "c", min_user_events=2)
    )
    assert c["user_id"].to_list() == ["A1", "A1"] and items["item_id"].to_list() == ["B1", "B2"]


def test_amazon_same_day_reviews_are_not_ordered_by_item(tmp_path: Path) -> None:
    """The 2018 files give days and group rows by item, so a user's reviews of one day
    came out in item-id order, and the evaluation held out the later item id of the day.
    Now the last of a day is any of its items, the same whatever the file's row order."""
    meta = _amazon_meta(tmp_path)
    day = 1_400_000_000
    rows = [(f"U{n:03d}", item, day) for item in ("B1", "B2", "B3") for n in range(300)]
    rows += [("V", "B3", day), ("V", "B1", day + 86_400)]  # different days keep time order
    files = {"grouped": rows, "shuffled": random.Random(0).sample(rows, len(rows))}
    out = {}
    for name, rs in files.items():
        (tmp_path / f"{name}.csv").write_text("".join(f"{i},{u},5.0,{t}\n" for u, i, t in rs))
        out[name], _ = _read(ingest_amazon(tmp_path / f"{name}.csv", meta, tmp_path / name))
    assert out["grouped"].equals(out["shuffled"])
    last = out["grouped"].group_by("user_id", maintain_order=True).agg(pl.col("item_id").last())
    share = last.filter(pl.col("user_id") != "V")["item_id"].value_counts(normalize=True)
    assert sorted(share["item_id"]) == ["B1", "B2", "B3"]
    assert share["proportion"].max() < 0.45  # a third each, not the later id every time
    assert out["grouped"].filter(pl.col("user_id") == "V")["item_id"].to_list() == ["B3", "B1"]


def test_amazon_2023_layout(tmp_path: Path) -> None:
    meta = _gz_lines(
        tmp_path / "meta_All_Beauty.jsonl.gz",
        [
            json.dumps(
                {
                    "parent_asin": "P1",
                    "main_category": "All Beauty",
                    "title": "Rose water toner",
                    "store": "Heritage",
                    "categories": [],
                    "features": ["Alcohol free", "8 fl oz"],
                    "description": ["Hydrating toner."],
                    "details": {"Brand": "Heritage"},
                }
            )
        ],
    )
    reviews = _gz_lines(
        tmp_path / "All_Beauty.jsonl.gz",
        [
            json.dumps(
                {
                    "user_id": "U1",
                    "asin": "C1",
                    "parent_asin": "P1",
                    "rating": 5.0,
                    "timestamp": 1588687728923,  # milliseconds
                    "text": "Lovely",
                }
            )
        ],
    )
    inter, items = _read(ingest_amazon(reviews, meta, tmp_path / "out"))
    assert inter["item_id"].to_list() == ["P1"]  # the parent item, as the metadata names it
    assert inter["timestamp"][0] == dt.datetime(2020, 5, 5, 14, 8, 48, 923000, tzinfo=dt.UTC)
    row = items.row(0, named=True)
    assert row["brand"] == "Heritage" and row["category"] == "All Beauty"
    assert row["features"] == "Alcohol free|8 fl oz" and row["description"] == "Hydrating toner."


def test_amazon_bad_input_names_file_row_and_column(tmp_path: Path) -> None:
    meta = _amazon_meta(tmp_path)
    broken = _gz_lines(tmp_path / "r.json.gz", [_review("A1", "B1", 1), "{not json", "[1, 2]"])
    with pytest.raises(DataError) as e:
        ingest_amazon(broken, meta, tmp_path / "out")
    assert e.value.rows == [1] and "r.json.gz" in str(e.value) and "JSON object" in str(e.value)
    no_user = _gz_lines(tmp_path / "s.json.gz", [json.dumps({"asin": "B1", "unixReviewTime": 1})])
    with pytest.raises(DataError) as e:
        ingest_amazon(no_user, meta, tmp_path / "out")
    assert e.value.column == "reviewerID" and e.value.rows == [0]
    (tmp_path / "t.csv").write_text("B1,A1,5.0,yesterday\n")
    with pytest.raises(DataError) as e:
        ingest_amazon(tmp_path / "t.csv", meta, tmp_path / "out")
    assert e.value.column == "timestamp" and e.value.rows == [0]
    assert not (tmp_path / "out" / "interactions.parquet").exists()


# ----------------------------------------------------------------------------- generic


def test_generic_csv_with_mapping_and_items(tmp_path: Path) -> None:
    (tmp_path / "events.csv").write_text(
        "uid;sku;ts;kind;qty\n"
        "alice;P-1;2024-01-01T10:00:00Z;view;1\n"
        "bob;P-2;2024-01-01T11:00:00+01:00;purchase;2\n"
        "alice;P-2;2024-01-02 09:30:00;view;1\n"
    )
    (tmp_path / "products.csv").write_text(
        "sku;name;description\nP-1;Mug;A mug\nP-2;Teapot;\nP-3;Spoon;Unused item\n"
    )
    mapping = {"user_id": "uid", "item_id": "sku", "timestamp": "ts", "event": "kind"}
    out = ingest_csv(
        tmp_path / "events.csv",
        tmp_path / "out",
        items_src=tmp_path / "products.csv",
        mapping=mapping,
    )
    inter, items = _read(out)
    assert inter.columns == ["user_id", "item_id", "timestamp", "event"]
    assert inter["user_id"].to_list() == ["alice", "bob", "alice"]
    assert inter["timestamp"][1] == dt.datetime(2024, 1, 1, 10, 0, tzinfo=dt.UTC)
    assert items.columns == ["item_id", "name", "description"] and items.height == 3


def test_generic_parquet_without_items_file(tmp_path: Path) -> None:
    pl.DataFrame(
        {"u": [1, 2, 2], "i": [10, 20, 10], "timestamp": [1_700_000_000_000] * 3}
    ).write_parquet(tmp_path / "ev.parquet")
    inter, items = _read(
        ingest_csv(
            tmp_path / "ev.parquet", tmp_path / "o", mapping={"user_id": "u", "item_id": "i"}
        )
    )
    assert items.columns == ["item_id"] and items["item_id"].to_list() == [10, 20]
    assert inter["item_id"].dtype == pl.Int64 and inter.height == 3
    assert inter["timestamp"][0] == dt.datetime(2023, 11, 14, 22, 13, 20, tzinfo=dt.UTC)


def test_generic_mapping_to_absent_column_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "ev.csv").write_text("user,item,time\na,b,2024-01-01\n")
    with pytest.raises(DataError) as e:
        ingest_csv(tmp_path / "ev.csv", tmp_path / "o", mapping={"user_id": "uid"})
    assert "'uid'" in str(e.value) and "user, item, time" in str(e.value)


# --------------------------------------------------------------------------------- CLI


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(ingest_app, name="ingest")

    @app.command()
    def version() -> None:  # a second command, so `ingest` stays a sub-command
        typer.echo("0")

    return app


def test_cli_csv_with_map_prints_paths_and_counts(tmp_path: Path) -> None:
    (tmp_path / "ev.tsv").write_text("uid\tsku\tts\nu1\ti1\t1700000000\nu2\ti1\t1700000100\n")
    res = CliRunner().invoke(
        _cli(),
        [
            "ingest",
            "csv",
            str(tmp_path / "ev.tsv"),
            str(tmp_path / "o"),
            "--map",
            "user_id=uid",
            "--map",
            "item_id=sku",
            "--map",
            "timestamp=ts",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "interactions.parquet (2 rows)" in res.output and "items.parquet (1 rows)" in res.output


def test_cli_help_and_bad_input(tmp_path: Path) -> None:
    runner = CliRunner()
    for cmd in ("movielens", "mind", "amazon", "csv"):
        res = runner.invoke(_cli(), ["ingest", cmd, "--help"])
        assert res.exit_code == 0 and "OUT" in res.output.upper()
    res = runner.invoke(_cli(), ["ingest", "csv", "x.csv", "o", "--map", "user_id"])
    assert res.exit_code == 2 and "canonical=source" in res.output
    res = runner.invoke(_cli(), ["ingest", "movielens", str(tmp_path / "none"), "o"])
    assert isinstance(res.exception, DataError)


# ----------------------------------------------------------------------------- realdata


@pytest.mark.realdata
def test_real_ml_latest_small(tmp_path: Path) -> None:
    if not (SHARED_ML / "ratings.csv").exists():
        pytest.skip("ml-latest-small is not present in ../shared/datasets")
    inter, items = _read(ingest_movielens(SHARED_ML, tmp_path / "out"))
    assert inter.height == 100836 and items.height == 9742
    assert inter["user_id"].n_unique() == 610
    assert items["tags"].drop_nulls().len() > 1000
