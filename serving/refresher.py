"""A server's refresher process: it ranks the lists of the users whose events the HTTP
workers take, so that an events request is answered without a rank.

With `recsys serve --workers N` (N > 1) the master starts one refresher beside the
workers. It loads the same bundle and shares the same state (the state folder, or
Redis), and listens on a Unix datagram socket in the run's folder. A worker that takes
events stores them, sends the users' ids to that socket and answers; the refresher
reads the events from the shared state and ranks each user's list into the shared
lists, where every worker finds it.

An event still makes the user's list stale at once: a read that comes before the
refresher's list is ready ranks the user itself, as a read that finds no list always
did, and the refresher then skips that user (a list ranked since the event exists).
When the refresher cannot take the users (still loading, restarting after a crash, its
socket's queue full) the worker ranks them inside the request, as a single-process
server does. So a list is never served stale; the refresher only moves the rank off
the request path, onto a core the workers leave idle.

Why a process and not a thread: a worker's requests and a background thread share one
interpreter lock, and a request waits up to a switch interval (5 ms) at each step while
the thread ranks (measured in benchmarks/README.md), so the worker's own thread cost
other requests more than the rank inside the events request did.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from recsys.resources import cpu_time_reader, usable_cpus

log = logging.getLogger("recsys")

SOCKET_NAME = "refresh.sock"
MAX_MESSAGE = 60_000  # bytes per datagram: a request's users, as JSON
MAX_PATH = 100  # bytes of an AF_UNIX socket's path: 108 on Linux, 104 on macOS


def socket_address(run_dir: Path) -> str | None:
    """Where the refresher listens: its socket file in the run's folder; where that
    path is too long for a Unix socket (a deep TMPDIR), a name in Linux's abstract
    namespace, written "@name" (no file); None: neither (no refresher)."""
    path = str(run_dir / SOCKET_NAME)
    if len(os.fsencode(path)) <= MAX_PATH:
        return path
    if sys.platform.startswith("linux"):
        return f"@recsys-refresh-{os.getpid()}-{run_dir.name}"
    return None


def _bind_name(address: str) -> str:
    """The address as `socket` takes it: "@name" is the abstract name "\\0name"."""
    return "\0" + address[1:] if address.startswith("@") else address


def _remove(address: str) -> None:
    if not address.startswith("@"):
        Path(address).unlink(missing_ok=True)


LOADAVG = Path("/proc/loadavg")


def idle_core(n_cores: int, loadavg: Path = LOADAVG) -> bool:
    """Whether a core is idle now: fewer tasks runnable on the machine, the caller
    included, than `n_cores` (the fourth field of /proc/loadavg counts them at this
    instant). False where that cannot be read (not Linux)."""
    try:
        running = int(loadavg.read_bytes().split()[3].split(b"/")[0])
    except (OSError, IndexError, ValueError):
        return False
    return running < n_cores


class CgroupIdle:
    """Whether a core of a container is idle: the CPU time its cgroup used since the
    last look, per second, is at least half a CPU under the CPUs it may use.

    In a container /proc/loadavg counts the host's tasks, not the container's, against
    the few CPUs of its quota or cpuset, so `idle_core` would say "busy" nearly always
    on a busy host (and the refresher would sit unused) or "idle" on a quiet host
    whatever the container's own load. The cgroup's CPU time counts only this
    container's processes. A look within `min_window` seconds of the last one gives
    the last answer: over a shorter window the rate is mostly rounding."""

    def __init__(
        self,
        n_cores: int,
        cpu_time: Callable[[], float | None],
        clock: Callable[[], float] = time.monotonic,
        min_window: float = 0.02,
    ) -> None:
        self.n_cores = n_cores
        self.cpu_time = cpu_time
        self.clock = clock
        self.min_window = min_window
        self.last = (clock(), cpu_time())
        self.idle = True
        self.busy = 0.0  # CPUs' worth of time used in the last window (for logs, tests)

    def __call__(self) -> bool:
        now, used = self.clock(), self.cpu_time()
        t0, u0 = self.last
        if used is None or u0 is None:
            self.last = (now, used)
            return False
        if now - t0 >= self.min_window:
            self.busy = (used - u0) / (now - t0)
            self.idle = self.busy <= self.n_cores - 0.5
            self.last = (now, used)
        return self.idle


def idleness(n_cores: int) -> Callable[[], bool]:
    """How a worker tells whether a core is idle: /proc/loadavg on a machine whose
    cores are all this server's; its cgroup's CPU time where a quota or cpuset gives it
    fewer (a container), if the cgroup's counter can be read."""
    if n_cores < (os.cpu_count() or n_cores):
        cpu_time = cpu_time_reader()
        if cpu_time is not None:
            return CgroupIdle(n_cores, cpu_time)
    return functools.partial(idle_core, n_cores)


class RefreshClient:
    """A worker's side: hand users to the refresher (`send`), or say it could not.

    Users are handed over only while a core is idle (`idleness`): then their rank
    runs beside this worker's next requests instead of before its answer. When every
    core is busy the rank costs the same CPU wherever it runs, and done inside the
    events request it is done once: in the refresher it would wait for a core, and the
    user's reads meanwhile would rank the list themselves. Measured in
    benchmarks/README.md."""

    def __init__(self, path: str | Path, always: bool = False) -> None:
        self.path = _bind_name(str(path))
        self.always = always  # hand over even while every core is busy
        self.n_cores = usable_cpus()  # its affinity, within its cgroup's CPU quota
        self.idle = idleness(self.n_cores)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)  # a full queue refuses at once; the worker ranks

    def send(self, users: list[Any]) -> bool:
        """True once the refresher has the users queued; False when it is not there
        (starting, restarting), its queue is full, or the ids do not fit one message:
        the caller ranks them itself then, as it does while no core is idle."""
        if not (self.always or self.idle()):
            return False
        msg = json.dumps({"t": time.time(), "u": users}, separators=(",", ":")).encode()
        if len(msg) > MAX_MESSAGE:
            return False
        try:
            self.sock.sendto(msg, self.path)
        except OSError:
            return False
        return True

    def close(self) -> None:
        self.sock.close()


