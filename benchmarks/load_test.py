"""Load test of `recsys serve` on loopback: wrk with varying user ids, bounded in time.

    .venv/bin/python benchmarks/load_test.py --bundle /tmp/srv/bundle
    .venv/bin/python benchmarks/load_test.py --bundle B --no-cache   # every request ranks

Starts the server on 127.0.0.1 (a free port), waits for /readyz, then for each
connection count runs wrk for `--duration` seconds; every request asks for a user id
drawn at random from the bundle's users (and `--unknown-share` of ids it has never
seen). Prints req/s, p50/p90/p99 and errors per run; the server is stopped at the end.
Needs wrk (Debian: apt-get install wrk).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parents[1]

LUA = """
local ids = {%(ids)s}
local items = {%(items)s}
local k = %(k)d
local event_share = %(event_share)f
math.randomseed(%(seed)d)
request = function()
  local id = ids[math.random(#ids)]
  if event_share > 0 and math.random() < event_share then
    local body = '{"events": [{"user_id": ' .. id .. ', "item_id": '
      .. items[math.random(#items)] .. '}]}'
    return wrk.format("POST", "/v1/events", {["Content-Type"] = "application/json"}, body)
  end
  return wrk.format("GET", "/v1/recommendations/" .. id .. "?k=" .. k)
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, timeout: float, proc: subprocess.Popen) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - t0
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server not ready after {timeout:.0f} s")


def to_ms(s: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", s)
    if not m:
        return float("nan")
    v, unit = float(m.group(1)), m.group(2)
    return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v


def run_wrk(url: str, script: Path, conns: int, duration: int) -> dict[str, float]:
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{conns}",
            f"-d{duration}s",
            "--timeout",
            "2s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=duration + 30,
    ).stdout
    res: dict[str, float] = {"connections": conns}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    res["req_s"] = float(m.group(1)) if m else float("nan")
    m = re.search(r"(\d+) requests in", out)
    res["requests"] = int(m.group(1)) if m else 0
    for p in ("50", "90", "99"):
        m = re.search(rf"\s{p}(?:\.000)?%\s+(\S+)", out)
        res[f"p{p}_ms"] = to_ms(m.group(1)) if m else float("nan")
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    res["errors"] = errors
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--connections", default="1,16")
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--no-cache", action="store_true", help="rank every request afresh")
    ap.add_argument("--prefill", action="store_true", help="server ranks all users at start")
    ap.add_argument(
        "--event-share",
        type=float,
        default=0.0,
        help="share of requests that POST a fresh event (the user's next list is re-ranked)",
    )
    ap.add_argument("--unknown-share", type=float, default=0.0)
    ap.add_argument("--warmup", type=int, default=3, help="seconds of unmeasured load first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (Debian: apt-get install -y wrk)")

    users = pl.read_parquet(args.bundle / "users.parquet")["user_id"].cast(pl.String).to_list()
    n_unknown = int(len(users) * args.unknown_share / max(1e-9, 1 - args.unknown_share))
    ids = users + [f"unknown-{j}" for j in range(n_unknown)]
    tmp = Path(tempfile.mkdtemp(prefix="recsys-load-"))
    script = tmp / "users.lua"
    items = pl.read_parquet(args.bundle / "items.parquet")["item_id"]
    item_ids = [json.dumps(x) for x in items.head(2000).to_list()]
    script.write_text(
        LUA
        % {
            "ids": ",".join(json.dumps(x) for x in ids),
            "items": ",".join(json.dumps(x) for x in item_ids),
            "k": args.k,
            "event_share": args.event_share,
            "seed": args.seed,
        }
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        str(ROOT / ".venv" / "bin" / "recsys"),
        "serve",
        "--bundle",
        str(args.bundle),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(args.workers),
        "--no-cache" if args.no_cache else "--cache",
    ] + (["--prefill"] if args.prefill else [])
    proc = subprocess.Popen(cmd, start_new_session=True)
    results = []
    try:
        ready_s = wait_ready(url, 600, proc)
        cache = "off" if args.no_cache else "on, prefilled" if args.prefill else "on"
        print(
            f"server ready in {ready_s:.1f} s: {args.workers} worker(s), "
            f"cache {cache}, {len(ids)} user ids, k={args.k}, "
            f"{args.event_share:.0%} of requests post an event",
            flush=True,
        )
        if args.warmup:
            run_wrk(url, script, 16, args.warmup)
        for c in [int(x) for x in args.connections.split(",")]:
            r = run_wrk(url, script, c, args.duration)
            results.append(r)
            print(
                f"{c:3d} conn: {r['req_s']:8.1f} req/s  p50 {r['p50_ms']:.2f} ms  "
                f"p90 {r['p90_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  "
                f"errors {int(r['errors'])} of {int(r['requests'])}",
                flush=True,
            )
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    sys.exit(0 if all(r["errors"] == 0 for r in results) else 1)


if __name__ == "__main__":
    main()
