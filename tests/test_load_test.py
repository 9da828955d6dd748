"""The load test's realistic mix is the traffic it claims to be: the generated wrk
script sends the intended shares of reads, events and unknown users, with bodies the
server's request models accept, users drawn Zipf-like by activity; wrk's report is
parsed with non-2xx answers and socket errors counted as errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar
from urllib.parse import unquote, urlsplit

import numpy as np
import polars as pl
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from loadmix import (
    mix_lua,
    parse_wrk,
    users_by_activity,
    wrk_percentile_ms,
    wrk_uncorrect,
    zipf_cdf,
)

WRK_OUT = """Running 10s test @ http://127.0.0.1:8000
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     3.10ms    2.00ms  41.20ms   90.00%
  Latency Distribution
     50%    2.50ms
     75%    3.00ms
     90%    5.10ms
     99%    1.20s
  12345 requests in 10.00s, 5.00MB read
  Socket errors: connect 0, read 3, write 1, timeout 2
  Non-2xx or 3xx responses: 7
Requests/sec:   1234.50
Transfer/sec:    500.00KB
"""


def test_wrk_report_counts_non_2xx_and_socket_errors() -> None:
    r = parse_wrk(WRK_OUT, 16)
    assert r["requests"] == 12345 and r["req_s"] == 1234.5
    assert (r["p50_ms"], r["p90_ms"], r["p99_ms"]) == (2.5, 5.1, 1200.0)
    assert r["non_2xx"] == 7 and r["socket_errors"] == 6 and r["errors"] == 13
    lines = [x for x in WRK_OUT.splitlines() if "errors" not in x and "Non-2xx" not in x]
    clean = parse_wrk("\n".join(lines), 16)
    assert clean["errors"] == 0


def wrk_correct(raw: np.ndarray, e: int) -> np.ndarray:
    """wrk's `stats_correct` over a histogram indexed by microseconds, as its C does it
    (the reference `wrk_uncorrect` is held to)."""
    out = raw.copy()
    if e <= 0:
        return out
    for n in range(2 * e, len(raw)):
        m = n - e
        while raw[n] and m > e:
            out[m] += raw[n]
            m -= e
    return out


def test_wrk_correction_is_undone_exactly() -> None:
    """wrk adds, for a sample n >= 2e, samples at n - e, n - 2e, ... above e; the
    requests' own latencies are recovered from what it reports."""
    raw = np.zeros(12, np.int64)
    raw[10], raw[2] = 1, 5
    cor = wrk_correct(raw, 3)
    assert cor.tolist() == [0, 0, 5, 0, 1, 0, 0, 1, 0, 0, 1, 0]  # 10 -> 7, 4 (not 1)
    assert (wrk_uncorrect(cor, 3) == raw).all()
    rng = np.random.default_rng(0)
    for e in (1, 2, 7, 50, 400, 5000):
        raw = rng.poisson(0.3, 3000) * (rng.random(3000) < 0.2)
        assert (wrk_uncorrect(wrk_correct(raw, e), e) == raw).all()
    assert (wrk_uncorrect(raw, 0) == raw).all()
    # wrk's percentile: the first value whose cumulative count reaches round(p% n + 0.5)
    h = np.zeros(5000, np.int64)
    h[[1000, 2000, 4000]] = [98, 1, 1]
    assert wrk_percentile_ms(h, 50) == 1.0  # rank round(50.5) = 51
    assert wrk_percentile_ms(h, 98) == 2.0 and wrk_percentile_ms(h, 99) == 4.0  # 99, 100


def test_users_are_ordered_by_their_events(tmp_path: Path) -> None:
    pl.DataFrame({"user_id": ["a", "b", "c", "d"]}).write_parquet(tmp_path / "users.parquet")
    u = [1, 1, 1, 3, 0, 3, 3, 3]  # b 3 events, d 4, a 1, c none
    hist = pl.DataFrame({"u": u, "i": [0] * 8, "t": [0] * 8})
    hist.cast({"u": pl.Int32, "i": pl.Int32}).write_parquet(tmp_path / "history.parquet")
    assert users_by_activity(tmp_path) == ["d", "b", "a", "c"]
    cdf = zipf_cdf(4, 1.0)
    assert cdf[-1] == 1.0 and np.allclose(np.diff(cdf, prepend=0), np.array([12, 6, 4, 3]) / 25)


