"""Shared fixtures: small synthetic data sets written by the tests themselves."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic data set (string ids), canonical Parquet."""
    from recsys.synth import generate

    d = tmp_path_factory.mktemp("synth")
    generate(d, n_users=300, n_items=250, n_events=12_000, seed=1, progress=False)
    return d


@pytest.fixture(scope="session")
def synth_data(synth_dir: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    from recsys.schema import read_interactions, read_items

    items = read_items(synth_dir / "items.parquet")
    return read_interactions(synth_dir / "interactions.parquet", items=items), items


@pytest.fixture(scope="session")
def fast_config():  # type: ignore[no-untyped-def]
    from recsys.config import PipelineConfig

    return PipelineConfig.model_validate(
        {
            "use_lm": False,  # the language model has its own tests (tests/test_lm.py)
            "sources": {"per_source": 50, "als_iterations": 3},
            "ranker": {"n_estimators": 60, "early_stopping_rounds": 20},
        }
    )


@pytest.fixture(scope="session")
def fitted(synth_data, fast_config):  # type: ignore[no-untyped-def]
    from recsys.pipeline import Pipeline

    inter, items = synth_data
    return Pipeline(fast_config).fit(inter, items)


@pytest.fixture(scope="session")
def bundle_dir(fitted, tmp_path_factory: pytest.TempPathFactory) -> Path:  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("bundle") / "b"
    fitted.save(str(d))
    return d


@pytest.fixture(scope="module")
def tree_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the serving tests keep the bundle's compiled trees."""
    return tmp_path_factory.mktemp("trees")


@pytest.fixture(scope="module")
def model(bundle_dir: Path, tree_cache: Path):  # type: ignore[no-untyped-def]
    """The small bundle loaded and warmed as a server holds it."""
    from recsys.service import Model

    m = Model.load(bundle_dir, tree_cache)
    m.warm()
    return m


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A fresh folder with a short path (for Unix sockets, whose paths hold about 100
    bytes), removed afterwards."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="rs-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until `recsys serve` at `base` answers /readyz with 200; AssertionError when it
    exits first or is not ready in `timeout` seconds."""
    import httpx

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"{base}: the server exited ({proc.returncode})")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{base} was not ready after {timeout} s")


def list_refreshes(base: str) -> dict[str, float]:
    """A running server's `recsys_list_refreshes` counts by outcome (/metrics)."""
    import re

    import httpx

    text = httpx.get(f"{base}/metrics", timeout=10).text
    found = re.findall(r'recsys_list_refreshes_total\{outcome="(\w+)"\} (\S+)', text)
    return {k: float(v) for k, v in found}


def another_version(bundle_dir: Path, dst: Path) -> Path:
    """A copy of the bundle that is another version of the same model (its manifest's
    time differs), for reload tests."""
    import json
    import shutil

    shutil.copytree(bundle_dir, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["created_at"] = "2000-01-01T00:00:00Z"
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def movielens_dir() -> Path:
    d = SHARED / "ml-latest-small"
    if not (d / "ratings.csv").exists():
        pytest.skip("ml-latest-small is not present in ../shared/datasets")
    return d


@pytest.fixture(scope="session")
def tiny_bert(synth_data, tmp_path_factory: pytest.TempPathFactory) -> Path:  # type: ignore[no-untyped-def]
    """A 2-layer randomly initialised BERT with a word-level vocabulary from the
    synthetic item texts: fast language-model tests, no network."""
    import re

    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from recsys.lm.text import item_texts

    _, items = synth_data
    words = sorted({w for t in item_texts(items) for w in re.findall(r"\w+|[^\w\s]", t.lower())})
    d = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(d / "vocab.txt")).save_pretrained(d)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def lm_config(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from recsys.config import PipelineConfig

    return PipelineConfig.model_validate(
        {
            "sources": {"per_source": 50, "als_iterations": 3},
            "ranker": {"n_estimators": 60, "early_stopping_rounds": 20},
            "lm": {
                "model": str(tiny_bert),
                "dim": 16,
                "epochs": 2,
                "encoder_epochs": 1,
                "batch_size": 128,
                "negatives": 64,
                "max_length": 32,
                "cpu_train_layers": 1,
                "checkpoints": False,
                "device": "cpu",
                "cpu_threads": 1,
            },
        }
    )


@pytest.fixture(scope="session")
def lm_pipeline(synth_data, lm_config):  # type: ignore[no-untyped-def]
    from recsys.pipeline import Pipeline

    inter, items = synth_data
    return Pipeline(lm_config).fit(inter, items)


@pytest.fixture(scope="session")
def lm_bundle(lm_pipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("lm-bundle") / "b"
    lm_pipeline.save(str(d))
    return d


@pytest.fixture(scope="session")
def fresh_process_lists():  # type: ignore[no-untyped-def]
    """A function that loads a bundle in new Python processes, one after the other
    with one tree cache, and ranks users 0..n-1 with compiled trees: per process, the
    lists and whether torch and LightGBM were imported (what a batch worker pays)."""
    import json
    import os
    import subprocess
    import sys

    def run(bundle: Path, tree_cache: Path, n_users: int, processes: int = 2) -> list[dict]:
        code = (
            "import json, sys\n"
            "import numpy as np\n"
            "from recsys.pipeline import Pipeline\n"
            f"p = Pipeline.load({str(bundle)!r})\n"
            f"items, _ = p.recommend_indices(np.arange({n_users}), 10, compiled=True, threads=1)\n"
            "print(json.dumps({'items': items.tolist(), 'torch': 'torch' in sys.modules,\n"
            "                  'lightgbm': 'lightgbm' in sys.modules}))\n"
        )
        env = {**os.environ, "RECSYS_TREE_CACHE": str(tree_cache)}
        out = []
        for _ in range(processes):
            done = subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
            )
            out.append(json.loads(done.stdout.splitlines()[-1]))
        return out

    return run
