"""Canonical tables and their validation at the boundary (ingest, fit, load).

In memory, after validation, the canonical tables are polars DataFrames:

interactions
    user_id     String or Int64, kept as given
    item_id     same dtype as items.item_id
    timestamp   Datetime("us", "UTC")  (naive input is taken as UTC, integer input as epoch seconds)
    event       String     (optional)
    rating      Float64    (optional)
    weight      Float64    (optional)
    impression_id String   (optional)
    label       Int8 0/1   (optional; 0 = shown but not clicked)

items
    item_id     String or Int64, unique, not null
    <text columns>  String (any number; nulls allowed)
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import polars as pl

USER = "user_id"
ITEM = "item_id"
TS = "timestamp"
EVENT = "event"
RATING = "rating"
WEIGHT = "weight"
IMPRESSION = "impression_id"
LABEL = "label"

INTERACTION_REQUIRED = (USER, ITEM, TS)
INTERACTION_OPTIONAL = (EVENT, RATING, WEIGHT, IMPRESSION, LABEL)


class DataError(ValueError):
    """Bad input data: says which file, column and rows, and what was expected.

    The CLI prints the message and exits with status 2.
    """

    def __init__(
        self,
        problem: str,
        *,
        file: str | None = None,
        column: str | None = None,
        rows: list[int] | None = None,
        expected: str | None = None,
    ) -> None:
        self.problem = problem
        self.file = file
        self.column = column
        self.rows = list(rows) if rows is not None else None
        self.expected = expected
        parts = []
        if file:
            parts.append(f"{file}")
        if column:
            parts.append(f"column '{column}'")
        if self.rows:
            shown = ", ".join(str(r) for r in self.rows[:5])
            more = f" (and {len(self.rows) - 5} more)" if len(self.rows) > 5 else ""
            parts.append(f"row(s) {shown}{more}")
        where = ": ".join(parts)
        msg = f"{where}: {problem}" if where else problem
        if expected:
            msg += f" (expected {expected})"
        super().__init__(msg)


log = logging.getLogger("recsys")

# Row numbers in messages are 0-based data rows (the header of a CSV is not counted).
_MAX_ROWS_IN_ERROR = 10_000
_SAMPLE = 5

# Integer epochs: the unit is read from the median absolute value of the column. Seconds
# below 1e11 reach the year 5138, so anything larger cannot be seconds; the same reasoning
# applies one factor of 1000 further for each finer unit.
_EPOCH_LIMITS = ((1e11, "s"), (1e14, "ms"), (1e17, "us"))

# Tried in order after polars' own format inference, each value keeping the first that
# parses. Day-first forms come after month-first ones (MIND writes 11/15/2019 8:55:22 AM).
_TS_FORMATS = (
    "%Y-%m-%dT%H:%M:%S%.f%z",
    "%Y-%m-%d %H:%M:%S%.f%z",
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%d %H:%M:%S%.f",
    "%Y-%m-%dT%H:%M",
    "%Y-%m-%d %H:%M",
    "%Y-%m-%d",
    "%Y/%m/%d %H:%M:%S",
    "%Y/%m/%d",
    "%m/%d/%Y %I:%M:%S %p",
    "%m/%d/%Y %H:%M:%S",
    "%m/%d/%Y %H:%M",
    "%m/%d/%Y",
    "%d.%m.%Y %H:%M:%S",
    "%d.%m.%Y",
    "%Y%m%dT%H%M%S",
)

_ID_HELP = "string or integer ids"
_TS_HELP = (
    "a datetime (any unit, tz-aware or naive = UTC), a date, epoch seconds "
    "(integer or float; integer ms/us/ns detected by magnitude) or ISO-8601 strings"
)


def _rows(mask: pl.Series) -> list[int]:
    """0-based row numbers where mask is true (at most _MAX_ROWS_IN_ERROR, to stay cheap)."""
    idx = mask.fill_null(False).arg_true()
    return idx.head(_MAX_ROWS_IN_ERROR).to_list()


def _sample(values: pl.Series, n: int = _SAMPLE) -> str:
    """A short, readable list of distinct example values for an error message."""
    vals = values.drop_nulls().unique(maintain_order=True).head(n).to_list()
    return ", ".join(repr(v) for v in vals)


def _missing_columns(df: pl.DataFrame, required: tuple[str, ...], source: str) -> None:
    for col in required:
        if col not in df.columns:
            found = ", ".join(df.columns) or "none"
            raise DataError(
                f"required column is missing (columns found: {found})",
                file=source,
                column=col,
                expected=f"columns {', '.join(required)}",
            )


def _check_no_nulls(s: pl.Series, source: str, what: str = "value") -> None:
    n = s.null_count()
    if n:
        raise DataError(
            f"{n} null {what}(s)",
            file=source,
            column=s.name,
            rows=_rows(s.is_null()),
            expected="no nulls",
        )


def _id_column(s: pl.Series, source: str) -> pl.Series:
    """Ids stay as given: strings stay strings, any integer type becomes Int64."""
    dt = s.dtype
    if dt == pl.String:
        out = s
    elif isinstance(dt, (pl.Categorical, pl.Enum)):
        out = s.cast(pl.String)
    elif dt.is_integer():
        out = s.cast(pl.Int64, strict=False)
        overflow = out.is_null() & s.is_not_null()
        if overflow.any():
            raise DataError(
                "integer ids do not fit in Int64",
                file=source,
                column=s.name,
                rows=_rows(overflow),
                expected=_ID_HELP,
            )
    elif dt == pl.Null:
        out = s.cast(pl.String)
    else:
        raise DataError(f"unsupported id type {dt}", file=source, column=s.name, expected=_ID_HELP)
    _check_no_nulls(out, source, "id")
    return out


def _refuse_rows(bad: pl.Series, s: pl.Series, source: str, message: str, expected: str) -> None:
    """A DataError naming the file, the column and the rows where `bad` holds; `message`
    may name how many rows ({n}) and show a sample of their values ({sample})."""
    if bad.any():
        raise DataError(
            message.format(n=int(bad.sum()), sample=_sample(s.filter(bad))),
            file=source,
            column=s.name,
            rows=_rows(bad),
            expected=expected,
        )


def _to_utc(s: pl.Series) -> pl.Series:
    """Any Datetime series to Datetime("us", "UTC"); naive values are taken as UTC."""
    dt = s.dtype
    assert isinstance(dt, pl.Datetime)
    s = s.dt.convert_time_zone("UTC") if dt.time_zone else s.dt.replace_time_zone("UTC")
    return s.dt.cast_time_unit("us")


def _epoch_int(s: pl.Series) -> pl.Series:
    """Integer epochs; the unit (s, ms, us, ns) is detected from the median magnitude, so
    a few stray values cannot turn a whole column of seconds into nanoseconds. Values too
    large for that unit (see _EPOCH_LIMITS) become null: the caller reports their rows as
    out of range."""
    s64 = s.cast(pl.Int64, strict=False)
    mag = s64.cast(pl.Float64).abs()  # float: abs(-2**63) does not wrap around
    typical = mag.median()
    unit, limit = "ns", float("inf")
    if typical is not None:
        for lim, u in _EPOCH_LIMITS:
            if float(typical) < lim:  # type: ignore[arg-type]
                unit, limit = u, lim
                break
    s64 = pl.select(pl.when(mag < limit).then(s64)).to_series().alias(s.name)
    if unit == "s":
        us = s64 * 1_000_000
    elif unit == "ms":
        us = s64 * 1_000
    elif unit == "us":
        us = s64
    else:
        us = s64 // 1_000
    return us.cast(pl.Datetime("us")).dt.replace_time_zone("UTC")


def _parse_ts_strings(s: pl.Series) -> pl.Series:
    """Strings to UTC datetimes: polars' inference first, then the common formats above."""
    stripped = s.str.strip_chars()
    if stripped.drop_nulls().str.contains(r"^-?\d+$").all() and stripped.drop_nulls().len():
        return _epoch_int(stripped.cast(pl.Int64, strict=False))
    result = pl.Series(s.name, [None] * len(s), dtype=pl.Datetime("us", "UTC"))
    try:
        inferred = stripped.str.to_datetime(strict=False, time_unit="us")
        result = _to_utc(inferred)
    except pl.exceptions.PolarsError:
        pass
    for fmt in _TS_FORMATS:
        todo = result.is_null() & stripped.is_not_null()
        if not todo.any():
            break
        try:
            parsed = stripped.str.to_datetime(fmt, strict=False, time_unit="us")
        except pl.exceptions.PolarsError:
            continue
        result = result.fill_null(_to_utc(parsed))
    return result.alias(s.name)