class _Counting(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else each answer waits for a delayed ACK
    seen: ClassVar[list[tuple[str, str, bytes]]] = []
    lock = threading.Lock()

    def _answer(self, body: bytes = b"") -> None:
        with self.lock:
            self.seen.append((self.command, self.path, body))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer(self.rfile.read(int(self.headers["Content-Length"])))

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_realistic_mix_sends_the_intended_traffic(tmp_path: Path) -> None:
    from serving.app import EventsIn, RecommendationIn

    users = [f"u{j}" for j in range(50)] + [7, "a b/é"]  # an integer id, one to quote
    items = [f"i{j}" for j in range(30)] + [99]
    script = tmp_path / "mix.lua"
    script.write_text(mix_lua(users, items, k=10, event_share=0.05, unknown_share=0.15))
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Counting)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        cmd = ["wrk", "-t1", "-c2", "-d2s", "--latency", "-s", str(script), url]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60)
    finally:
        srv.shutdown()
    seen = _Counting.seen
    n = len(seen)
    assert n > 1000
    # the histogram the script prints is the one wrk reports from, and the requests'
    # own latencies are no higher than that at any percentile here (no slow request)
    r = parse_wrk(out.stdout, 2)
    for p in ("50", "90", "99"):
        assert abs(r[f"cor_p{p}_ms"] - r[f"p{p}_ms"]) <= 0.01 * max(1.0, r[f"p{p}_ms"]), r
        assert 0 < r[f"raw_p{p}_ms"] <= r[f"cor_p{p}_ms"] + 1.0
    kinds = Counter()
    read_users: Counter[str] = Counter()
    for method, path, body in seen:
        if method == "GET":
            p = urlsplit(path)
            assert p.path.startswith("/v1/recommendations/") and p.query == "k=10"
            read_users[unquote(p.path.rsplit("/", 1)[1])] += 1
            kinds["read"] += 1
        elif path == "/v1/events":
            ev = EventsIn.model_validate_json(body).events
            assert len(ev) == 1 and ev[0].user_id in users and ev[0].item_id in items
            kinds["event"] += 1
        else:
            assert path == "/v1/recommendations"
            req = RecommendationIn.model_validate_json(body)
            assert req.user_id not in users and req.history and 1 <= len(req.history) <= 10
            assert set(req.history) <= set(items) and req.k == 10
            kinds["unknown"] += 1
    for kind, share in (("read", 0.80), ("event", 0.05), ("unknown", 0.15)):
        assert abs(kinds[kind] / n - share) < 4 * (share * (1 - share) / n) ** 0.5 + 0.005, kinds
    # Zipf, exponent 1: the most active user is read about twice as often as the second
    assert read_users["u0"] > 1.5 * read_users["u1"]
    assert read_users["u1"] > 1.5 * read_users["u3"]
    assert set(read_users) <= {str(u) for u in users} and "a b/é" in read_users


def test_each_request_timed_on_its_own_by_kind() -> None:
    """The per-request client sends the mix's kinds in their shares, with bodies the
    server accepts, and times every answer (wrk's percentiles are corrected for
    coordinated omission, so they cannot say which kind of request the tail is)."""
    from loadmix import timed_mix

    from serving.app import EventsIn, RecommendationIn

    _Counting.seen = []
    users = [f"u{j}" for j in range(50)] + [7]
    items = [f"i{j}" for j in range(30)]
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Counting)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        r = timed_mix(url, users, items, 1.5, event_share=0.1, unknown_share=0.2)
    finally:
        srv.shutdown()
    n = r["requests"]
    assert n == len(_Counting.seen) > 300 and r["errors"] == 0
    assert r["read"]["n"] + r["event"]["n"] + r["unknown"]["n"] == n == r["all"]["n"]
    assert 0.05 < r["event"]["n"] / n < 0.15 and 0.13 < r["unknown"]["n"] / n < 0.27
    assert 0 < r["all"]["p50_ms"] <= r["all"]["p99_ms"] <= r["all"]["max_ms"]
    for method, path, body in _Counting.seen:
        if path == "/v1/events":
            assert EventsIn.model_validate_json(body).events[0].user_id in users
        elif method == "POST":
            assert 1 <= len(RecommendationIn.model_validate_json(body).history or []) <= 10
        else:
            assert unquote(urlsplit(path).path.rsplit("/", 1)[1]) in map(str, users)
