"""Redis as the shared state of a fleet: real `redis-server` processes started here (the
Debian package; `.ci/run` installs it), no stand-in. Two services with their own
`RedisState` stand for two servers; the slow test runs two `recsys serve` processes."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import another_version, free_port, list_refreshes, wait_ready

from recsys.service import Model, RecService, ServiceLimits
from recsys.state import CachedList, StateWriteError

REDIS_SERVER = shutil.which("redis-server")
pytestmark = pytest.mark.skipif(
    REDIS_SERVER is None,
    reason="redis-server is not installed (Debian: apt-get install redis-server; "
    ".ci/run installs it)",
)
redis = pytest.importorskip("redis", reason="the Redis client: pip install 'recsys[redis]'")

from recsys.redis_state import RedisState, RedisStateError, _pack, _unpack  # noqa: E402


class RedisServer:
    def __init__(self, workdir: Path) -> None:
        assert REDIS_SERVER is not None
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = open(workdir / "redis.log", "wb")  # noqa: SIM115 - closed by stop()
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        self.proc = subprocess.Popen(
            [REDIS_SERVER, *args, "--appendonly", "no", "--dir", str(workdir)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        end = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > end:
                    self.stop()
                    pytest.fail(
                        f"redis-server did not start: {(workdir / 'redis.log').read_text()}"
                    )
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


_prefixes = itertools.count()


@pytest.fixture()
def prefix() -> str:
    """Each test its own keys in the shared server."""
    return f"t{os.getpid()}-{next(_prefixes)}:"


def _service(model: Model, url: str, prefix: str, tree_cache: Path, **kw: float) -> RecService:
    refresh = bool(kw.pop("refresh", True))
    state = RedisState(url, prefix=prefix, **kw)
    limits = ServiceLimits(refresh=refresh)
    return RecService(model, limits=limits, state=state, tree_cache=tree_cache)


# -- two servers, one Redis ------------------------------------------------------------
def test_an_event_posted_to_one_changes_the_list_the_other_serves(
    model: Model, tree_cache: Path, redis_server: RedisServer, prefix: str
) -> None:
    a = _service(model, redis_server.url, prefix, tree_cache)
    b = _service(model, redis_server.url, prefix, tree_cache)
    uid = model.user_ids[3]
    before = b.recommend(uid, k=10).items
    a.add_events([(uid, before[0][0], None)])
    after = b.recommend(uid, k=10).items
    assert after != before
    assert before[0][0] not in [i for i, _ in after]  # now seen, by the other server
    # a user the bundle does not know, made by events on one server, ranked by the other
    a.add_events([("newcomer", model.item_ids[j], None) for j in (1, 2, 4)])
    rec = b.recommend("newcomer", k=5)
    assert rec.fallback is None and all(s is not None for _, s in rec.items)


def test_a_list_ranked_by_one_is_served_by_the_other(
    model: Model, tree_cache: Path, redis_server: RedisServer, prefix: str
) -> None:
    a = _service(model, redis_server.url, prefix, tree_cache, refresh=False)
    b = _service(model, redis_server.url, prefix, tree_cache, refresh=False)
    uid = model.user_ids[5]
    first = a.recommend(uid, k=10)
    assert first.age_s == 0.0  # ranked for this request
    time.sleep(0.01)
    second = b.recommend(uid, k=10)
    assert second.age_s > 0.0  # a's list, served by b
    assert second.items == first.items
    assert str(uid) in b.lists and len(b.lists) >= 1
    # an event makes it stale for both at once
    a.add_events([(uid, first.items[0][0], None)])
    third = b.recommend(uid, k=10)
    assert third.age_s == 0.0 and first.items[0][0] not in [i for i, _ in third.items]
    assert a.recommend(uid, k=10).age_s > 0.0  # and b's new list serves a


def test_lists_seeded_into_redis_in_batches(
    model: Model, tree_cache: Path, redis_server: RedisServer, prefix: str, tmp_path: Path
) -> None:
    """A batch job's lists seed Redis in a few round trips: every other server serves
    them; a user with an event, or with a complete list of this bundle already shared,
    keeps what the fleet has."""
    import polars as pl

    users = list(model.user_ids[:6])
    ranked = _service(model, redis_server.url, prefix, tree_cache, refresh=False)
    ranked.add_events([(users[1], model.item_ids[3], None)])  # an event before the seed
    complete = ranked.recommend(users[2], k=10)  # a complete list, shared
    rows = [
        {"user_id": u, "item_id": i, "rank": r, "score": 1000.0 + r}
        for u in users
        for r, i in enumerate(model.item_ids[10:15], 1)
    ]
    pl.DataFrame(rows).write_parquet(tmp_path / "recs.parquet")
    state = RedisState(redis_server.url, prefix=prefix)
    seeded = RecService(
        model, seed_lists=tmp_path / "recs.parquet", limits=ServiceLimits(refresh=False),
        state=state, tree_cache=tree_cache,
    )  # fmt: skip
    other = _service(model, redis_server.url, prefix, tree_cache, refresh=False)
    for u in (users[0], *users[3:]):
        rec = other.recommend(u, k=5)
        assert [i for i, _ in rec.items] == list(model.item_ids[10:15]), u
        assert all(sc is not None and sc > 900 for _, sc in rec.items)
    lists = seeded.lists
    assert lists.get(str(users[1])) is None  # nothing seeded over the event
    assert all(sc is None or sc < 900 for _, sc in other.recommend(users[1], k=5).items)
    assert other.recommend(users[2], k=5).items == complete.items[:5]  # not the seeded top
    # the batched reads and writes agree with the one-at-a-time ones across batches
    many = lists.get_checked_many(users, state, batch=4)
    assert [(e is None, v) for e, v in many] == [
        (e is None, v) for e, v in (lists.get_checked(u, state) for u in users)
    ]
    assert many[1][1] == 1 and not many[0][0].complete and many[2][0].complete
    entry = CachedList("v", 0, 1.0, np.arange(3), np.ones(3), complete=True)
    lists.put_many([(f"x{j}", entry) for j in range(5)], batch=2)
    assert all(lists.get(f"x{j}") is not None for j in range(5))


def test_versions_grow_and_fresh_histories_are_trimmed(
    redis_server: RedisServer, prefix: str
) -> None:
    s = RedisState(redis_server.url, max_events_per_user=3, prefix=prefix)
    assert s.fresh("u") is None and s.version("u") == 0
    assert s.add([("u", i, 1000 + i) for i in range(10)]) == {"u"}
    f = s.fresh("u")
    assert f is not None
    assert f.items == [7, 8, 9] and f.times == [1007, 1008, 1009]
    v1 = s.version("u")
    assert v1 == f.version > 0
    s.add([(7, "i-x", 5), ("u", "i-y", 6)])
    assert s.version(7) > v1 and s.version("u") > s.version(7)
    g = s.fresh("u")
    assert g is not None and g.items == [8, 9, "i-y"]  # ids keep their type
    # the service keys a user by the bundle's id or the client's text: 7 and "7" are one
    assert s.version("7") == s.version(7)
    # every event is in the stream, for consumers outside the servers
    entries = s.r.xrange(f"{prefix}events")
    assert len(entries) == 12
    last = entries[-1][1]
    assert json.loads(last[b"u"]) == "u" and json.loads(last[b"i"]) == "i-y"
    assert int(last[b"v"]) == s.version("u")
    # keys expire: fresh histories and versions after fresh_ttl_s
    assert 0 < s.r.ttl(f"{prefix}fresh:u") <= s.fresh_ttl_s
    assert 0 < s.r.ttl(f"{prefix}ver:u") <= s.fresh_ttl_s


def test_a_stored_list_reads_back_as_it_was() -> None:
    e = CachedList(
        "v-1", 42, 1.5e9, np.array([3, 1, 2], np.int64), np.array([0.5, np.nan, -1.0]), False
    )
    back = _unpack(_pack(e))
    assert (back.model_version, back.fresh_version, back.at, back.complete) == (
        "v-1",
        42,
        1.5e9,
        False,
    )
    np.testing.assert_array_equal(back.items, e.items)
    np.testing.assert_array_equal(back.scores, e.scores)
    assert back.items.dtype == np.int64 and back.scores.dtype == np.float64


def test_a_reload_announced_by_one_is_followed_by_the_other(
    model: Model,
    tree_cache: Path,
    bundle_dir: Path,
    tmp_path: Path,
    redis_server: RedisServer,
    prefix: str,
) -> None:
    a = _service(model, redis_server.url, prefix, tree_cache)
    b = _service(model, redis_server.url, prefix, tree_cache, bundle_check_s=0.0)
    uid = model.user_ids[4]
    before = b.recommend(uid, k=10).items
    a.add_events([(uid, before[0][0], None)])
    _, new = a.reload(another_version(bundle_dir, tmp_path / "b2"))
    assert new != model.version
    b.sync()
    assert b._bg_reload is not None
    b._bg_reload.join(timeout=120)
    assert b.model.version == new == a.model.version
    # the fresh event survives the reload, and the old bundle's lists are not served
    rec = b.recommend(uid, k=10)
    assert before[0][0] not in [i for i, _ in rec.items] and rec.model_version == new
    # a server started after the announcement serves its own bundle
    assert RedisState(redis_server.url, prefix=prefix, bundle_check_s=0.0).bundle_target() is None


# -- Redis out of reach ----------------------------------------------------------------
def test_a_dead_redis_refuses_events_with_503_and_lists_still_serve(
    model: Model, tree_cache: Path, tmp_path: Path
) -> None:
    from fastapi.testclient import TestClient

    from serving.app import create_app
    from serving.settings import Settings

    server = RedisServer(tmp_path / "redis")
    try:
        svc = _service(model, server.url, "dead:", tree_cache, timeout_s=0.5)
        client = TestClient(create_app(svc, Settings()), raise_server_exceptions=False)
        uid, item = model.user_ids[6], model.item_ids[0]
        ok = client.post("/v1/events", json={"events": [{"user_id": uid, "item_id": item}]})
        assert ok.status_code == 200, ok.text
    finally:
        server.stop()
    r = client.post("/v1/events", json={"events": [{"user_id": uid, "item_id": item}]})
    assert r.status_code == 503, r.text
    assert "Redis" in r.json()["detail"] and r.headers.get("retry-after")
    with pytest.raises(StateWriteError):  # refused at once while Redis is known down
        svc.state.add([(uid, item, 1)])
    # reads degrade to the bundle alone: a list, not an error
    g = client.get(f"/v1/recommendations/{uid}", params={"k": 5})
    assert g.status_code == 200 and len(g.json()["items"]) == 5


def test_a_full_redis_takes_no_event_of_a_batch(redis_server: RedisServer, prefix: str) -> None:
    s = RedisState(redis_server.url, prefix=prefix)
    s.add([("u", "i0", 1)])
    v = s.version("u")
    s.r.config_set("maxmemory-policy", "noeviction")
    s.r.config_set("maxmemory", "1")
    try:
        with pytest.raises(StateWriteError, match="refused the events"):
            s.add([("u", "i1", 2), ("w", "i2", 3)])
    finally:
        s.r.config_set("maxmemory", "0")
    assert s.version("u") == v and s.version("w") == 0
    f = s.fresh("u")
    assert f is not None and f.items == ["i0"]


def test_no_server_is_a_clear_error_without_the_password() -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    with pytest.raises(RedisStateError) as e:
        RedisState(url, timeout_s=0.5)
    assert "127.0.0.1" in str(e.value) and "***" in str(e.value)
    assert "hunter2" not in str(e.value)


def test_serve_refuses_an_unreachable_redis_before_starting(bundle_dir: Path) -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    recsys = Path(sys.executable).parent / "recsys"
    r = subprocess.run(
        [recsys, "serve", "--bundle", str(bundle_dir), "--redis-url", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert "cannot use Redis at redis://:***@127.0.0.1" in r.stderr
    assert "hunter2" not in r.stderr + r.stdout


# -- two `recsys serve` processes ------------------------------------------------------
@pytest.mark.slow
def test_two_servers_sharing_redis(
    bundle_dir: Path, model: Model, tree_cache: Path, redis_server: RedisServer, tmp_path: Path
) -> None:
    """The issue's figure: an event posted to one server changes the list the other
    serves. The first server has two workers, so its refresher process ranks the
    event's list into Redis, and the other serves that list without a rank."""
    import httpx

    env = {
        **os.environ,
        "RECSYS_REDIS_URL": redis_server.url,
        "RECSYS_TREE_CACHE": str(tree_cache),
    }
    recsys = str(Path(sys.executable).parent / "recsys")
    procs: list[subprocess.Popen] = []
    bases = []
    try:
        for n in range(2):
            port = free_port()
            log = open(tmp_path / f"server{n}.log", "wb")  # noqa: SIM115 - the child's
            cmd = [recsys, "serve", "--bundle", str(bundle_dir), "--port", str(port)]
            workers = ["--workers", "2" if n == 0 else "1"]
            env_n = {**env, "RECSYS_REFRESHER_HANDOFF": "always"}
            procs.append(
                subprocess.Popen([*cmd, *workers], env=env_n, stdout=log, stderr=subprocess.STDOUT)
            )
            bases.append(f"http://127.0.0.1:{port}")
        for base, proc in zip(bases, procs, strict=True):
            wait_ready(base, proc)
        one, other = bases
        uid = model.user_ids[3]
        before = httpx.get(f"{other}/v1/recommendations/{uid}", params={"k": 10}).json()
        top = before["items"][0]["item_id"]
        r = httpx.post(f"{one}/v1/events", json={"events": [{"user_id": uid, "item_id": top}]})
        assert r.status_code == 200 and r.json() == {"accepted": 1}, r.text
        end = time.monotonic() + 60
        while list_refreshes(one).get("done", 0) < 1 and time.monotonic() < end:
            time.sleep(0.1)  # the first server's refresher ranks the list into Redis
        assert list_refreshes(one) == {"handed": 1.0, "done": 1.0}
        got = httpx.get(f"{other}/v1/recommendations/{uid}", params={"k": 10})
        assert "age" in got.headers  # a list ranked before the read: the refresher's
        after = got.json()
        assert after["items"] != before["items"]
        assert top not in [it["item_id"] for it in after["items"]]
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
