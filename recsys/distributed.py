"""Ray as the engine past one machine: the batch job's parts and the item encoding on
Ray Data, over actor pools whose actors load the bundle once.

    pip install 'recsys[ray]'
    recsys recommend --engine ray [--address ray://head:10001] ...
    recsys encode-items --engine ray ...

Without an address (and without RAY_ADDRESS) a local Ray starts on this machine; with
one, the job attaches to that cluster. The cluster's workers must see the bundle, the
input file and the output's folder at the same paths (a shared file system).

recommend: a dataset of the parts still to write (the same parts as the local engine:
`batch_size` distinct users each, in file order) is mapped by an actor pool; each
actor loads the bundle and the users once, ranks a part, and writes it under a
temporary name then renames it, so a part is whole or absent. The driver streams the
parts into the output as the local engine does. The lists are the local engine's, a
rerun after a failure (or kill -9) skips the parts already written, and the output
is the same file.

encode-items: `read_parquet` of the new items, mapped by an actor pool whose actors
hold the bundle's item tower (each asks for a GPU where the cluster has them),
returning the vectors the driver adds to the bundle.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from recsys.resources import usable_cpus
from recsys.schema import ITEM

log = logging.getLogger("recsys")


class Parts(Protocol):
    """A batch job cut in parts (`recsys.batch.PartJob`): `run` writes one part."""

    threads: int | None

    def run(self, index: int) -> int: ...


SINGLE_THREAD = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "POLARS_MAX_THREADS": "1",
}


def _ray() -> Any:
    try:
        import ray
    except ImportError as e:  # pragma: no cover - the extra is not installed
        raise RuntimeError(
            "the ray engine needs Ray: pip install 'recsys[ray]' (or use --engine local)"
        ) from e
    return ray


def connect(address: str | None = None, num_cpus: int | None = None) -> Any:
    """Attach to the cluster at `address` (or RAY_ADDRESS), else start a local Ray."""
    ray = _ray()
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        kw: dict[str, Any] = {
            "include_dashboard": False,
            "log_to_driver": False,
            "logging_level": logging.ERROR,
        }
        if address is None:
            kw["num_cpus"] = num_cpus or usable_cpus()

        ray.init(address=address, runtime_env={"env_vars": SINGLE_THREAD}, **kw)
        ray.data.DataContext.get_current().enable_progress_bars = False
        for name in ("ray", "ray.data"):  # our own bar shows the progress
            for handler in logging.getLogger(name).handlers:
                handler.setLevel(logging.ERROR)
    return ray


def run_ray(
    job: Parts,
    todo: list[int],
    address: str | None = None,
    workers: int = 0,
    on_done: Callable[[int], None] | None = None,
) -> None:
    """Write the parts `todo` of a batch job with a Ray Data actor pool."""
    ray = connect(address)
    n = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    n = min(n, len(todo))
    log.info("ray: %d parts on %d actors (%s)", len(todo), n, address or "local")
    job.threads = 1

    class PartActor:
        """Ranks parts; the bundle and the users are loaded once per actor (the job
        travels with the class, so no constructor argument sits in the object store)."""

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {"part": batch["part"], "users": np.array([job.run(int(batch["part"][0]))])}

    ds = ray.data.from_items([{"part": i} for i in todo]).map_batches(
        PartActor, batch_size=1, concurrency=n, num_cpus=1
    )
    for row in ds.iter_rows():
        if on_done is not None:
            on_done(int(row["users"]))


class _EncodeActor:
    """Encodes item texts with a bundle's item tower, loaded once."""

    def __init__(self, bundle_dir: str) -> None:
        import json

        import polars as pl

        from recsys.config import PipelineConfig
        from recsys.lm.model import LanguageModel

        d = Path(bundle_dir)
        manifest = json.loads((d / "manifest.json").read_text())
        cfg = PipelineConfig.model_validate(manifest["config"])
        self.lm = LanguageModel.load(d, manifest["lm"], cfg.lm, cfg.seed)
        self.like = pl.read_parquet(d / "items.parquet", n_rows=0)

    def __call__(self, batch: Any) -> dict[str, Any]:
        import polars as pl

        from recsys.lm.catalogue import _align

        items = pl.from_arrow(batch)
        assert isinstance(items, pl.DataFrame)
        items = _align(items, self.like)
        return {"item_id": items[ITEM].to_numpy(), "vector": list(self.lm.encode_items(items))}


def encode_items_ray(
    bundle_dir: Path, items_path: Path, address: str | None = None, workers: int = 0
) -> dict[Any, np.ndarray]:
    """item id -> vector for every item of a Parquet file, encoded by a Ray Data actor
    pool (`read_parquet`, then `map_batches`; one GPU per actor where there are any)."""
    ray = connect(address)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    n = workers or max(1, gpus or int(ray.cluster_resources().get("CPU", 1)))
    log.info("ray: encoding %s on %d actors (%d GPUs)", items_path, n, gpus)
    # read first: the read tasks need CPUs that the actor pool would otherwise hold
    ds = ray.data.read_parquet(str(items_path)).materialize()
    ds = ds.map_batches(
        _EncodeActor,
        fn_constructor_args=(str(bundle_dir),),
        batch_format="pyarrow",
        batch_size=1024,
        concurrency=(1, n),
        num_gpus=1 if gpus else 0,
        num_cpus=1,
    )
    out: dict[Any, np.ndarray] = {}
    for b in ds.iter_batches(batch_format="numpy", batch_size=None):
        for i, v in zip(b["item_id"].tolist(), b["vector"], strict=True):
            out[i] = np.asarray(v, dtype=np.float32)
    return out
