"""New and changed items in a fitted bundle, without refitting: `recsys encode-items`.

The items' vectors come from their text through the bundle's fine-tuned item tower;
the catalogue, the item-sized arrays of the sources and the fallback list grow to
hold them, and the bundle is written again (temporary sibling + rename, fresh
checksums). New items have no interactions: the language model's nearest-items
source is what can recommend them until the next fit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl

from recsys.candidates import ALS, History, MostPopular, RecentPopular
from recsys.data import IdIndex
from recsys.lm.source import LMNearest
from recsys.pipeline import Pipeline, item_categories
from recsys.schema import ITEM, DataError

log = logging.getLogger("recsys")


def _align(new: pl.DataFrame, like: pl.DataFrame) -> pl.DataFrame:
    """`new` with exactly the columns and dtypes of `like` (missing ones null)."""
    if ITEM not in new.columns:
        raise DataError(f"the new items have no {ITEM} column", file="items")
    extra = [c for c in new.columns if c not in like.columns]
    if extra:
        log.warning("ignoring item columns the bundle does not know: %s", extra)
    cols = [
        (pl.col(c) if c in new.columns else pl.lit(None)).cast(t, strict=False).alias(c)
        for c, t in like.schema.items()
    ]
    out = new.select(cols)
    if out[ITEM].null_count():
        raise DataError(f"{ITEM} values that do not convert to {like.schema[ITEM]}", file="items")
    return out.unique(ITEM, keep="last", maintain_order=True)


def add_items(
    p: Pipeline,
    new_items: pl.DataFrame,
    progress: bool = False,
    encode: Callable[[pl.DataFrame], np.ndarray] | None = None,
) -> tuple[int, int]:
    """Add or refresh items in a fitted pipeline in place; returns (added, refreshed).
    `encode`: the items' vectors from their (aligned) rows, in place of the bundle's
    item tower in this process (e.g. an encoding on a cluster)."""
    lm = p.lm
    if lm is None:
        raise ValueError("this bundle has no language model (fitted with --no-lm)")
    new = _align(new_items, p.items_)
    idx = p.item_index_.lookup(new[ITEM])
    known = idx >= 0
    vecs = encode(new) if encode is not None else lm.encode_items(new, progress=progress)
    n_old = len(p.item_index_)
    n_add = int((~known).sum())
    # catalogue: refreshed rows in place, new rows appended (index order is kept)
    items = p.items_
    if known.any():
        items = items.update(new.filter(pl.Series(known)), on=ITEM, include_nulls=True)
    items = pl.concat([items, new.filter(pl.Series(~known))])
    p.items_ = items
    p.item_index_ = IdIndex(items[ITEM])
    n_new = len(p.item_index_)
    iv = np.zeros((n_new, lm.item_vectors_.shape[1]), dtype=np.float32)
    iv[:n_old] = lm.item_vectors_
    iv[idx[known]] = vecs[known]
    iv[n_old:] = vecs[~known]
    lm.item_vectors_ = iv
    tv = np.zeros_like(iv)
    tv[:n_old] = lm.text_vectors_
    tv[idx[known]] = vecs[known]
    tv[n_old:] = vecs[~known]
    lm.text_vectors_ = tv
    p.item_cats_ = item_categories(items, p.item_index_, p.config.category_columns)
    if n_add:
        h = p.history_
        p.history_ = History(h.ev, h.n_users, n_new, now=h.now)
        for s in p.sources_:
            for attr in ("sim_", "trans_"):
                m = getattr(s, attr, None)
                if m is not None:
                    m = m.tocsr(copy=True)
                    m.resize((n_new, n_new))
                    setattr(s, attr, m)
            if isinstance(s, ALS):
                f = s.item_factors_
                s.item_factors_ = np.vstack([f, np.zeros((n_add, f.shape[1]), f.dtype)])
            if isinstance(s, MostPopular | RecentPopular | LMNearest):
                s.fit(p.history_)
        p.fallback_ = np.concatenate([p.fallback_, np.arange(n_old, n_new, dtype=np.int64)])
    return n_add, int(known.sum())


def encode_items_into_bundle(
    bundle_dir: str | Path,
    new_items: pl.DataFrame,
    progress: bool = False,
    encode: Callable[[pl.DataFrame], np.ndarray] | None = None,
) -> tuple[int, int]:
    """Load (checksums verified), add or refresh the items, save atomically."""
    p = Pipeline.load(bundle_dir)
    p.timings_ = dict(p.manifest_.get("timings_s", {}))
    added, refreshed = add_items(p, new_items, progress, encode)
    p.save(bundle_dir)
    return added, refreshed
