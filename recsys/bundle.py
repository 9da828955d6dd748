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


def _json_kind(x: object) -> str:
    kinds = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return kinds.get(type(x), "number")


def _plain_name(name: object) -> bool:
    """A file name directly inside the bundle folder: no separator, no '..', not absolute."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not any(c in name for c in "/\\\x00")
        and not Path(name).is_absolute()
    )


def _named_files(manifest: dict[str, Any]) -> list[object]:
    """File names the manifest's own sections point at (the ranker's models, the language
    model's files): each must also be a checksummed entry of "files"."""
    names: list[object] = []
    ranker = manifest.get("ranker")
    if isinstance(ranker, dict) and isinstance(ranker.get("models"), list):
        names += ranker["models"]
    lm = manifest.get("lm")
    if isinstance(lm, dict) and isinstance(lm.get("files"), dict):
        names += list(lm["files"].values())
    return names


def bundle_version(manifest: dict[str, Any]) -> str:
    """The version a bundle is served and known by: its creation time and a digest of
    its manifest (which lists every file's checksum)."""
    import hashlib

    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    return f"{manifest.get('created_at', 'unsaved')}-{digest[:12]}"


VERSION_KEY = b"recsys.bundle_version"  # in the key-value metadata of `recommend`'s output


def lists_version(path: str | Path) -> str | None:
    """The bundle version `recsys recommend` wrote into a lists file; None for a file
    without it (written by something else)."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    v = meta.get(VERSION_KEY)
    return v.decode() if v is not None else None


LIST_COLUMNS = ("user_id", "item_id", "rank", "score")


def lists_problem(path: str | Path, version: str, item_ids: Any) -> str | None:
    """What keeps a lists file from serving a bundle (its version, its item ids as a
    polars Series): not Parquet, `recommend`'s columns missing, written with another
    bundle, or items the bundle does not know. None when it can serve."""
    import polars as pl

    try:
        lf = pl.scan_parquet(path)
        names = set(lf.collect_schema().names())
        made_by = lists_version(path)
    except Exception as e:
        return f"{path}: not a readable Parquet file ({e})"
    missing = set(LIST_COLUMNS) - names
    if missing:
        return (
            f"{path}: missing column(s) {sorted(missing)}; expected the output of "
            "`recsys recommend` (user_id, item_id, rank, score)"
        )
    if made_by is not None and made_by != version:
        return (
            f"{path}: lists of bundle {made_by}, but the bundle is {version}; rerun "
            "recommend with this bundle"
        )
    known = pl.DataFrame({"b": item_ids})
    try:
        ids = lf.select(pl.col("item_id").unique())
        dtype = known["b"].dtype
        as_bundle = ids.with_columns(pl.col("item_id").cast(dtype, strict=False).alias("b"))
        unknown = as_bundle.join(known.lazy(), on="b", how="anti", nulls_equal=False).collect()
    except Exception as e:
        return f"{path}: could not read item_id ({e})"
    if len(unknown):
        return (
            f"{path}: {len(unknown)} items the bundle does not know (e.g. "
            f"{unknown['item_id'][0]!r}): lists from another bundle?"
        )
    return None


def read_manifest(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """Read and verify: every listed file present with its checksum, format known.

    Refused with a BundleError naming the entry: a manifest that is not a JSON object, a
    file name that is not a plain name inside the folder ('../x', '/etc/x': nothing
    outside the folder is ever read), and a manifest or any file of the folder that is a
    symbolic link. `fit` writes no links, and a link could point outside the folder or be
    retargeted after its checksum was verified; the bundle folder itself may be a link
    (the usual `current -> v3` deployment). `verify=False` checks the manifest's form
    only, without hashing the files."""
    d = Path(path)
    if not d.is_dir():
        raise BundleError(f"{d}: no bundle here (not a directory)")
    mf = d / MANIFEST
    if mf.is_symlink():
        raise BundleError(f"{mf}: the manifest is a symbolic link; a bundle holds its own files")
    if not mf.is_file():
        raise BundleError(f"{d}: not a bundle or incomplete: {MANIFEST} is missing")
    try:
        manifest = json.loads(mf.read_bytes())
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BundleError(f"{mf}: manifest is not valid JSON ({first})") from e
    if not isinstance(manifest, dict):
        raise BundleError(f"{mf}: manifest is a JSON {_json_kind(manifest)}, not an object")
    fmt = manifest.get("format")
    if type(fmt) is not int or fmt != FORMAT:
        raise BundleError(f"{d}: bundle format {fmt!r}, this recsys reads {FORMAT}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise BundleError(f"{mf}: 'files' is a JSON {_json_kind(files)}, not an object")
    for name, info in files.items():
        if not isinstance(info, dict):
            raise BundleError(
                f"{mf}: 'files' entry {name!r} is a JSON {_json_kind(info)}, "
                'not {"sha256": ..., "bytes": ...}'
            )
    problems = [
        f"{f.name} is a symbolic link (links are not followed)"
        for f in sorted(d.iterdir())
        if f.is_symlink() and f.name != MANIFEST
    ]
    for name, info in files.items():
        if not _plain_name(name):
            problems.append(f"{name!r} is not a file name inside the bundle folder")
            continue
        f = d / name
        if f.is_symlink():
            continue  # said above
        if not f.is_file():
            problems.append(f"{name} is missing")
        elif verify and _sha256(f) != info.get("sha256"):
            problems.append(
                f"{name} does not match its checksum (changed after the bundle was written)"
            )
    for name in _named_files(manifest):
        if not isinstance(name, str) or name not in files:  # also '../x', '/abs'
            problems.append(f"{name!r} is named by the manifest but not listed in its files")
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
        for f in tmp.iterdir():  # safetensors writes its files 0600 whatever the umask
            if f.is_file() and not f.is_symlink():
                chmod_as_created(f)
        write_manifest(tmp, config, data_fingerprint, extra)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("bundle saved to %s", path)
    return path