def _timestamp_column(s: pl.Series, source: str) -> pl.Series:
    """Every accepted timestamp form to Datetime("us", "UTC"); see _TS_HELP."""
    dt = s.dtype
    _check_no_nulls(s, source, "timestamp")
    if isinstance(dt, pl.Datetime):
        out = _to_utc(s)
    elif dt == pl.Date:
        out = s.cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
    elif dt.is_integer():
        out = _epoch_int(s)
    elif dt.is_float():
        bad = s.is_nan() | s.is_infinite()
        _refuse_rows(bad, s, source, "NaN or infinite timestamps", _TS_HELP)
        us = (s * 1_000_000).round(0).cast(pl.Int64, strict=False)
        out = us.cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
    elif dt == pl.String or isinstance(dt, (pl.Categorical, pl.Enum)):
        s = s.cast(pl.String)
        out = _parse_ts_strings(s)
        bad = out.is_null() & s.is_not_null()
        _refuse_rows(
            bad, s, source, "{n} timestamp(s) could not be parsed, e.g. {sample}", _TS_HELP
        )
    else:
        raise DataError(
            f"unsupported timestamp type {dt}", file=source, column=s.name, expected=_TS_HELP
        )
    out = out.alias(s.name)
    bad = out.is_null() & s.is_not_null()
    _refuse_rows(bad, s, source, "{n} timestamp(s) out of range, e.g. {sample}", _TS_HELP)
    return out


