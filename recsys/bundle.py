"""The bundle: a directory holding a fitted pipeline in safe formats only.

    manifest.json          versions, config, data fingerprint, fit log, sha256 of every file
    users.parquet          user ids, in index order
    items.parquet          the items table, in index order
    history.parquet        training events (u, i, t)
    item_categories.parquet
    sources.safetensors    learned arrays of every candidate source
    lm_*.safetensors       the language model: fine-tuned encoder layers and projection,
                           user tower, item vectors (the manifest's "lm" section names
                           the base encoder and tokenizer, the text template, sizes)
    ranker-N.txt           LightGBM's own text models (one per fold, averaged; one with
                           `[ranker] refit`)
    importances.parquet    ranker feature importances

Written to a temporary sibling directory and renamed into place, so a failed save
never leaves a half-written bundle. Loading verifies every checksum first.

This module is the format (manifest, checksums, atomic writes); what goes into the
files is the pipeline's (`Pipeline.save`, `Pipeline.load`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from recsys.config import PipelineConfig
from recsys.schema import chmod_as_created

log = logging.getLogger("recsys")

FORMAT = 1
MANIFEST = "manifest.json"


class BundleError(RuntimeError):
    """A bundle that is missing, incomplete, tampered with or of another format."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("recsys", "numpy", "polars", "lightgbm", "scipy", "implicit", "safetensors"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


MANIFEST_KEYS = frozenset(
    {"format", "created_at", "versions", "config", "data_fingerprint", "files"}
)


def write_manifest(
    d: Path, config: PipelineConfig, data_fingerprint: str, extra: dict[str, Any]
) -> None:
    files = {
        f.name: {"sha256": _sha256(f), "bytes": f.stat().st_size}
        for f in sorted(d.iterdir())
        if f.is_file() and f.name != MANIFEST
    }
    manifest = {
        "format": FORMAT,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": _versions(),
        "config": config.model_dump(),
        "data_fingerprint": data_fingerprint,
        "files": files,
        **extra,
    }
    _dump_manifest(d, manifest)


def _dump_manifest(d: Path, manifest: dict[str, Any]) -> None:
    with open(d / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=False)
        f.flush()
        os.fsync(f.fileno())


def _replace_dir(tmp: Path, path: Path) -> None:
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read and verify: every listed file present with its checksum, format known."""
    d = Path(path)
    if not d.is_dir():
        raise BundleError(f"{d}: no bundle here (not a directory)")
    mf = d / MANIFEST
    if not mf.is_file():
        raise BundleError(f"{d}: not a bundle or incomplete: {MANIFEST} is missing")
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mf}: manifest is not valid JSON ({e})") from e
    if manifest.get("format") != FORMAT:
        raise BundleError(
            f"{d}: bundle format {manifest.get('format')!r}, this recsys reads {FORMAT}"
        )
    problems = []
    for name, info in manifest.get("files", {}).items():
        f = d / name
        if not f.is_file():
            problems.append(f"{name} is missing")
        elif _sha256(f) != info.get("sha256"):
            problems.append(
                f"{name} does not match its checksum (changed after the bundle was written)"
            )
    if problems:
        raise BundleError(f"{d}: refusing to load the bundle: " + "; ".join(problems))
    return manifest


def write(
    path: str | Path,
    config: PipelineConfig,
    data_fingerprint: str,
    write_files: Callable[[Path], dict[str, Any]],
) -> Path:
    """Write a bundle atomically: `write_files(d)` fills a temporary sibling directory
    `d` and returns extra manifest fields; the manifest (with every file's checksum)
    is added and the directory renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    chmod_as_created(tmp, directory=True)
    try:
        extra = write_files(tmp)
        write_manifest(tmp, config, data_fingerprint, extra)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("bundle saved to %s", path)
    return path
