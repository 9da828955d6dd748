"""The `recsys` command: a thin layer over the Python API."""

from __future__ import annotations

import logging
import os
import sys

from recsys.resources import limit_threads_to_quota

limit_threads_to_quota()  # before the numeric libraries load and size their thread pools

from recsys.cli.app import app  # noqa: E402

__all__ = ["app", "main"]


def main() -> None:
    """Entry point of the `recsys` console script: clear messages and exit 2 on bad input."""
    logging.basicConfig(
        level=os.environ.get("RECSYS_LOG", "INFO"),
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    from recsys.bundle import BundleError
    from recsys.cli import commands  # noqa: F401  (registers the commands)
    from recsys.pseudonym import PseudonymKeyError
    from recsys.schema import DataError

    try:
        app()
    except (DataError, BundleError, PseudonymKeyError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
