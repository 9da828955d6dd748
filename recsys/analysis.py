"""What the headline number hides, computed from each model's top-k lists on one split.

Metrics at several cut-offs, the popularity bias, novelty and category diversity of
the lists, metrics by user and item segment, the exposure of popularity deciles, and
bootstrap confidence intervals over users (paired against a reference model). All of
it is plain numpy over internal indices; `recsys.evaluate` calls `analyse` once per
run and `recsys.report` turns the result into Markdown and plots.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import polars as pl

from recsys.data import I, U

KS = (5, 10, 20, 50)
METRICS = ("ndcg", "recall", "hr", "mrr")


def hits_matrix(
    recs: np.ndarray, users: np.ndarray, truth: pl.DataFrame, n_items: int
) -> tuple[np.ndarray, np.ndarray]:
    """hits[r, j]: is the j-th item of row r held out for users[r]; n_rel[r]: how many
    distinct items users[r] has held out."""
    pairs = truth.select(U, I).unique()
    codes = np.sort(pairs[U].to_numpy().astype(np.int64) * n_items + pairs[I].to_numpy())
    rec_codes = users.astype(np.int64)[:, None] * n_items + recs.astype(np.int64)
    hits = np.isin(rec_codes, codes) & (recs >= 0)
    per_user = pairs.group_by(U).len()
    n_rel = np.zeros(int(max(users.max(initial=0), per_user[U].max() or 0)) + 1, dtype=np.int64)
    n_rel[per_user[U].to_numpy()] = per_user["len"].to_numpy()
    return hits, n_rel[users]


def metrics_at(
    hits: np.ndarray, n_rel: np.ndarray, ks: tuple[int, ...] = KS
) -> dict[str, np.ndarray]:
    """Per-user NDCG, Recall, HR and MRR at each k (the same definitions as
    `recsys.metrics`); keys like 'ndcg@10'. Rows without held-out items are NaN."""
    kmax = hits.shape[1]
    disc = 1.0 / np.log2(np.arange(2, kmax + 2))
    cdcg = np.cumsum(hits * disc, axis=1)
    cdisc = np.cumsum(disc)
    chits = np.cumsum(hits, axis=1)
    first = np.where(hits.any(axis=1), hits.argmax(axis=1), kmax)
    ok = n_rel > 0
    nr = np.maximum(n_rel, 1)
    out: dict[str, np.ndarray] = {}
    for k in ks:
        kk = min(k, kmax)
        idcg = cdisc[np.minimum(nr, kk) - 1]
        vals = {
            "ndcg": cdcg[:, kk - 1] / idcg,
            "recall": chits[:, kk - 1] / nr,
            "hr": (chits[:, kk - 1] > 0).astype(np.float64),
            "mrr": np.where(first < kk, 1.0 / (first + 1.0), 0.0),
        }
        for m, v in vals.items():
            out[f"{m}@{k}"] = np.where(ok, v, np.nan)
    return out


def popularity_deciles(counts: np.ndarray) -> np.ndarray:
    """Decile of each item by training interactions: 1 = the most popular 10% of the
    catalogue, 10 = the least popular (ties broken by index, so deciles are equal-sized)."""
    order = np.argsort(-counts, kind="stable")
    dec = np.empty(len(counts), dtype=np.int64)
    dec[order] = np.arange(len(counts)) * 10 // max(len(counts), 1) + 1
    return dec


def category_matrix(item_cats: pl.DataFrame, n_items: int) -> np.ndarray | None:
    """Items x categories 0/1 matrix from (i, cat) rows; None when there are none."""
    if len(item_cats) == 0:
        return None
    cats = item_cats["cat"].unique().sort()
    col = {c: j for j, c in enumerate(cats.to_list())}
    m = np.zeros((n_items, len(col)), dtype=np.float32)
    m[item_cats["i"].to_numpy(), np.array([col[c] for c in item_cats["cat"].to_list()])] = 1.0
    return m


def intra_list_diversity(recs: np.ndarray, cats: np.ndarray) -> np.ndarray:
    """Per list: mean over item pairs of 1 - Jaccard(categories). Two items without
    categories count as alike; NaN for lists of fewer than two items."""
    out = np.full(len(recs), np.nan)
    for r, row in enumerate(recs):
        row = row[row >= 0]
        if len(row) < 2:
            continue
        c = cats[row]
        inter = c @ c.T
        size = c.sum(axis=1)
        union = size[:, None] + size[None, :] - inter
        jac = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
        iu = np.triu_indices(len(row), 1)
        out[r] = float((1.0 - jac[iu]).mean())
    return out


def bootstrap(
    per_user: dict[str, np.ndarray],
    reference: str | None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Percentile bootstrap over users of each model's mean, and of the paired
    difference to `reference` (the same resampled users for every model)."""
    names = list(per_user)
    n = len(next(iter(per_user.values()))) if names else 0
    if n == 0:
        return {}, {}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    lo_q, hi_q = (1 - level) / 2, 1 - (1 - level) / 2
    means = {m: np.nan_to_num(v)[idx].mean(axis=1) for m, v in per_user.items()}
    ci = {
        m: {
            "mean": float(np.nanmean(per_user[m])),
            "lo": float(np.quantile(b, lo_q)),
            "hi": float(np.quantile(b, hi_q)),
            "std": float(b.std()),
        }
        for m, b in means.items()
    }
    paired: dict[str, dict[str, float]] = {}
    if reference in per_user:
        for m in names:
            if m == reference:
                continue
            d = means[m] - means[reference]
            diff = float(np.nanmean(per_user[m] - per_user[reference]))
            # two-sided share of resamples on the other side of zero
            p = float(min(1.0, 2 * min((d <= 0).mean(), (d >= 0).mean())))
            paired[m] = {
                "diff": diff,
                "lo": float(np.quantile(d, lo_q)),
                "hi": float(np.quantile(d, hi_q)),
                "p": p,
                "wins": float((per_user[m] > per_user[reference]).mean()),
                "losses": float((per_user[m] < per_user[reference]).mean()),
            }
    return ci, paired


