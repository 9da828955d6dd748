"""Worker processes that each listen on their own socket (SO_REUSEPORT, Linux).

uvicorn's workers share one listening socket, and an asyncio server accepts every
pending connection each time it wakes: when 16 keep-alive connections arrive together,
whichever worker wakes first takes most of them, and keeps them. Measured with the
load test's realistic mix on 2 workers, 16 connections split 10/6, 14/2, 3/13, 9/7 and
16/0 in five runs, and the 16/0 run served 2,500 req/s against 3,800-4,100 for the
others (one core idle). With a socket per worker bound with SO_REUSEPORT the kernel
spreads new connections over the workers' sockets by a hash of each connection's
addresses, so the split is binomial (16/0 about once in 30,000 runs).

uvicorn's supervisor is kept (it restarts a worker that dies); only its worker class
is replaced, so that each worker binds its own socket before it serves. A worker that
dies takes its socket with it: new connections go to the others until its
replacement listens. Connections that had reached the dead worker's queue but were
not yet accepted are reset, unless net.ipv4.tcp_migrate_req is 1 (then the kernel
moves them to another worker's socket): in the load test's kill -9 of a worker
holding 9-11 of 16 connections, 10-19 requests failed with it off and exactly the
connections it held (7 and 8) with it on. `recsys serve --shared-socket` keeps
uvicorn's one socket.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from uvicorn.supervisors import multiprocess

log = logging.getLogger("recsys")


def reuse_port_available(port: int) -> bool:
    """Workers can each bind `port` themselves (Linux spreads connections over
    SO_REUSEPORT sockets; macOS and others do not, and port 0 would give each its own)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT") and port > 0


def reuse_port_socket(host: str, port: int, reuse_port: bool = True) -> socket.socket:
    """A TCP socket bound to (host, port), with SO_REUSEPORT unless told otherwise;
    not yet listening."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family=family)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


_claims: list[socket.socket] = []  # a worker's claim on its own port, held for its life


def own_port_socket(host: str, base: int, n: int) -> socket.socket:
    """A socket bound to the first port of base .. base + n - 1 that no other worker
    holds, not yet listening (it listens once the worker serves, as its SO_REUSEPORT
    socket does, so that a worker still loading refuses connections and a balancer
    sends them to the others): a worker's own port, for a balancer in front. A worker
    claims its port by a name in Linux's abstract socket namespace, which the kernel
    frees when the process ends, so a replacement takes the port of the worker that
    died. (Binding alone cannot claim it: sockets with SO_REUSEADDR, needed to bind
    beside the dead worker's closing connections, may share a port until one listens.)"""
    for port in range(base, base + n):
        claim = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            claim.bind(f"\0recsys-worker-port-{host}-{port}")
        except OSError:
            claim.close()
            continue
        try:
            sock = reuse_port_socket(host, port, reuse_port=False)
        except OSError:
            claim.close()
            continue
        _claims.append(claim)
        return sock
    raise OSError(f"none of the ports {base}-{base + n - 1} is free")


class ReusePortProcess(multiprocess.Process):
    """A uvicorn worker that listens on a socket of its own (and on a port of its own
    when the server was given worker ports)."""

    def target(self, sockets: list[socket.socket] | None = None) -> None:  # pragma: no cover
        sock = reuse_port_socket(self.config.host, self.config.port)
        own = []
        base = getattr(self.config, "worker_port_base", None)  # `recsys serve --worker-ports`
        if base is not None:
            own = [own_port_socket(self.config.host, base, self.config.workers)]
        super().target([sock, *own])


def exit_with_parent(parent: int, every: float = 1.0) -> threading.Thread:
    """A daemon thread that stops this worker (SIGTERM: uvicorn's graceful shutdown)
    once `parent`, its supervisor, is no longer its parent: a master killed with
    SIGKILL left its workers serving the port with nobody to restart them, and a new
    server could not bind it."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        log.warning("the server's master (pid %d) is gone; this worker stops", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    t = threading.Thread(target=watch, name="parent-watch", daemon=True)
    t.start()
    return t


MIGRATE = Path("/proc/sys/net/ipv4/tcp_migrate_req")


def migrates_requests() -> bool | None:
    """Whether Linux hands the connections queued on a closing SO_REUSEPORT socket to
    the others (net.ipv4.tcp_migrate_req, 5.14 and later); None where unknown."""
    try:
        return MIGRATE.read_text().strip() != "0"
    except OSError:
        return None


def run_workers(config: Any, port_base: int | None = None) -> None:
    """uvicorn's multiprocess supervisor over `config.workers` workers, each with its
    own SO_REUSEPORT socket and, given `port_base`, a port of its own among port_base ..
    port_base + workers - 1. Raises OSError when an address cannot be bound."""
    if not migrates_requests():
        log.warning(
            "net.ipv4.tcp_migrate_req is off: connections still queued on a worker that "
            "dies are reset rather than handed to the other workers (sysctl -w "
            "net.ipv4.tcp_migrate_req=1, or --shared-socket)"
        )
    # a clear error before spawning, and without SO_REUSEPORT so that a server already
    # on the port (even one of ours) refuses it rather than sharing its connections
    reuse_port_socket(config.host, config.port, reuse_port=False).close()
    if port_base is not None:
        for port in range(port_base, port_base + config.workers):
            reuse_port_socket(config.host, port, reuse_port=False).close()
    config.worker_port_base = port_base  # travels to the workers with their config
    multiprocess.Process = ReusePortProcess  # type: ignore[misc]  # what the supervisor spawns
    multiprocess.Multiprocess(config, sockets=[]).run()
