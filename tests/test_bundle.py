"""The bundle: loads back to the same lists, refuses tampering, never half-written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from recsys.bundle import BundleError
from recsys.pipeline import Pipeline


def test_loaded_bundle_gives_the_same_lists(fitted, bundle_dir: Path) -> None:  # type: ignore[no-untyped-def]
    users = fitted.user_index_.ids.head(40)
    a = fitted.recommend(users, k=10)
    b = Pipeline.load(str(bundle_dir)).recommend(users, k=10)
    assert a.equals(b)


def test_bundle_holds_only_safe_formats_and_a_complete_manifest(bundle_dir: Path) -> None:
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    files = {p.name for p in bundle_dir.iterdir()} - {"manifest.json"}
    assert files == set(manifest["files"])
    assert all(Path(f).suffix in {".parquet", ".safetensors", ".txt", ".json"} for f in files)
    assert {"numpy", "polars", "lightgbm", "python"} <= set(manifest["versions"])
    assert len(manifest["data_fingerprint"]) == 64
    assert manifest["config"]["target_fraction"] == 0.2


@pytest.fixture()
def copy(bundle_dir: Path, tmp_path: Path) -> Path:
    d = tmp_path / "copy"
    shutil.copytree(bundle_dir, d)
    return d


def test_tampered_file_is_refused_by_name(copy: Path) -> None:
    f = copy / "ranker-0.txt"
    f.write_bytes(f.read_bytes().replace(b"leaf_value=", b"leaf_value=1", 1))
    with pytest.raises(BundleError, match=r"ranker-0\.txt does not match its checksum"):
        Pipeline.load(str(copy))


def test_missing_file_is_refused(copy: Path) -> None:
    (copy / "sources.safetensors").unlink()
    with pytest.raises(BundleError, match=r"sources\.safetensors is missing"):
        Pipeline.load(str(copy))


def test_missing_manifest_is_refused(copy: Path) -> None:
    (copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match=r"manifest\.json is missing"):
        Pipeline.load(str(copy))


def test_failed_save_leaves_the_old_bundle_intact(fitted, copy: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    before = (copy / "manifest.json").read_text()

    def boom(self, d):  # type: ignore[no-untyped-def]
        (d / "users.parquet").write_text("partial")
        raise OSError("disk full")

    monkeypatch.setattr(Pipeline, "_write_files", boom)
    with pytest.raises(OSError, match="disk full"):
        fitted.save(str(copy))
    assert (copy / "manifest.json").read_text() == before
    Pipeline.load(str(copy))  # still valid
    assert [p.name for p in copy.parent.iterdir() if p.name.startswith(".")] == []
