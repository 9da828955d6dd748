"""`recsys serve`: the HTTP endpoint over a bundle (uvicorn, one or more workers)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

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
        help="Where workers share fresh events and reloads (default with --workers > 1: a "
        "folder of this run in /dev/shm, memory, or in TMPDIR when set; removed at exit).",
    ),
    cache: bool = typer.Option(
        True,
        "--cache/--no-cache",
        help="Keep each user's ranked list until their next event or --list-ttl.",
    ),
    prefill: bool = typer.Option(
        False, "--prefill", help="Rank every bundle user into the cache before ready."
    ),
    lists: Path | None = typer.Option(
        None,
        "--lists",
        help="A `recsys recommend` output (user_id, item_id, rank, score) from this bundle: "
        "its lists are served from the start, each for requests of up to its k, until its "
        "time-to-live ends or the user posts an event.",
    ),
    list_ttl: float = typer.Option(
        float(os.environ.get("RECSYS_LIST_TTL_S", "3600")),
        "--list-ttl",
        min=1.0,
        help="Seconds a cached list may be served; lists read in their last quarter are "
        "recomputed in the background. A user's events request ranks their list before "
        "it is answered (RECSYS_REFRESH_INLINE_USERS users of a request, default 8) or "
        "hands it to the refresher process (--refresher).",
    ),
    redis_url: str | None = typer.Option(
        os.environ.get("RECSYS_REDIS_URL"),
        "--redis-url",
        show_default=False,
        help="Redis shared by a fleet of servers (fresh events, ranked lists, reloads), "
        "e.g. redis://host:6379/0; replaces the state folder. Default: RECSYS_REDIS_URL.",
    ),
    reuse_port: bool = typer.Option(
        os.environ.get("RECSYS_REUSE_PORT", "true").lower() not in ("0", "false", "no"),
        "--reuse-port/--shared-socket",
        help="With --workers > 1 on Linux: a listening socket per worker (SO_REUSEPORT), so "
        "the kernel spreads connections evenly; --shared-socket: one socket, which the "
        "first worker to wake drains (uneven). Set net.ipv4.tcp_migrate_req=1 so that "
        "connections queued on a worker that dies go to the others.",
    ),
    refresher: bool = typer.Option(
        True,
        "--refresher/--no-refresher",
        help="With --workers > 1: one more process that ranks the lists of users with new "
        "events while a core is idle, so an events request is answered without a rank (a "
        "read that comes first ranks, as without it; with every core busy the request "
        "ranks them); --no-refresher: the events request always ranks them.",
    ),
    worker_ports: int | None = typer.Option(
        None,
        "--worker-ports",
        min=1,
        max=65535,
        metavar="BASE",
        help="With --workers N > 1 and --reuse-port: each worker also listens on a port of "
        "its own, BASE to BASE+N-1, for a balancer in front that sends each worker one "
        "request at a time and queues the rest (serving/haproxy.cfg: `maxconn 1`), so "
        "that a request waits for the first free worker, not behind the ranks of the "
        "worker holding its connection (README: Serving behind a balancer).",
    ),
    log_level: str = typer.Option("warning", "--log-level"),
) -> None:
    """Serve top-k lists over HTTP (GET/POST /v1/recommendations, POST /v1/events, ...).

    Settings not given here come from RECSYS_* environment variables (see
    serving/settings.py); RECSYS_ADMIN_TOKEN enables POST /admin/reload. A bundle fitted
    on pseudonymized user ids needs the key in RECSYS_PSEUDONYM_KEY; requests send raw ids.
    """
    import uvicorn

    from recsys import resources
    from recsys.bundle import read_manifest
    from recsys.pseudonym import for_manifest
    from serving.settings import Settings
    from serving.workers import reuse_port_available, run_workers

    if worker_ports is not None:
        if workers < 2 or not reuse_port or not reuse_port_available(port):
            print(
                "error: --worker-ports needs --workers 2 or more and --reuse-port on Linux",
                file=sys.stderr,
            )
            raise SystemExit(2)
        if worker_ports <= port < worker_ports + workers or worker_ports + workers > 65536:
            print(
                f"error: --worker-ports {worker_ports}: the ports {worker_ports}-"
                f"{worker_ports + workers - 1} must lie in 1-65535 and not hold --port {port}",
                file=sys.stderr,
            )
            raise SystemExit(2)
    # clear errors now rather than a worker that never gets ready: a damaged bundle, or
    # one fitted on pseudonymized ids without the key they were hashed with
    for_manifest(read_manifest(bundle), str(bundle))
    if lists is not None:
        check_lists(lists, bundle)
        os.environ["RECSYS_LISTS"] = str(lists.resolve())
    os.environ["RECSYS_LIST_TTL_S"] = str(list_ttl)
    os.environ["RECSYS_BUNDLE"] = str(bundle.resolve())
    os.environ["RECSYS_WORKERS"] = str(workers)
    os.environ["RECSYS_CACHE"] = "true" if cache else "false"
    os.environ["RECSYS_PREFILL"] = "true" if prefill else "false"
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if not resources.user_set(var):
            os.environ[var] = "1"  # workers are the parallelism
    if redis_url:  # checked now: a clear error rather than workers that exit
        from recsys.redis_state import RedisState, RedisStateError

        try:
            RedisState(redis_url).close()
        except RedisStateError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        os.environ["RECSYS_REDIS_URL"] = redis_url
    run_dir = None
    if workers > 1:
        remove_stale_runs(runtime_dir() or tempfile.gettempdir())
        run_dir = Path(tempfile.mkdtemp(prefix=RUN_PREFIX, dir=runtime_dir()))
        (run_dir / MASTER_PID).write_text(f"{os.getpid()}\n")
        if not redis_url:
            state_dir = state_dir or run_dir / "state"
        metrics_dir = run_dir / "metrics"
        metrics_dir.mkdir()
        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(metrics_dir))
    if state_dir is not None:
        os.environ["RECSYS_STATE_DIR"] = str(state_dir)
    refresh_proc = None
    if run_dir is not None and cache and refresher and Settings().refresh:
        from serving.refresher import RefresherProcess, socket_address

        sock = socket_address(run_dir)
        if sock is None:
            print(f"note: no refresher: the path of {run_dir} is too long for a Unix socket")
        else:
            os.environ["RECSYS_REFRESH_SOCKET"] = sock
            refresh_proc = RefresherProcess(sock, log_level)
            refresh_proc.start()
    app = "serving.app:app_from_env"
    kw: dict[str, Any] = {
        "factory": True, "host": host, "port": port, "workers": workers,
        "log_level": log_level, "access_log": False,
    }  # fmt: skip
    try:
        if workers > 1 and reuse_port and reuse_port_available(port):
            # a socket per worker: the kernel spreads connections over the workers
            # (serving/workers.py says why uvicorn's one shared socket does not)
            try:
                run_workers(uvicorn.Config(app, **kw), worker_ports)
            except OSError as e:
                where = f"{host}:{port}"
                if worker_ports is not None:
                    where += f" and ports {worker_ports}-{worker_ports + workers - 1}"
                print(f"error: cannot listen on {where}: {e.strerror or e}", file=sys.stderr)
                raise SystemExit(2) from None
            return
        uvicorn.run(app, **kw)
    finally:
        if refresh_proc is not None:
            refresh_proc.stop()
        if run_dir is not None:  # this run's own files (not a --state-dir given)
            shutil.rmtree(run_dir, ignore_errors=True)


RUN_PREFIX = "recsys-serve-"
MASTER_PID = "master.pid"


def remove_stale_runs(parent: str | Path) -> list[Path]:
    """Remove the run folders in `parent` of servers whose master is gone (killed
    without its clean-up: SIGKILL, a crash of the machine's power aside); returns
    them. A folder whose master is alive, or not known, stays."""
    gone = []
    for d in Path(parent).glob(RUN_PREFIX + "*"):
        try:
            pid = int((d / MASTER_PID).read_text())
        except (OSError, ValueError):
            continue  # not ours to judge (older servers wrote no pid)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d)
        except OSError:
            pass  # alive, another user's
    return gone


def runtime_dir(min_free: int = 512 << 20) -> str | None:
    """Where a multi-worker server keeps the files its workers share for the run (the
    default state folder, Prometheus' per-process metrics): /dev/shm, a memory file
    system, where it is writable with `min_free` bytes free, unless TMPDIR names a
    place. Those files change with every request (metrics) and event (fresh events,
    lists); on a disk a write can wait for the file system's journal, and when the
    disk stalls the worker and all its connections wait with it (0.5 s p99 at 16
    connections in a load test here, against 20-28 ms). None: the temporary folder."""
    if os.environ.get("TMPDIR"):
        return None
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    if not os.access("/dev/shm", os.W_OK | os.X_OK) or st.f_bavail * st.f_frsize < min_free:
        return None
    return "/dev/shm"


def check_lists(path: Path, bundle: Path) -> None:
    """A seed file for the list cache: readable, `recommend`'s columns, written with
    this bundle, only its items. Raises DataError (exit 2) naming what is wrong."""
    import polars as pl

    from recsys.bundle import bundle_version, lists_problem, read_manifest
    from recsys.schema import DataError

    version = bundle_version(read_manifest(bundle, verify=False))
    items = pl.read_parquet(bundle / "items.parquet", columns=["item_id"])["item_id"]
    problem = lists_problem(path, version, items)
    if problem is not None:
        raise DataError(f"--lists {problem}")
