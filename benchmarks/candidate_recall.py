"""Which candidate source finds the held-out items, and does text find the sparse ones?

    .venv/bin/python benchmarks/candidate_recall.py --data /work/runs/ml [--seed 0]

`--data` holds canonical `interactions.parquet` and `items.parquet`. The DESIGN.md
split (per user, the last 20% in time held out); the pipeline is fitted on the
training part with the defaults (the language model from `RECSYS_CACHE_DIR` when a
fit of the same data and settings left it there). Printed, for the held-out
(user, item) pairs, all of them and split by the item's training events (under
`--sparse-below`: "sparse"): the share each source's own top `--per-source` finds,
their union (the ranker's candidates), a text-only source (the user's language-model
vector against each item's text vector, without the per-item offset that the `lm`
source's item vectors learn from behaviour) and the union with it, then recall@10
and @50 of the pipeline's lists and of the two language-model sources alone.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np

from features.batch import Histories
from recsys.candidates import ItemMatrix, ProductRows, source_top_k
from recsys.config import PipelineConfig
from recsys.data import I, IdIndex, U, to_canonical, to_internal
from recsys.pipeline import Pipeline
from recsys.schema import ITEM, USER, read_interactions, read_items
from recsys.split import split_last_fraction


class TextOnly:
    """The language model's user vectors against its text vectors (no item offsets)."""

    name = "lm_text"

    def __init__(self, lm: object) -> None:
        self.lm = lm

    def rows(self, b: Histories, n_items: int) -> ProductRows:
        lm = self.lm
        return ProductRows(lm.user_vectors_for(b), ItemMatrix(lm.text_vectors_), n_items)  # type: ignore[attr-defined]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-source", type=int, default=100)
    ap.add_argument("--sparse-below", type=int, default=5)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    inter = read_interactions(f"{args.data}/interactions.parquet")
    items = read_items(f"{args.data}/items.parquet")
    ui, ii = IdIndex.from_values(inter[USER]), IdIndex(items[ITEM])
    hist, test = split_last_fraction(to_internal(inter, ui, ii), 0.2)
    users = np.sort(test[U].unique().to_numpy()).astype(np.int64)
    t0 = time.perf_counter()
    pipe = Pipeline(PipelineConfig(seed=args.seed)).fit(to_canonical(hist, ui, ii), items)
    print(f"fit on the training part: {time.perf_counter() - t0:.0f} s")

    uidx = pipe.user_index_.lookup(ui.take(users))
    to_pipe = pipe.item_index_.lookup(ii.ids)  # evaluation item index -> the pipeline's
    pairs = test.select(U, I).unique()
    row = np.searchsorted(users, pairs[U].to_numpy())
    item = to_pipe[pairs[I].to_numpy()]
    train_events = np.bincount(hist[I].to_numpy(), minlength=len(ii))[pairs[I].to_numpy()]
    sparse = train_events < args.sparse_below
    print(
        f"{len(pairs)} held-out pairs of {len(users)} users; {sparse.mean():.1%} on items "
        f"with fewer than {args.sparse_below} training events"
    )

    def found(lists: np.ndarray) -> np.ndarray:
        keys = np.unique(np.repeat(np.arange(len(lists)), lists.shape[1]) * 2**32 + lists.ravel())
        q = row * 2**32 + item
        at = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
        return keys[at] == q

    def line(name: str, hit: np.ndarray) -> None:
        print(
            f"  {name:28s} all {hit.mean():.3f}  sparse {hit[sparse].mean():.3f}  "
            f"warm {hit[~sparse].mean():.3f}"
        )

    h, n = pipe.history_, args.per_source
    print(f"found in a source's own top {n}:")
    hits = {}
    for s in pipe.sources_:
        hits[s.name] = found(source_top_k(s, h, uidx, n))
        line(s.name, hits[s.name])
    union = np.any(np.stack(list(hits.values())), axis=0)
    line("union (the candidates)", union)
    if pipe.lm_ is not None:
        text = found(source_top_k(TextOnly(pipe.lm_), h, uidx, n))  # type: ignore[arg-type]
        line("lm_text (no item offsets)", text)
        line("union and lm_text", union | text)
    recs, _ = pipe.recommend_indices(uidx, 50)
    print("recall of the lists:")
    for k in (10, 50):
        line(f"pipeline @{k}", found(recs[:, :k]))
    if pipe.lm_ is not None:
        lm = next(s for s in pipe.sources_ if s.name == "lm")
        line("lm alone @10", found(source_top_k(lm, h, uidx, 10)))
        line("lm_text alone @10", found(source_top_k(TextOnly(pipe.lm_), h, uidx, 10)))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
