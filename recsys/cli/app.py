"""The `recsys` Typer application; `recsys.cli.commands` registers the commands on it."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="recsys",
    help="Two-stage recommender: candidates, point-in-time features, LightGBM LambdaRank.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
