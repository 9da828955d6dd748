"""The batch job at scale keeps the lists: chunks, parts and worker processes change
nothing, on all of ml-latest-small (real data: skipped when it is absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import movielens_dir


@pytest.mark.realdata
@pytest.mark.slow
def test_streamed_recommend_gives_the_in_memory_and_the_endpoint_lists(tmp_path: Path) -> None:
    from recsys.batch import recommend_file
    from recsys.config import PipelineConfig
    from recsys.ingest import ingest_movielens
    from recsys.online import OnlineRanker
    from recsys.pipeline import Pipeline
    from recsys.schema import read_interactions, read_items

    paths = ingest_movielens(movielens_dir(), tmp_path / "ml")
    items = read_items(paths[1])
    inter = read_interactions(paths[0], items=items)
    cfg = PipelineConfig.model_validate({"use_lm": False, "chunk_memory_mb": 16})
    p = Pipeline(cfg).fit(inter, items)
    assert p.chunk_size < 610  # several chunks per part
    bundle = tmp_path / "bundle"
    p.save(bundle)
    ids = inter["user_id"].unique().sort()
    users = tmp_path / "users.parquet"
    pl.DataFrame({"user_id": ids}).write_parquet(users)
    out = tmp_path / "recs.parquet"
    recommend_file(bundle, users, out, k=10, batch_size=100, workers=2)
    streamed = pl.read_parquet(out)
    loaded = Pipeline.load(bundle)
    in_memory = loaded.recommend(ids, k=10)
    assert streamed.select("user_id", "item_id", "rank").equals(
        in_memory.select("user_id", "item_id", "rank")
    )
    np.testing.assert_allclose(streamed["score"], in_memory["score"], rtol=0, atol=1e-9)
    online = OnlineRanker(loaded, tree_cache=tmp_path / "trees")
    for uid in ids.gather_every(25).to_list():
        u = int(loaded.user_index_.lookup(pl.Series([uid]))[0])
        ranked = online.rank(online.user_state(u))
        want = loaded.item_index_.lookup(streamed.filter(pl.col("user_id") == uid)["item_id"])
        np.testing.assert_array_equal(ranked.items[:10], want, err_msg=str(uid))
