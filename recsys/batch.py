"""Batch scoring: top-k for every user of a file into Parquet, in resumable parts.

The users are cut into parts of `batch_size`; each part is ranked (a memory budget
sets how many users share a chunk inside it) and written to `OUT.parts/` next to the
output, under a temporary name and then renamed, so a part is either whole or absent.
A rerun with the same bundle, users file, k and part size skips the finished parts.
The final file is streamed from the parts (one part in memory at a time) to a
temporary name and renamed; only then are the parts removed. Memory therefore stays
at one bundle and one part per worker, whatever the number of users.

Engines: `local` ranks in this process or in `workers` processes on this machine
(each loads the bundle once); `ray` runs the same parts on a Ray cluster
(`recsys.distributed`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import polars as pl
from tqdm.auto import tqdm

from recsys.schema import ITEM, USER, DataError

log = logging.getLogger("recsys")


def read_users(path: Path) -> pl.Series:
    """Distinct user ids of a users file, in file order."""
    if not path.exists():
        raise DataError("file not found", file=str(path))
    try:
        df = (
            pl.read_csv(path, columns=[USER])
            if path.suffix.lower() == ".csv"
            else pl.read_parquet(path, columns=[USER])
        )
    except pl.exceptions.ColumnNotFoundError as e:
        try:
            found = (
                pl.read_csv(path, n_rows=0).columns
                if path.suffix.lower() == ".csv"
                else list(pl.read_parquet_schema(path))
            )
        except Exception:
            found = []
        raise DataError(
            f"no '{USER}' column; columns found: {found}",
            file=str(path),
            column=USER,
            expected="a user_id column",
        ) from e
    except Exception as e:
        raise DataError(f"cannot read the file ({type(e).__name__}: {e})", file=str(path)) from e
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


def part_path(parts: Path, index: int) -> Path:
    return parts / f"part-{index:06d}.parquet"


def write_atomic(df: pl.DataFrame, path: Path) -> None:
    """Write to a temporary sibling, then rename: the file is whole or absent."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    df.write_parquet(tmp)
    os.replace(tmp, path)


class PartJob:
    """What ranking one part needs: the bundle, the users, k; loaded once per process."""

    def __init__(
        self,
        bundle_dir: Path,
        users_path: Path,
        parts: Path,
        k: int,
        batch_size: int,
        new_item_every: int | None,
        threads: int | None = None,
    ) -> None:
        self.bundle_dir, self.users_path, self.parts = bundle_dir, users_path, parts
        self.k, self.batch_size, self.new_item_every = k, batch_size, new_item_every
        self.threads = threads
        self._pipe: Any = None
        self._users: pl.Series | None = None

    def _load(self) -> None:
        from recsys.pipeline import Pipeline

        pipe = Pipeline.load(str(self.bundle_dir))
        if self.new_item_every is not None:
            pipe.new_item_every = self.new_item_every
        pipe.compiled_trees(self.threads)  # compiled (or read from the cache) once
        self._pipe = pipe
        self._users = read_users(self.users_path)

    def load(self) -> float:
        """Load the bundle (once); returns the memory a part's work takes beside it, in
        GiB: the chunk budget of the bundle's settings."""
        if self._pipe is None:
            self._load()
        return float(self._pipe.config.chunk_memory_mb) / 1024

    def lists(self, users: pl.Series) -> pl.DataFrame:
        """(user_id, item_id, rank, score) for a slice of users."""
        if self._pipe is None:
            self._load()
        pipe = self._pipe
        items, scores = pipe.recommend_indices(
            pipe.user_index_.lookup(users), self.k, compiled=True, threads=self.threads
        )
        return pipe.lists_frame(users, items, scores)

    def run(self, index: int) -> int:
        """Rank part `index` and write it; returns its number of users."""
        if self._pipe is None:
            self._load()
        assert self._users is not None
        users = self._users[index * self.batch_size : (index + 1) * self.batch_size]
        write_atomic(self.lists(users), part_path(self.parts, index))
        return len(users)


