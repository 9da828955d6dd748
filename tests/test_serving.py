"""The HTTP endpoint: every route, every bad-input case, fresh events, safe reloads."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

import httpx
import pytest
from conftest import another_version, free_port, list_refreshes, wait_ready
from fastapi.testclient import TestClient

from recsys.service import Model, RecService
from serving.app import create_app
from serving.settings import Settings

TOKEN = "s3cret"


@pytest.fixture()
def service(model: Model, tree_cache: Path) -> RecService:
    return RecService(model, tree_cache=tree_cache)


@pytest.fixture()
def client(service: RecService) -> TestClient:
    settings = Settings(admin_token=TOKEN, max_body_bytes=20_000)
    return TestClient(create_app(service, settings), raise_server_exceptions=False)


def _a_user(model: Model) -> str:
    return str(model.user_ids[0])


def _an_item(model: Model) -> str:
    return str(model.item_ids[0])


# -- the happy paths ------------------------------------------------------------------
def test_get_recommendations_for_a_known_user(client: TestClient, model: Model) -> None:
    uid = _a_user(model)
    r = client.get(f"/v1/recommendations/{uid}", params={"k": 7})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["user_id"] == model.user_ids[0]
    assert body["model_version"] == model.version
    assert body["fallback"] is None
    assert len(body["items"]) == 7
    scores = [it["score"] for it in body["items"]]
    assert scores == sorted(scores, reverse=True)
    seen = set(model.ranker.user_state(0).items.tolist())
    assert not {model.item_index(it["item_id"]) for it in body["items"]} & seen


def test_unknown_user_gets_a_marked_popular_list(client: TestClient, model: Model) -> None:
    r = client.get("/v1/recommendations/nobody-at-all", params={"k": 5})
    assert r.status_code == 200
    body = r.json()
    assert body["fallback"] == "popular"
    assert [it["item_id"] for it in body["items"]] == [
        model.item_ids[j] for j in model.fallback[:5]
    ]


def test_post_with_history_only_ranks_from_that_history(client: TestClient, model: Model) -> None:
    hist = [model.item_ids[j] for j in (3, 5, 8)]
    r = client.post("/v1/recommendations", json={"history": hist, "k": 10})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["fallback"] == "history"
    got = [it["item_id"] for it in body["items"]]
    assert len(got) == 10 and not set(got) & set(hist)
    assert all(it["score"] is not None for it in body["items"])


def test_post_with_user_and_exclude(client: TestClient, model: Model) -> None:
    uid = model.user_ids[1]
    first = client.post("/v1/recommendations", json={"user_id": uid, "k": 5}).json()
    drop = [it["item_id"] for it in first["items"][:2]]
    r = client.post("/v1/recommendations", json={"user_id": uid, "k": 5, "exclude": drop})
    assert r.status_code == 200
    got = [it["item_id"] for it in r.json()["items"]]
    assert len(got) == 5 and not set(got) & set(drop)
    assert got[:3] == [it["item_id"] for it in first["items"][2:]]


def test_large_k_is_filled_with_unscored_items(client: TestClient, model: Model) -> None:
    r = client.get(f"/v1/recommendations/{_a_user(model)}", params={"k": 1000})
    assert r.status_code == 200
    items = r.json()["items"]
    n_seen = len(set(model.ranker.user_state(0).items.tolist()))
    assert len(items) == min(1000, len(model.item_ids) - n_seen)
    assert len({it["item_id"] for it in items}) == len(items)


def test_fresh_event_changes_the_next_list(client: TestClient, model: Model) -> None:
    uid = model.user_ids[2]
    before = client.get(f"/v1/recommendations/{uid}").json()["items"]
    top = before[0]["item_id"]
    r = client.post("/v1/events", json={"events": [{"user_id": uid, "item_id": top}]})
    assert r.status_code == 200 and r.json() == {"accepted": 1}
    after = client.get(f"/v1/recommendations/{uid}").json()["items"]
    assert after != before
    assert top not in [it["item_id"] for it in after]  # now seen


def test_fresh_events_for_a_new_user_make_a_ranked_list(client: TestClient, model: Model) -> None:
    events = [{"user_id": "newcomer", "item_id": model.item_ids[j]} for j in (1, 2, 4)]
    assert client.post("/v1/events", json={"events": events}).status_code == 200
    body = client.get("/v1/recommendations/newcomer").json()
    assert body["fallback"] is None
    assert all(it["score"] is not None for it in body["items"])


def test_fresh_events_are_bounded_per_user(model: Model, tree_cache: Path) -> None:
    from recsys.service import ServiceLimits

    svc = RecService(model, limits=ServiceLimits(max_events_per_user=3, max_fresh_users=2))
    svc.add_events([("a", model.item_ids[j], None) for j in range(10)])
    fresh = svc.state.fresh("a")
    assert fresh is not None and len(fresh.items) == 3
    svc.add_events([("b", model.item_ids[0], None), ("c", model.item_ids[0], None)])
    assert svc.state.fresh_events.users() == ["b", "c"]


def test_similar_items(client: TestClient, model: Model) -> None:
    r = client.get(f"/v1/items/{_an_item(model)}/similar", params={"k": 4})
    assert r.status_code == 200
    body = r.json()
    assert len(body["items"]) <= 4
    assert body["item_id"] == model.item_ids[0]
    assert model.item_ids[0] not in [it["item_id"] for it in body["items"]]


def test_health_ready_docs_metrics(client: TestClient, model: Model) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["model_version"] == model.version
    assert client.get("/docs").status_code == 200
    assert "/v1/recommendations/{user_id}" in client.get("/openapi.json").json()["paths"]
    client.get(f"/v1/recommendations/{_a_user(model)}")
    client.get("/v1/recommendations/x", params={"k": 0})
    text = client.get("/metrics").text
    assert 'recsys_http_requests_total{endpoint="/v1/recommendations/{user_id}"' in text
    assert "recsys_http_request_duration_seconds_bucket" in text
    assert 'recsys_http_errors_total{endpoint="/v1/recommendations/{user_id}",status="422"}' in text
    assert f'recsys_bundle_info{{version="{model.version}"}} 1.0' in text


def test_not_ready_until_loaded(tree_cache: Path) -> None:
    c = TestClient(create_app(RecService(None)), raise_server_exceptions=False)
    assert c.get("/healthz").status_code == 200
    assert c.get("/readyz").status_code == 503
    assert c.get("/v1/recommendations/u").status_code == 503


# -- bad input: a 4xx with a message, never a 5xx ----------------------------------------
BAD_GETS = [
    ("/v1/recommendations/u1", {"k": 0}),
    ("/v1/recommendations/u1", {"k": 1001}),
    ("/v1/recommendations/u1", {"k": "ten"}),
    ("/v1/recommendations/" + "x" * 300, {}),
    ("/v1/items/" + "x" * 300 + "/similar", {}),
    ("/v1/items/no-such-item/similar", {}),
    ("/v1/items/1/similar", {"k": -1}),
    ("/no/such/route", {}),
]


@pytest.mark.parametrize(("path", "params"), BAD_GETS)
def test_bad_gets_are_4xx_with_a_message(client: TestClient, path: str, params: dict) -> None:
    r = client.get(path, params=params)
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["detail"]


def _bad_posts(model: Model) -> list[tuple[str, object]]:
    item = model.item_ids[0]
    return [
        ("/v1/recommendations", {}),
        ("/v1/recommendations", {"history": []}),
        ("/v1/recommendations", {"user_id": "u", "k": 0}),
        ("/v1/recommendations", {"user_id": "u", "k": 5000}),
        ("/v1/recommendations", {"user_id": "x" * 300}),
        ("/v1/recommendations", {"history": ["no-such-item"]}),
        ("/v1/recommendations", {"history": [item, 1.5]}),
        ("/v1/recommendations", {"user_id": "u", "exclude": ["no-such-item"]}),
        ("/v1/recommendations", {"user_id": "u", "surprise": 1}),
        ("/v1/recommendations", {"history": [item] * 1001}),
        ("/v1/recommendations", [1, 2]),
        ("/v1/recommendations", {"user_id": 2**70}),
        ("/v1/events", {}),
        ("/v1/events", {"events": []}),
        ("/v1/events", {"events": [{"user_id": "u"}]}),
        ("/v1/events", {"events": [{"user_id": "u", "item_id": "no-such-item"}]}),
        ("/v1/events", {"events": [{"user_id": "u", "item_id": item, "timestamp": "when?"}]}),
        ("/admin/reload", {"bundle": "/nowhere"}),
    ]


def test_bad_posts_are_4xx_with_a_message(client: TestClient, model: Model) -> None:
    for path, body in _bad_posts(model):
        r = client.post(path, json=body)
        assert 400 <= r.status_code < 500, (path, body, r.status_code, r.text)
        assert r.json()["detail"], (path, body)


def test_malformed_json_and_oversized_bodies(client: TestClient) -> None:
    r = client.post(
        "/v1/recommendations", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 422 and r.json()["detail"]
    r = client.post(
        "/v1/recommendations", content=b"\xff\xfe", headers={"content-type": "application/json"}
    )
    assert 400 <= r.status_code < 500
    big = json.dumps({"history": ["x" * 100] * 300}).encode()
    r = client.post(
        "/v1/recommendations", content=big, headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and "larger than" in r.json()["detail"]

    def chunks():  # no content-length: counted while read
        for _ in range(30):
            yield b" " * 1000

    r = client.post("/v1/events", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


# -- reloads ----------------------------------------------------------------------------
def test_reload_needs_a_configured_token(service: RecService, model: Model) -> None:
    c = TestClient(create_app(service, Settings(admin_token=None)))
    assert c.post("/admin/reload").status_code == 403
    c = TestClient(create_app(service, Settings(admin_token=TOKEN)))
    assert c.post("/admin/reload").status_code == 401
    assert c.post("/admin/reload", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_reload_swaps_to_a_good_bundle(
    client: TestClient, bundle_dir: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "b2"
    shutil.copytree(bundle_dir, copy)
    r = client.post(
        "/admin/reload", json={"bundle": str(copy)}, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert r.status_code == 200, r.text
    assert client.get("/readyz").json()["model_version"] == r.json()["model_version"]


def test_tampered_bundle_is_refused_while_requests_keep_succeeding(
    client: TestClient, model: Model, bundle_dir: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "tampered"
    shutil.copytree(bundle_dir, bad)
    with open(bad / "history.parquet", "ab") as f:
        f.write(b"\x00")
    statuses: list[int] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            statuses.append(client.get(f"/v1/recommendations/{_a_user(model)}").status_code)

    t = threading.Thread(target=hammer)
    t.start()
    try:
        r = client.post(
            "/admin/reload", json={"bundle": str(bad)}, headers={"Authorization": f"Bearer {TOKEN}"}
        )
    finally:
        stop.set()
        t.join()
    assert r.status_code == 409
    assert "history.parquet" in r.json()["detail"]
    assert statuses and set(statuses) == {200}
    assert client.get("/readyz").json()["model_version"] == model.version


def test_bundle_failing_warm_up_is_refused(
    service: RecService, model: Model, monkeypatch: pytest.MonkeyPatch, bundle_dir: Path
) -> None:
    def broken(self: Model, n_users: int = 8) -> None:
        raise ValueError("compiled trees differ from LightGBM")

    monkeypatch.setattr(Model, "warm", broken)
    with pytest.raises(ValueError):
        service.reload(bundle_dir)
    assert service.model is model


def test_workers_share_fresh_events_and_reloads(
    model: Model, tree_cache: Path, bundle_dir: Path, tmp_path: Path
) -> None:
    """Two services over one state directory stand for two worker processes."""
    a = RecService(model, state_dir=tmp_path / "state", tree_cache=tree_cache)
    b = RecService(model, state_dir=tmp_path / "state", tree_cache=tree_cache)
    uid = model.user_ids[3]
    before = b.recommend(uid, k=10).items
    a.add_events([(uid, before[0][0], None)])
    after = b.recommend(uid, k=10).items
    assert after != before and before[0][0] not in [i for i, _ in after]
    _, new = a.reload(another_version(bundle_dir, tmp_path / "b2"))
    assert new != model.version
    b.sync()
    assert b._bg_reload is not None
    b._bg_reload.join(timeout=120)
    assert b.model.version == new == a.model.version
    # the fresh event survives the reload
    assert before[0][0] not in [i for i, _ in b.recommend(uid, k=10).items]


def test_serve_refuses_a_tampered_bundle_before_starting(bundle_dir: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    bad = tmp_path / "tampered"
    shutil.copytree(bundle_dir, bad)
    with open(bad / "items.parquet", "ab") as f:
        f.write(b"\x00")
    r = subprocess.run(
        [Path(sys.executable).parent / "recsys", "serve", "--bundle", str(bad), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert "items.parquet" in r.stderr


def test_server_service_freezes_the_loaded_bundle_out_of_the_collector(
    bundle_dir: Path, tree_cache: Path, tmp_path: Path
) -> None:
    """With `freeze_gc` (what `recsys serve` uses) the objects alive after a load are
    frozen, so full collections do not walk them during requests; a reload unfreezes,
    lets the replaced bundle be collected, and freezes the new state."""
    import gc
    import weakref

    gc.unfreeze()
    svc = RecService(None, tree_cache=tree_cache, freeze_gc=True)
    try:
        svc.start(bundle_dir)
        frozen = gc.get_freeze_count()
        assert frozen > 1000
        m = svc.model
        m.cycle = [m]  # type: ignore[attr-defined]  # only the collector frees a cycle
        old = weakref.ref(m)
        del m
        copy = tmp_path / "b2"
        shutil.copytree(bundle_dir, copy)
        svc.reload(copy)
        assert old() is None  # the replaced bundle did not stay frozen
        assert gc.get_freeze_count() > 1000
        assert svc.recommend(str(svc.model.user_ids[0]), k=5).items
    finally:
        gc.unfreeze()
    plain = RecService(None, tree_cache=tree_cache)
    plain.start(bundle_dir)
    assert gc.get_freeze_count() == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT spreads on Linux")
def test_each_worker_listens_on_its_own_socket_and_a_taken_port_is_refused(
    bundle_dir: Path, tmp_path: Path, model: Model, short_tmp: Path
) -> None:
    """uvicorn's one shared socket lets the first worker to wake take a burst of
    connections (16 of 16 in a load test); a socket per worker lets the kernel spread
    them. A port already served is refused rather than shared. Beside the workers, the
    refresher process ranks the lists of an events request's users; when it dies the
    master starts another, and the workers rank inline meanwhile."""
    import socket
    import subprocess
    import time

    import psutil

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = str(Path(sys.executable).parent / "recsys")
    cmd = [exe, "serve", "--bundle", str(bundle_dir), "--port", str(port), "--workers", "2"]
    # a short TMPDIR: the refresher's socket is a file there (a deep one gets an
    # abstract name, tested in test_serving_state.py)
    runs = short_tmp
    env = {**os.environ, "RECSYS_TREE_CACHE": str(tmp_path / "trees"), "TMPDIR": str(runs),
           "RECSYS_REFRESHER_HANDOFF": "always"}  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)

    def refreshers() -> list[int]:
        pids = []
        for c in psutil.Process(proc.pid).children():
            try:
                if c.status() != "zombie" and "serving.refresher" in " ".join(c.cmdline()):
                    pids.append(c.pid)
            except psutil.Error:  # gone meanwhile
                pass
        return pids

    def refreshes() -> dict[str, float]:
        return list_refreshes(f"http://127.0.0.1:{port}")

    def post_event(item: object) -> None:
        body = {"events": [{"user_id": model.user_ids[2], "item_id": item}]}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/events", json=body, timeout=30)
        assert r.status_code == 200, r.text

    try:
        listeners: dict[int, int] = {}  # worker pid: its listening socket's inode
        end = time.monotonic() + 240
        while time.monotonic() < end and len(listeners) < 2:
            time.sleep(0.5)
            listeners = {}
            for c in psutil.Process(proc.pid).children(recursive=True):
                try:
                    conns = c.net_connections(kind="tcp")
                except psutil.NoSuchProcess:
                    continue
                for k in conns:
                    if k.status == psutil.CONN_LISTEN and k.laddr.port == port:
                        # the socket itself: a shared one has one inode in every worker
                        listeners[c.pid] = os.stat(f"/proc/{c.pid}/fd/{k.fd}").st_ino
        assert len(listeners) == 2 and len(set(listeners.values())) == 2, listeners
        # the workers' shared files of this run: in TMPDIR when it is set
        (run,) = runs.glob("recsys-serve-*")
        assert (run / "state").is_dir() and (run / "metrics").is_dir()
        (first,) = refreshers()
        assert first not in listeners
        end = time.monotonic() + 120
        while not (run / "refresh.sock").exists() and time.monotonic() < end:
            time.sleep(0.2)  # the refresher's bundle loads
        post_event(model.item_ids[5])
        while refreshes().get("done", 0) < 1 and time.monotonic() < end:
            time.sleep(0.2)
        assert refreshes().get("handed") == 1 and refreshes().get("done") == 1
        os.kill(first, signal.SIGKILL)
        # A killed process shows "zombie" while its other threads still hold its files:
        # its socket is gone once a datagram to it is refused. The empty one the probe
        # sends, were it taken, asks the refresher for nothing.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
            while time.monotonic() < end:
                try:
                    probe.sendto(b'{"t":0,"u":[]}', str(run / "refresh.sock"))
                except (ConnectionRefusedError, FileNotFoundError):
                    break
                time.sleep(0.05)
        post_event(model.item_ids[6])  # no refresher: ranked in the request
        assert refreshes().get("handed") == 1 and refreshes().get("done") == 2
        while refreshers() in ([], [first]) and time.monotonic() < end:
            time.sleep(0.2)
        (second,) = refreshers()
        assert second != first
        again = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
        assert again.returncode == 2 and "cannot listen" in again.stderr, again.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert not list(runs.iterdir()), "a stopped server leaves no files of its run"
    assert not psutil.pid_exists(second) or psutil.Process(second).status() == "zombie"


def free_ports(n: int) -> int:
    """The first of n consecutive ports that are free on 127.0.0.1 now."""
    import socket

    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        try:
            socks = [socket.create_server(("127.0.0.1", base + j)) for j in range(n)]
        except OSError:
            continue
        for x in socks:
            x.close()
        return base
    raise AssertionError("no free ports")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract socket names")
def test_each_worker_claims_a_port_of_its_own_until_it_ends() -> None:
    """Two workers starting together take different ports of the range, bound but not
    yet listening (a worker that still loads refuses connections); a third finds none;
    the port of one that ended goes to the next to ask."""
    import socket

    from serving import workers

    base = free_ports(2)
    claims = list(workers._claims)
    try:
        a = workers.own_port_socket("127.0.0.1", base, 2)
        b = workers.own_port_socket("127.0.0.1", base, 2)
        assert {a.getsockname()[1], b.getsockname()[1]} == {base, base + 1}
        with (
            pytest.raises(ConnectionRefusedError),
            socket.create_connection(("127.0.0.1", a.getsockname()[1]), timeout=2),
        ):
            pass  # bound, not listening
        with pytest.raises(OSError, match="is free"):
            workers.own_port_socket("127.0.0.1", base, 2)
        port_a = a.getsockname()[1]
        a.close()  # the worker holding port_a ends: its socket and its claim go
        workers._claims.pop(-2).close()
        c = workers.own_port_socket("127.0.0.1", base, 2)
        assert c.getsockname()[1] == port_a
        b.close()
        c.close()
    finally:
        for x in workers._claims[len(claims) :]:
            x.close()
        workers._claims[:] = claims


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT spreads on Linux")
def test_worker_ports_give_each_worker_a_port_that_its_replacement_takes_again(
    bundle_dir: Path, tmp_path: Path, short_tmp: Path, model: Model
) -> None:
    """`--worker-ports BASE`: for a balancer in front, each worker also listens on a
    port of its own, BASE and BASE + 1 for two workers; a worker killed with -9 is
    replaced and the replacement answers on the port it left. Settings that cannot
    give each worker a port are refused before anything loads. Where haproxy is
    installed, the shipped serving/haproxy.cfg in front answers every request, also
    while a worker is dead (the balancer sends them to the other)."""
    import subprocess
    import time

    import psutil

    def balancer(base: int) -> tuple[subprocess.Popen[bytes], int]:
        """haproxy with the shipped serving/haproxy.cfg in front of the workers' ports."""
        front = free_ports(1)
        env = {
            **os.environ,
            "RECSYS_LB_BIND": f"127.0.0.1:{front}",
            "RECSYS_LB_W1": f"127.0.0.1:{base}",
            "RECSYS_LB_W2": f"127.0.0.1:{base + 1}",
        }
        cfg = Path(__file__).resolve().parents[1] / "serving" / "haproxy.cfg"
        lb = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], env=env)
        end = time.monotonic() + 30
        while time.monotonic() < end and not ready(front):
            time.sleep(0.2)
        return lb, front

    port, base = free_ports(1), free_ports(2)
    exe = str(Path(sys.executable).parent / "recsys")
    cmd = [exe, "serve", "--bundle", str(bundle_dir), "--port", str(port), "--workers", "2"]
    env = {**os.environ, "RECSYS_TREE_CACHE": str(tmp_path / "trees"), "TMPDIR": str(short_tmp)}
    for bad, says in (
        (["--workers", "1", "--worker-ports", str(base)], "needs --workers 2 or more"),
        (["--worker-ports", str(port - 1)], "must lie in 1-65535 and not hold --port"),
        (["--worker-ports", "65535"], "must lie in 1-65535"),
        (["--shared-socket", "--worker-ports", str(base)], "--reuse-port"),
    ):
        r = subprocess.run(cmd + bad, capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 2 and says in r.stderr, (bad, r.stderr)

    def owners() -> dict[int, int]:  # own port: the worker listening on it
        out = {}
        for c in psutil.Process(proc.pid).children(recursive=True):
            try:
                for k in c.net_connections(kind="tcp"):
                    if k.status == psutil.CONN_LISTEN and k.laddr.port in (base, base + 1):
                        out[k.laddr.port] = c.pid
            except psutil.NoSuchProcess:
                continue
        return out

    def ready(p: int) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{p}/readyz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    proc = subprocess.Popen(
        [*cmd, "--worker-ports", str(base)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        end = time.monotonic() + 240
        while time.monotonic() < end:
            if len(owners()) == 2 and ready(base) and ready(base + 1):
                break
            time.sleep(0.5)
        first = owners()
        assert len(first) == 2 and len(set(first.values())) == 2, first
        lb = balancer(base) if shutil.which("haproxy") else None
        lb_url = f"http://127.0.0.1:{lb[1]}" if lb else None
        users = [str(u) for u in model.user_ids[:20]]
        if lb_url:  # serving/haproxy.cfg in front: every request answered
            assert all(
                httpx.get(f"{lb_url}/v1/recommendations/{u}", timeout=10).status_code == 200
                for u in users
            )
        os.kill(first[base], signal.SIGKILL)
        if lb_url:  # the balancer sends them to the other worker: none fails, and none
            # waits a second (haproxy's pause before a retry, at most its connect timeout)
            # or for the replacement to load
            assert all(
                httpx.get(f"{lb_url}/v1/recommendations/{u}", timeout=0.5).status_code == 200
                for u in users
            )
        while time.monotonic() < end:
            now = owners()
            if now.get(base) not in (None, first[base]) and ready(base):
                break
            time.sleep(0.5)
        assert now[base] != first[base] and now[base + 1] == first[base + 1], (first, now)
        assert ready(port) and ready(base + 1)
    finally:
        if lb:
            lb[0].terminate()
            lb[0].wait(timeout=30)
        proc.terminate()
        proc.wait(timeout=60)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT spreads on Linux")
def test_a_killed_master_takes_its_workers_and_the_next_start_clears_its_files(
    bundle_dir: Path, tmp_path: Path
) -> None:
    """`kill -9` of the master skips its clean-up: its workers and refresher stop by
    themselves (they served the port on, with nobody to restart them), and the next
    server's start removes the dead master's run folder."""
    import subprocess

    import psutil

    from recsys.cli.serve import remove_stale_runs

    port = free_port()
    runs = tmp_path / "tmp"
    runs.mkdir()
    env = {**os.environ, "RECSYS_TREE_CACHE": str(tmp_path / "trees"), "TMPDIR": str(runs)}
    exe = str(Path(sys.executable).parent / "recsys")
    cmd = [exe, "serve", "--bundle", str(bundle_dir), "--port", str(port), "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    kids: list[psutil.Process] = []
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, timeout=240)
        kids = psutil.Process(proc.pid).children()
        assert len(kids) >= 3  # two workers and the refresher (and a resource tracker)
        (run,) = runs.glob("recsys-serve-*")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        _, alive = psutil.wait_procs(kids, timeout=30)
        assert not alive, [p.cmdline() for p in alive]
        assert run.exists()  # nobody cleaned up
        alive_run = runs / "recsys-serve-alive"
        alive_run.mkdir()
        (alive_run / "master.pid").write_text(f"{os.getpid()}\n")
        (runs / "recsys-serve-unknown").mkdir()  # no pid: not ours to judge
        assert remove_stale_runs(runs) == [run]
        assert alive_run.exists() and (runs / "recsys-serve-unknown").exists()
    finally:
        for p in kids:
            with contextlib.suppress(psutil.Error):
                p.kill()


def test_a_worker_stops_when_its_master_is_gone() -> None:
    """The watch a worker of `recsys serve` runs: SIGTERM to itself once its parent is
    not the master it started under."""
    import subprocess

    code = (
        "import os, time; from serving.workers import exit_with_parent; "
        "exit_with_parent(os.getppid() + 1, every=0.05); time.sleep(30)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert r.returncode == -signal.SIGTERM, r.stderr


def test_workers_share_their_files_in_memory_unless_tmpdir_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The default state folder and the metrics files change with every request; on a
    disk a stalled journal stalls the workers, so they go to /dev/shm when it is there
    with room, and to TMPDIR when the user names one."""
    from recsys.cli.serve import runtime_dir

    monkeypatch.setenv("TMPDIR", "/somewhere")
    assert runtime_dir() is None
    monkeypatch.delenv("TMPDIR")
    shm = os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK)
    assert runtime_dir() == ("/dev/shm" if shm else None)
    assert runtime_dir(min_free=1 << 62) is None  # no room


def test_plain_posts_skip_the_framework_and_answer_the_same(model: Model, tree_cache: Path) -> None:
    """POST /v1/recommendations with a body that needs no coercion is answered before
    FastAPI, with the bytes the route gives (errors included); any body the route
    must validate or coerce goes to it and gets the same answer as before."""
    items, uids = [_an_item(model), str(model.item_ids[1])], model.user_ids
    app = create_app(RecService(model, tree_cache=tree_cache), Settings(max_k=50))
    app_route = create_app(RecService(model, tree_cache=tree_cache), Settings(max_k=50))
    app_route.fast_posts = {}  # every request through FastAPI
    # which bodies are taken early, asked of a third service (a rank caches a list)
    probe = create_app(RecService(model, tree_cache=tree_cache), Settings(max_k=50))
    fast = probe.fast_posts["/v1/recommendations"]
    scope = {"type": "http", "method": "POST", "path": "/v1/recommendations",
             "headers": [(b"content-type", b"application/json")]}  # fmt: skip
    taken = [
        {"history": items},
        {"user_id": "new-a", "history": items[:1], "k": 5},
        {"user_id": uids[0], "k": 3},
        {"user_id": uids[1], "exclude": items, "k": 1000},  # capped by max_k
        {"user_id": "new-b", "history": ["no-such-item"]},  # the route's 4xx
        {"history": []},  # the route's 422: no user and no history
        {"user_id": None, "history": items, "exclude": None, "k": 1},
    ]
    routed: list[object] = [
        {"history": items, "k": 5.0},
        {"history": items, "k": "5"},
        {"history": items, "k": 0},
        {"history": items, "k": 1001},
        {"history": items, "k": True},
        {"history": items, "extra": 1},
        {"history": "abc"},
        {"history": [1.5]},
        {"history": [True]},
        {"history": [[items[0]]]},
        {"history": [""]},
        {"history": ["x" * 257]},
        {"history": items * 501},  # over MAX_LIST
        {"user_id": True, "history": items},
        {"user_id": 2**63, "history": items},
        {"user_id": "", "history": items},
        [items],
        "x",
        None,
    ]
    for body in taken:
        assert fast(scope, json.dumps(body).encode()) is not None, body
    for body in routed:
        assert fast(scope, json.dumps(body).encode()) is None, body
    for raw in (b"{", b'{"history": NaN}', b""):
        assert fast(scope, raw) is None, raw
    text = {**scope, "headers": [(b"content-type", b"text/plain")]}
    assert fast(text, json.dumps(taken[0]).encode()) is None

    with_fast, route_only = TestClient(app), TestClient(app_route)
    sent = [json.dumps(b).encode() for b in [*taken, *routed]] + [b"{", b'{"history": NaN}']
    ok = 0
    for body in sent:
        a = with_fast.post("/v1/recommendations", content=body,
                           headers={"content-type": "application/json"})  # fmt: skip
        b = route_only.post("/v1/recommendations", content=body,
                            headers={"content-type": "application/json"})  # fmt: skip
        assert (a.status_code, a.content) == (b.status_code, b.content), body[:80]
        assert a.headers["content-type"] == b.headers["content-type"]
        ok += a.status_code == 200
    assert ok >= 5  # the taken bodies that rank, and the ones the route coerces
    line = 'recsys_http_requests_total{endpoint="/v1/recommendations",method="POST",status="200"}'
    counts = [float(x.split()[-1]) for x in with_fast.get("/metrics").text.splitlines()
              if x.startswith(line)]  # fmt: skip
    assert counts == [ok]


def test_plain_events_skip_the_framework_and_answer_the_same(
    model: Model, tree_cache: Path
) -> None:
    """POST /v1/events without timestamps and with plain ids is taken before FastAPI,
    with the route's answers; timestamps and anything odd go to the route."""
    items, uids = [_an_item(model), str(model.item_ids[1])], model.user_ids
    app = create_app(RecService(model, tree_cache=tree_cache))
    app_route = create_app(RecService(model, tree_cache=tree_cache))
    app_route.fast_posts = {}
    # which bodies are taken early, asked of a third service (taking them changes it)
    fast = create_app(RecService(model, tree_cache=tree_cache)).fast_posts["/v1/events"]
    scope = {"type": "http", "method": "POST", "path": "/v1/events",
             "headers": [(b"content-type", b"application/json")]}  # fmt: skip

    def ev(*rows: dict) -> dict:
        return {"events": list(rows)}

    taken = [
        ev({"user_id": uids[0], "item_id": items[0]}),
        ev({"user_id": "new-user", "item_id": items[1]}, {"user_id": uids[1], "item_id": items[0]}),
        ev({"user_id": uids[0], "item_id": items[1], "timestamp": None}),
        ev({"user_id": uids[0], "item_id": "no-such-item"}),  # the route's 4xx
    ]
    routed: list[object] = [
        ev({"user_id": uids[0], "item_id": items[0], "timestamp": 1_700_000_000}),
        ev({"user_id": uids[0], "item_id": items[0], "timestamp": "2024-01-01T00:00:00"}),
        ev({"user_id": uids[0], "item_id": items[0], "extra": 1}),
        ev({"user_id": True, "item_id": items[0]}),
        ev({"user_id": uids[0], "item_id": 1.5}),
        ev({"user_id": uids[0]}),
        ev(),
        ev(*[{"user_id": uids[0], "item_id": items[0]}] * 1001),
        {"events": "x"},
        {"events": [], "more": 1},
        [1],
    ]
    for body in taken:
        assert fast(scope, json.dumps(body).encode()) is not None, body
    for body in routed:
        assert fast(scope, json.dumps(body).encode()) is None, str(body)[:80]
    with_fast, route_only = TestClient(app), TestClient(app_route)
    for body in [*taken, *routed]:
        raw = json.dumps(body).encode()
        a = with_fast.post("/v1/events", content=raw, headers={"content-type": "application/json"})
        b = route_only.post("/v1/events", content=raw, headers={"content-type": "application/json"})
        assert (a.status_code, a.content) == (b.status_code, b.content), raw[:80]
    # the events taken early changed the lists as the route's did
    for u in (uids[0], uids[1], "new-user"):
        a, b = with_fast.get(f"/v1/recommendations/{u}"), route_only.get(f"/v1/recommendations/{u}")
        assert a.json()["items"] == b.json()["items"], u


def test_cached_reads_skip_the_framework_and_answer_the_same(
    service: RecService, model: Model
) -> None:
    """A GET of a list that needs no rank is answered before FastAPI's routing, with
    the bytes the route gives; anything the route must validate or rank goes to it."""
    app = create_app(service, Settings(max_k=50))
    fast, uid = app.fast, _a_user(model)
    assert fast is not None
    service.recommend(uid, k=10)  # the user's list is cached

    def scope(path: str, query: bytes = b"", method: str = "GET") -> dict:
        return {"type": "http", "method": method, "path": path, "root_path": "",
                "query_string": query}  # fmt: skip

    taken = [
        (f"/v1/recommendations/{uid}", b""),
        (f"/v1/recommendations/{uid}", b"k=7"),
        (f"/v1/recommendations/{uid}", b"k=1000"),  # capped by max_k, as the route does
        ("/v1/recommendations/nobody-at-all", b"k=5"),  # the popular fallback
    ]
    for path, q in taken:
        assert fast(scope(path, q)) is not None, (path, q)
    routed = [
        (f"/v1/recommendations/{model.user_ids[1]}", b"k=5"),  # no list yet: a rank
        (f"/v1/recommendations/{uid}", b"k=0"),
        (f"/v1/recommendations/{uid}", b"k=1001"),
        (f"/v1/recommendations/{uid}", b"k=07"),
        (f"/v1/recommendations/{uid}", b"k=x"),
        (f"/v1/recommendations/{uid}", b"k=5&k=6"),
        (f"/v1/recommendations/{uid}", b"n=5"),
        (f"/v1/recommendations/{uid}/", b""),
        ("/v1/recommendations/" + "x" * 257, b""),
        ("/v1/recommendations/", b""),
    ]
    for path, q in routed:
        assert fast(scope(path, q)) is None, (path, q)
    assert fast(scope(f"/v1/recommendations/{uid}", method="HEAD")) is None

    with_fast = TestClient(app)
    app_route = create_app(service, Settings(max_k=50))
    app_route.fast = None  # every request through FastAPI
    route_only = TestClient(app_route)
    ok = 0
    for path, q in taken + routed:
        url = f"{path}?{q.decode()}" if q else path
        a, b = with_fast.get(url), route_only.get(url)
        assert (a.status_code, a.content) == (b.status_code, b.content), url
        assert a.headers["content-type"] == b.headers["content-type"]
        ok += a.status_code == 200
    assert len(with_fast.get(f"/v1/recommendations/{uid}?k=1000").json()["items"]) == 50
    # the reads answered early are counted under the route, as the others
    line = (
        "recsys_http_requests_total"
        '{endpoint="/v1/recommendations/{user_id}",method="GET",status="200"}'
    )
    counts = [float(x.split()[-1]) for x in with_fast.get("/metrics").text.splitlines()
              if x.startswith(line)]  # fmt: skip
    assert counts == [ok + 1]