def _float_column(s: pl.Series, source: str) -> pl.Series:
    """Ratings and weights as Float64; text that is not a number is an error, nulls are kept."""
    if not (s.dtype.is_numeric() or s.dtype in (pl.String, pl.Boolean, pl.Null)):
        raise DataError(
            f"unsupported type {s.dtype}", file=source, column=s.name, expected="numbers"
        )
    src = s.str.strip_chars() if s.dtype == pl.String else s
    out = src.cast(pl.Float64, strict=False)
    bad = out.is_null() & s.is_not_null()
    _refuse_rows(bad, s, source, "{n} non-numeric value(s), e.g. {sample}", "numbers")
    bad = out.is_nan() | out.is_infinite()
    _refuse_rows(bad, s, source, "{n} NaN or infinite value(s)", "finite numbers")
    return out


def _label_column(s: pl.Series, source: str) -> pl.Series:
    """Labels as Int8 in {0, 1}: 1 = clicked, 0 = shown but not clicked."""
    if s.dtype == pl.Boolean:
        out = s.cast(pl.Int8)
    elif s.dtype == pl.String:
        out = s.str.strip_chars().cast(pl.Float64, strict=False)
    elif s.dtype.is_numeric() or s.dtype == pl.Null:
        out = s.cast(pl.Float64, strict=False)
    else:
        raise DataError(f"unsupported type {s.dtype}", file=source, column=s.name, expected="0/1")
    bad = ~((out == 0) | (out == 1)).fill_null(False)
    _refuse_rows(bad, s, source, "{n} label(s) not 0/1, e.g. {sample}", "0 or 1")
    return out.cast(pl.Int8).alias(s.name)


