"""Pseudonymous user ids: ingest --pseudonymize, the record fit copies into the bundle,
and a server that takes raw ids, hashes them with the same key and answers with them."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import typer
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from recsys.cli.ingest import ingest_app
from recsys.ingest import ingest_csv, ingest_movielens
from recsys.pseudonym import (
    ENV_VAR,
    MANIFEST_FIELD,
    Pseudonymizer,
    PseudonymKeyError,
    for_manifest,
    sidecar_path,
)
from recsys.schema import DataError
from recsys.service import Model, RecService
from serving.app import create_app

KEY = "0123456789abcdef-test-key-one"
OTHER_KEY = "fedcba9876543210-test-key-two"
RAW_USERS = ("alice@example.com", "bob", "carol+1@example.org")

FAST_TOML = """
use_lm = false

[sources]
per_source = 50
als_iterations = 3

[ranker]
n_estimators = 60
early_stopping_rounds = 20
"""


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(ingest_app, name="ingest")
    app.command("noop")(lambda: None)  # two commands: `ingest` stays a sub-command
    return app


def _events(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    rows = [
        (RAW_USERS[0], "i1", 1_700_000_000),
        (RAW_USERS[1], "i1", 1_700_000_100),
        (RAW_USERS[0], "i2", 1_700_000_200),
        (RAW_USERS[2], "i3", 1_700_000_300),
        (RAW_USERS[1], "i2", 1_700_000_400),
    ]
    lines = ["uid,sku,ts"] + [f"{u},{i},{t}" for u, i, t in rows]
    (d / "events.csv").write_text("\n".join(lines) + "\n")
    return d / "events.csv"


def _ingest(src: Path, out: Path, key: str | None, *flags: str) -> tuple[int, str]:
    env = {ENV_VAR: key} if key is not None else {ENV_VAR: ""}
    args = ["ingest", "csv", str(src), str(out), "--map", "user_id=uid", "--map", "item_id=sku"]
    res = CliRunner().invoke(_cli(), [*args, "--map", "timestamp=ts", *flags], env=env)
    return res.exit_code, res.output


# -- the hash -----------------------------------------------------------------------------
def test_keyed_hash_same_id_same_pseudonym_other_key_other_pseudonym() -> None:
    p, q = Pseudonymizer(KEY.encode()), Pseudonymizer(OTHER_KEY.encode())
    a = p("alice")
    assert a == p("alice") and len(a) == 32 and int(a, 16) >= 0 and a == a.lower()
    assert a != p("alice ") and a != q("alice")
    assert p(42) == p("42")  # an integer id and the same id from a URL
    assert p.fingerprint != q.fingerprint and len(p.fingerprint) == 16
    assert KEY not in repr(p) and KEY not in json.dumps(p.record())


def test_key_from_the_environment() -> None:
    assert Pseudonymizer.from_env({ENV_VAR: KEY}).key == KEY.encode()
    with pytest.raises(PseudonymKeyError, match=ENV_VAR):
        Pseudonymizer.from_env({})
    with pytest.raises(PseudonymKeyError, match="at least 16"):
        Pseudonymizer.from_env({ENV_VAR: "short"})


# -- ingest -------------------------------------------------------------------------------
def test_ingest_pseudonymize_writes_no_raw_id_and_never_the_key(tmp_path: Path) -> None:
    src = _events(tmp_path / "src")
    code, output = _ingest(src, tmp_path / "out", KEY, "--pseudonymize")
    assert code == 0, output
    inter = pl.read_parquet(tmp_path / "out" / "interactions.parquet")
    p = Pseudonymizer(KEY.encode())
    assert set(inter["user_id"]) == {p(u) for u in RAW_USERS}
    # the same raw id became the same pseudonym on every row: per-user events are kept
    assert inter.group_by("user_id").len().sort("len")["len"].to_list() == [1, 2, 2]
    for f in (tmp_path / "out").iterdir():
        data = f.read_bytes()
        assert KEY.encode() not in data, f.name
        if f.suffix == ".json":
            assert not any(u.encode() in data for u in RAW_USERS), f.name
    for col in inter.columns:
        values = set(inter[col].cast(pl.String).to_list())
        assert not values & set(RAW_USERS), col
    record = json.loads(sidecar_path(tmp_path / "out" / "interactions.parquet").read_text())
    assert record == p.record()
    assert KEY not in output and p.fingerprint in output

    # again under another key: other pseudonyms, no raw id either
    code, output = _ingest(src, tmp_path / "out2", OTHER_KEY, "--pseudonymize")
    assert code == 0, output
    other = pl.read_parquet(tmp_path / "out2" / "interactions.parquet")
    assert not set(other["user_id"]) & set(inter["user_id"])
    assert set(other["user_id"]) == {Pseudonymizer(OTHER_KEY.encode())(u) for u in RAW_USERS}

    # without --pseudonymize into the same folder: raw ids, and the record goes
    code, output = _ingest(src, tmp_path / "out", KEY)
    assert code == 0, output
    assert set(pl.read_parquet(tmp_path / "out" / "interactions.parquet")["user_id"]) == set(
        RAW_USERS
    )
    assert not sidecar_path(tmp_path / "out" / "interactions.parquet").exists()


@pytest.mark.parametrize("key", [None, "short"])
def test_ingest_pseudonymize_without_a_usable_key_exits_2_and_writes_nothing(
    tmp_path: Path, key: str | None
) -> None:
    src = _events(tmp_path / "src")
    code, output = _ingest(src, tmp_path / "out", key, "--pseudonymize")
    assert code == 2 and ENV_VAR in output
    assert not (tmp_path / "out").exists()


def test_every_converter_takes_the_pseudonymizer(tmp_path: Path) -> None:
    """The hashing sits where every converter writes; MovieLens' integer ids included."""
    d = tmp_path / "ml"
    d.mkdir()
    (d / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n2,1,5.0,964983815\n"
    )
    (d / "movies.csv").write_text("movieId,title,genres\n1,Toy Story (1995),Animation\n")
    p = Pseudonymizer(KEY.encode())
    inter_path, _ = ingest_movielens(d, tmp_path / "out", pseudonymize=p)
    users = pl.read_parquet(inter_path)["user_id"]
    assert users.dtype == pl.String and set(users) == {p(1), p(2)}
    assert sidecar_path(inter_path).is_file()


