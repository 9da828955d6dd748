"""`recsys serve`: the HTTP endpoint over a bundle (uvicorn, one or more workers)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import typer


def serve(
    bundle: Path = typer.Option(..., "--bundle", help="Bundle directory written by `recsys fit`."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port", min=0, max=65535),
    workers: int = typer.Option(
        int(os.environ.get("RECSYS_WORKERS", "1")),
        "--workers",
        min=1,
        help="Server processes (one per core); they share fresh events and reloads.",
    ),
    state_dir: Path | None = typer.Option(
        None,
        "--state-dir",
        help="Where workers share fresh events and reloads (default: a temporary directory "
        "when --workers > 1).",
    ),
    cache: bool = typer.Option(
        True, "--cache/--no-cache", help="Keep each user's ranked list until their next event."
    ),
    prefill: bool = typer.Option(
        False, "--prefill", help="Rank every bundle user into the cache before ready."
    ),
    log_level: str = typer.Option("warning", "--log-level"),
) -> None:
    """Serve top-k lists over HTTP (GET/POST /v1/recommendations, POST /v1/events, ...).

    Settings not given here come from RECSYS_* environment variables (see
    serving/settings.py); RECSYS_ADMIN_TOKEN enables POST /admin/reload. A bundle fitted
    on pseudonymized user ids needs the key in RECSYS_PSEUDONYM_KEY; requests send raw ids.
    """
    import uvicorn

    from recsys.bundle import read_manifest
    from recsys.pseudonym import for_manifest

    # clear errors now rather than a worker that never gets ready: a damaged bundle, or
    # one fitted on pseudonymized ids without the key they were hashed with
    for_manifest(read_manifest(bundle), str(bundle))
    os.environ["RECSYS_BUNDLE"] = str(bundle.resolve())
    os.environ["RECSYS_CACHE"] = "true" if cache else "false"
    os.environ["RECSYS_PREFILL"] = "true" if prefill else "false"
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")  # workers are the parallelism
    if workers > 1:
        run_dir = Path(tempfile.mkdtemp(prefix="recsys-serve-"))
        state_dir = state_dir or run_dir / "state"
        metrics_dir = run_dir / "metrics"
        metrics_dir.mkdir()
        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(metrics_dir))
    if state_dir is not None:
        os.environ["RECSYS_STATE_DIR"] = str(state_dir)
    uvicorn.run(
        "serving.app:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        access_log=False,
    )