_JOB: PartJob | None = None  # a worker process's job, set by its initializer


def _init_worker(job: PartJob) -> None:
    global _JOB
    logging.getLogger("recsys").setLevel(logging.WARNING)
    _JOB = job


def _run_part(index: int) -> int:
    assert _JOB is not None, "worker without a job"
    return _JOB.run(index)


def _load_worker() -> float:
    """Load the job's bundle in this worker; returns what another worker would take,
    in GiB: this one's memory now less the pages it shares with other processes, and
    a part's working memory."""
    from recsys.memory import rss_gib
    from recsys.resources import shared_memory

    assert _JOB is not None, "worker without a job"
    part = _JOB.load()
    return max(0.0, rss_gib()[0] - shared_memory() / 2**30) + part


@contextmanager
def _single_threaded_children() -> Iterator[None]:
    """Worker processes share the cores: one thread each for the numeric libraries
    (set in the environment they start with)."""
    keys = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "POLARS_MAX_THREADS")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(dict.fromkeys(keys, "1"))
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


MEMORY_SHARE = 0.85  # of the memory available after the first worker, for the others


def workers_that_fit(workers: int, worker_gib: float, available: int | None) -> int:
    """How many workers of `worker_gib` each can run at once when one is already
    running and `available` bytes are left (None: unknown, no cap): at least 1."""
    if available is None or worker_gib <= 0:
        return workers
    more = int(MEMORY_SHARE * available / 2**30 // worker_gib)
    return max(1, min(workers, 1 + more))


def run_local(job: PartJob, todo: list[int], workers: int, on_done: Callable[[int], None]) -> None:
    """Rank the parts `todo` in this process (workers <= 1) or in worker processes.

    Each worker holds the bundle, so the first worker loads it alone: the memory it
    took for itself (its resident memory less what it shares) and a part's working
    memory, against the memory still available (the machine's, within the cgroup's
    limit), cap how many more workers start beside it. A worker killed meanwhile (the
    system out of memory) raises `WorkerLost`; the parts written so far stay."""
    if workers <= 1 or len(todo) <= 1:
        for index in todo:
            on_done(job.run(index))
        return
    job.threads = 1
    want = min(workers, len(todo))

    def pool(n: int) -> ProcessPoolExecutor:
        ctx = get_context("spawn")
        return ProcessPoolExecutor(n, mp_context=ctx, initializer=_init_worker, initargs=(job,))

    try:
        _run_parts(pool, todo, want, on_done)
    except BrokenProcessPool:
        raise WorkerLost(
            "a worker process was killed while ranking (out of memory?); the parts "
            "written so far are kept: rerun with fewer --workers to go on"
        ) from None


class WorkerLost(RuntimeError):
    """A worker process died while ranking a part (killed: out of memory, a signal)."""


def _run_parts(
    pool: Callable[[int], ProcessPoolExecutor],
    todo: list[int],
    want: int,
    on_done: Callable[[int], None],
) -> None:
    from recsys.resources import available_memory

    with _single_threaded_children(), pool(1) as first:
        gib = first.submit(_load_worker).result()
        avail = available_memory()
        n = workers_that_fit(want, gib, avail)
        if n < want:
            log.warning(
                "recommend: running %d of %d workers: each takes %.2f GiB of its own and "
                "%.2f GiB is available",
                n,
                want,
                gib,
                (avail or 0) / 2**30,
            )
        # the first worker goes on beside a pool of the others: processes never
        # exceed n (a pool may start a process per task it is given)
        pools = [(first, 1)] if n == 1 else [(first, 1), (pool(n - 1), n - 1)]
        try:
            rest = iter(todo)
            running: dict[Future[int], ProcessPoolExecutor] = {}
            while True:
                for p, cap in pools:
                    busy = sum(q is p for q in running.values())
                    for index in itertools.islice(rest, max(0, cap - busy)):
                        running[p.submit(_run_part, index)] = p
                if not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for f in done:
                    del running[f]
                    on_done(f.result())
        finally:
            for p, _ in pools[1:]:
                p.shutdown()


def merge_parts(
    files: list[Path], out: Path, users_dtype: pl.DataType, version: str | None = None
) -> int:
    """Stream the parts into `out` (temporary name, then rename); returns its rows.
    `version`: the bundle's, kept in the file's metadata (`recsys serve --lists` checks
    it)."""
    import pyarrow.parquet as pq

    from recsys.bundle import VERSION_KEY

    schema = pl.DataFrame(
        schema={USER: users_dtype, ITEM: pl.String, "rank": pl.Int32, "score": pl.Float64}
    )
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    rows = 0
    writer: pq.ParquetWriter | None = None
    try:
        for f in files:
            table = pq.read_table(f, schema=None)
            if writer is None:
                meta = dict(table.schema.metadata or {})
                if version is not None:
                    meta[VERSION_KEY] = version.encode()
                writer = pq.ParquetWriter(tmp, table.schema.with_metadata(meta))
            writer.write_table(table)
            rows += table.num_rows
        if writer is None:  # no users: an empty file with the columns
            empty = schema.to_arrow()
            if version is not None:
                empty = empty.replace_schema_metadata({VERSION_KEY: version.encode()})
            pq.write_table(empty, tmp)
        else:
            writer.close()
            writer = None
        os.replace(tmp, out)
    finally:
        if writer is not None:
            writer.close()
        if tmp.exists():
            tmp.unlink()
    return rows


def recommend_file(
    bundle_dir: Path,
    users_path: Path,
    out: Path,
    k: int = 10,
    batch_size: int = 1000,
    new_item_every: int | None = None,
    engine: str = "local",
    workers: int = 1,
    address: str | None = None,
) -> tuple[int, int]:
    """Write (user_id, item_id, rank, score) for every user; returns (users, rows).
    `new_item_every` overrides the bundle's setting of the new-item slots."""
    from recsys.bundle import bundle_version, read_manifest

    users = read_users(users_path)
    manifest = read_manifest(bundle_dir)  # refuses a damaged bundle before any work
    new_every = manifest["config"].get("new_item_every", 0)
    if (new_item_every if new_item_every is not None else new_every) and not manifest.get("lm"):
        log.warning("new-item slots are off: the bundle has no language model to rank them")
    out.parent.mkdir(parents=True, exist_ok=True)
    parts = out.with_name(out.name + ".parts")
    key = _job_key(bundle_dir, users, k, batch_size, new_item_every)
    state = parts / "job.json"
    if parts.exists() and (not state.exists() or json.loads(state.read_text()).get("key") != key):
        shutil.rmtree(parts)
    parts.mkdir(exist_ok=True)
    state.write_text(json.dumps({"key": key}))
    n_parts = -(-len(users) // batch_size)
    todo = [i for i in range(n_parts) if not part_path(parts, i).exists()]
    if len(todo) < n_parts:
        log.info("resuming: %d of %d parts already written", n_parts - len(todo), n_parts)
    done_users = sum(
        min(batch_size, len(users) - i * batch_size) for i in range(n_parts) if i not in set(todo)
    )
    bar = tqdm(total=len(users), desc="recommend", unit="user", initial=done_users)
    job = PartJob(bundle_dir, users_path, parts, k, batch_size, new_item_every)
    if todo:
        if engine == "ray":
            from recsys.distributed import run_ray

            run_ray(job, todo, address=address, workers=workers, on_done=bar.update)
        elif engine == "local":
            run_local(job, todo, workers, bar.update)
        else:
            raise ValueError(f"unknown engine {engine!r}: 'local' or 'ray'")
    bar.close()
    rows = merge_parts(
        [part_path(parts, i) for i in range(n_parts)], out, users.dtype, bundle_version(manifest)
    )
    shutil.rmtree(parts, ignore_errors=True)
    return len(users), rows
