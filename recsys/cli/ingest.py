"""`recsys ingest`: converters from public data set layouts to the canonical Parquet tables.

Registered by the main app with `app.add_typer(ingest_app, name="ingest")`. Bad input
raises DataError, which the `recsys` entry point prints and turns into exit status 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.parquet as pq
import typer

if TYPE_CHECKING:
    from recsys.pseudonym import Pseudonymizer

ingest_app = typer.Typer(
    help="Convert MovieLens, MIND, Amazon reviews or any CSV/Parquet event log to the "
    "canonical tables "
    "(OUT_DIR/interactions.parquet and OUT_DIR/items.parquet), validated like `fit` does.",
    no_args_is_help=True,
)

_SRC = "Source folder."
_OUT = "Output folder; interactions.parquet and items.parquet are written there (created)."


_PSEUDONYMIZE = (
    "Write user ids as HMAC-SHA256 pseudonyms (32 hex digits) under the secret key in "
    "RECSYS_PSEUDONYM_KEY; the key is never written, only its fingerprint in "
    "OUT_DIR/interactions.pseudonym.json, which `recsys fit` copies into the bundle."
)


def _pseudonymizer(on: bool) -> Pseudonymizer | None:
    """The key checked before anything is read or written: exit status 2 without it."""
    if not on:
        return None
    from recsys.pseudonym import Pseudonymizer, PseudonymKeyError

    try:
        return Pseudonymizer.from_env()
    except PseudonymKeyError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None


def _report(paths: tuple[Path, Path]) -> None:
    """Print where the tables went and how big they are (row counts from Parquet metadata)."""
    from recsys.pseudonym import read_sidecar, sidecar_path

    for label, path in zip(("interactions", "items"), paths, strict=True):
        rows = pq.read_metadata(path).num_rows
        typer.echo(f"{label}: {path} ({rows} rows)")
    record = read_sidecar(paths[0])
    if record is not None:
        typer.echo(
            f"user ids pseudonymized (key fingerprint {record['key_fingerprint']}): "
            f"{sidecar_path(paths[0])}"
        )


@ingest_app.command(
    "movielens",
    help="MovieLens: every rating is an interaction; items get title, genres, tags and year. "
    "Example: recsys ingest movielens ../shared/datasets/ml-latest-small data/ml",
)
def movielens(
    src: Path = typer.Argument(
        ...,
        help=_SRC + " ml-latest-small / ml-25m layout "
        "(ratings.csv, movies.csv, optional tags.csv) or ml-100k "
        "(u.data, u.item); detected automatically.",
    ),
    out: Path = typer.Argument(..., help=_OUT),
    pseudonymize: bool = typer.Option(False, "--pseudonymize", help=_PSEUDONYMIZE),
) -> None:
    """Convert a MovieLens folder; the layout is detected from its files."""
    from recsys.ingest import ingest_movielens

    _report(ingest_movielens(src, out, _pseudonymizer(pseudonymize)))


@ingest_app.command(
    "mind",
    help="MIND news: one row per shown article (label 1 clicked / 0 skipped) plus the "
    "history clicks, which have no time in MIND and are placed just before the user's "
    "first impression, one second apart. Articles missing from news.tsv are dropped with "
    "a warning.",
)
def mind(
    src: Path = typer.Argument(
        ..., help=_SRC + " A MIND split holding behaviors.tsv and news.tsv."
    ),
    out: Path = typer.Argument(..., help=_OUT),
    pseudonymize: bool = typer.Option(False, "--pseudonymize", help=_PSEUDONYMIZE),
) -> None:
    """Convert a MIND split (behaviors.tsv + news.tsv)."""
    from recsys.ingest import ingest_mind

    _report(ingest_mind(src, out, _pseudonymizer(pseudonymize)))


@ingest_app.command(
    "amazon",
    help="Amazon reviews (McAuley lab, 2014/2018/2023 releases): every review is an "
    "interaction with its rating; items get title, brand, category, description and "
    "features as clean text. Example: recsys ingest amazon Magazine_Subscriptions.csv "
    "meta_Magazine_Subscriptions.json.gz data/magazine",
)
def amazon(
    reviews: Path = typer.Argument(
        ...,
        help="Reviews as JSON lines (e.g. *_5.json.gz, *.jsonl.gz) or a ratings-only CSV "
        "(item,user,rating,timestamp as in 2018; user,item,... as in 2014; or the 2023 "
        "benchmark CSV with a header). Gzip or plain.",
    ),
    meta: Path = typer.Argument(
        ..., help="The category's metadata: meta_*.json[.gz] or meta_*.jsonl[.gz]."
    ),
    out: Path = typer.Argument(..., help=_OUT),
    min_user_events: int = typer.Option(
        1,
        "--min-user-events",
        min=1,
        help="Leave out users with fewer interactions than this (1 keeps everyone).",
    ),
    pseudonymize: bool = typer.Option(False, "--pseudonymize", help=_PSEUDONYMIZE),
) -> None:
    """Convert an Amazon review category and its metadata."""
    from recsys.ingest import ingest_amazon

    key = _pseudonymizer(pseudonymize)
    _report(ingest_amazon(reviews, meta, out, min_user_events=min_user_events, pseudonymize=key))


def _parse_mapping(pairs: list[str]) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for pair in pairs:
        canonical, sep, source = pair.partition("=")
        if not sep or not canonical.strip() or not source.strip():
            raise typer.BadParameter(
                f"'{pair}' is not canonical=source (e.g. user_id=uid)", param_hint="--map"
            )
        mapping[canonical.strip()] = source.strip()
    return mapping


@ingest_app.command(
    "csv",
    help="Generic event log: needs user_id, item_id and timestamp (after --map). Optional "
    "columns event, rating, weight, impression_id and label are kept; other columns are "
    "dropped. Timestamps may be datetimes, epoch seconds/ms or ISO-8601 strings.",
)
def csv(
    src: Path = typer.Argument(
        ..., help="Event log: .csv/.tsv/.txt (delimiter sniffed) or .parquet."
    ),
    out: Path = typer.Argument(..., help=_OUT),
    items: Path | None = typer.Option(
        None,
        "--items",
        help="Item table (CSV or Parquet) with item_id and text columns. "
        "Without it the catalogue is the distinct item ids, with no text.",
    ),
    map_: list[str] = typer.Option(
        [],
        "--map",
        help="canonical=source column, repeatable: --map user_id=uid "
        "--map item_id=sku --map timestamp=ts. Applies to both files.",
    ),
    sep: str | None = typer.Option(
        None, "--sep", help="CSV delimiter; sniffed from the header line when not given."
    ),
    drop_unknown_items: bool = typer.Option(
        False,
        "--drop-unknown-items",
        help="Drop events whose item is not in --items (with a warning) instead of failing.",
    ),
    pseudonymize: bool = typer.Option(False, "--pseudonymize", help=_PSEUDONYMIZE),
) -> None:
    """Convert a generic CSV/TSV/Parquet event log with a column mapping."""
    from recsys.ingest import ingest_csv

    key = _pseudonymizer(pseudonymize)
    if sep is not None and sep in ("\\t", "tab"):
        sep = "\t"
    _report(
        ingest_csv(
            src,
            out,
            items_src=items,
            mapping=_parse_mapping(map_),
            sep=sep,
            drop_unknown_items=drop_unknown_items,
            pseudonymize=key,
        )
    )
