"""The command contract of DESIGN.md, run as a user runs it: fit, recommend, evaluate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

RECSYS = str(Path(sys.executable).with_name("recsys"))
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

FAST_TOML = """
[sources]
per_source = 50
als_iterations = 3

[ranker]
n_estimators = 60
early_stopping_rounds = 20
"""


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([RECSYS, *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def fast_toml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("cfg") / "fast.toml"
    p.write_text(FAST_TOML)
    return p


@pytest.fixture(scope="module")
def cli_bundle(synth_dir: Path, fast_toml: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "bundle"
    r = run(
        "fit",
        "--interactions",
        str(synth_dir / "interactions.parquet"),
        "--items",
        str(synth_dir / "items.parquet"),
        "--out",
        str(out),
        "--config",
        str(fast_toml),
        "--no-lm",
    )
    assert r.returncode == 0, r.stderr
    # the fit log shows the time of each stage
    assert "stage ranker" in r.stderr and "fit time by stage" in r.stdout
    return out


def test_fit_then_recommend_writes_k_unseen_rows_per_user(
    cli_bundle: Path, synth_dir: Path, tmp_path: Path
) -> None:
    inter = pl.read_parquet(synth_dir / "interactions.parquet")
    known = inter["user_id"].unique().sort().head(30).to_list()
    users = tmp_path / "users.parquet"
    pl.DataFrame({"user_id": [*known, "never-seen-user"]}).write_parquet(users)
    out = tmp_path / "recs.parquet"
    r = run("recommend", "--bundle", str(cli_bundle), "--users", str(users), "--k", "7")
    assert r.returncode != 0  # --out is required
    r = run(
        "recommend", "--bundle", str(cli_bundle), "--users", str(users),
        "--k", "7", "--out", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    recs = pl.read_parquet(out)
    assert recs.columns == ["user_id", "item_id", "rank", "score"]
    counts = recs.group_by("user_id").agg(pl.len(), pl.col("rank").sort())
    assert counts.height == 31
    assert set(counts["len"].to_list()) == {7}
    assert all(ranks == list(range(1, 8)) for ranks in counts["rank"].to_list())
    seen = inter.select("user_id", "item_id").unique()
    assert recs.join(seen, on=["user_id", "item_id"], how="semi").height == 0
    assert not list(tmp_path.glob("*.parts"))  # parts cleaned once the file is complete


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux's")
def test_recommend_starts_a_worker_per_cpu_it_may_use(
    cli_bundle: Path, synth_dir: Path, tmp_path: Path
) -> None:
    """Run on one CPU (`taskset -c N`), the default is one worker process, not one per
    core of the machine (each holds the bundle)."""
    inter = pl.read_parquet(synth_dir / "interactions.parquet")
    users = tmp_path / "users.parquet"
    pl.DataFrame({"user_id": inter["user_id"].unique().sort().head(40)}).write_parquet(users)
    one = min(os.sched_getaffinity(0))
    out = tmp_path / "recs.parquet"
    args = ["recommend", "--bundle", str(cli_bundle), "--users", str(users), "--k", "3",
            "--batch-size", "10", "--out", str(out)]  # fmt: skip
    r = subprocess.run(
        [RECSYS, *args], capture_output=True, text=True, timeout=600,
        preexec_fn=lambda: os.sched_setaffinity(0, {one}),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "recommend: 1 worker process, one per CPU: 1 usable CPU" in r.stderr, r.stderr
    if (os.cpu_count() or 1) > 1:
        assert f"affinity 1 of {os.cpu_count()} cores" in r.stderr
    assert pl.read_parquet(out).height == 40 * 3


def test_fit_on_bad_input_names_file_column_and_exits_nonzero(
    synth_dir: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.parquet"
    pl.read_parquet(synth_dir / "interactions.parquet").drop("timestamp").write_parquet(bad)
    out = tmp_path / "b"
    r = run(
        "fit", "--interactions", str(bad), "--items", str(synth_dir / "items.parquet"),
        "--out", str(out),
    )  # fmt: skip
    assert r.returncode == 2
    assert "bad.parquet" in r.stderr and "timestamp" in r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()


def test_recommend_refuses_a_tampered_bundle(cli_bundle: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(cli_bundle, copy)
    with open(copy / "history.parquet", "ab") as f:
        f.write(b"x")
    users = tmp_path / "u.parquet"
    pl.DataFrame({"user_id": ["a"]}).write_parquet(users)
    r = run("recommend", "--bundle", str(copy), "--users", str(users), "--out", str(tmp_path / "r"))
    assert r.returncode == 2
    assert "history.parquet" in r.stderr and "checksum" in r.stderr


def test_interrupted_recommend_resumes_from_finished_chunks(
    cli_bundle: Path, synth_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from recsys import batch
    from recsys.pipeline import Pipeline

    users = tmp_path / "users.parquet"
    ids = pl.read_parquet(synth_dir / "interactions.parquet")["user_id"].unique().sort().head(50)
    pl.DataFrame({"user_id": ids}).write_parquet(users)
    out = tmp_path / "recs.parquet"
    real = Pipeline.recommend_indices
    calls: list[int] = []

    def failing(self, user_ids, k=10, **kw):  # type: ignore[no-untyped-def]
        calls.append(len(user_ids))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, user_ids, k, **kw)

    monkeypatch.setattr(Pipeline, "recommend_indices", failing)
    with pytest.raises(KeyboardInterrupt):
        batch.recommend_file(cli_bundle, users, out, k=5, batch_size=10)
    assert not out.exists()
    assert len(list(out.with_name(out.name + ".parts").glob("part-*.parquet"))) == 2
    calls.clear()
    monkeypatch.setattr(Pipeline, "recommend_indices", real)
    n_users, n_rows = batch.recommend_file(cli_bundle, users, out, k=5, batch_size=10)
    assert (n_users, n_rows) == (50, 250)
    assert calls == [] and pl.read_parquet(out)["user_id"].n_unique() == 50
    whole = tmp_path / "whole.parquet"
    batch.recommend_file(cli_bundle, users, whole, k=5, batch_size=10)
    assert pl.read_parquet(out).equals(pl.read_parquet(whole))


def test_recommend_killed_midway_reruns_to_the_same_file(
    cli_bundle: Path, synth_dir: Path, tmp_path: Path
) -> None:
    """`kill -9` while parts are being written, then the same command again: the same
    output file as a run that was never interrupted, and no half-written part."""
    import signal
    import time

    users = tmp_path / "users.parquet"
    ids = pl.read_parquet(synth_dir / "interactions.parquet")["user_id"].unique().sort()
    pl.DataFrame({"user_id": ids}).write_parquet(users)
    out = tmp_path / "recs.parquet"
    parts = out.with_name(out.name + ".parts")
    args = ["recommend", "--bundle", str(cli_bundle), "--users", str(users), "--k", "5",
            "--batch-size", "5", "--workers", "1"]  # fmt: skip
    p = subprocess.Popen([RECSYS, *args, "--out", str(out)], stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("part-*.parquet"))) < 3:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    written = len(list(parts.glob("part-*.parquet")))
    assert not out.exists() and 3 <= written < len(ids) // 5, written
    r = run(*args, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr
    whole = tmp_path / "whole.parquet"
    assert run(*args, "--out", str(whole)).returncode == 0
    assert pl.read_parquet(out).equals(pl.read_parquet(whole))
    assert not parts.exists() and not list(tmp_path.glob(".*tmp"))


def test_evaluate_prints_the_table_and_writes_the_report(
    synth_dir: Path, fast_toml: Path, tmp_path: Path
) -> None:
    out = tmp_path / "report"
    r = run(
        "evaluate", "--interactions", str(synth_dir / "interactions.parquet"),
        "--items", str(synth_dir / "items.parquet"), "--out", str(out),
        "--config", str(fast_toml), "--no-lm", "--seed", "3",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    for model in ("MostPop", "ItemKNN", "EASE", "ALS", "recsys"):
        assert model in r.stdout
    assert (out / "metrics.json").is_file() and (out / "report.md").is_file()
    assert json.loads((out / "metrics.json").read_text())["seed"] == 3  # --seed over the file's


def test_seeds_benchmark_runs_evaluate_once_per_seed(
    synth_dir: Path, fast_toml: Path, tmp_path: Path
) -> None:
    out = tmp_path / "seeds"
    r = subprocess.run(
        [sys.executable, str(BENCHMARKS / "seeds.py"), "--data", str(synth_dir),
         "--seeds", "0,2", "--config", str(fast_toml), "--no-lm", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    got = json.loads((out / "seeds.json").read_text())
    assert [row["seed"] for row in got["rows"]] == [0, 2]
    for row in got["rows"]:
        m = json.loads((out / f"seed{row['seed']}" / "metrics.json").read_text())
        assert row["no_lm"] == m["models"]["recsys (no LM)"]["ndcg@10"]
        assert row["peak_gib"] > 0.05 and row["wall_s"] > 0
    assert got["summary"]["no_lm"]["worst"] == min(row["no_lm"] for row in got["rows"])
    assert "machine:" in r.stdout and not list(out.glob("cache*"))


def test_seeds_benchmark_reads_seed_lists_and_sums_up_the_lift() -> None:
    sys.path.insert(0, str(BENCHMARKS))
    from seeds import parse_seeds, seed_row, summarise

    assert parse_seeds("0-4") == [0, 1, 2, 3, 4] and parse_seeds("1-2,7") == [1, 2, 7]
    for bad in ("a", "3-", "1,1", "0-2,2"):
        with pytest.raises(ValueError):
            parse_seeds(bad)

    def metrics(seed: int, with_lm: float, without: float, lo: float) -> dict[str, object]:
        models = {"EASE": 0.1, "recsys": with_lm, "recsys (no LM)": without}
        return {
            "k": 10,
            "seed": seed,
            "models": {n: {"ndcg@10": v, "seconds": 1.0} for n, v in models.items()},
            "ablation": {"paired": {"lo": lo, "hi": lo + 0.01}},
        }

    rows = [seed_row(metrics(0, 0.22, 0.20, 0.001)), seed_row(metrics(1, 0.19, 0.20, -0.02))]
    assert rows[0]["lift"] == pytest.approx(1.1) and rows[0]["x_ease"] == pytest.approx(2.2)
    assert rows[1]["diff_lo"] == -0.02 and rows[1]["seed"] == 1
    s = summarise(rows)
    assert s["lift"]["mean"] == pytest.approx(1.025) and s["lift"]["worst"] == pytest.approx(0.95)
    assert s["recsys"]["worst"] == 0.19 and s["interval_excludes_zero"] == 1