# -- fit: the record goes into the bundle ------------------------------------------------
def _fit(inter: Path, items: Path, out: Path, cfg: Path) -> tuple[int, str]:
    import recsys.cli.commands  # noqa: F401  (registers the commands)
    from recsys.cli import app

    args = ["fit", "--interactions", str(inter), "--items", str(items), "--out", str(out)]
    res = CliRunner().invoke(app, [*args, "--config", str(cfg)])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.output


@pytest.fixture(scope="module")
def fast_toml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("cfg") / "fast.toml"
    p.write_text(FAST_TOML)
    return p


@pytest.fixture(scope="module")
def pseudo_bundle(
    synth_dir: Path, fast_toml: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The conftest bundle's data and settings, ingested with --pseudonymize, fitted by
    `recsys fit`."""
    d = tmp_path_factory.mktemp("pseudo")
    inter, items = ingest_csv(
        synth_dir / "interactions.parquet",
        d / "data",
        items_src=synth_dir / "items.parquet",
        pseudonymize=Pseudonymizer(KEY.encode()),
    )
    code, output = _fit(inter, items, d / "bundle", fast_toml)
    assert code == 0, output
    return d / "bundle"


def test_fit_copies_the_record_into_the_manifest(pseudo_bundle: Path, synth_dir: Path) -> None:
    manifest = json.loads((pseudo_bundle / "manifest.json").read_text())
    assert manifest[MANIFEST_FIELD] == Pseudonymizer(KEY.encode()).record()
    raw = set(pl.read_parquet(synth_dir / "interactions.parquet")["user_id"])
    assert not raw & set(pl.read_parquet(pseudo_bundle / "users.parquet")["user_id"])
    assert not [p for p in pseudo_bundle.parent.iterdir() if p.name.startswith(".")]
    for f in pseudo_bundle.iterdir():
        assert KEY.encode() not in f.read_bytes(), f.name


def test_fit_refuses_raw_ids_under_a_stale_record(tmp_path: Path, fast_toml: Path) -> None:
    src = _events(tmp_path / "src")
    code, output = _ingest(src, tmp_path / "data", KEY)
    assert code == 0, output
    inter = tmp_path / "data" / "interactions.parquet"
    sidecar_path(inter).write_text(json.dumps(Pseudonymizer(KEY.encode()).record()))
    with pytest.raises(DataError, match="not pseudonyms"):
        _fit(inter, tmp_path / "data" / "items.parquet", tmp_path / "bundle", fast_toml)
    assert not (tmp_path / "bundle").exists()


# -- serving ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tree_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("trees")


@pytest.fixture(scope="module")
def pseudo_model(pseudo_bundle: Path, tree_cache: Path) -> Model:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV_VAR, KEY)
        m = Model.load(pseudo_bundle, tree_cache)
    m.warm()
    return m


@pytest.fixture(scope="module")
def raw_model(bundle_dir: Path, tree_cache: Path) -> Model:
    m = Model.load(bundle_dir, tree_cache)
    m.warm()
    return m


def test_the_server_needs_the_key_the_data_was_hashed_with(
    pseudo_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from serving.app import app_from_env

    manifest = json.loads((pseudo_bundle / "manifest.json").read_text())
    with pytest.raises(PseudonymKeyError, match=ENV_VAR):
        for_manifest(manifest, "b", {})
    with pytest.raises(PseudonymKeyError, match="not the key"):
        for_manifest(manifest, "b", {ENV_VAR: OTHER_KEY})
    assert for_manifest({}, "b", {ENV_VAR: KEY}) is None  # raw-id bundles ignore a key
    monkeypatch.setenv("RECSYS_BUNDLE", str(pseudo_bundle))
    monkeypatch.setenv(ENV_VAR, OTHER_KEY)
    with pytest.raises(SystemExit, match="not the key"):
        app_from_env()
    monkeypatch.delenv(ENV_VAR)
    with pytest.raises(SystemExit, match=ENV_VAR):
        app_from_env()


def test_recsys_serve_refuses_to_start_without_the_key(pseudo_bundle: Path) -> None:
    import os
    import subprocess
    import sys

    recsys = str(Path(sys.executable).with_name("recsys"))
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    args = [recsys, "serve", "--bundle", str(pseudo_bundle), "--port", "0"]
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and ENV_VAR in r.stderr, r.stderr


def test_a_raw_id_gets_the_list_its_pseudonym_was_fitted_for(
    pseudo_model: Model, raw_model: Model
) -> None:
    """The same data and settings with pseudonyms for ids: the raw id sent to the
    pseudonymized bundle gets the list the raw-id bundle gives that user, under the id
    the client sent."""
    client = TestClient(create_app(RecService(pseudo_model)), raise_server_exceptions=False)
    for raw in raw_model.user_ids[:3]:
        r = client.get(f"/v1/recommendations/{raw}", params={"k": 10})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["user_id"] == raw and body["fallback"] is None
        expected = RecService(raw_model).recommend(raw, k=10)
        assert [it["item_id"] for it in body["items"]] == [i for i, _ in expected.items]
        hashed = Pseudonymizer(KEY.encode())(raw)
        assert pseudo_model.user_index(hashed) == raw_model.user_index(raw)


def test_fresh_events_under_raw_ids_are_kept_under_the_pseudonym(pseudo_model: Model) -> None:
    service = RecService(pseudo_model)
    client = TestClient(create_app(service), raise_server_exceptions=False)
    item = pseudo_model.item_ids[0]
    r = client.post("/v1/events", json={"events": [{"user_id": "newcomer", "item_id": item}]})
    assert r.status_code == 200, r.text
    assert service.state.fresh_events.users() == [Pseudonymizer(KEY.encode())("newcomer")]
    r = client.post("/v1/recommendations", json={"user_id": "newcomer", "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["user_id"] == "newcomer" and body["fallback"] is None
    assert item not in [it["item_id"] for it in body["items"]]
