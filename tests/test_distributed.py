"""The Ray engine: the same lists as the local engine, on a local 2-CPU Ray."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pytest

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    from recsys.distributed import connect

    connect(num_cpus=2)
    yield
    ray.shutdown()


def test_ray_engine_writes_the_local_engines_lists(
    local_ray: None, bundle_dir: Path, synth_dir: Path, tmp_path: Path
) -> None:
    from recsys.batch import recommend_file

    users = tmp_path / "users.parquet"
    ids = pl.read_parquet(synth_dir / "interactions.parquet")["user_id"].unique().sort()
    pl.DataFrame({"user_id": [*ids.head(80).to_list(), "nobody"]}).write_parquet(users)
    local, on_ray = tmp_path / "local.parquet", tmp_path / "ray.parquet"
    assert recommend_file(bundle_dir, users, local, k=7, batch_size=20) == (81, 567)
    # a part already written (as after an interruption) is kept, the rest is ranked
    parts = on_ray.with_name(on_ray.name + ".parts")
    recommend_file(bundle_dir, users, on_ray, k=7, batch_size=20, engine="ray", workers=2)
    a, b = pl.read_parquet(local), pl.read_parquet(on_ray)
    assert a.equals(b)
    assert not parts.exists()


def test_ray_encoding_gives_the_local_vectors(
    local_ray: None, lm_bundle: Path, synth_dir: Path
) -> None:
    from recsys.distributed import encode_items_ray
    from recsys.pipeline import Pipeline

    items = pl.read_parquet(synth_dir / "items.parquet").head(40)
    path = lm_bundle.parent / "new_items.parquet"
    items.write_parquet(path)
    got = encode_items_ray(lm_bundle, path, workers=2)
    p = Pipeline.load(str(lm_bundle))
    assert p.lm is not None
    want = p.lm.encode_items(items)
    assert set(got) == set(items["item_id"].to_list())
    np.testing.assert_allclose(
        np.stack([got[i] for i in items["item_id"].to_list()]), want, atol=1e-5
    )
