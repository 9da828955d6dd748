"""Load test of `recsys serve` on loopback: wrk with varying user ids, bounded in time.

    .venv/bin/python benchmarks/load_test.py --bundle /tmp/srv/bundle
    .venv/bin/python benchmarks/load_test.py --bundle B --no-cache   # every request ranks
    .venv/bin/python benchmarks/load_test.py --bundle B --mix realistic   # + freshness probe
    .venv/bin/python benchmarks/load_test.py --bundle B --soak 60
    .venv/bin/python benchmarks/load_test.py --bundle B --kill-worker
    .venv/bin/python benchmarks/load_test.py --bundle B --reload-under-load
    .venv/bin/python benchmarks/load_test.py --bundle B --mix realistic --haproxy

Each run starts the server on 127.0.0.1 (a free port, `--workers` processes), waits
until every worker answers /readyz, runs its scenario and stops the server.

- default (`--mix uniform`): for each connection count wrk runs `--duration` seconds;
  every request asks for a user id drawn uniformly from the bundle's users (and
  `--unknown-share` of ids it has never seen); `--event-share` of them POST an event.
- `--mix realistic`: 94% GET /v1/recommendations/{id}?k=10, ids drawn Zipf-like
  (`--zipf`) over the bundle's users ordered by their number of events; 1% POST
  /v1/events (a user drawn the same way, a random catalogue item); 5% POST
  /v1/recommendations for an unknown user with a history of 1-10 random items. Beside
  the last connection count's run, a freshness probe times an event until the user's
  list reflects it, reading on the other worker.
- `--soak S`: the realistic mix at 64 connections, 10 s of warm-up, then S seconds;
  errors, p99 and the resident memory of the server's processes, every second.
- `--kill-worker`: the mix at 16 connections for 20 s; one worker is killed (SIGKILL)
  at 5 s; errors, the replacement's pid and when it answered again.
- `--reload-under-load`: the mix at 16 connections for 20 s; POST /admin/reload of the
  same bundle in the middle; errors and the reload's time.
- `--haproxy` (with any of the above): the server's workers also listen on ports of
  their own (`--worker-ports`) and the load goes through haproxy with
  serving/haproxy.cfg, which gives each worker one request at a time and queues the
  rest in one queue; the freshness probe still reads on the workers themselves.

Prints req/s, p50/p90/p99 and errors (non-2xx responses plus socket errors); exits 1
when any request failed. The percentiles are wrk's, which it corrects for coordinated
omission; beside them, in brackets, the requests' own (the histogram wrk reports, with
its correction undone: see loadmix.HIST_LUA). Needs wrk (Debian: apt-get install wrk).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import polars as pl
import psutil
from loadmix import (
    HIST_LUA,
    Balancer,
    FreshnessProbe,
    RssSampler,
    Server,
    WrkRun,
    fmt_timed,
    fmt_wrk,
    free_ports,
    json_id,
    lua_str,
    mix_lua,
    path_id,
    run_wrk,
    timed_mix,
    users_by_activity,
)
from machine import cpu

UNIFORM_LUA = """
local ids_path = {%(ids_path)s}
local ids_json = {%(ids_json)s}
local items = {%(items)s}
local k = %(k)d
local event_share = %(event_share)f
math.randomseed(%(seed)d)
request = function()
  local j = math.random(#ids_path)
  if event_share > 0 and math.random() < event_share then
    local body = '{"events": [{"user_id": ' .. ids_json[j] .. ', "item_id": '
      .. items[math.random(#items)] .. '}]}'
    return wrk.format("POST", "/v1/events", {["Content-Type"] = "application/json"}, body)
  end
  return wrk.format("GET", "/v1/recommendations/" .. ids_path[j] .. "?k=" .. k)
end
"""

MiB = 1024 * 1024


def uniform_script(args: argparse.Namespace, path: Path) -> int:
    users = pl.read_parquet(args.bundle / "users.parquet")["user_id"].to_list()
    share = args.unknown_share or 0.0
    n_unknown = int(len(users) * share / max(1e-9, 1 - share))
    ids = users + [f"unknown-{j}" for j in range(n_unknown)]
    items = pl.read_parquet(args.bundle / "items.parquet")["item_id"].head(2000).to_list()
    path.write_text(
        HIST_LUA
        + UNIFORM_LUA
        % {
            "ids_path": ",".join(lua_str(path_id(x)) for x in ids),
            "ids_json": ",".join(lua_str(json_id(x)) for x in ids),
            "items": ",".join(lua_str(json_id(x)) for x in items),
            "k": args.k,
            "event_share": args.event_share or 0.0,
            "seed": args.seed,
        }
    )
    return len(ids)


def realistic_script(
    args: argparse.Namespace, path: Path, users: list[Any], pace_ms: float = 0.0
) -> None:
    items = pl.read_parquet(args.bundle / "items.parquet")["item_id"].to_list()
    path.write_text(
        mix_lua(
            users,
            items,
            k=args.k,
            exponent=args.zipf,
            event_share=0.01 if args.event_share is None else args.event_share,
            unknown_share=0.05 if args.unknown_share is None else args.unknown_share,
            seed=args.seed,
            tag=secrets.token_hex(4),
            pace_ms=pace_ms,
        )
    )


def gib(b: float) -> str:
    return f"{b / 1024**3:.3f} GiB"


# -- scenarios ---------------------------------------------------------------------------
def paced_run(
    args: argparse.Namespace, srv: Server, script: Path, users: list[Any], c: int
) -> dict[str, float]:
    """The mix offered at `--rate` req/s over `c` connections. Each connection waits an
    exponential think time between an answer and its next request, so it cycles in
    think + latency: a think of c / rate alone delivers less than the rate (about 880
    of 1,000 req/s here). A short run first measures the latency part of the cycle at
    this load (twice: the latency grows as the think shrinks), and the measured run
    thinks that much less."""
    paced = script.with_name(f"paced{c}.lua")
    target = c * 1000.0 / args.rate  # ms per request and connection
    pace_ms = target
    for _ in range(2):
        realistic_script(args, paced, users, pace_ms=pace_ms)
        probe = run_wrk(srv.load_url, paced, c, max(2.0, args.duration / 5))
        latency_part = max(0.0, c * 1000.0 / max(probe["req_s"], 1e-9) - pace_ms)
        pace_ms = max(target / 10, target - latency_part)
    realistic_script(args, paced, users, pace_ms=pace_ms)
    pr = run_wrk(srv.load_url, paced, c, args.duration)
    pr["offered_rate"] = args.rate
    pr["think_ms"] = pace_ms
    return pr


def count_changes(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    return {k: int(v - before.get(k, 0.0)) for k, v in after.items() if v != before.get(k, 0.0)}


def fmt_refreshes(moved: dict[str, int]) -> str:
    """A run's lists ranked off the read path, by outcome."""
    handed = moved.get("handed", 0)
    done, current = moved.get("done", 0), moved.get("current", 0)
    return (
        f"  lists ranked after events: {done} (plus {current} already ranked by a read), "
        f"of which {handed} handed to the refresher process, {moved.get('failed', 0)} failed"
    )


def connection_runs(
    args: argparse.Namespace, srv: Server, script: Path, users: list[Any] | None
) -> dict[str, Any]:
    if args.warmup:
        run_wrk(srv.load_url, script, 16, args.warmup)
    conns = [int(x) for x in args.connections.split(",")]
    runs = []
    fresh = None
    for j, c in enumerate(conns):
        probe = None
        if users is not None and args.freshness and j == len(conns) - 1:
            probe = FreshnessProbe(srv, users, args.zipf, args.k, args.freshness)
            probe.start()
        before = srv.refreshes() if users is not None else {}
        r = run_wrk(srv.load_url, script, c, args.duration)
        runs.append(r)
        print(fmt_wrk(r), flush=True)
        if users is not None:
            r["refreshes"] = moved = count_changes(before, srv.refreshes())
            if moved:
                print(fmt_refreshes(moved), flush=True)
        if users is not None and getattr(args, "rate", None) and c > 1:
            # the same mix offered at --rate req/s: latency at that load, not at saturation
            pr = paced_run(args, srv, script, users, c)
            runs.append(pr)
            print(
                f"offered {args.rate:g} req/s (think {pr['think_ms']:.1f} ms): " + fmt_wrk(pr),
                flush=True,
            )
        if probe is not None:
            probe.stop()
            fresh = probe.summary()
            print(
                f"freshness beside {c} conn: {fresh['probes']} probes "
                f"({fresh['cross_worker']} read on the other worker, "
                f"{fresh['first_read_fresh']} fresh at the first read), event to a read "
                f"without the item: p50 {fresh['p50_ms']:.1f} ms  p99 {fresh['p99_ms']:.1f} ms"
                f"  max {fresh['max_ms']:.1f} ms; {fresh['stale']} still listed after "
                f"{probe.give_up:.0f} s, {fresh['errors']} errors",
                flush=True,
            )
            for e in probe.errors[:5]:
                print(f"  probe error: {e}", flush=True)
            if fresh["probes"] < args.freshness:
                print(f"  (only {fresh['probes']} of {args.freshness} probes fitted)")
    out: dict[str, Any] = {"runs": runs, "freshness": fresh}
    timed = None
    if users is not None and args.per_request:
        items = pl.read_parquet(args.bundle / "items.parquet")["item_id"].to_list()
        timed = timed_mix(
            srv.load_url, users, items, args.per_request, k=args.k, exponent=args.zipf,
            event_share=0.01 if args.event_share is None else args.event_share,
            unknown_share=0.05 if args.unknown_share is None else args.unknown_share,
            seed=args.seed, tag=secrets.token_hex(4),
        )  # fmt: skip
        out["per_request"] = timed
        print(fmt_timed(timed), flush=True)
    out["ok"] = (
        all(r["errors"] == 0 for r in runs)
        and (fresh is None or (fresh["errors"] == 0 and fresh["stale"] == 0))
        and (timed is None or timed["errors"] == 0)
    )
    return out


def soak(args: argparse.Namespace, srv: Server, script: Path) -> dict[str, Any]:
    c = args.soak_connections
    warm = run_wrk(srv.load_url, script, c, args.soak_warmup) if args.soak_warmup else None
    if warm:
        print("warm-up " + fmt_wrk(warm), flush=True)
    sampler = RssSampler(srv, 1.0)
    sampler.start()
    r = run_wrk(srv.load_url, script, c, args.soak)
    time.sleep(1.1)  # one sample after the load
    sampler.stop()
    rss = [s[1] for s in sampler.samples]
    start, end, peak = rss[0], rss[-1], max(rss)
    growth = 100 * (end - start) / start
    print("soak    " + fmt_wrk(r), flush=True)
    print(
        f"RSS of the server's {len(sampler.samples[-1][2])} processes: after warm-up "
        f"{gib(start)}, at the end {gib(end)}, max {gib(peak)}, growth {growth:+.2f}%",
        flush=True,
    )
    first, last = sampler.samples[0][2], sampler.samples[-1][2]
    for pid in sorted(set(first) | set(last)):
        a, b = first.get(pid), last.get(pid)
        print(
            f"  pid {pid}: {'-' if a is None else f'{a / MiB:.0f} MiB'} -> "
            f"{'-' if b is None else f'{b / MiB:.0f} MiB'}"
        )
    return {
        "warmup": warm,
        "soak": r,
        "rss_start": start,
        "rss_end": end,
        "rss_max": peak,
        "rss_growth_pct": growth,
        "rss_series": [(round(t, 1), v) for t, v, _ in sampler.samples],
        "ok": r["errors"] == 0,
    }


def _established(pid: int, port: int) -> int:
    try:
        return sum(
            1
            for c in psutil.Process(pid).net_connections("tcp")
            if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port
        )
    except psutil.NoSuchProcess:
        return 0


def kill_worker(args: argparse.Namespace, srv: Server, script: Path) -> dict[str, Any]:
    if args.warmup:
        run_wrk(srv.load_url, script, 16, args.warmup)
    before = srv.worker_pids()
    run = WrkRun(srv.load_url, script, 16, args.fault_duration)
    time.sleep(args.kill_at)
    victim = before[0]
    conns = _established(victim, srv.port)
    os.kill(victim, signal.SIGKILL)
    t_kill = time.perf_counter()
    held = f"it held {conns} connections"
    if srv.front is not None:  # the clients' connections are haproxy's
        held += " of the server's port; the balancer sends it one request at a time"
    print(f"killed worker {victim} ({held}) at {args.kill_at:.0f} s")
    new_pid = None
    t_spawn = t_first = t_ready = None
    first_status = None
    deadline = t_kill + args.fault_duration + 120
    while time.perf_counter() < deadline and t_ready is None:
        if new_pid is None:
            fresh = [p for p in srv.worker_pids() if p not in before]
            if fresh:
                new_pid, t_spawn = fresh[0], time.perf_counter()
            else:
                time.sleep(0.05)
                continue
        try:  # fresh connections until one lands on the new worker
            status, pid = srv.ask("/readyz", timeout=2)
        except (OSError, http.client.HTTPException):
            status, pid = 0, None
        if pid == new_pid:
            if t_first is None:
                t_first, first_status = time.perf_counter(), status
            if status == 200:
                t_ready = time.perf_counter()
        time.sleep(0.05)
    r = run.result()
    print(fmt_wrk(r), flush=True)

    def since(t: float | None) -> str:
        return "never" if t is None else f"{t - t_kill:.2f} s after the kill"

    print(
        f"replacement worker: {new_pid or 'none'} (spawned {since(t_spawn)}); first answer "
        f"{since(t_first)} (status {first_status}), ready (/readyz 200) {since(t_ready)}; "
        f"workers now {srv.worker_pids()}",
        flush=True,
    )
    return {
        "wrk": r,
        "victim": victim,
        "victim_connections": conns,
        "replacement": new_pid,
        "spawned_s": None if t_spawn is None else t_spawn - t_kill,
        "first_answer_s": None if t_first is None else t_first - t_kill,
        "first_status": first_status,
        "ready_s": None if t_ready is None else t_ready - t_kill,
        "ok": new_pid is not None and t_ready is not None and r["errors"] <= conns,
    }


def reload_under_load(
    args: argparse.Namespace, srv: Server, script: Path, token: str
) -> dict[str, Any]:
    if args.warmup:
        run_wrk(srv.load_url, script, 16, args.warmup)
    sampler = RssSampler(srv, 0.5)
    sampler.start()
    run = WrkRun(srv.load_url, script, 16, args.fault_duration)
    time.sleep(args.fault_duration / 2 - 3)
    body = json.dumps({"bundle": str(args.bundle.resolve())})
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=600)
    t0 = time.perf_counter()
    conn.request(
        "POST",
        "/admin/reload",
        body,
        {"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    resp = conn.getresponse()
    answer = resp.read().decode()
    took = time.perf_counter() - t0
    conn.close()
    # the other worker follows through the shared state: every worker ready again?
    follow = srv.wait_ready(120)
    r = run.result()
    sampler.stop()
    print(fmt_wrk(r), flush=True)
    print(
        f"POST /admin/reload: {resp.status} in {took:.2f} s: {answer[:300]}; every worker "
        f"answered /readyz 200 within {follow:.2f} s after it",
        flush=True,
    )
    rss = [s[1] for s in sampler.samples]
    print(
        f"RSS of the server's processes {gib(rss[0])} before, max {gib(max(rss))} during, "
        f"{gib(rss[-1])} at the end",
        flush=True,
    )
    after = run_wrk(srv.load_url, script, 16, 5)  # what the reloaded server does (its caches)
    print("after the reload, 5 s: " + fmt_wrk(after), flush=True)
    return {
        "wrk": r,
        "after": after,
        "reload_status": resp.status,
        "reload_s": took,
        "reload_answer": answer,
        "rss_before": rss[0],
        "rss_max": max(rss),
        "rss_end": rss[-1],
        "ok": resp.status == 200 and r["errors"] == 0 and after["errors"] == 0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--haproxy",
        action="store_true",
        help="send the load through haproxy (serving/haproxy.cfg) to the workers' own "
        "ports (`recsys serve --worker-ports`): one queue for both workers",
    )
    ap.add_argument("--connections", default="1,16")
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--no-cache", action="store_true", help="rank every request afresh")
    ap.add_argument("--prefill", action="store_true", help="server ranks all users at start")
    ap.add_argument(
        "--mix",
        choices=["uniform", "realistic"],
        default="uniform",
        help="uniform: the default's GETs of uniformly drawn users; realistic: the "
        "production-like mix (the soak and fault scenarios always use it)",
    )
    ap.add_argument(
        "--event-share",
        type=float,
        default=None,
        help="share of requests that POST a fresh event (the user's next list is "
        "re-ranked); default 0, 0.01 in the realistic mix",
    )
    ap.add_argument(
        "--unknown-share",
        type=float,
        default=None,
        help="uniform: share of GETs for unknown ids (default 0); realistic: share of "
        "POSTs for unknown users with a history (default 0.05)",
    )
    ap.add_argument("--zipf", type=float, default=1.0, help="exponent of the user draw")
    ap.add_argument(
        "--rate",
        type=float,
        default=None,
        help="realistic mix: after each saturating run with more than one connection, "
        "run the mix again offered at this many req/s (Poisson-like arrivals per "
        "connection, the think time calibrated by two short probes so that this rate "
        "is delivered), for the latency at that load",
    )
    ap.add_argument(
        "--freshness",
        type=int,
        default=200,
        help="realistic mix: event-to-list probes beside the last run (0: none)",
    )
    ap.add_argument("--soak", type=int, metavar="SECONDS", help="soak run of this length")
    ap.add_argument("--soak-connections", type=int, default=64)
    ap.add_argument("--soak-warmup", type=int, default=10)
    ap.add_argument("--kill-worker", action="store_true")
    ap.add_argument("--kill-at", type=float, default=5.0, help="seconds into the run")
    ap.add_argument("--reload-under-load", action="store_true")
    ap.add_argument("--fault-duration", type=int, default=20, help="seconds of load around a fault")
    ap.add_argument(
        "--serve-args",
        default="",
        metavar="ARGS",
        help="more arguments of `recsys serve`, e.g. '--lists recs.parquet'",
    )
    ap.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="environment of the server (RECSYS_* settings), repeatable",
    )
    ap.add_argument(
        "--per-request",
        type=float,
        default=0,
        metavar="SECONDS",
        help="realistic mix: then this many seconds on one connection with every request "
        "timed on its own (wrk's percentiles are corrected for coordinated omission), "
        "by kind of request",
    )
    ap.add_argument("--warmup", type=int, default=3, help="seconds of unmeasured load first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if args.haproxy and args.workers != 2:
        ap.error("--haproxy: serving/haproxy.cfg names two workers' ports; use --workers 2")
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (Debian: apt-get install -y wrk)")
    scenario = (
        "soak"
        if args.soak
        else "kill-worker"
        if args.kill_worker
        else "reload"
        if args.reload_under_load
        else args.mix
    )
    if sum(bool(x) for x in (args.soak, args.kill_worker, args.reload_under_load)) > 1:
        raise SystemExit("choose one of --soak, --kill-worker, --reload-under-load")

    print(f"machine: {cpu()}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="recsys-load-"))
    script = tmp / "mix.lua"
    users = None
    if scenario == "uniform":
        n_ids = uniform_script(args, script)
        what = f"uniform over {n_ids} user ids"
    else:
        users = users_by_activity(args.bundle)
        realistic_script(args, script, users)
        ev = 0.01 if args.event_share is None else args.event_share
        unk = 0.05 if args.unknown_share is None else args.unknown_share
        what = (
            f"realistic mix over {len(users)} users (Zipf {args.zipf}): "
            f"{1 - ev - unk:.0%} GET, {ev:.0%} events, {unk:.0%} unknown users with a history"
        )
    env = dict(kv.split("=", 1) for kv in args.server_env)
    token = secrets.token_hex(16)
    if scenario == "reload":
        env["RECSYS_ADMIN_TOKEN"] = token
    srv = Server(args.bundle, args.workers, not args.no_cache, args.prefill, env)
    srv.extra = shlex.split(args.serve_args)
    if args.haproxy:
        base = free_ports(args.workers)
        srv.extra += ["--worker-ports", str(base)]
        srv.front = Balancer(list(range(base, base + args.workers)))
    srv.start()
    result: dict[str, Any] = {"scenario": scenario, "machine": cpu()}
    try:
        ready_s = srv.wait_ready(900)
        if srv.front is not None:
            srv.front.start()
            what += f"; through haproxy (serving/haproxy.cfg) on port {srv.front.port}"
        cache = "off" if args.no_cache else "on, prefilled" if args.prefill else "on"
        print(
            f"server ready in {ready_s:.1f} s: {args.workers} worker(s) "
            f"{srv.worker_pids()}, cache {cache}, k={args.k}; {what}",
            flush=True,
        )
        if scenario in ("uniform", "realistic"):
            result |= connection_runs(args, srv, script, users)
        elif scenario == "soak":
            result |= soak(args, srv, script)
        elif scenario == "kill-worker":
            result |= kill_worker(args, srv, script)
        else:
            result |= reload_under_load(args, srv, script, token)
    finally:
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    sys.exit(0 if result.get("ok") else 1)


if __name__ == "__main__":
    main()
