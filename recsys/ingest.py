"""Converters from public data set layouts to the canonical Parquet tables.

Each converter writes OUT_DIR/interactions.parquet and OUT_DIR/items.parquet (atomically:
a temp file, then a rename, so a failed run never leaves half a data set behind) after
running them through the same validation as `fit`, and returns the two paths. With
`pseudonymize` (a `recsys.pseudonym.Pseudonymizer`), user ids are written as keyed hashes
and OUT_DIR/interactions.pseudonym.json records that they were.
"""

from __future__ import annotations

import ast
import gzip
import html
import io
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import polars as pl

from recsys.pseudonym import Pseudonymizer, sidecar_path, write_sidecar
from recsys.schema import (
    EVENT,
    IMPRESSION,
    ITEM,
    LABEL,
    RATING,
    TS,
    USER,
    DataError,
    read_table,
    validate_interactions,
    validate_items,
    write_parquet_atomic,
)

log = logging.getLogger("recsys")

INTERACTIONS_FILE = "interactions.parquet"
ITEMS_FILE = "items.parquet"

MAX_TAGS = 20
ML100K_GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
_YEAR = r"\((\d{4})\)\s*$"
_MIND_TIME = "%m/%d/%Y %I:%M:%S %p"

PathLike = str | os.PathLike[str]


