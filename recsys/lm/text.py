"""Item text from the items table: a template, or `column: value` pairs by default."""

from __future__ import annotations

import re

import polars as pl

from recsys.schema import ITEM

_FIELD = re.compile(r"\{([^{}]+)\}")


def text_columns(items: pl.DataFrame) -> list[str]:
    """Every string column but the id, in table order."""
    return [c for c, t in items.schema.items() if c != ITEM and t == pl.String]


def item_texts(items: pl.DataFrame, template: str | None = None) -> list[str]:
    """One text per row. Missing values drop out; items without text give ''.

    `template` names columns in braces ('{title}. {genres}'); None joins every string
    column but the id as 'column: value' pairs, one per line. Separators '|' become
    ', ' so that lists read as text.
    """
    if template is None:
        cols = text_columns(items)
        if not cols:
            return [""] * len(items)
        parts = [
            pl.when(pl.col(c).is_not_null() & (pl.col(c).str.len_chars() > 0))
            .then(pl.lit(f"{c}: ") + pl.col(c).str.replace_all(r"\|", ", "))
            .otherwise(None)
            for c in cols
        ]
        expr = pl.concat_str(parts, separator="\n", ignore_nulls=True)
    else:
        names = _FIELD.findall(template)
        missing = [n for n in names if n not in items.columns]
        if missing:
            raise ValueError(f"text template names unknown item column(s) {missing}")
        pieces: list[pl.Expr] = []
        pos = 0
        for m in _FIELD.finditer(template):
            if m.start() > pos:
                pieces.append(pl.lit(template[pos : m.start()]))
            pieces.append(
                pl.col(m.group(1)).cast(pl.String).str.replace_all(r"\|", ", ").fill_null("")
            )
            pos = m.end()
        if pos < len(template):
            pieces.append(pl.lit(template[pos:]))
        expr = pl.concat_str(pieces) if pieces else pl.lit(template)
    return items.select(expr.fill_null("").str.strip_chars().alias("t"))["t"].to_list()
