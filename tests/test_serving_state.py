"""Lists kept fresh off the read path, their time-to-live, lists seeded from a batch job,
and the state folder's events log: bounded, whole or not at all on a full disk."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys.service import Model, RecService, ServiceLimits, StorageError
from recsys.state import FileState


def _ids(rec) -> list:  # type: ignore[no-untyped-def]
    return [i for i, _ in rec.items]


def test_an_event_is_in_the_next_read_and_its_list_is_recomputed_off_the_read_path(
    model: Model,
) -> None:
    svc = RecService(model)
    uid = model.user_ids[2]
    before = svc.recommend(uid, k=10)
    assert before.age_s == 0.0  # ranked for this request
    svc.add_events([(uid, before.items[0][0], None)])
    # ranked on the write path: current when the events request returns, no waiting
    entry = svc.lists.get(str(uid))
    assert entry is not None and entry.fresh_version == svc.state.version(uid) > 0
    after = svc.recommend(uid, k=10)
    assert after.age_s > 0  # the refreshed list, not a rank on read
    assert before.items[0][0] not in _ids(after)


def test_an_events_request_ranks_a_bounded_number_of_its_users(
    model: Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first `refresh_inline_users` users of a request are ranked before it returns,
    the others in the background; a rank that fails does not fail the request."""
    svc = RecService(model, limits=ServiceLimits(refresh_inline_users=1))
    assert svc.refresher is not None
    threads: dict[object, str] = {}
    failing = {model.user_ids[3]}
    rank_user = svc._rank_user

    def rank(m: Model, key: object, u: int) -> object:
        threads[key] = threading.current_thread().name
        if key in failing:
            raise RuntimeError("no list for you")
        return rank_user(m, key, u)

    monkeypatch.setattr(svc, "_rank_user", rank)
    a, b = model.user_ids[1], model.user_ids[2]
    svc.add_events([(a, model.item_ids[4], None), (b, model.item_ids[5], None)])
    assert threads.get(a) == threading.current_thread().name
    assert svc.refresher.wait_idle(60) and threads[b] == "list-refresher"
    for key in (a, b):
        e = svc.lists.get(str(key))
        assert e is not None and e.fresh_version == svc.state.version(key) > 0
    bad = model.user_ids[3]
    assert svc.add_events([(bad, model.item_ids[4], None)]) == 1
    assert svc.state.version(bad) > 0 and svc.refresher.outcomes["failed"] == 1
    failing.clear()
    assert svc.recommend(bad, k=5).age_s == 0.0  # no list was kept: ranked on read


def test_refreshed_list_equals_a_synchronous_rank(model: Model) -> None:
    uid = model.user_ids[4]
    item = model.item_ids[7]
    bg = RecService(model)
    bg.recommend(uid, k=10)
    bg.add_events([(uid, item, 1_700_000_000)])
    assert bg.refresher is not None and bg.refresher.wait_idle(60)
    sync = RecService(model, limits=ServiceLimits(refresh=False))
    sync.add_events([(uid, item, 1_700_000_000)])
    assert bg.recommend(uid, k=10).items == sync.recommend(uid, k=10).items


def test_a_list_older_than_its_ttl_is_ranked_again(model: Model) -> None:
    svc = RecService(model, limits=ServiceLimits(list_ttl_s=100, refresh=False))
    uid = model.user_ids[1]
    svc.recommend(uid, k=5)
    e = svc.lists.get(str(uid))
    assert e is not None
    assert svc.recommend(uid, k=5).age_s > 0  # served from the cache
    e.at -= 101  # as if ranked 101 s ago
    assert svc.recommend(uid, k=5).age_s == 0.0  # expired: ranked again
    assert svc.lists.get(str(uid)).at > e.at  # type: ignore[union-attr]


def test_a_list_in_the_last_quarter_of_its_ttl_is_refreshed_in_the_background(
    model: Model,
) -> None:
    svc = RecService(model, limits=ServiceLimits(list_ttl_s=100))
    uid = model.user_ids[1]
    svc.recommend(uid, k=5)
    e = svc.lists.get(str(uid))
    assert e is not None
    e.at -= 80
    old_at = e.at
    assert svc.recommend(uid, k=5).age_s >= 80  # served now: still within its TTL
    assert svc.refresher is not None and svc.refresher.wait_idle(60)
    assert svc.lists.get(str(uid)).at > old_at + 79  # type: ignore[union-attr]


