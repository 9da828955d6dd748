"""Hostile input, files and requests, in one table each: every case is a 4xx with a
message (HTTP) or exit status 2 with a one-paragraph message naming the file, column or
entry (CLI); never a 5xx, never a traceback, and nothing half-written.

Decisions these cases fix:
- Ids are opaque strings: control characters, right-to-left marks, CJK and emoji are
  valid ids (the Parquet side keeps them as given, so the endpoint must too); an
  unknown one gets the popular fallback, echoed back exactly. Lone UTF-16 surrogates
  are not text and are refused (422). On a bundle with integer ids only the canonical
  ASCII form of an integer names a user ('007', '٧' are other, unknown ids).
- Numbers: int64 ids at both edges are valid ids; k is bounded (422 past 1000); NaN and
  +-Infinity, which Python's json accepts, are refused (422) wherever a number goes.
- A bundle file that is a symbolic link is refused, wherever it points: `fit` never
  writes one, and a link can lead outside the folder or be retargeted after its checksum
  was read. The bundle folder itself may be a link.
- A users file with zero rows is not an error for `recommend`: zero users, an empty
  R.parquet with the contract's columns.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from recsys.config import PipelineConfig
from recsys.service import Model, RecService
from serving.app import FailureLimiter, create_app
from serving.settings import Settings

TOKEN = "t0ken-never-logged"


# -- the CLI, run in process through its real entry point -----------------------------
@dataclass
class Ran:
    code: int | str | None
    out: str


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> Ran:
    """`recsys ARGV` as the console script runs it (recsys.cli.main: DataError and
    BundleError become 'error: ...' and exit status 2)."""
    from recsys.cli import main

    old = sys.argv
    sys.argv = ["recsys", *map(str, argv)]
    try:
        main()
        code: int | str | None = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = old
    captured = capsys.readouterr()
    return Ran(code, captured.out + captured.err)


@pytest.fixture()
def no_server(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("recsys serve started a server on a bad bundle")

    monkeypatch.setattr(uvicorn, "run", refuse)


# -- files ------------------------------------------------------------------------------
@dataclass
class Files:
    """What a file case builds on: the synthetic data, a bundle, and a scratch folder."""

    tmp: Path
    synth: Path
    bundle: Path

    @property
    def inter(self) -> Path:
        return self.synth / "interactions.parquet"

    @property
    def items(self) -> Path:
        return self.synth / "items.parquet"

    def events(self) -> pl.DataFrame:
        return pl.read_parquet(self.inter)

    def parquet(self, name: str, df: pl.DataFrame) -> Path:
        p = self.tmp / name
        df.write_parquet(p)
        return p

    def copy_bundle(self, name: str) -> Path:
        d = self.tmp / name
        shutil.copytree(self.bundle, d)
        return d

    def edit_manifest(self, name: str, edit: Callable[[dict], object]) -> Path:
        d = self.copy_bundle(name)
        m = json.loads((d / "manifest.json").read_text())
        edit(m)
        (d / "manifest.json").write_text(json.dumps(m))
        return d

    def outside(self) -> tuple[Path, str]:
        p = self.tmp / "outside.txt"
        p.write_text("not the bundle's")
        return p, hashlib.sha256(p.read_bytes()).hexdigest()

    def users(self) -> Path:
        return self.parquet("users.parquet", pl.DataFrame({"user_id": ["u000001", "nobody"]}))


@dataclass
class FileCase:
    """argv from the files; the messages it must show; paths that must not exist after."""

    build: Callable[[Files], list[object]]
    says: tuple[str, ...]
    outputs: tuple[str, ...] = ()
    serve: bool = False
    marks: list[pytest.MarkDecorator] = field(default_factory=list)


def _fit(inter: object = None, items: object = None, *extra: object) -> Callable:
    def build(f: Files) -> list[object]:
        i = inter(f) if callable(inter) else f.inter
        t = items(f) if callable(items) else f.items
        more = [e(f) if callable(e) else e for e in extra]
        return ["fit", "--interactions", i, "--items", t, "--out", f.tmp / "B", "--no-lm", *more]

    return build


def _empty(suffix: str) -> Callable[[Files], Path]:
    def make(f: Files) -> Path:
        p = f.tmp / f"empty{suffix}"
        p.write_bytes(b"")
        return p

    return make


def _truncated(f: Files) -> Path:
    raw = f.inter.read_bytes()
    p = f.tmp / "truncated.parquet"
    p.write_bytes(raw[: len(raw) // 2])
    return p


def _duplicate_parquet(f: Files) -> Path:
    t = f.events().head(100).to_arrow()
    cols = [t.column("user_id"), t.column("item_id"), t.column("user_id"), t.column("timestamp")]
    p = f.tmp / "dup.parquet"
    pq.write_table(pa.table(cols, names=["user_id", "item_id", "user_id", "timestamp"]), p)
    return p


def _duplicate_csv(f: Files) -> Path:
    p = f.tmp / "dup.csv"
    p.write_text("user_id,item_id,user_id,timestamp\nu1,i00001,u2,1600000000\n")
    return p


def _ts(name: str, value: float) -> Callable[[Files], Path]:
    """Epoch seconds, `value` in the first 3 rows of the whole event log."""

    def make(f: Files) -> Path:
        dtype = pl.Int64 if isinstance(value, int) else pl.Float64
        first = pl.int_range(pl.len()) < 3
        ts = (
            pl.when(first)
            .then(pl.lit(value, dtype))
            .otherwise(pl.col("timestamp").dt.epoch("s").cast(dtype))
        )
        return f.parquet(name, f.events().with_columns(ts.alias("timestamp")))

    return make


def _column(name: str, column: str, expr: pl.Expr, rows: int | None = None) -> Callable:
    def make(f: Files) -> Path:
        df = f.events() if rows is None else f.events().head(rows)
        return f.parquet(name, df.with_columns(expr.alias(column)))

    return make


def _config(name: str, text: str) -> Callable[[Files], Path]:
    def make(f: Files) -> Path:
        p = f.tmp / name
        p.write_text(text)
        return p

    return make


def _recommend(users: Callable[[Files], Path] | None = None, *extra: object) -> Callable:
    def build(f: Files) -> list[object]:
        u = users(f) if users else f.users()
        return [
            "recommend",
            "--bundle",
            f.bundle,
            "--users",
            u,
            "--out",
            f.tmp / "R.parquet",
            "--workers",
            1,
            *extra,
        ]

    return build


def _users(name: str, df: pl.DataFrame) -> Callable[[Files], Path]:
    return lambda f: f.parquet(name, df)


def _on_bundle(command: str, make: Callable[[Files], Path]) -> Callable:
    def build(f: Files) -> list[object]:
        b = make(f)
        if command == "recommend":
            return [
                "recommend",
                "--bundle",
                b,
                "--users",
                f.users(),
                "--out",
                f.tmp / "R.parquet",
                "--workers",
                1,
            ]
        if command == "serve":
            return ["serve", "--bundle", b, "--port", 0]
        return ["explain", "--bundle", b, "--user", "u000001"]

    return build


def _manifest_text(text: str) -> Callable[[Files], Path]:
    def make(f: Files) -> Path:
        d = f.copy_bundle("b")
        (d / "manifest.json").write_text(text)
        return d

    return make


def _listed_outside(absolute: bool) -> Callable[[Files], Path]:
    def make(f: Files) -> Path:
        p, digest = f.outside()
        name = str(p) if absolute else "../outside.txt"
        return f.edit_manifest("b", lambda m: m["files"].update({name: {"sha256": digest}}))

    return make


def _ranker_outside(f: Files) -> Path:
    f.outside()
    return f.edit_manifest("b", lambda m: m["ranker"].update(models=["../outside.txt"]))


def _symlinked(target_outside: bool) -> Callable[[Files], Path]:
    def make(f: Files) -> Path:
        d = f.copy_bundle("b")
        real = f.tmp / "users-elsewhere.parquet" if target_outside else d / "real.parquet"
        os.replace(d / "users.parquet", real)  # same bytes: the checksum still matches
        os.symlink(real if target_outside else real.name, d / "users.parquet")
        return d

    return make


def _symlinked_manifest(f: Files) -> Path:
    d = f.copy_bundle("b")
    os.replace(d / "manifest.json", f.tmp / "manifest-elsewhere.json")
    os.symlink(f.tmp / "manifest-elsewhere.json", d / "manifest.json")
    return d


def _encode_items(items: Callable[[Files], Path] | None = None) -> Callable:
    def build(f: Files) -> list[object]:
        return ["encode-items", "--bundle", f.bundle, "--items", items(f) if items else f.items]

    return build


def _ingest(src: Callable[[Files], Path]) -> Callable:
    return lambda f: ["ingest", "csv", src(f), f.tmp / "ING"]


BIG = 2**63 - 1
FILE_CASES: dict[str, FileCase] = {
    # -- input tables of fit (evaluate and ingest read them the same way)
    "fit-interactions-0-byte-parquet": FileCase(
        _fit(_empty(".parquet")), ("empty.parquet", "cannot read"), ("B",)
    ),
    "fit-interactions-0-byte-csv": FileCase(
        _fit(_empty(".csv")), ("empty.csv", "empty CSV"), ("B",)
    ),
    "fit-items-0-byte-parquet": FileCase(
        _fit(None, _empty(".parquet")), ("empty.parquet", "cannot read"), ("B",)
    ),
    "fit-interactions-zero-rows": FileCase(
        _fit(lambda f: f.parquet("zero.parquet", f.events().head(0))),
        ("zero.parquet", "empty"),
        ("B",),
    ),
    "fit-items-zero-rows": FileCase(
        _fit(None, lambda f: f.parquet("zero.parquet", pl.read_parquet(f.items).head(0))),
        ("missing from the items table",),
        ("B",),
    ),
    "fit-interactions-truncated-parquet": FileCase(
        _fit(_truncated), ("truncated.parquet", "cannot read"), ("B",)
    ),
    "fit-user-id-list-type": FileCase(
        _fit(_column("list.parquet", "user_id", pl.concat_list(pl.col("user_id")))),
        ("list.parquet", "user_id", "unsupported id type List"),
        ("B",),
    ),
    "fit-user-id-struct-type": FileCase(
        _fit(_column("struct.parquet", "user_id", pl.struct(pl.col("user_id")))),
        ("struct.parquet", "user_id", "unsupported id type Struct"),
        ("B",),
    ),
    "fit-user-id-beyond-int64": FileCase(
        _fit(_column("u64.parquet", "user_id", pl.lit(2**64 - 1, dtype=pl.UInt64))),
        ("u64.parquet", "user_id", "do not fit in Int64"),
        ("B",),
    ),
    "fit-timestamp-unparseable-string": FileCase(
        _fit(_column("ts.parquet", "timestamp", pl.lit("not a time"))),
        ("ts.parquet", "timestamp", "row(s) 0, 1, 2", "could not be parsed"),
        ("B",),
    ),
    "fit-timestamp-int64-max": FileCase(
        _fit(_ts("tsmax.parquet", BIG)),
        ("tsmax.parquet", "timestamp", "row(s) 0, 1, 2:", "out of range"),
        ("B",),
    ),
    "fit-timestamp-int64-min": FileCase(
        _fit(_ts("tsmin.parquet", -(2**63))),
        ("tsmin.parquet", "timestamp", "row(s) 0, 1, 2:", "out of range"),
        ("B",),
    ),
    "fit-timestamp-float-1e300": FileCase(
        _fit(_ts("tsfloat.parquet", 1e300)),
        ("tsfloat.parquet", "timestamp", "row(s) 0, 1, 2:", "out of range"),
        ("B",),
    ),
    "fit-rating-nan": FileCase(
        _fit(_column("nan.parquet", "rating", pl.lit(float("nan")))),
        ("nan.parquet", "rating", "NaN or infinite"),
        ("B",),
    ),
    "fit-weight-infinity": FileCase(
        _fit(_column("inf.parquet", "weight", pl.lit(float("-inf")))),
        ("inf.parquet", "weight", "NaN or infinite"),
        ("B",),
    ),
    "fit-csv-duplicate-header": FileCase(
        _fit(_duplicate_csv), ("dup.csv", "user_id", "more than once"), ("B",)
    ),
    "fit-parquet-duplicate-field": FileCase(
        _fit(_duplicate_parquet), ("dup.parquet", "user_id", "more than one"), ("B",)
    ),
    "fit-too-few-users-to-rank": FileCase(
        _fit(lambda f: f.parquet("tiny.parquet", f.events().head(50))), ("ranker",), ("B",)
    ),
    "fit-config-not-toml": FileCase(
        _fit(None, None, "--config", _config("bad.toml", "[ranker\nx =")),
        ("bad.toml", "not valid TOML"),
        ("B",),
    ),
    "fit-config-nan-and-inf": FileCase(
        _fit(
            None,
            None,
            "--config",
            _config(
                "nan.toml", "[ranker]\nlearning_rate = nan\n[sources]\nrecent_window_days = inf\n"
            ),
        ),
        ("nan.toml", "ranker.learning_rate", "finite"),
        ("B",),
    ),
    "evaluate-interactions-0-byte": FileCase(
        lambda f: [
            "evaluate",
            "--interactions",
            _empty(".parquet")(f),
            "--items",
            f.items,
            "--out",
            f.tmp / "REPORT",
            "--no-lm",
        ],
        ("empty.parquet",),
        ("REPORT",),
    ),
    # -- the users of recommend
    "recommend-users-list-type": FileCase(
        _recommend(_users("ul.parquet", pl.DataFrame({"user_id": [["a"]]}))),
        ("ul.parquet", "user_id", "unsupported id type"),
        ("R.parquet", "R.parquet.parts"),
    ),
    "recommend-users-float-type": FileCase(
        _recommend(_users("uf.parquet", pl.DataFrame({"user_id": [1.5]}))),
        ("uf.parquet", "user_id", "unsupported id type Float64"),
        ("R.parquet", "R.parquet.parts"),
    ),
    "recommend-users-truncated": FileCase(
        _recommend(_truncated), ("truncated.parquet", "cannot read"), ("R.parquet",)
    ),
    "recommend-users-duplicate-field": FileCase(
        _recommend(_duplicate_parquet), ("dup.parquet", "user_id"), ("R.parquet",)
    ),
    "recommend-k-int64-max": FileCase(_recommend(None, "--k", BIG), ("--k",), ("R.parquet",)),
    "recommend-k-int64-min": FileCase(_recommend(None, "--k", -(2**63)), ("--k",), ("R.parquet",)),
    "recommend-k-2**64": FileCase(_recommend(None, "--k", 2**64), ("--k",), ("R.parquet",)),
    # -- bundles
    "recommend-manifest-not-json": FileCase(
        _on_bundle("recommend", _manifest_text("{nope")),
        ("manifest.json", "not valid JSON"),
        ("R.parquet",),
    ),
    "serve-manifest-json-list": FileCase(
        _on_bundle("serve", _manifest_text("[1, 2]")),
        ("manifest.json", "JSON array, not an object"),
        serve=True,
    ),
    "explain-manifest-10000-deep": FileCase(
        _on_bundle("explain", _manifest_text("[" * 10_000 + "]" * 10_000)),
        ("manifest.json", "not valid JSON"),
    ),
    "serve-manifest-files-a-list": FileCase(
        _on_bundle("serve", lambda f: f.edit_manifest("b", lambda m: m.update(files=["x"]))),
        ("manifest.json", "'files' is a JSON array"),
        serve=True,
    ),
    "recommend-manifest-files-entry-a-string": FileCase(
        _on_bundle(
            "recommend",
            lambda f: f.edit_manifest("b", lambda m: m["files"].update({"users.parquet": "abc"})),
        ),
        ("'users.parquet'", "JSON string"),
        ("R.parquet",),
    ),
    "recommend-manifest-names-dotdot": FileCase(
        _on_bundle("recommend", _listed_outside(absolute=False)),
        ("'../outside.txt' is not a file name inside the bundle folder",),
        ("R.parquet",),
    ),
    "serve-manifest-names-absolute-path": FileCase(
        _on_bundle("serve", _listed_outside(absolute=True)),
        ("outside.txt' is not a file name inside the bundle folder",),
        serve=True,
    ),
    "explain-ranker-model-outside": FileCase(
        _on_bundle("explain", _ranker_outside),
        ("'../outside.txt' is named by the manifest but not listed",),
    ),
    "recommend-bundle-file-symlink-outside": FileCase(
        _on_bundle("recommend", _symlinked(target_outside=True)),
        ("users.parquet is a symbolic link",),
        ("R.parquet",),
    ),
    "serve-bundle-file-symlink-inside": FileCase(
        _on_bundle("serve", _symlinked(target_outside=False)),
        ("users.parquet is a symbolic link",),
        serve=True,
    ),
    "explain-manifest-symlink": FileCase(
        _on_bundle("explain", _symlinked_manifest), ("manifest.json", "symbolic link")
    ),
    # -- encode-items and ingest
    "encode-items-bundle-without-lm": FileCase(_encode_items(), ("no language model",)),
    "encode-items-0-byte-items": FileCase(
        _encode_items(_empty(".parquet")), ("empty.parquet", "cannot read")
    ),
    "ingest-csv-0-byte": FileCase(_ingest(_empty(".csv")), ("empty.csv",), ("ING",)),
    "ingest-csv-duplicate-header": FileCase(
        _ingest(_duplicate_csv), ("dup.csv", "user_id", "more than once"), ("ING",)
    ),
    "ingest-parquet-user-id-list": FileCase(
        _ingest(_column("list.parquet", "user_id", pl.concat_list(pl.col("user_id")), 100)),
        ("list.parquet", "user_id", "unsupported id type"),
        ("ING",),
    ),
}


@pytest.fixture()
def files(synth_dir: Path, bundle_dir: Path, tmp_path: Path) -> Files:
    return Files(tmp_path, synth_dir, bundle_dir)


@pytest.mark.parametrize("name", list(FILE_CASES))
def test_bad_files_exit_2_with_one_paragraph_and_write_nothing(
    name: str,
    files: Files,
    capsys: pytest.CaptureFixture[str],
    no_server: None,
    bundle_dir: Path,
) -> None:
    case = FILE_CASES[name]
    manifest = (bundle_dir / "manifest.json").read_bytes()
    argv = case.build(files)
    r = run_cli(argv, capsys)
    assert r.code == 2, (argv, r.code, r.out[-2000:])
    assert "Traceback" not in r.out, r.out
    for s in case.says:
        assert s in r.out, (s, r.out)
    if argv[0] != "recommend" or "--k" not in argv:  # not a usage error: our message
        errors = [line for line in r.out.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, r.out  # one paragraph, one line
    for out in case.outputs:
        assert not (files.tmp / out).exists(), f"{out} was written"
    leftovers = [p.name for p in files.tmp.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers  # no temporary folder or file left behind
    assert (bundle_dir / "manifest.json").read_bytes() == manifest  # the bundle untouched


def test_the_table_of_cases_is_at_least_30_long() -> None:
    assert len(FILE_CASES) + len(request_cases()) >= 30
    assert len(FILE_CASES) >= 30 and len(request_cases()) >= 30


def test_read_manifest_never_hashes_a_file_outside_the_folder(
    files: Files, monkeypatch: pytest.MonkeyPatch
) -> None:
    from recsys import bundle

    seen: list[Path] = []
    real = bundle._sha256
    monkeypatch.setattr(bundle, "_sha256", lambda p: seen.append(Path(p)) or real(p))
    for make in (_listed_outside(False), _listed_outside(True), _symlinked(True)):
        d = make(files)
        with pytest.raises(bundle.BundleError):
            bundle.read_manifest(d)
        assert all(p.parent == d and not p.is_symlink() for p in seen), seen
        shutil.rmtree(d)
        seen.clear()
    # the folder itself may be a link (current -> v3): it is the files inside that may not
    link = files.tmp / "current"
    link.symlink_to(files.bundle)
    assert bundle.read_manifest(link)["format"] == bundle.FORMAT


def test_ids_in_any_script_are_kept_as_given_by_recommend(
    files: Files, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = ["a\x00b", "a\nb", "\u202eשלום", "用户", "🙂", "u000001"]
    users = files.parquet("weird.parquet", pl.DataFrame({"user_id": ids}))
    out = files.tmp / "R.parquet"
    argv = [
        "recommend",
        "--bundle",
        files.bundle,
        "--users",
        users,
        "--out",
        out,
        "--k",
        3,
        "--workers",
        1,
    ]
    r = run_cli(argv, capsys)
    assert r.code == 0, r.out
    got = pl.read_parquet(out)
    assert got["user_id"].unique(maintain_order=True).to_list() == ids
    assert got.group_by("user_id").len()["len"].to_list() == [3] * len(ids)


def test_a_users_file_of_zero_rows_gives_an_empty_result(
    files: Files, capsys: pytest.CaptureFixture[str]
) -> None:
    none = pl.DataFrame({"user_id": pl.Series(values=[], dtype=pl.String)})
    users = files.parquet("none.parquet", none)
    out = files.tmp / "R.parquet"
    argv = ["recommend", "--bundle", files.bundle, "--users", users, "--out", out, "--workers", 1]
    r = run_cli(argv, capsys)
    assert r.code == 0, r.out
    got = pl.read_parquet(out)
    assert got.height == 0 and got.columns == ["user_id", "item_id", "rank", "score"]


# -- requests ---------------------------------------------------------------------------
TEN_MB = b'{"user_id": "' + b"x" * (10 * 2**20) + b'"}'
DEEP = 10_000


@dataclass(frozen=True)
class Req:
    method: str
    path: str
    body: bytes | None = None
    params: dict[str, str] | None = None
    status: tuple[int, ...] = (422,)
    chunked: bool = False
    fallback_for: object = None  # a 200 with the popular list for this (unknown) user


def _body(obj: object) -> bytes:
    return json.dumps(obj).encode()


def _raw(text: str) -> bytes:
    return text.encode()


STRANGE_IDS = {
    "nul": "a\x00b",
    "newline": "a\nb",
    "rtl-override-hebrew": "\u202eשלום",
    "cjk": "用户",
    "emoji": "🙂👍🏽",
    "arabic-indic-digits": "١٢٣",
}
EDGES = {"int64-max": 2**63 - 1, "int64-min": -(2**63), "2**64": 2**64}
NON_FINITE = ("NaN", "Infinity", "-Infinity")


def _event_at(ts: str) -> bytes:
    return _raw('{"events": [{"user_id": "u", "item_id": "i00001", "timestamp": ' + ts + "}]}")


def request_cases() -> dict[str, Req]:
    cases: dict[str, Req] = {
        "post-10mb-body": Req("POST", "/v1/recommendations", TEN_MB, status=(413,)),
        "post-10mb-chunked": Req("POST", "/v1/events", TEN_MB, status=(413,), chunked=True),
        "post-history-10000-deep": Req(
            "POST",
            "/v1/recommendations",
            _raw('{"history": ' + "[" * DEEP + "]" * DEEP + "}"),
            status=(400, 422),
        ),
        "post-user-10000-deep-objects": Req(
            "POST",
            "/v1/recommendations",
            _raw('{"user_id": ' + '{"a": ' * DEEP + "1" + "}" * DEEP + "}"),
            status=(400, 422),
        ),
        "post-events-10000-deep": Req(
            "POST",
            "/v1/events",
            _raw('{"events": ' + "[" * DEEP + "]" * DEEP + "}"),
            status=(400, 422),
        ),
        "post-k-5000-digits": Req(
            "POST",
            "/v1/recommendations",
            _raw('{"user_id": "u", "k": ' + "9" * 5000 + "}"),
            status=(400, 422),
        ),
        "post-lone-surrogate-user": Req(
            "POST", "/v1/recommendations", _raw('{"user_id": "\\ud800"}')
        ),
        "post-lone-surrogate-exclude": Req(
            "POST", "/v1/recommendations", _raw('{"user_id": "u", "exclude": ["\\udfff"]}')
        ),
        "post-events-lone-surrogate": Req(
            "POST", "/v1/events", _raw('{"events": [{"user_id": "\\udc80", "item_id": 1}]}')
        ),
        "post-body-a-string": Req("POST", "/v1/recommendations", _body("just text")),
        "post-body-null": Req("POST", "/v1/recommendations", b"null"),
        "similar-of-strange-item": Req(
            "GET", "/v1/items/" + quote("用户\x00", safe="") + "/similar", status=(404,)
        ),
    }
    for name, uid in STRANGE_IDS.items():
        cases[f"get-id-{name}"] = Req(
            "GET", f"/v1/recommendations/{quote(uid, safe='')}", status=(200,), fallback_for=uid
        )
        cases[f"post-id-{name}"] = Req(
            "POST",
            "/v1/recommendations",
            _body({"user_id": uid}),
            status=(200,),
            fallback_for=uid,
        )
    for name, n in EDGES.items():
        cases[f"get-k-{name}"] = Req("GET", "/v1/recommendations/u", params={"k": str(n)})
        cases[f"post-k-{name}"] = Req(
            "POST", "/v1/recommendations", _body({"user_id": "u", "k": n})
        )
        cases[f"post-history-{name}"] = Req("POST", "/v1/recommendations", _body({"history": [n]}))
        valid = n < 2**63
        cases[f"post-user-{name}"] = Req(
            "POST",
            "/v1/recommendations",
            _body({"user_id": n}),
            status=(200,) if valid else (422,),
            fallback_for=n if valid else None,
        )
    for v in NON_FINITE:
        cases[f"post-k-{v}"] = Req(
            "POST", "/v1/recommendations", _raw('{"user_id": "u", "k": ' + v + "}")
        )
        cases[f"post-user-{v}"] = Req("POST", "/v1/recommendations", _raw('{"user_id": ' + v + "}"))
        cases[f"post-history-{v}"] = Req(
            "POST", "/v1/recommendations", _raw('{"history": [' + v + "]}")
        )
        cases[f"post-timestamp-{v}"] = Req("POST", "/v1/events", _event_at(v))
        cases[f"get-k-{v}"] = Req("GET", "/v1/recommendations/u", params={"k": v})
    for name, ts in {
        "1e20": "1e20",
        "int64-max": str(2**63 - 1),
        "int64-min": str(-(2**63)),
        "year-10000": '"10000-01-01T00:00:00"',
        "month-13": '"2020-13-01T00:00:00"',
    }.items():
        cases[f"post-timestamp-{name}"] = Req("POST", "/v1/events", _event_at(ts))
    # naive times are UTC, as in the canonical data: the year 1 is a time, not a 500
    cases["post-timestamp-year-1-naive"] = Req(
        "POST", "/v1/events", _event_at('"0001-01-01T00:00:00"'), status=(200,)
    )
    return cases


REQUESTS = request_cases()


@pytest.fixture(scope="module")
def model(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Model:
    m = Model.load(bundle_dir, tmp_path_factory.mktemp("trees"))
    m.warm()
    return m


@pytest.fixture()
def client(model: Model) -> TestClient:
    app = create_app(RecService(model), Settings(admin_token=TOKEN))  # default body limit
    return TestClient(app, raise_server_exceptions=False)


def _chunks(body: bytes) -> Iterator[bytes]:
    for i in range(0, len(body), 2**16):
        yield body[i : i + 2**16]


@pytest.mark.parametrize("name", list(REQUESTS))
def test_bad_requests_are_4xx_with_a_message(name: str, client: TestClient, model: Model) -> None:
    case = REQUESTS[name]
    if case.method == "GET":
        r = client.get(case.path, params=case.params)
    else:
        body = _chunks(case.body) if case.chunked else case.body
        r = client.post(case.path, content=body, headers={"content-type": "application/json"})
    assert r.status_code in case.status, (r.status_code, r.text[:500])
    assert r.status_code < 500
    if r.status_code >= 400:
        assert r.json()["detail"], r.text
    if case.fallback_for is not None:
        got = r.json()
        assert got["user_id"] == case.fallback_for  # echoed exactly as sent
        assert got["fallback"] == "popular" and len(got["items"]) == 10


def test_integer_id_bundles_take_only_canonical_integers(
    tmp_path: Path, synth_data: tuple[pl.DataFrame, pl.DataFrame], fast_config: PipelineConfig
) -> None:
    """'007', ' 7', '+7', '1_2' or '٧' (Arabic-Indic seven) are other users than 7 or 12."""
    from recsys.pipeline import Pipeline

    inter, items = synth_data
    inter = inter.with_columns(pl.col("user_id").str.strip_prefix("u").cast(pl.Int64))
    Pipeline(fast_config).fit(inter, items).save(str(tmp_path / "b"))
    m = Model.load(tmp_path / "b", tmp_path / "trees")
    m.warm()
    c = TestClient(create_app(RecService(m)), raise_server_exceptions=False)
    known = max(int(u) for u in m.user_ids)  # several digits
    r = c.get(f"/v1/recommendations/{known}").json()
    assert r["user_id"] == known and r["fallback"] is None
    digits = str(known).translate(str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩"))
    underscored = f"{known}"[0] + "_" + f"{known}"[1:]
    for other in (f"00{known}", f"+{known}", f" {known}", digits, underscored):
        r = c.get(f"/v1/recommendations/{quote(other, safe='')}")
        assert r.status_code == 200, r.text
        assert r.json()["fallback"] == "popular", other


# -- the admin endpoint -----------------------------------------------------------------
def _admin(c: TestClient, token: str | None, body: object = None) -> object:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return c.post("/admin/reload", json=body, headers=headers)


def test_admin_failures_are_rate_limited_per_client(model: Model) -> None:
    settings = Settings(admin_token=TOKEN, admin_max_failures=3, admin_failure_window_s=60)
    app = create_app(RecService(model), settings)
    clock = [1000.0]
    app.state.admin_limiter.clock = lambda: clock[0]
    c = TestClient(app, raise_server_exceptions=False)
    for guess in ("a", "b", None):
        assert _admin(c, guess).status_code == 401
    r = _admin(c, "d")
    assert r.status_code == 429 and r.headers["Retry-After"] == "60", r.text
    assert "too many failed" in r.json()["detail"]
    # blocked means blocked: not even the right token is compared until the window passes
    assert _admin(c, TOKEN, {"bundle": "/nowhere"}).status_code == 429
    clock[0] += 30
    assert _admin(c, TOKEN).headers["Retry-After"] == "30"
    clock[0] += 31  # the failures left the window
    assert _admin(c, TOKEN, {"bundle": "/nowhere"}).status_code == 409
    # a success clears the count; another client was never limited
    assert _admin(c, "e").status_code == 401
    other = TestClient(app, raise_server_exceptions=False, client=("10.0.0.9", 5000))
    assert _admin(other, "x").status_code == 401


def test_failure_limiter_forgets_the_least_recent_clients() -> None:
    lim = FailureLimiter(max_failures=1, window_s=10, max_clients=2, clock=lambda: 0.0)
    for ip in ("a", "b", "c"):
        lim.failed(ip)
    assert lim.retry_after("a") == 0 and lim.retry_after("c") == 10


def test_admin_token_never_reaches_the_logs(
    model: Model, bundle_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(admin_token=TOKEN, admin_max_failures=2)
    c = TestClient(create_app(RecService(model), settings), raise_server_exceptions=False)
    guess = "guess-" + TOKEN[::-1]
    good = tmp_path / "good"
    shutil.copytree(bundle_dir, good)
    with caplog.at_level(logging.DEBUG):
        assert _admin(c, TOKEN, {"bundle": str(tmp_path / "nowhere")}).status_code == 409
        assert _admin(c, TOKEN, {"bundle": str(good)}).status_code == 200
        assert _admin(c, guess).status_code == 401
        assert c.post("/admin/reload", headers={"Authorization": TOKEN * 1000}).status_code == 422
        assert _admin(c, TOKEN + "x").status_code == 401
        assert _admin(c, TOKEN).status_code == 429
    text = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert "wrong bearer token" in text  # failures are logged ...
    assert TOKEN not in text and TOKEN[::-1] not in text  # ... without any token


def test_reload_of_a_bundle_naming_a_path_outside_is_refused(
    client: TestClient, files: Files, model: Model
) -> None:
    for make in (_listed_outside(False), _symlinked(True)):
        d = make(files)
        r = _admin(client, TOKEN, {"bundle": str(d)})
        assert r.status_code == 409 and "refusing to load the bundle" in r.json()["detail"]
        assert client.get("/readyz").json()["model_version"] == model.version
        shutil.rmtree(d)