def _text_column(s: pl.Series) -> pl.Series:
    """Item text as String: lists (e.g. genres) are joined with '|', empty lists become null."""
    dt = s.dtype
    if isinstance(dt, (pl.List, pl.Array)):
        lst = s.cast(pl.List(pl.String)) if isinstance(dt, pl.List) else s.arr.to_list()
        lst = lst.cast(pl.List(pl.String))
        joined = lst.list.drop_nulls().list.join("|")
        return joined.replace("", None).alias(s.name)
    if isinstance(dt, (pl.Categorical, pl.Enum)):
        return s.cast(pl.String)
    return s


def validate_items(df: pl.DataFrame, source: str = "items") -> pl.DataFrame:
    """Check and normalise an item catalogue; the ids are what interactions must refer to.

    item_id: String or integer (any integer type becomes Int64), unique, not null. Other
    columns: list columns are joined with '|' into String (text for the language model);
    strings and numbers are kept as they are. Items without any text are allowed.
    """
    _missing_columns(df, (ITEM,), source)
    ids = _id_column(df[ITEM], source)
    dup = ids.is_duplicated()
    if dup.any():
        frame = pl.DataFrame({ITEM: ids.filter(dup), "row": dup.arg_true()})
        groups = frame.group_by(ITEM, maintain_order=True).agg(pl.col("row"))
        shown = "; ".join(
            f"{v!r} at rows {', '.join(map(str, r[:5]))}"
            for v, r in groups.head(_SAMPLE).iter_rows()
        )
        more = f" and {groups.height - _SAMPLE} more" if groups.height > _SAMPLE else ""
        raise DataError(
            f"{groups.height} duplicated item id(s): {shown}{more}",
            file=source,
            column=ITEM,
            rows=_rows(dup),
            expected="unique item ids",
        )
    cols = [ids] + [_text_column(df[c]) for c in df.columns if c != ITEM]
    return pl.DataFrame(cols)


def _reconcile_item_dtype(ids: pl.Series, items: pl.DataFrame, source: str) -> pl.Series:
    """Cast interaction item ids to the catalogue's id type when every value converts."""
    target = items[ITEM].dtype
    if ids.dtype == target:
        return ids
    if target == pl.String:
        return ids.cast(pl.String)
    out = ids.str.strip_chars().cast(pl.Int64, strict=False)
    # "007" would become 7 and silently point at another item: require the canonical form.
    bad = out.is_null() | (out.cast(pl.String) != ids)
    if bad.any():
        raise DataError(
            f"item ids are strings but the items table has integer ids; "
            f"{int(bad.sum())} value(s) are not integers, e.g. {_sample(ids.filter(bad))}",
            file=source,
            column=ITEM,
            rows=_rows(bad),
            expected="the items table's id type",
        )
    return out


