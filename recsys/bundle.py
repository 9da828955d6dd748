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
from importlib import metadata
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import polars as pl
from safetensors.numpy import load_file, save_file

from recsys.candidates import History
from recsys.config import PipelineConfig
from recsys.data import I, IdIndex, T, U
from recsys.pipeline import Pipeline, make_sources
from recsys.ranker import Ranker
from recsys.schema import ITEM, USER

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


def fingerprint(p: Pipeline) -> str:
    """sha256 over the training events and the catalogue ids the pipeline was fitted on."""
    h = hashlib.sha256()
    ev = p.history_.ev
    for col in (U, I, T):
        h.update(np.ascontiguousarray(ev[col].to_numpy()).tobytes())
    h.update(p.item_index_.ids.cast(pl.String).str.join("\x1f").item().encode())
    return h.hexdigest()


def write_files(p: Pipeline, d: Path) -> dict[str, Any]:
    """Write the artifacts of a fitted pipeline into `d` and return extra manifest fields."""
    pl.DataFrame({USER: p.user_index_.ids}).write_parquet(d / "users.parquet")
    p.items_.write_parquet(d / "items.parquet")
    p.history_.ev.write_parquet(d / "history.parquet")
    p.item_cats_.write_parquet(d / "item_categories.parquet")
    tensors: dict[str, np.ndarray] = {"fallback": p.fallback_.astype(np.int64)}
    for s in p.sources_:
        for k, v in s.state().items():
            tensors[f"{s.name}.{k}"] = np.ascontiguousarray(v)
    save_file(tensors, str(d / "sources.safetensors"))
    models = []
    for f, b in enumerate(p.ranker_.boosters_):
        name = f"ranker-{f}.txt"
        b.save_model(str(d / name))
        models.append(name)
    p.ranker_.importances().write_parquet(d / "importances.parquet")
    lm = p.lm.save(d) if p.lm is not None else None
    return {
        "lm": lm,
        "ranker": {
            "features": p.ranker_.features_,
            "models": models,
            "validation_ndcg@10": p.ranker_.best_score_,
        },
        "timings_s": {k: round(v, 3) for k, v in getattr(p, "timings_", {}).items()},
    }


def save(p: Pipeline, path: str | Path) -> Path:
    """Save atomically: build in a temporary sibling, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp.chmod(0o755)
    try:
        extra = write_files(p, tmp)
        write_manifest(tmp, p.config, fingerprint(p), extra)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("bundle saved to %s", path)
    return path


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


def load(path: str | Path) -> Pipeline:
    """Load a verified bundle into a ready-to-recommend pipeline."""
    d = Path(path)
    manifest = read_manifest(d)
    cfg = PipelineConfig.model_validate(manifest["config"])
    p = Pipeline(cfg)
    p.user_index_ = IdIndex(pl.read_parquet(d / "users.parquet")[USER])
    p.items_ = pl.read_parquet(d / "items.parquet")
    p.item_index_ = IdIndex(p.items_[ITEM])
    p.item_cats_ = pl.read_parquet(d / "item_categories.parquet")
    ev = pl.read_parquet(d / "history.parquet")
    p.history_ = History(ev, len(p.user_index_), len(p.item_index_))
    tensors = load_file(str(d / "sources.safetensors"))
    p.fallback_ = tensors["fallback"]
    p.sources_ = []
    p.lm_ = None
    if manifest.get("lm"):
        from recsys.lm.model import LanguageModel

        p.lm_ = LanguageModel.load(d, manifest["lm"], cfg.lm, cfg.seed)
    for s in make_sources(cfg, p.lm_):
        prefix = f"{s.name}."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        p.sources_.append(s.load_state(state, p.history_))
    r = Ranker()
    r.boosters_ = [lgb.Booster(model_file=str(d / name)) for name in manifest["ranker"]["models"]]
    r.features_ = list(manifest["ranker"]["features"])
    r.best_score_ = float(manifest["ranker"]["validation_ndcg@10"])
    p.ranker_ = r
    p.manifest_ = manifest
    return p