# -- lists seeded from a batch job -------------------------------------------------------
def _batch_lists(model: Model, users: list, k: int, out: Path) -> Path:  # type: ignore[type-arg]
    svc = RecService(model, cache=False)
    rows = []
    for u in users:
        for r, (i, s) in enumerate(svc.recommend(u, k=k).items, 1):
            rows.append({"user_id": u, "item_id": i, "rank": r, "score": s})
    pl.DataFrame(rows).write_parquet(out)
    return out


def test_lists_seeded_from_a_batch_file_are_served_until_an_event(
    model: Model, tmp_path: Path
) -> None:
    users = model.user_ids[:5]
    path = _batch_lists(model, users, 5, tmp_path / "recs.parquet")
    # a seed file whose scores differ from a fresh rank tells a seeded list apart
    df = pl.read_parquet(path).with_columns(pl.col("score") + 1000.0)
    df.write_parquet(path)
    svc = RecService(model, seed_lists=path, limits=ServiceLimits(refresh=False))
    assert len(svc.lists) == 5
    rec = svc.recommend(users[0], k=5)
    assert rec.age_s >= 0 and all(s is not None and s > 900 for _, s in rec.items)
    assert svc.recommend(users[0], k=3).items == rec.items[:3]
    # a longer list than the file holds is ranked
    longer = svc.recommend(users[0], k=8)
    assert len(longer.items) == 8 and all(s is not None and s < 900 for _, s in longer.items)
    # an event replaces the seeded list
    svc.add_events([(users[1], model.item_ids[3], None)])
    assert all(s is None or s < 900 for _, s in svc.recommend(users[1], k=5).items)