def validate_interactions(
    df: pl.DataFrame,
    source: str = "interactions",
    items: pl.DataFrame | None = None,
    drop_unknown_items: bool = False,
) -> pl.DataFrame:
    """Check and normalise an event log to the canonical interactions table.

    Output: user_id, item_id (String or Int64), timestamp Datetime("us", "UTC"), plus any
    of event (String), rating/weight (Float64), impression_id (String), label (Int8 0/1).
    Timestamps: datetimes of any unit (tz-aware converted, naive taken as UTC), dates,
    float epoch seconds, ISO-8601/common strings, or integer epochs whose unit comes from
    the median magnitude: below 1e11 seconds, below 1e14 ms, below 1e17 us, else ns
    (values beyond their unit's limit are refused as out of range).
    Other columns are dropped. With `items`, item ids take the catalogue's id type and ids
    missing from it are an error, or are dropped (with a warning) if drop_unknown_items.
    Row numbers in errors are 0-based data rows.
    """
    _missing_columns(df, INTERACTION_REQUIRED, source)
    if df.height == 0:
        raise DataError("the interactions table is empty", file=source, expected="at least one row")
    cols: dict[str, pl.Series] = {
        USER: _id_column(df[USER], source),
        ITEM: _id_column(df[ITEM], source),
        TS: _timestamp_column(df[TS], source),
    }
    for name in INTERACTION_OPTIONAL:
        if name not in df.columns:
            continue
        s = df[name]
        if name in (EVENT, IMPRESSION):
            cols[name] = s.cast(pl.String)
        elif name in (RATING, WEIGHT):
            cols[name] = _float_column(s, source)
        else:
            cols[name] = _label_column(s, source)
    out = pl.DataFrame(list(cols.values()))
    if items is None:
        return out
    if ITEM not in items.columns:
        raise DataError("the items table has no item_id column", column=ITEM)
    out = out.with_columns(_reconcile_item_dtype(out[ITEM], items, source))
    unknown = ~out[ITEM].is_in(items[ITEM].implode())
    n_unknown = int(unknown.sum())
    if n_unknown:
        ids = out[ITEM].filter(unknown)
        n_ids = ids.n_unique()
        if not drop_unknown_items:
            raise DataError(
                f"{n_unknown} row(s) name {n_ids} item id(s) missing from the items table, "
                f"e.g. {_sample(ids)}; pass --drop-unknown-items (drop_unknown_items=True) "
                "to drop these rows",
                file=source,
                column=ITEM,
                rows=_rows(unknown),
                expected="every item_id present in the items table",
            )
        log.warning(
            "%s: dropped %d interaction(s) naming %d item id(s) missing from the items table",
            source,
            n_unknown,
            n_ids,
        )
        out = out.filter(~unknown)
        if out.height == 0:
            raise DataError(
                "no interactions left after dropping unknown items",
                file=source,
                column=ITEM,
                expected="item ids that exist in the items table",
            )
    return out


_CANONICAL_INT = r"^-?(0|[1-9]\d*)$"


def _ids_from_text(df: pl.DataFrame, cols: list[str]) -> pl.DataFrame:
    """CSV ids are read as text; they become Int64 only when every value is a plain integer.

    That keeps "00123" and "A7" exactly as written while numeric ids stay numbers.
    """
    for c in cols:
        if c in df.columns and df[c].dtype == pl.String:
            s = df[c].drop_nulls()
            if s.len() and s.str.contains(_CANONICAL_INT).all():
                as_int = df[c].cast(pl.Int64, strict=False)
                if as_int.null_count() == df[c].null_count():
                    df = df.with_columns(as_int)
    return df


def sniff_separator(path: str | os.PathLike[str]) -> str:
    """The delimiter of a text table, from its header line: comma, tab, semicolon or pipe."""
    with open(path, "rb") as f:
        head = f.readline().decode("utf-8", errors="replace")
    counts = {sep: head.count(sep) for sep in (",", "\t", ";", "|")}
    best = max(counts, key=lambda k: counts[k])
    return best if counts[best] else ","


_CSV_SUFFIXES = (".csv", ".tsv", ".txt")


def _duplicate_csv_columns(p: Path, sep: str) -> None:
    """polars renames a repeated header (a, a_duplicated_0): refuse it instead, since which
    of the two columns is meant cannot be known."""
    head = pl.read_csv(p, separator=sep, has_header=False, n_rows=1, infer_schema=False)
    names = list(head.row(0)) if head.height else []
    dups = sorted({n for n in names if n is not None and names.count(n) > 1})
    if dups:
        raise DataError(
            f"the header names {', '.join(repr(n) for n in dups)} more than once",
            file=str(p),
            column=dups[0],
            expected="unique column names",
        )