def _write(
    interactions: pl.DataFrame,
    items: pl.DataFrame,
    out_dir: PathLike,
    what: str,
    pseudonymize: Pseudonymizer | None = None,
) -> tuple[Path, Path]:
    """Write both canonical tables atomically and log what was written.

    Every converter ends here, so `pseudonymize` (`recsys.pseudonym`) applies to all of
    them: user ids are replaced by their pseudonyms before anything is written, and the
    record of it (flag and key fingerprint, never the key) goes beside the interactions
    once they are in place. A record left by an earlier run is removed first: a crash
    in between leaves no record rather than one that does not match the ids.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    inter_file = out / INTERACTIONS_FILE
    if pseudonymize is not None:
        interactions = interactions.with_columns(pseudonymize.series(interactions[USER]))
    sidecar_path(inter_file).unlink(missing_ok=True)
    items_path = write_parquet_atomic(items, out / ITEMS_FILE)
    inter_path = write_parquet_atomic(interactions, inter_file)
    if pseudonymize is not None:
        record = write_sidecar(inter_path, pseudonymize)
        log.info(
            "%s: user ids pseudonymized (key fingerprint %s), recorded in %s",
            what,
            pseudonymize.fingerprint,
            record,
        )
    log.info(
        "%s: wrote %d interactions (%d users) to %s and %d items to %s",
        what,
        interactions.height,
        interactions[USER].n_unique(),
        inter_path,
        items.height,
        items_path,
    )
    return inter_path, items_path


def _from_epoch_seconds(col: str) -> pl.Expr:
    return pl.from_epoch(col, time_unit="s").dt.replace_time_zone("UTC").alias(TS)


# --------------------------------------------------------------------------- MovieLens

_ML_LATEST = ("ratings.csv", "movies.csv")
_ML_100K = ("u.data", "u.item")


def _movielens_layout(src: Path) -> tuple[str, Path] | None:
    if all((src / f).is_file() for f in _ML_LATEST):
        return "latest", src
    if all((src / f).is_file() for f in _ML_100K):
        return "100k", src
    return None


def ingest_movielens(
    src_dir: PathLike, out_dir: PathLike, pseudonymize: Pseudonymizer | None = None
) -> tuple[Path, Path]:
    """Convert a MovieLens folder (ml-latest-small / ml-25m CSV layout, or ml-100k).

    The layout is detected from the files present; a folder holding exactly one MovieLens
    folder (an unpacked zip) is accepted too. Every rating is one interaction.
    """
    src = Path(src_dir)
    if not src.is_dir():
        raise DataError("folder not found", file=str(src), expected="a MovieLens folder")
    found = _movielens_layout(src)
    if found is None:
        subs = [d for d in src.iterdir() if d.is_dir()]
        candidates = [f for f in (_movielens_layout(d) for d in subs) if f is not None]
        if len(candidates) == 1:
            found = candidates[0]
    if found is None:
        present = ", ".join(sorted(p.name for p in src.iterdir())[:20]) or "nothing"
        raise DataError(
            f"not a recognised MovieLens folder (it holds: {present})",
            file=str(src),
            expected="ratings.csv + movies.csv (+ tags.csv) as in ml-latest-small / ml-25m, "
            "or u.data + u.item as in ml-100k",
        )
    layout, folder = found
    if layout == "latest":
        inter, items = _movielens_latest(folder)
    else:
        inter, items = _movielens_100k(folder)
    items = validate_items(items, source=str(folder))
    inter = validate_interactions(inter, source=str(folder), items=items)
    return _write(inter, items, out_dir, f"movielens ({layout})", pseudonymize)


def _read_ml_csv(path: Path, schema: dict[str, pl.DataType]) -> pl.LazyFrame:
    """Lazily scan a MovieLens CSV with a fixed schema (ml-25m has 25M ratings)."""
    try:
        with path.open("rb") as f:
            header = f.readline().decode("utf-8", errors="replace").strip().split(",")
    except OSError as e:
        raise DataError(f"cannot read the file: {e}", file=str(path)) from e
    missing = [c for c in schema if c not in header]
    if missing:
        raise DataError(
            f"missing column(s) {', '.join(missing)} (header: {','.join(header)})",
            file=str(path),
            expected=f"columns {', '.join(schema)}",
        )
    return pl.scan_csv(path, schema_overrides=schema, infer_schema=False).select(list(schema))


def _collect(lf: pl.LazyFrame, path: Path) -> pl.DataFrame:
    try:
        return lf.collect(engine="streaming")
    except pl.exceptions.PolarsError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot read the file: {first}", file=str(path)) from e


def _movielens_latest(src: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    ratings_path = src / "ratings.csv"
    ratings = _read_ml_csv(
        ratings_path,
        {
            "userId": pl.Int64(),
            "movieId": pl.Int64(),
            "rating": pl.Float64(),
            "timestamp": pl.Int64(),
        },
    ).select(
        pl.col("userId").alias(USER),
        pl.col("movieId").alias(ITEM),
        _from_epoch_seconds("timestamp"),
        pl.col("rating").alias(RATING),
    )
    inter = _collect(ratings, ratings_path)

    movies_path = src / "movies.csv"
    movies = _read_ml_csv(
        movies_path, {"movieId": pl.Int64(), "title": pl.String(), "genres": pl.String()}
    ).select(
        pl.col("movieId").alias(ITEM),
        pl.col("title"),
        pl.when(pl.col("genres") == "(no genres listed)")
        .then(None)
        .otherwise(pl.col("genres"))
        .alias("genres"),
        pl.col("title").str.extract(_YEAR, 1).alias("year"),
    )
    items = _collect(movies, movies_path)

    tags_path = src / "tags.csv"
    if tags_path.is_file():
        tags = _collect(_movielens_tags(tags_path), tags_path)
        items = items.join(tags, on=ITEM, how="left", maintain_order="left")
    else:
        items = items.with_columns(pl.lit(None, dtype=pl.String).alias("tags"))
    return inter, items.select(ITEM, "title", "genres", "tags", "year")


def _movielens_tags(path: Path) -> pl.LazyFrame:
    """Each movie's distinct tags, lowercased, most applied first, at most MAX_TAGS."""
    tag = pl.col("tag").cast(pl.String).str.to_lowercase().str.replace_all("|", " ", literal=True)
    return (
        _read_ml_csv(path, {"movieId": pl.Int64(), "tag": pl.String()})
        .select(pl.col("movieId").alias(ITEM), tag.str.strip_chars().alias("tag"))
        .filter(pl.col("tag").is_not_null() & (pl.col("tag") != ""))
        .group_by(ITEM, "tag")
        .agg(pl.len().alias("n"))
        .group_by(ITEM)
        .agg(
            pl.col("tag")
            .sort_by(["n", "tag"], descending=[True, False])
            .head(MAX_TAGS)
            .str.join("|")
            .alias("tags")
        )
    )