def test_seed_file_with_unknown_items_or_columns_is_refused(
    model: Model, bundle_dir: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.parquet"
    pl.DataFrame({"user_id": [1], "item_id": [10**9], "rank": [1], "score": [0.5]}).write_parquet(
        bad
    )
    cols = tmp_path / "cols.parquet"
    pl.DataFrame({"user": [1], "item_id": [1]}).write_parquet(cols)
    from recsys.service import ServiceError

    with pytest.raises(ServiceError, match="items the bundle does not know"):
        RecService(model, seed_lists=bad)
    recsys = Path(sys.executable).parent / "recsys"
    for f, msg in ((bad, "does not know"), (cols, "missing column")):
        r = subprocess.run(
            [recsys, "serve", "--bundle", str(bundle_dir), "--lists", str(f), "--port", "0"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 2, r.stderr
        assert msg in r.stderr and "Traceback" not in r.stderr


# -- the state folder's events log ---------------------------------------------------------
def test_an_event_costs_one_rank_whichever_worker_reads(
    model: Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers on one state folder: the one that took an event ranks the user in
    the background; the other serves that list rather than ranking again, but never a
    list ranked from other events than its own."""
    a = RecService(model, state_dir=tmp_path / "s")
    b = RecService(model, limits=ServiceLimits(refresh=False), state_dir=tmp_path / "s")
    ranked: list[object] = []
    rank_user = b._rank_user
    monkeypatch.setattr(b, "_rank_user", lambda *x: ranked.append(x[1]) or rank_user(*x))
    uid, item = model.user_ids[3], model.item_ids[5]
    b.recommend(uid, k=10)
    assert ranked == [uid]  # b's own list, before any event
    a.add_events([(uid, item, 1_700_000_000)])
    assert a.refresher is not None and a.refresher.wait_idle(60)
    got = b.recommend(uid, k=10)
    assert ranked == [uid] and got.age_s > 0  # a's list, not a rank of b's
    alone = RecService(model, limits=ServiceLimits(refresh=False))
    alone.add_events([(uid, item, 1_700_000_000)])
    assert got.items == alone.recommend(uid, k=10).items
    # an event a has not ranked for: a's list no longer matches b's events
    b.add_events([(uid, model.item_ids[6], 1_700_000_100)])
    got = b.recommend(uid, k=10)
    assert ranked == [uid, uid] and got.age_s == 0.0
    alone.add_events([(uid, model.item_ids[6], 1_700_000_100)])
    assert got.items == alone.recommend(uid, k=10).items


def test_the_refresher_process_ranks_an_events_users_and_workers_serve_its_list(
    model: Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker hands an events request's users to the refresher and answers without a
    rank; the refresher ranks them from the shared events, and the worker serves that
    list, the one it would have ranked. With no refresher listening (starting, dead)
    the worker ranks them inside the request, as before."""
    from serving.refresher import RefreshClient, serve_refresh

    state = tmp_path / "s"
    worker = RecService(model, state_dir=state)
    refresher = RecService(model, limits=ServiceLimits(refresh=False), state_dir=state)
    sock = tmp_path / "refresh.sock"
    worker.handoff = RefreshClient(sock, always=True).send
    ranked: list[object] = []
    rank_user = worker._rank_user
    monkeypatch.setattr(worker, "_rank_user", lambda *x: ranked.append(x[1]) or rank_user(*x))
    done: list[str] = []
    stop, bound = threading.Event(), threading.Event()
    loop = threading.Thread(
        target=serve_refresh, args=(refresher, sock, stop, bound.set, done.append), daemon=True
    )
    loop.start()
    assert bound.wait(30)
    uid, item = model.user_ids[3], model.item_ids[5]
    alone = RecService(model, limits=ServiceLimits(refresh=False))
    worker.add_events([(uid, item, 1_700_000_000)])
    alone.add_events([(uid, item, 1_700_000_000)])
    assert worker.refresher is not None and worker.refresher.outcomes["handed"] == 1
    assert ranked == []  # answered without a rank
    end = time.monotonic() + 60
    while not done and time.monotonic() < end:
        time.sleep(0.01)
    assert done == ["done"]
    got = worker.recommend(uid, k=10)
    assert ranked == [] and got.age_s > 0  # the refresher's list, not a rank of its own
    assert got.items == alone.recommend(uid, k=10).items
    stop.set()
    loop.join(10)
    assert not loop.is_alive() and not sock.exists()  # the refresher's socket goes with it
    # a refresher whose server is gone (another parent) ends by itself
    orphan = threading.Thread(target=serve_refresh, args=(refresher, sock),
                              kwargs={"parent": os.getppid() + 1}, daemon=True)  # fmt: skip
    orphan.start()
    orphan.join(30)
    assert not orphan.is_alive() and not sock.exists()
    worker.add_events([(uid, model.item_ids[6], 1_700_000_100)])
    assert ranked == [uid] and worker.refresher.outcomes["handed"] == 1  # ranked inline
    alone.add_events([(uid, model.item_ids[6], 1_700_000_100)])
    assert worker.recommend(uid, k=10).items == alone.recommend(uid, k=10).items


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract names: Linux")
def test_a_run_folder_too_deep_for_a_socket_path_gets_an_abstract_name(tmp_path: Path) -> None:
    """AF_UNIX paths hold about 100 bytes; a deep TMPDIR (a test's, a container's) put
    the refresher's socket past that, and it could not bind. Such a run gets a name in
    Linux's abstract namespace, which leaves no file."""
    from serving.refresher import RefreshClient, serve_refresh, socket_address

    short = tmp_path.parent / "r"
    assert socket_address(short) == str(short / "refresh.sock")
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    address = socket_address(deep)
    assert address is not None and address.startswith("@") and deep.name in address

    class Service:  # what the loop calls: sync, then each user's rank
        def __init__(self) -> None:
            self.ranked: list[object] = []

        def sync(self) -> None:
            pass

        def refresh_user(self, user: object, asked: float) -> bool:
            self.ranked.append(user)
            return True

    svc = Service()
    stop, bound = threading.Event(), threading.Event()
    loop = threading.Thread(target=serve_refresh, args=(svc, address, stop, bound.set),
                            daemon=True)  # fmt: skip
    loop.start()
    assert bound.wait(10)
    assert RefreshClient(address, always=True).send(["u1", 7])
    end = time.monotonic() + 10
    while len(svc.ranked) < 2 and time.monotonic() < end:
        time.sleep(0.01)
    assert svc.ranked == ["u1", 7]
    stop.set()
    loop.join(5)
    assert not loop.is_alive() and not list(tmp_path.iterdir())


def test_users_are_handed_to_the_refresher_only_while_a_core_is_idle(tmp_path: Path) -> None:
    """/proc/loadavg's fourth field counts the tasks runnable now, the caller included:
    fewer than the cores means one is idle. Unreadable: no hand-over (rank inline). A
    request's ids that do not fit one message are not handed over either."""
    from serving.refresher import MAX_MESSAGE, RefreshClient, idle_core

    f = tmp_path / "loadavg"
    f.write_text("0.52 0.58 0.59 1/467 12345\n")
    assert idle_core(2, f)
    f.write_text("2.52 2.58 2.59 2/467 12345\n")
    assert not idle_core(2, f) and idle_core(3, f)
    f.write_text("garbage\n")
    assert not idle_core(64, f)
    assert not idle_core(64, tmp_path / "none")
    import socket

    sock = tmp_path / "r.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(sock))
        client = RefreshClient(sock, always=True)
        assert client.send(["u1", 2])
        assert json.loads(server.recv(65536))["u"] == ["u1", 2]
        assert not client.send(["x" * 200] * (MAX_MESSAGE // 200))
    assert not client.send(["u1"])  # nobody listening


def test_in_a_container_idle_cores_come_from_its_cgroup_cpu_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A container's /proc/loadavg counts the host's tasks; its cgroup's CPU time
    counts its own. With a quota of 2 CPUs, a window in which the container used 1.2
    CPUs leaves one idle; 1.8 does not. The counter is the quota's cgroup's (v2
    `cpu.stat`, v1 `cpuacct.usage` in its own hierarchy), and the worker reads it
    whenever its CPUs are fewer than the machine's."""
    from recsys.resources import cpu_time_reader
    from serving import refresher
    from serving.refresher import CgroupIdle, RefreshClient

    root, proc = tmp_path / "cgroup", tmp_path / "proc_cgroup"
    pod = root / "kubepods" / "pod1"
    (pod / "ctr").mkdir(parents=True)
    proc.write_text("0::/kubepods/pod1/ctr\n")
    (pod / "cpu.max").write_text("200000 100000\n")  # the pod's limit: 2 CPUs
    (pod / "ctr" / "cpu.stat").write_text("usage_usec 1\n")  # not the quota's cgroup
    (pod / "cpu.stat").write_text("usage_usec 5000000\nuser_usec 4000000\n")
    read = cpu_time_reader(root, proc)
    assert read is not None and read() == 5.0
    now = [100.0]
    idle = CgroupIdle(2, read, clock=lambda: now[0])
    for used, expected in [(1.2, True), (1.8, False), (0.0, True)]:
        t0 = read()
        now[0] += 0.5
        (pod / "cpu.stat").write_text(f"usage_usec {round((t0 + used * 0.5) * 1e6)}\n")
        assert idle() is expected, used
        assert idle.busy == pytest.approx(used)
    (pod / "cpu.stat").write_text("usage_usec 99999999\n")
    now[0] += 0.001  # within the minimum window: the last answer
    assert idle() is True
    (pod / "cpu.stat").unlink()  # unreadable: no hand-over
    now[0] += 1
    assert idle() is False

    # v1 with cpu and cpuacct mounted apart, as on many hosts
    proc.write_text("4:cpu:/docker/abc\n3:cpuacct:/docker/abc\n0::/\n")
    (root / "cpu" / "docker" / "abc").mkdir(parents=True)
    (root / "cpu" / "docker" / "abc" / "cpu.cfs_quota_us").write_text("100000\n")
    (root / "cpu" / "docker" / "abc" / "cpu.cfs_period_us").write_text("100000\n")
    (root / "cpuacct" / "docker" / "abc").mkdir(parents=True)
    (root / "cpuacct" / "docker" / "abc" / "cpuacct.usage").write_text("2500000000\n")
    (root / "cpuacct" / "docker" / "cpuacct.usage").write_text("9900000000\n")
    read = cpu_time_reader(root, proc)
    assert read is not None and read() == 2.5
    assert cpu_time_reader(root, tmp_path / "missing") is None

    # the worker's choice: the cgroup where its CPUs are fewer than the machine's
    monkeypatch.setattr(refresher, "cpu_time_reader", lambda: cpu_time_reader(root, proc))
    for usable, cores, cgroup in [(2, 64, True), (2, 2, False)]:
        monkeypatch.setattr(refresher, "usable_cpus", lambda u=usable: u)
        monkeypatch.setattr(refresher.os, "cpu_count", lambda c=cores: c)
        assert isinstance(RefreshClient(tmp_path / "r.sock").idle, CgroupIdle) is cgroup


def test_a_refresh_skips_a_list_ranked_since_it_was_asked(
    model: Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hot user's next read often comes before the background refresh of their
    event: the read ranks them (it may not serve the old list), and the refresh then
    has nothing to do, unless the list is older than the ask (time-to-live)."""
    svc = RecService(model, limits=ServiceLimits(refresh=False))
    ranks: list[object] = []
    rank_user = svc._rank_user
    monkeypatch.setattr(svc, "_rank_user", lambda *x: ranks.append(x[1]) or rank_user(*x))
    uid = model.user_ids[6]
    asked = time.time()
    svc.add_events([(uid, model.item_ids[3], None)])
    svc.recommend(uid, k=10)  # the read ranks: its list includes the event
    assert ranks == [uid]
    assert svc._refresh(uid, asked) is False and ranks == [uid]
    assert svc._refresh(uid, time.time() + 1) is True and ranks == [uid, uid]


def test_compaction_prunes_the_shared_lists_of_users_it_drops(tmp_path: Path) -> None:
    from recsys.state import CachedList, list_file_name

    st = FileState(tmp_path / "s", max_events_per_user=2, max_fresh_users=3, compact_bytes=600)
    lists = st.lists(100)
    users = [f"u{j}" for j in range(6)]
    for j, u in enumerate(users):
        st.add([(u, "item", 1_700_000_000 + j)])
        e = CachedList("v", st.version(u), 0.0, np.arange(3), np.zeros(3))
        lists.put(u, e, st.fresh(u))
    assert len(list(st.lists_dir.iterdir())) == 6
    for j in range(20):  # past compact_bytes: the log keeps the last three users
        st.add([(users[-1], "item", 1_700_000_100 + j)])
    kept = {list_file_name(u) for u in st.fresh_events.users()}
    assert len(kept) == 3
    assert {p.name for p in st.lists_dir.iterdir()} == kept


def test_events_log_is_compacted_and_workers_keep_the_fresh_events(
    model: Model, tmp_path: Path
) -> None:
    lim = ServiceLimits(max_events_per_user=3, compact_bytes=4096, refresh=False)
    a = RecService(model, limits=lim, state_dir=tmp_path / "s")
    b = RecService(model, limits=lim, state_dir=tmp_path / "s")
    uid = model.user_ids[0]
    items = model.item_ids[:20]
    for i in range(200):  # far more than the log may keep
        a.add_events([(uid, items[i % 20], 1_700_000_000 + i), (f"new{i % 7}", items[0], None)])
    log = tmp_path / "s" / "events.jsonl"
    assert log.stat().st_size <= 4096 + 200
    # 400 events were taken; the log keeps what was appended since its last compaction
    # beside three events for each of the eight users
    assert len(log.read_text().splitlines()) < 4096 // 40
    b.sync()
    fa, fb = a.state.fresh(uid), b.state.fresh(uid)
    assert fa is not None and fb is not None
    assert fb.items == fa.items == [items[197 % 20], items[198 % 20], items[199 % 20]]
    assert b.recommend(uid, k=10).items == a.recommend(uid, k=10).items


def test_a_full_disk_refuses_events_and_leaves_the_log_whole(
    model: Model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = RecService(model, state_dir=tmp_path / "s", limits=ServiceLimits(refresh=False))
    uid = model.user_ids[0]
    svc.add_events([(uid, model.item_ids[1], 1_700_000_000)])
    log = tmp_path / "s" / "events.jsonl"
    before = log.read_bytes()
    real_write = os.write

    def half_then_full(fd: int, data: bytes) -> int:  # the disk fills mid-write
        if len(data) > 20:
            return real_write(fd, data[:20])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(StorageError, match="disk is full"):
        svc.add_events([(uid, model.item_ids[2], None), ("someone", model.item_ids[3], None)])
    monkeypatch.undo()
    assert log.read_bytes() == before  # no torn line
    fresh = svc.state.fresh(uid)
    assert fresh is not None and fresh.items == [model.item_ids[1]]
    svc.add_events([(uid, model.item_ids[4], 1_700_000_001)])  # the next one is whole
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["i"] for r in rows] == [model.item_ids[1], model.item_ids[4]]


def test_a_failed_compaction_keeps_the_old_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    st = FileState(tmp_path / "s", max_events_per_user=2, compact_bytes=10**9)
    st.add([("u", 1, 1), ("u", 2, 2), ("u", 3, 3)])
    log = tmp_path / "s" / "events.jsonl"
    before = log.read_bytes()

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)  # the compacted copy cannot be made durable
    with st._locked():
        st._compact_locked()
    monkeypatch.undo()
    assert log.read_bytes() == before
    assert not [p for p in (tmp_path / "s").iterdir() if p.name.endswith(".tmp")]
    fresh = st.fresh("u")
    assert fresh is not None and fresh.items == [2, 3]
    st.compact_bytes = 1  # and the next append compacts
    st.add([("u", 4, 4)])
    assert [json.loads(x)["i"] for x in log.read_text().splitlines()] == [3, 4]


def test_cached_lists_say_their_age_and_metrics_count_refreshes(model: Model) -> None:
    from fastapi.testclient import TestClient

    from serving.app import create_app

    svc = RecService(model)
    c = TestClient(create_app(svc), raise_server_exceptions=False)
    uid = model.user_ids[5]
    first = c.get(f"/v1/recommendations/{uid}")
    assert first.status_code == 200 and "age" not in first.headers
    svc.lists.get(str(uid)).at -= 30  # type: ignore[union-attr]
    again = c.get(f"/v1/recommendations/{uid}")
    assert again.json() == first.json() and int(again.headers["age"]) >= 30
    r = c.post("/v1/events", json={"events": [{"user_id": uid, "item_id": model.item_ids[9]}]})
    assert r.status_code == 200
    assert svc.refresher is not None and svc.refresher.wait_idle(60)
    text = c.get("/metrics").text
    assert 'recsys_list_refreshes_total{outcome="done"} 1.0' in text
    assert 'recsys_list_age_seconds_bucket{le="60.0"} 2.0' in text


def test_prefilled_lists_are_all_there_once_ready(bundle_dir: Path, tree_cache: Path) -> None:
    import threading

    svc = RecService(None, tree_cache=tree_cache, limits=ServiceLimits(prefill=True))
    seen: list[int] = []

    def watch() -> None:
        while not svc.ready:
            pass
        seen.append(len(svc.lists))

    t = threading.Thread(target=watch)
    t.start()
    svc.start(bundle_dir)
    t.join(60)
    n_users = int((np.diff(svc.model.ranker._hist_ptr) > 0).sum())
    assert seen == [n_users]


def test_a_reload_of_the_same_bundle_keeps_the_cached_lists(model: Model, bundle_dir: Path) -> None:
    svc = RecService(model, tree_cache=None)
    uid = model.user_ids[6]
    first = svc.recommend(uid, k=5)
    svc.lists.get(str(uid)).at -= 5  # type: ignore[union-attr]
    old, new = svc.reload(bundle_dir)
    assert old == new
    again = svc.recommend(uid, k=5)
    assert again.age_s >= 5 and again.items == first.items


def test_lists_from_recommend_carry_the_bundle_version_and_another_bundle_refuses_them(
    model: Model, bundle_dir: Path, tmp_path: Path
) -> None:
    from conftest import another_version

    from recsys.batch import recommend_file
    from recsys.bundle import lists_version
    from recsys.service import ServiceError

    users = tmp_path / "users.parquet"
    pl.DataFrame({"user_id": model.user_ids[:30]}).write_parquet(users)
    out = tmp_path / "recs.parquet"
    recommend_file(bundle_dir, users, out, k=5)
    assert lists_version(out) == model.version
    svc = RecService(model, seed_lists=out, limits=ServiceLimits(refresh=False))
    assert len(svc.lists) == 30
    other = another_version(bundle_dir, tmp_path / "other")
    other_model = Model.load(other, None)
    with pytest.raises(ServiceError, match="lists of bundle"):
        RecService(other_model, seed_lists=out)
    recsys = Path(sys.executable).parent / "recsys"
    r = subprocess.run(
        [recsys, "serve", "--bundle", str(other), "--lists", str(out), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "rerun recommend with this bundle" in r.stderr, r.stderr