def read_table(
    path: str | os.PathLike[str],
    id_columns: list[str] | None = None,
    sep: str | None = None,
) -> pl.DataFrame:
    """Read Parquet, or CSV/TSV by extension, turning every read failure into a DataError."""
    p = Path(path)
    if not p.exists():
        raise DataError("file not found", file=str(p), expected="an existing Parquet or CSV file")
    if p.is_dir():
        raise DataError("is a directory", file=str(p), expected="a Parquet or CSV file")
    suffix = p.suffix.lower()
    try:
        if suffix in _CSV_SUFFIXES:
            if sep is None:
                sep = "\t" if suffix == ".tsv" else sniff_separator(p)
            _duplicate_csv_columns(p, sep)
            overrides = {c: pl.String for c in (id_columns or [])}
            df = pl.read_csv(
                p, separator=sep, schema_overrides=overrides, infer_schema_length=100_000
            )
            df = _ids_from_text(df, list(overrides))
        else:
            df = pl.read_parquet(p)
    except DataError:
        raise
    except Exception as e:
        kind = "CSV" if suffix in _CSV_SUFFIXES else "Parquet"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"cannot read the file: {first}", file=str(p), expected=f"a {kind} file"
        ) from e
    return df


def check_id_file(path: str | os.PathLike[str], column: str = USER) -> None:
    """A file of ids (the users of `recsys recommend`), checked from its header or Parquet
    schema only: readable, unique column names, and `column` of string or integer type."""
    p = Path(path)
    if not p.is_file():
        raise DataError("file not found", file=str(p), expected="a Parquet or CSV file")
    csv = p.suffix.lower() == ".csv"  # as recsys.batch.read_users reads it
    try:
        if csv:
            _duplicate_csv_columns(p, ",")
            schema = pl.scan_csv(p).collect_schema()
        else:
            schema = pl.scan_parquet(p).collect_schema()
    except DataError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"cannot read the file: {first}",
            file=str(p),
            expected=f"a {'CSV' if csv else 'Parquet'} file",
        ) from e
    if column not in schema:
        raise DataError(
            f"no '{column}' column (columns found: {', '.join(schema) or 'none'})",
            file=str(p),
            column=column,
        )
    dt = schema[column]
    text = dt == pl.String or isinstance(dt, (pl.Categorical, pl.Enum))
    if not (text or dt == pl.Null or dt.is_integer()):
        raise DataError(f"unsupported id type {dt}", file=str(p), column=column, expected=_ID_HELP)


def read_items(path: str | os.PathLike[str]) -> pl.DataFrame:
    """Read and validate an item catalogue (Parquet, or CSV by extension)."""
    return validate_items(read_table(path, [ITEM]), source=str(path))


def read_interactions(
    path: str | os.PathLike[str],
    items: pl.DataFrame | None = None,
    drop_unknown_items: bool = False,
) -> pl.DataFrame:
    """Read and validate an event log (Parquet, or CSV by extension)."""
    df = read_table(path, [USER, ITEM])
    return validate_interactions(
        df, source=str(path), items=items, drop_unknown_items=drop_unknown_items
    )


def current_umask() -> int:
    """The process's umask. Linux shows it in /proc/self/status, which reads it without
    changing it; elsewhere os.umask sets a value and puts the old one back at once (for a
    moment, a file another thread creates gets 0o077 rather than the umask)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def chmod_as_created(path: str | os.PathLike[str], directory: bool = False) -> None:
    """Give a file from tempfile.mkstemp (always 0600) or a directory from mkdtemp
    (always 0700) the mode open() or mkdir() would have given it: 0666 (0777) less the
    umask. Called before the rename that puts it in place, so what a user writes gets
    the permissions their umask asks for, as every other file does."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path in the directory of `path` (created) to write to. When the block
    ends without error, the file gets the umask's permissions (`chmod_as_created`) and
    replaces `path` in one rename; on error it is removed and `path` is left as it was."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        chmod_as_created(tmp)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_parquet_atomic(df: pl.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write Parquet via a temp file in the same directory and os.replace.

    Readers never see a half-written file, and a crash leaves the old file intact. The
    file gets the permissions of the umask, as a plain write would.
    """
    with atomic_path(path) as tmp:
        df.write_parquet(tmp)
    return Path(path)