def _segment_labels(edges: list[int]) -> list[str]:
    return [f"{lo}–{hi - 1}" if hi - 1 > lo else f"{lo}" for lo, hi in itertools.pairwise(edges)]


def history_segments(lengths: np.ndarray, n_segments: int = 4) -> tuple[np.ndarray, list[str]]:
    """Users cut into (at most) `n_segments` groups of about equal size by history
    length; returns each user's segment number and a 'lo–hi events' label per segment."""
    qs = np.quantile(lengths, np.linspace(0, 1, n_segments + 1)[1:-1]) if len(lengths) else []
    lowest = int(lengths.min()) if len(lengths) else 0
    edges = sorted({lowest} | {int(np.ceil(q)) for q in qs})
    edges.append(int(lengths.max(initial=0)) + 1)
    edges = sorted(set(edges))
    seg = np.searchsorted(np.array(edges[1:]), lengths, side="right")
    return seg, [f"{lab} events" for lab in _segment_labels(edges)]


def analyse(
    lists: dict[str, np.ndarray],
    users: np.ndarray,
    hist: pl.DataFrame,
    test: pl.DataFrame,
    n_users: int,
    n_items: int,
    item_cats: pl.DataFrame,
    k: int = 10,
    ks: tuple[int, ...] = KS,
    reference: str = "EASE",
    cold_threshold: int = 5,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Every analysis of the report, as plain JSON-ready values.

    lists: model -> [len(users), >= max(ks)] item indices ranked best first (-1 empty);
    hist/test: internal (u, i, t) training and held-out events; item_cats: (i, cat).
    """
    ks = tuple(sorted(set(ks) | {k}))
    counts = np.bincount(hist[I].to_numpy(), minlength=n_items).astype(np.float64)
    user_counts = np.bincount(hist.select(U, I).unique()[I].to_numpy(), minlength=n_items).astype(
        np.float64
    )
    n_hist_users = max(int(hist[U].n_unique()), 1)
    self_info = -np.log2((user_counts + 1.0) / (n_hist_users + 1.0))
    pop_pct = np.empty(n_items)
    pop_pct[np.argsort(counts, kind="stable")] = np.arange(n_items) / max(n_items - 1, 1)
    decile = popularity_deciles(counts)
    cats = category_matrix(item_cats, n_items)
    hist_len = np.bincount(hist[U].to_numpy(), minlength=n_users)[users]
    seg, seg_labels = history_segments(hist_len)

    pairs = test.select(U, I).unique()
    pu, pi = pairs[U].to_numpy().astype(np.int64), pairs[I].to_numpy().astype(np.int64)
    pair_dec = decile[pi]
    pair_cold = counts[pi] < cold_threshold
    row_of = np.full(n_users, -1, dtype=np.int64)
    row_of[users] = np.arange(len(users))
    pr = row_of[pu]
    pairs_ok = pr >= 0

    at_k: dict[str, dict[str, float]] = {}
    beyond: dict[str, dict[str, float]] = {}
    per_user_head: dict[str, np.ndarray] = {}
    user_seg: dict[str, dict[str, list[float]]] = {}
    item_dec: dict[str, list[float]] = {}
    cold_warm: dict[str, dict[str, float]] = {}
    exposure: dict[str, list[float]] = {}
    per_user_all: dict[str, dict[str, np.ndarray]] = {}
    for name, recs in lists.items():
        hits, n_rel = hits_matrix(recs, users, test, n_items)
        pm = metrics_at(hits, n_rel, ks)
        per_user_all[name] = pm
        at_k[name] = {key: float(np.nanmean(v)) for key, v in pm.items()}
        per_user_head[name] = pm[f"ndcg@{k}"]
        top = recs[:, :k]
        valid = top >= 0
        items_k = top[valid]
        beyond[name] = {
            f"coverage@{k}": len(np.unique(items_k)) / max(n_items, 1),
            f"novelty@{k}": float(self_info[items_k].mean()) if len(items_k) else float("nan"),
            f"popularity_percentile@{k}": float(pop_pct[items_k].mean())
            if len(items_k)
            else float("nan"),
            f"mean_item_interactions@{k}": float(counts[items_k].mean())
            if len(items_k)
            else float("nan"),
            f"top_decile_share@{k}": float((decile[items_k] == 1).mean())
            if len(items_k)
            else float("nan"),
        }
        if cats is not None:
            beyond[name][f"diversity@{k}"] = float(np.nanmean(intra_list_diversity(top, cats)))
        user_seg[name] = {
            f"ndcg@{k}": [
                float(np.nanmean(pm[f"ndcg@{k}"][seg == s])) for s in range(len(seg_labels))
            ],
            f"recall@{k}": [
                float(np.nanmean(pm[f"recall@{k}"][seg == s])) for s in range(len(seg_labels))
            ],
        }
        # for each held-out (user, item): did the item make the user's top-k?
        rec_codes = np.sort(
            (
                users.astype(np.int64)[:, None] * n_items + np.where(valid, top, -n_items * 10)
            ).ravel()
        )
        found = np.isin(pu * n_items + pi, rec_codes) & pairs_ok
        item_dec[name] = [
            float(found[pairs_ok & (pair_dec == d)].mean())
            if (pairs_ok & (pair_dec == d)).any()
            else float("nan")
            for d in range(1, 11)
        ]
        cold_warm[name] = {
            "cold": float(found[pairs_ok & pair_cold].mean())
            if (pairs_ok & pair_cold).any()
            else float("nan"),
            "warm": float(found[pairs_ok & ~pair_cold].mean())
            if (pairs_ok & ~pair_cold).any()
            else float("nan"),
        }
        exposure[name] = [
            float((decile[items_k] == d).mean()) if len(items_k) else 0.0 for d in range(1, 11)
        ]

    ci, paired = bootstrap(per_user_head, reference, n_boot=n_boot, seed=seed)
    total = max(counts.sum(), 1.0)
    gap = {
        name: float(np.nanmax(v[f"ndcg@{k}"]) - np.nanmin(v[f"ndcg@{k}"]))
        for name, v in user_seg.items()
    }
    return {
        "k": k,
        "ks": list(ks),
        "users": len(users),
        "at_k": at_k,
        "beyond": beyond,
        "headline": f"ndcg@{k}",
        "bootstrap": {"resamples": n_boot, "level": 0.95, "reference": reference, "ci": ci},
        "paired": paired,
        "user_segments": {
            "by": "training events per user",
            "labels": seg_labels,
            "users": [int((seg == s).sum()) for s in range(len(seg_labels))],
            "models": user_seg,
            "gap": gap,
        },
        "item_deciles": {
            "by": "training interactions per item; 1 = most popular 10% of the catalogue",
            "held_out_share": [float((pair_dec[pairs_ok] == d).mean()) for d in range(1, 11)],
            f"recall@{k}": item_dec,
        },
        "cold_warm": {
            "cold_threshold": cold_threshold,
            "held_out_share_cold": float(pair_cold[pairs_ok].mean()) if pairs_ok.any() else 0.0,
            "cold_items": int((counts < cold_threshold).sum()),
            f"recall@{k}": cold_warm,
        },
        "exposure": {
            "interaction_share": [float(counts[decile == d].sum() / total) for d in range(1, 11)],
            "slot_share": exposure,
        },
        "_per_user": per_user_all,  # numpy arrays; dropped from metrics.json
        "_users": users,
    }