def serve_refresh(
    service: Any,
    path: str | Path,
    stop: threading.Event | None = None,
    on_bound: Callable[[], None] | None = None,
    on_done: Callable[[str], None] | None = None,
    parent: int | None = None,
) -> None:
    """The refresher's loop over a loaded `RecService`: bind `path`, then for each
    message take the shared state's new events (`service.sync`, which also follows a
    reload) and rank each user's list unless a list ranked since the event is already
    there. Every second without messages it syncs too, so that reloads are followed,
    and returns once `parent` is no longer its parent process (the master was killed
    without stopping it)."""
    address = str(path)
    _remove(address)  # a socket left by a refresher that died
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind(_bind_name(address))
        sock.settimeout(1.0)
        if on_bound is not None:
            on_bound()
        while stop is None or not stop.is_set():
            try:
                batch = [sock.recv(MAX_MESSAGE + 1)]
            except TimeoutError:
                if parent is not None and os.getppid() != parent:
                    log.warning("refresher: the server (pid %d) is gone; exiting", parent)
                    return
                service.sync()
                continue
            sock.setblocking(False)
            try:  # what else waits: one sync for all of it
                while len(batch) < 256:
                    batch.append(sock.recv(MAX_MESSAGE + 1))
            except BlockingIOError:
                pass
            finally:
                sock.settimeout(1.0)
            todo: dict[Any, float] = {}
            for raw in batch:
                try:
                    msg = json.loads(raw)
                    asked, users = float(msg["t"]), list(msg["u"])
                except (ValueError, KeyError, TypeError):
                    log.warning("refresher: a malformed message of %d bytes skipped", len(raw))
                    continue
                for u in users:
                    if isinstance(u, int | str) and not isinstance(u, bool):
                        todo.setdefault(u, asked)
            service.sync()
            for user, asked in todo.items():
                outcome = "done"
                try:
                    if not service.refresh_user(user, asked):
                        outcome = "current"  # a read ranked it since the event
                except Exception:  # one user's failure: their next read ranks them
                    outcome = "failed"
                    log.exception("refresher: could not rank the list of %r", user)
                if on_done is not None:
                    on_done(outcome)
    finally:
        sock.close()
        _remove(address)


def main(argv: list[str] | None = None) -> None:  # pragma: no cover - a child process
    """`python -m serving.refresher SOCKET [LOG_LEVEL]` (SOCKET "@name": an abstract
    name): the refresher process, with the workers' settings from the environment: the
    bundle loaded, then `serve_refresh` until terminated."""
    args = sys.argv[1:] if argv is None else argv
    path, log_level = args[0], args[1] if len(args) > 1 else "warning"
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the master, which stops us
    master = os.getppid()
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    from serving.app import refresher_service

    service, bundle = refresher_service()
    try:
        service.start(bundle)
    except Exception:
        log.exception("refresher: could not load the bundle %s", bundle)
        raise SystemExit(1) from None
    log.info("refresher ready (pid %d)", os.getpid())
    from serving.metrics import Metrics

    metrics = Metrics()  # with the workers' PROMETHEUS_MULTIPROC_DIR: summed into /metrics
    serve_refresh(service, path, on_done=lambda o: metrics.refreshes.labels(o).inc(), parent=master)


class RefresherProcess:
    """The master's side: start the refresher, start it again when it dies (the
    workers rank inline meanwhile), stop it with the server."""

    def __init__(self, path: str | Path, log_level: str = "warning", check_s: float = 1.0):
        self.path = str(path)
        self.log_level = log_level
        self.check_s = check_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()  # no spawn after `stop`
        self._watch: threading.Thread | None = None
        self.restarts = 0

    def start(self) -> None:
        self._spawn()
        self._watch = threading.Thread(target=self._supervise, name="refresher-watch", daemon=True)
        self._watch.start()

    def _spawn(self) -> None:
        # its own interpreter (no copy of the master's threads), named in its command line
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "serving.refresher", self.path, self.log_level]
        )

    def _supervise(self) -> None:
        while not self._stop.wait(self.check_s):
            p = self._proc
            if p is not None and p.poll() is not None and not self._stop.is_set():
                log.warning(
                    "the refresher (pid %s) exited with %s; starting another (workers rank "
                    "events' lists themselves meanwhile)",
                    p.pid,
                    p.returncode,
                )
                self.restarts += 1
                if self._stop.wait(min(30.0, 0.5 * 2 ** min(self.restarts, 6))):
                    return  # stopped during the pause (no tight crash loop)
                with self._lock:
                    if not self._stop.is_set():
                        self._spawn()

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._stop.set()
        p = self._proc
        if p is None:
            return
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout)
        try:
            _remove(self.path)
        except OSError as e:
            log.warning("could not remove %s: %s", self.path, e)


if __name__ == "__main__":  # pragma: no cover
    main()
