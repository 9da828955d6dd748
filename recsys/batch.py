"""Batch scoring: top-k for every user of a file into Parquet, in resumable chunks.

Finished chunks are kept in `OUT.parts/` next to the output; a rerun with the same
bundle, users file, k and chunk size skips them. The final file is written to a
temporary name and renamed, and only then are the parts removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import polars as pl
from tqdm.auto import tqdm

from recsys.schema import USER, DataError

log = logging.getLogger("recsys")


def read_users(path: Path) -> pl.Series:
    """Distinct user ids of a users file, in file order."""
    if not path.exists():
        raise DataError("file not found", file=str(path))
    try:
        df = pl.read_csv(path) if path.suffix.lower() == ".csv" else pl.read_parquet(path)
    except Exception as e:
        raise DataError(f"cannot read the file ({type(e).__name__}: {e})", file=str(path)) from e
    if USER not in df.columns:
        raise DataError(
            f"no '{USER}' column; columns found: {df.columns}",
            file=str(path),
            column=USER,
            expected="a user_id column",
        )
    nulls = df.with_row_index("row").filter(pl.col(USER).is_null())["row"].to_list()
    if nulls:
        raise DataError(
            "null user ids", file=str(path), column=USER, rows=nulls, expected="an id on every row"
        )
    return df[USER].unique(maintain_order=True)


def _job_key(
    bundle_dir: Path, users: pl.Series, k: int, batch_size: int, new_item_every: int | None = None
) -> str:
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    h = hashlib.sha256()
    h.update(json.dumps(manifest["files"], sort_keys=True).encode())
    h.update(users.cast(pl.String).str.join("\x1f").item().encode())
    h.update(f"{k}/{batch_size}/{new_item_every}".encode())
    return h.hexdigest()


def recommend_file(
    bundle_dir: Path,
    users_path: Path,
    out: Path,
    k: int = 10,
    batch_size: int = 2000,
    new_item_every: int | None = None,
) -> tuple[int, int]:
    """Write (user_id, item_id, rank, score) for every user; returns (users, rows).
    `new_item_every` overrides the bundle's setting of the new-item slots."""
    from recsys.pipeline import Pipeline

    users = read_users(users_path)
    pipe = Pipeline.load(str(bundle_dir))
    if new_item_every is not None:
        pipe.new_item_every = new_item_every
    if pipe.new_item_every and pipe.lm is None:
        log.warning("new-item slots are off: the bundle has no language model to rank them")
    out.parent.mkdir(parents=True, exist_ok=True)
    parts = out.with_name(out.name + ".parts")
    key = _job_key(bundle_dir, users, k, batch_size, new_item_every)
    state = parts / "job.json"
    if parts.exists() and (not state.exists() or json.loads(state.read_text()).get("key") != key):
        shutil.rmtree(parts)
    parts.mkdir(exist_ok=True)
    state.write_text(json.dumps({"key": key}))
    chunks = range(0, len(users), batch_size)
    done = [c for c in chunks if (parts / f"part-{c // batch_size:06d}.parquet").exists()]
    if done:
        log.info("resuming: %d of %d chunks already written", len(done), len(chunks))
    bar = tqdm(
        total=len(users),
        desc="recommend",
        unit="user",
        initial=min(len(done) * batch_size, len(users)),
    )
    for c in chunks:
        part = parts / f"part-{c // batch_size:06d}.parquet"
        if part.exists():
            continue
        recs = pipe.recommend(users[c : c + batch_size], k=k)
        tmp = part.with_suffix(".tmp")
        recs.write_parquet(tmp)
        os.replace(tmp, part)
        bar.update(min(batch_size, len(users) - c))
    bar.close()
    files = [parts / f"part-{c // batch_size:06d}.parquet" for c in chunks]
    result = (
        pl.concat([pl.read_parquet(f) for f in files])
        if files
        else pl.DataFrame(
            schema={USER: users.dtype, "item_id": pl.String, "rank": pl.Int32, "score": pl.Float64}
        )
    )
    tmp = out.with_name(f".{out.name}.tmp")
    result.write_parquet(tmp)
    os.replace(tmp, out)
    shutil.rmtree(parts, ignore_errors=True)
    return len(users), len(result)