def _movielens_100k(src: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    data_path, item_path = src / "u.data", src / "u.item"
    try:
        inter = pl.read_csv(
            data_path,
            separator="\t",
            has_header=False,
            new_columns=[USER, ITEM, RATING, "ts"],
            schema_overrides=[pl.Int64, pl.Int64, pl.Float64, pl.Int64],
        ).select(USER, ITEM, _from_epoch_seconds("ts"), RATING)
    except pl.exceptions.PolarsError as e:
        raise DataError(
            f"cannot read the file: {e}", file=str(data_path), expected="user item rating ts"
        ) from e
    # u.item is latin-1 (e.g. "Señorita Extraviada"); polars reads UTF-8 only.
    text = item_path.read_bytes().decode("latin-1")
    names = ["item_id", "title", "release_date", "video_release_date", "url"]
    flags = [f"g{i}" for i in range(len(ML100K_GENRES))]
    try:
        raw = pl.read_csv(
            io.BytesIO(text.encode("utf-8")),
            separator="|",
            has_header=False,
            quote_char=None,
            new_columns=names + flags,
            schema_overrides=[pl.Int64] + [pl.String] * 4 + [pl.Int8] * len(flags),
        )
    except pl.exceptions.PolarsError as e:
        raise DataError(
            f"cannot read the file: {e}",
            file=str(item_path),
            expected="movie id | title | release date | video release date | IMDb URL | "
            "19 genre flags",
        ) from e
    genre_list = pl.concat_list(
        [
            pl.when(pl.col(f) == 1).then(pl.lit(g)).otherwise(None)
            for f, g in zip(flags, ML100K_GENRES, strict=True)
        ]
    ).list.drop_nulls()
    items = raw.select(
        pl.col("item_id").alias(ITEM),
        pl.col("title"),
        genre_list.list.join("|").replace("", None).alias("genres"),
        pl.col("title").str.extract(_YEAR, 1).alias("year"),
    )
    return inter, items


# --------------------------------------------------------------------------------- MIND

_BEHAVIORS = ["impression_id", "user_id", "time", "history", "impressions"]
_NEWS = [
    "item_id",
    "category",
    "subcategory",
    "title",
    "abstract",
    "url",
    "title_entities",
    "abstract_entities",
]


def _read_tsv(path: Path, names: list[str]) -> pl.DataFrame:
    """MIND's header-less TSVs; titles hold bare quotes, so quoting is off."""
    if not path.is_file():
        raise DataError("file not found", file=str(path), expected="the MIND layout")
    try:
        return pl.read_csv(
            path,
            separator="\t",
            has_header=False,
            quote_char=None,
            new_columns=names,
            schema_overrides=[pl.String] * len(names),
        )
    except pl.exceptions.PolarsError as e:
        first = str(e).strip().splitlines()[0]
        raise DataError(
            f"cannot read the file: {first}",
            file=str(path),
            expected=f"{len(names)} tab-separated columns: {', '.join(names)}",
        ) from e


def ingest_mind(
    src_dir: PathLike, out_dir: PathLike, pseudonymize: Pseudonymizer | None = None
) -> tuple[Path, Path]:
    """Convert a MIND split (behaviors.tsv + news.tsv) to canonical tables.

    Every impression entry becomes a row with impression_id and label (1 clicked, 0 shown
    and skipped). History clicks carry no time: they become event="history_click" rows
    just before the user's first impression, one second apart, in history order. Entries
    naming news absent from news.tsv (known in MIND's dev/test splits) are dropped with a
    warning, since validation would refuse them.
    """
    src = Path(src_dir)
    if not src.is_dir():
        raise DataError("folder not found", file=str(src), expected="a MIND folder")
    if not (src / "behaviors.tsv").is_file():
        subs = [d for d in src.iterdir() if d.is_dir() and (d / "behaviors.tsv").is_file()]
        if len(subs) == 1:
            src = subs[0]
        else:
            present = ", ".join(sorted(p.name for p in src.iterdir())[:20]) or "nothing"
            raise DataError(
                f"not a MIND folder (it holds: {present})",
                file=str(src),
                expected="behaviors.tsv and news.tsv",
            )
    beh_path = src / "behaviors.tsv"
    news = _read_tsv(src / "news.tsv", _NEWS)
    news = news.select(_NEWS[:5]).unique(ITEM, keep="first", maintain_order=True)
    items = validate_items(news, source=str(src / "news.tsv"))

    beh = _read_tsv(beh_path, _BEHAVIORS).with_row_index("row")
    time = (
        pl.col("time").str.strip_chars().str.to_datetime(_MIND_TIME, strict=False, time_unit="us")
    )
    beh = beh.with_columns(time.dt.replace_time_zone("UTC").alias(TS))
    bad = beh.filter(pl.col(TS).is_null())
    if bad.height:
        raise DataError(
            f"{bad.height} time(s) could not be parsed, e.g. {bad['time'].head(3).to_list()}",
            file=str(beh_path),
            column="time",
            rows=bad["row"].head(10_000).to_list(),
            expected="times like 11/15/2019 8:55:22 AM",
        )

    imp = (
        beh.select(IMPRESSION, USER, TS, pl.col("impressions").str.strip_chars().str.split(" "))
        .explode("impressions")
        .filter(pl.col("impressions").is_not_null() & (pl.col("impressions") != ""))
        .with_columns(
            pl.col("impressions").str.extract(r"^(.+?)(?:-(\d+))?$", 1).alias(ITEM),
            pl.col("impressions").str.extract(r"^(.+?)(?:-(\d+))?$", 2).alias(LABEL),
        )
    )
    if imp[LABEL].null_count() == imp.height:  # the test split has no labels
        imp = imp.with_columns(pl.lit("impression").alias(EVENT)).drop(LABEL)
    else:
        imp = imp.with_columns(
            pl.col(LABEL).cast(pl.Int8, strict=False),
        ).with_columns(
            pl.when(pl.col(LABEL) == 1)
            .then(pl.lit("impression_click"))
            .otherwise(pl.lit("impression_skip"))
            .alias(EVENT)
        )
    imp = imp.drop("impressions")

    first_seen = beh.group_by(USER).agg(pl.col(TS).min().alias("first_ts"))
    hist = (
        beh.sort([TS, "row"])
        .select(USER, pl.col("history").str.strip_chars().str.split(" ").alias(ITEM))
        .explode(ITEM)
        .filter(pl.col(ITEM).is_not_null() & (pl.col(ITEM) != ""))
        .unique([USER, ITEM], keep="first", maintain_order=True)
        .join(first_seen, on=USER, how="left", maintain_order="left")
        .with_columns(
            (
                pl.col("first_ts")
                - pl.duration(
                    seconds=pl.len().over(USER) - pl.int_range(pl.len()).over(USER),
                    time_unit="us",
                )
            ).alias(TS),
            pl.lit(None, dtype=pl.String).alias(IMPRESSION),
            pl.lit("history_click").alias(EVENT),
        )
    )
    if LABEL in imp.columns:
        hist = hist.with_columns(pl.lit(1, dtype=pl.Int8).alias(LABEL))
    cols = [USER, ITEM, TS, EVENT, IMPRESSION] + ([LABEL] if LABEL in imp.columns else [])
    inter = pl.concat([hist.select(cols), imp.select(cols)]).sort(TS, maintain_order=True)

    known = pl.col(ITEM).is_in(items[ITEM].implode())
    n_unknown = inter.filter(~known).height
    if n_unknown:
        n_ids = inter.filter(~known)[ITEM].n_unique()
        log.warning(
            "%s: dropped %d interaction(s) naming %d news id(s) missing from news.tsv",
            beh_path,
            n_unknown,
            n_ids,
        )
        inter = inter.filter(known)
    inter = validate_interactions(inter, source=str(beh_path), items=items)
    return _write(inter, items, out_dir, "mind", pseudonymize)


# ------------------------------------------------------------------------------- Amazon

_TAG = re.compile(r"<[^>]*>|<[^>]*$")  # tags, and a tag cut off at the end of the text
_SPACE = re.compile(r"\s+")
_AMAZON_FIELDS = {  # canonical name: source fields, in order of preference (2023, 2018, 2014)
    USER: ("user_id", "reviewerID"),
    ITEM: ("parent_asin", "asin"),
    TS: ("timestamp", "unixReviewTime"),
    RATING: ("rating", "overall"),
}
_AMAZON_CSV_HEADER = {"user_id": USER, "parent_asin": ITEM, "asin": ITEM, "item_id": ITEM}


def _is_gzip(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _open_text(path: Path, what: str) -> IO[str]:
    """Open a text file, gzip-compressed or not (told by its first bytes, not its name)."""
    if not path.is_file():
        raise DataError("file not found", file=str(path), expected=what)
    if _is_gzip(path):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    return path.open("r", encoding="utf-8", errors="replace")


def _json_lines(path: Path, what: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row, record) for every non-empty line. Rows are 0-based line numbers.

    Lines are JSON objects (2018, 2023) or Python dict literals (the 2014 files, read with
    ast.literal_eval, which evaluates literals only).
    """
    try:
        with _open_text(path, what) as f:
            for row, line in enumerate(f):
                line = line.strip()
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    try:
                        record = ast.literal_eval(line)
                    except (ValueError, SyntaxError, MemoryError, RecursionError):
                        record = None
                if not isinstance(record, dict):
                    raise DataError(
                        f"not a JSON object: {line[:80]!r}",
                        file=str(path),
                        rows=[row],
                        expected=f"{what}: one JSON object per line",
                    )
                yield row, record
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read the file: {e}", file=str(path), expected=what) from e


def _amazon_text(value: Any, sep: str = " ") -> str | None:
    """Flatten a metadata value to one clean string: the strings of lists (and lists of
    lists) joined with `sep` without repeats, HTML tags dropped, entities unescaped,
    whitespace collapsed; None if nothing is left."""
    parts: list[str] = []
    stack = [value]
    while stack:
        v = stack.pop()
        if v is None:
            continue
        if isinstance(v, list | tuple):
            stack.extend(reversed(v))
            continue
        text = html.unescape(_TAG.sub(" ", html.unescape(str(v))))
        text = _SPACE.sub(" ", text).strip()
        if text and text not in parts:
            parts.append(text)
    return sep.join(parts) or None


def _amazon_meta(path: Path) -> pl.DataFrame:
    """Item text from a metadata file: one row per item id, the first record wins."""
    what = "Amazon metadata (meta_*.json[.gz] or meta_*.jsonl[.gz])"
    ids: list[str] = []
    cols: dict[str, list[str | None]] = {
        "title": [],
        "brand": [],
        "category": [],
        "description": [],
        "features": [],
    }
    seen: set[str] = set()
    for row, rec in _json_lines(path, what):
        item = rec.get("parent_asin") or rec.get("asin")
        if not item:
            raise DataError(
                "record has no item id",
                file=str(path),
                column="asin",
                rows=[row],
                expected="an 'asin' (2014, 2018) or 'parent_asin' (2023) field",
            )
        item = str(item)
        if item in seen:
            continue
        seen.add(item)
        ids.append(item)
        categories = rec.get("categories") or rec.get("category")
        if rec.get("main_category"):
            categories = [rec["main_category"], categories or []]
        cols["title"].append(_amazon_text(rec.get("title")))
        cols["brand"].append(_amazon_text(rec.get("brand") or rec.get("store")))
        cols["category"].append(_amazon_text(categories, "|"))
        cols["description"].append(_amazon_text(rec.get("description")))
        cols["features"].append(_amazon_text(rec.get("features") or rec.get("feature"), "|"))
    if not ids:
        raise DataError("no item records", file=str(path), expected=what)
    return pl.DataFrame(
        {ITEM: ids, **cols}, schema={ITEM: pl.String, **dict.fromkeys(cols, pl.String)}
    )


def _amazon_reviews_json(path: Path) -> pl.DataFrame:
    what = "Amazon reviews (*.json[.gz] / *.jsonl[.gz], one review per line)"
    values: dict[str, list[Any]] = {c: [] for c in _AMAZON_FIELDS}
    missing: dict[str, list[int]] = {}
    for row, rec in _json_lines(path, what):
        for col, fields in _AMAZON_FIELDS.items():
            v = next((rec[f] for f in fields if rec.get(f) not in (None, "")), None)
            if v is None and col != RATING:
                missing.setdefault(fields[-1], []).append(row)
            values[col].append(None if v is None else str(v))
    for field, rows in missing.items():
        raise DataError(
            f"{len(rows)} review(s) without this field",
            file=str(path),
            column=field,
            rows=rows[:10_000],
            expected="user (reviewerID / user_id), item (asin / parent_asin), time "
            "(unixReviewTime / timestamp) in every review",
        )
    if not values[USER]:
        raise DataError("no reviews", file=str(path), expected=what)
    df = pl.DataFrame(
        {
            USER: pl.Series(values[USER], dtype=pl.String),
            ITEM: pl.Series(values[ITEM], dtype=pl.String),
            TS: pl.Series(values[TS], dtype=pl.String),
            RATING: pl.Series(values[RATING], dtype=pl.String),
        }
    )
    return _amazon_numbers(df, path)


def _amazon_numbers(df: pl.DataFrame, path: Path) -> pl.DataFrame:
    """Epoch times (seconds in 2014/2018, ms in 2023) and ratings from strings."""
    df = df.with_row_index("row").with_columns(
        pl.col(TS).str.strip_chars().cast(pl.Float64, strict=False).cast(pl.Int64).alias("_ts"),
        pl.col(RATING).str.strip_chars().cast(pl.Float64, strict=False).alias("_rating"),
    )
    checks = (
        (pl.col("_ts").is_null(), TS, "epoch seconds or milliseconds"),
        (pl.col("_rating").is_null() & pl.col(RATING).is_not_null(), RATING, "a star rating"),
    )
    for bad_rows, column, expected in checks:
        bad = df.filter(bad_rows)
        if bad.height:
            raise DataError(
                f"{bad.height} value(s) are not {expected}, e.g. {bad[column].head(3).to_list()}",
                file=str(path),
                column=column,
                rows=bad["row"].head(10_000).to_list(),
                expected=expected,
            )
    return df.select(USER, ITEM, pl.col("_ts").alias(TS), pl.col("_rating").alias(RATING))


def _amazon_ratings_csv(path: Path, meta_ids: set[str]) -> pl.DataFrame:
    """A ratings-only CSV: 2018 'item,user,rating,time' or 2014 'user,item,rating,time'
    without a header (which column holds items is told by the ids found in META), or the
    2023 benchmark layout with a header (user_id,parent_asin,rating,timestamp,...)."""
    what = "Amazon ratings CSV: item,user,rating,timestamp (2018) or user,item,... (2014)"
    try:
        with _open_text(path, what) as f:
            text = f.read()
        first = text.split("\n", 1)[0].strip().split(",")
        header = [c.strip() for c in first]
        has_header = USER in header and any(c in _AMAZON_CSV_HEADER for c in header[1:])
        raw = pl.read_csv(
            io.StringIO(text),
            has_header=has_header,
            infer_schema=False,
            truncate_ragged_lines=False,
        )
    except pl.exceptions.PolarsError as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot read the file: {first_line}", file=str(path), expected=what) from e
    if has_header:
        rename = {c: _AMAZON_CSV_HEADER[c] for c in raw.columns if c in _AMAZON_CSV_HEADER}
        if "parent_asin" in rename and "asin" in rename:
            del rename["asin"]
        df = raw.rename(rename)
        missing = [c for c in (USER, ITEM, RATING, TS) if c not in df.columns]
        if missing:
            raise DataError(
                f"missing column(s) {', '.join(missing)} (header: {','.join(raw.columns)})",
                file=str(path),
                expected="user_id, parent_asin, rating, timestamp",
            )
        return _amazon_numbers(df.select(USER, ITEM, TS, RATING), path)
    if raw.width != 4:
        raise DataError(
            f"{raw.width} columns, first row {','.join(first)}",
            file=str(path),
            expected="4 columns without a header: item,user,rating,timestamp (2018) or "
            "user,item,rating,timestamp (2014)",
        )
    a, b = raw.columns[:2]
    hits_a = raw[a].unique().is_in(list(meta_ids)).sum()
    hits_b = raw[b].unique().is_in(list(meta_ids)).sum()
    if hits_a == hits_b == 0:
        raise DataError(
            "neither of the first two columns holds item ids found in the metadata",
            file=str(path),
            expected="the CSV and the metadata file of the same Amazon category",
        )
    item, user = (a, b) if hits_a >= hits_b else (b, a)
    df = raw.select(
        pl.col(user).alias(USER),
        pl.col(item).alias(ITEM),
        pl.col(raw.columns[3]).alias(TS),
        pl.col(raw.columns[2]).alias(RATING),
    )
    return _amazon_numbers(df, path)


def order_ties(inter: pl.DataFrame) -> pl.DataFrame:
    """The rows by user, then time, and a user's rows of the same time in an order that
    says nothing about the items: a fixed pseudo-random key of (user, item).

    The evaluation and the fit hold out each user's last events in time, and take the
    rows' order where times are equal. The Amazon files give days (2014, 2018) and group
    their rows by item, so row order would make the item with the later id (on Amazon,
    the newer product) the "last" of a day: 60% of the users of Magazine Subscriptions
    had their held-out event on the day of their last training event, and 90% of those
    had the later item id. The key depends only on the ids (their ranks among the
    file's ids), so the order is the same whatever the order of the rows."""
    u = inter[USER].rank("dense").to_numpy().astype(np.uint64)
    i = inter[ITEM].rank("dense").to_numpy().astype(np.uint64)
    key = _splitmix64((u << np.uint64(32)) | i)
    return inter.with_columns(pl.Series("_key", key)).sort([USER, TS, "_key"]).drop("_key")


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (uint64 in, uint64 out, wrapping): a cheap,
    fixed mixing of a number's bits."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def ingest_amazon(
    reviews_src: PathLike,
    meta_src: PathLike,
    out_dir: PathLike,
    min_user_events: int = 1,
    pseudonymize: Pseudonymizer | None = None,
) -> tuple[Path, Path]:
    """Convert an Amazon review category (McAuley lab: 2014, 2018 or 2023 release).

    REVIEWS: the reviews (JSON lines, e.g. Magazine_Subscriptions_5.json.gz or
    All_Beauty.jsonl.gz) or a ratings-only CSV (e.g. Magazine_Subscriptions.csv); META: the
    category's metadata (meta_*.json[.gz] / meta_*.jsonl[.gz]). Gzip is detected from the
    content. Every review is an interaction with its rating. Items are the reviewed items,
    with title, brand (2023: store), category, description and features as clean text
    (HTML dropped, lists joined); reviewed items missing from META keep empty text.
    Repeated (user, item, time) rows are dropped; users with fewer than `min_user_events`
    interactions are left out. A user's reviews of the same day are written in an order
    that does not follow the item ids (`order_ties`).
    """
    reviews, meta_path = Path(reviews_src), Path(meta_src)
    meta = _amazon_meta(meta_path)
    if reviews.name.lower().endswith((".csv", ".csv.gz")):
        inter = _amazon_ratings_csv(reviews, set(meta[ITEM].to_list()))
    else:
        inter = _amazon_reviews_json(reviews)
    n = inter.height
    inter = inter.unique([USER, ITEM, TS], keep="first", maintain_order=True)
    if inter.height < n:
        log.info("%s: dropped %d repeated (user, item, time) review(s)", reviews, n - inter.height)
    if min_user_events > 1:
        inter = inter.filter(pl.len().over(USER) >= min_user_events)
        if inter.height == 0:
            raise DataError(
                f"no user has {min_user_events} or more reviews",
                file=str(reviews),
                expected="a lower --min-user-events",
            )
    inter = order_ties(inter)
    reviewed = inter.select(pl.col(ITEM).unique(maintain_order=True))
    items = reviewed.join(meta, on=ITEM, how="left", maintain_order="left")
    no_meta = items.height - reviewed.join(meta, on=ITEM, how="semi").height
    if no_meta:
        log.warning(
            "%s: %d of %d reviewed item(s) are not in %s; they keep empty text",
            reviews,
            no_meta,
            items.height,
            meta_path,
        )
    items = validate_items(items, source=str(meta_path))
    inter = validate_interactions(inter, source=str(reviews), items=items)
    return _write(inter, items, out_dir, "amazon", pseudonymize)


# ---------------------------------------------------------------------------- generic


def ingest_csv(
    interactions_src: PathLike,
    out_dir: PathLike,
    items_src: PathLike | None = None,
    mapping: dict[str, str] | None = None,
    sep: str | None = None,
    drop_unknown_items: bool = False,
    pseudonymize: Pseudonymizer | None = None,
) -> tuple[Path, Path]:
    """Convert any CSV/TSV/Parquet event log (and optional item table) to canonical tables.

    `mapping` maps canonical names to source column names, e.g. {"user_id": "uid"}; it
    applies to both files wherever the source column exists. Without an items file the
    catalogue is the distinct item ids, with no text.
    """
    mapping = dict(mapping or {})
    inter_src = Path(interactions_src)

    def load(path: Path, ids: list[str]) -> pl.DataFrame:
        df = read_table(path, [mapping.get(c, c) for c in ids], sep=sep)
        renames = {s: c for c, s in mapping.items() if s in df.columns and s != c}
        clash = [c for c in renames.values() if c in df.columns and c not in renames]
        if clash:
            df = df.drop(clash)  # the mapped source column wins over a same-named one
        return df.rename(renames)

    raw = load(inter_src, [USER, ITEM])
    for canonical in (USER, ITEM, TS):
        if canonical in mapping and canonical not in raw.columns:
            raise DataError(
                f"the mapping names column '{mapping[canonical]}' for {canonical}, but the "
                f"file has no such column (columns found: {', '.join(raw.columns)})",
                file=str(inter_src),
                column=mapping[canonical],
            )
    if items_src is not None:
        items = validate_items(load(Path(items_src), [ITEM]), source=str(items_src))
    else:
        if ITEM not in raw.columns:
            raise DataError(
                f"required column is missing (columns found: {', '.join(raw.columns)})",
                file=str(inter_src),
                column=ITEM,
                expected="an item_id column, or --map item_id=COLUMN",
            )
        items = validate_items(
            raw.select(pl.col(ITEM).drop_nulls().unique(maintain_order=True)),
            source=str(inter_src),
        )
    inter = validate_interactions(
        raw, source=str(inter_src), items=items, drop_unknown_items=drop_unknown_items
    )
    return _write(inter, items, out_dir, "csv", pseudonymize)
