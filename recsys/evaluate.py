"""Offline evaluation (the DESIGN.md protocol): per user, the last 20% of events (at
least one) are held out; every catalogue item the user has not met in training is
ranked; the pipeline and the baselines are measured on the same split in one run."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys.candidates import ALS, EASE, History, ItemKNN, MostPopular, Source, top_n
from recsys.config import PipelineConfig
from recsys.data import IdIndex, U, to_canonical, to_internal
from recsys.metrics import summarize
from recsys.pipeline import Pipeline
from recsys.schema import ITEM, USER
from recsys.split import split_last_fraction

log = logging.getLogger("recsys")


def baselines(seed: int = 0) -> dict[str, Source]:
    """The reference models of DESIGN.md, with its hyper-parameters."""
    return {
        "MostPop": MostPopular(),
        "ItemKNN": ItemKNN(k=0),
        "EASE": EASE(l2=200.0, double=True),
        "ALS": ALS(seed=seed),
    }


@dataclass
class Report:
    k: int
    n_users: int
    n_items: int
    n_train: int
    n_test: int
    rows: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocol": "per-user last 20% held out (at least one); all unseen items ranked",
            "k": self.k,
            "users": self.n_users,
            "items": self.n_items,
            "train_events": self.n_train,
            "test_events": self.n_test,
            "models": self.rows,
        }

    def markdown(self) -> str:
        k = self.k
        cols = [f"ndcg@{k}", f"recall@{k}", f"hr@{k}", f"mrr@{k}", "coverage", "seconds"]
        ease = self.rows.get("EASE", {}).get(f"ndcg@{k}")
        lines = [
            "# Offline evaluation",
            "",
            f"{self.n_users} users, {self.n_items} items; {self.n_train} training and "
            f"{self.n_test} held-out events (per user, the last 20% in time).",
            "",
            "| model | " + " | ".join(cols) + (" | × EASE |" if ease else " |"),
            "|---|" + "---:|" * (len(cols) + (1 if ease else 0)),
        ]
        for name, m in self.rows.items():
            vals = [
                f"{m.get(c, float('nan')):.4f}" if c != "seconds" else f"{m.get(c, 0):.1f}"
                for c in cols
            ]
            ratio = f" | {m[f'ndcg@{k}'] / ease:.3f}" if ease else ""
            lines.append(f"| {name} | " + " | ".join(vals) + ratio + " |")
        return "\n".join(lines) + "\n"


def evaluate(
    interactions: pl.DataFrame,
    items: pl.DataFrame,
    config: PipelineConfig | None = None,
    k: int = 10,
    holdout: float = 0.2,
    with_baselines: bool = True,
) -> Report:
    """Fit every model on the training part and measure it on the held-out part."""
    config = config or PipelineConfig()
    user_index = IdIndex.from_values(interactions[USER])
    item_index = IdIndex(items[ITEM])
    ev = to_internal(interactions, user_index, item_index)
    hist, test = split_last_fraction(ev, holdout)
    users = np.sort(test[U].unique().to_numpy()).astype(np.int64)
    rep = Report(k, len(users), len(item_index), len(hist), len(test))
    h = History(hist, len(user_index), len(item_index))
    if with_baselines:
        for name, model in baselines(config.seed).items():
            t0 = time.perf_counter()
            model.fit(h)
            recs = np.concatenate(
                [
                    top_n(model.scores(users[s : s + 512], h), h.X[users[s : s + 512]], k)[0]
                    for s in range(0, len(users), 512)
                ]
            )
            rep.rows[name] = summarize(recs, users, test, k, len(item_index)) | {
                "seconds": time.perf_counter() - t0
            }
            log.info("%-10s ndcg@%d %.4f", name, k, rep.rows[name][f"ndcg@{k}"])
    t0 = time.perf_counter()
    train = to_canonical(hist, user_index, item_index)
    pipe = Pipeline(config).fit(train, items)
    uidx = pipe.user_index_.lookup(user_index.take(users))
    recs, _ = pipe.recommend_indices(uidx, k)
    name = "recsys" if config.use_lm else "recsys (no LM)"
    rep.rows[name] = summarize(recs, users, test, k, len(item_index)) | {
        "seconds": time.perf_counter() - t0
    }
    log.info("%-10s ndcg@%d %.4f", name, k, rep.rows[name][f"ndcg@{k}"])
    return rep


def write_report(rep: Report, out_dir: str | Path) -> tuple[Path, Path]:
    """metrics.json and report.md, each written to a temp file and renamed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = (out / "metrics.json", out / "report.md")
    for path, text in zip(
        paths, (json.dumps(rep.to_dict(), indent=2), rep.markdown()), strict=True
    ):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return paths
