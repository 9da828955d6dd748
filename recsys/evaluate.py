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

from recsys.analysis import KS, analyse, bootstrap
from recsys.candidates import ALS, EASE, History, ItemKNN, MostPopular, Source, source_top_k
from recsys.config import PipelineConfig
from recsys.data import IdIndex, U, to_canonical, to_internal
from recsys.metrics import summarize
from recsys.pipeline import Pipeline, is_lm_feature, item_categories
from recsys.report import markdown, write_plots
from recsys.resources import machine
from recsys.schema import ITEM, USER
from recsys.split import split_last_fraction, tied_holdout_share

log = logging.getLogger("recsys")

# share of held-out events tied in time with their user's training events above which
# the evaluation warns that row order, not time, chose them
TIED_WARN = 0.05


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
    analysis: dict[str, Any] = field(default_factory=dict)
    importances: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    ablation: dict[str, Any] = field(default_factory=dict)
    tied_holdout: float = 0.0  # `recsys.split.tied_holdout_share` of the split
    seed: int = 0  # the settings' seed: of the fits, the baselines' and the bootstrap
    # `recsys.resources.machine()`, with "lm": the path that encoded the items when
    # a language model was fitted
    machine: dict[str, Any] = field(default_factory=dict)
    # not in metrics.json: the pipelines fitted on the training part, for explanations
    pipelines: dict[str, Pipeline] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocol": "per-user last 20% held out (at least one); all unseen items ranked",
            "k": self.k,
            "users": self.n_users,
            "items": self.n_items,
            "train_events": self.n_train,
            "test_events": self.n_test,
            "seed": self.seed,
            "tied_holdout": self.tied_holdout,
            "machine": self.machine,
            "models": self.rows,
            "analysis": {a: v for a, v in self.analysis.items() if not a.startswith("_")},
            "importances": self.importances,
            "ablation": self.ablation,
        }

    def markdown(self) -> str:
        return markdown(self.to_dict())

    def per_user(self, metric: str | None = None) -> pl.DataFrame:
        """One row per evaluated user (`user_id` as given, `history` = training events)
        and one column per model, of `metric` (default: the headline, e.g. 'ndcg@10')."""
        metric = metric or f"ndcg@{self.k}"
        pu = self.analysis["_per_user"]
        base = {USER: self.analysis["_user_ids"], "history": self.analysis["_history"]}
        return pl.DataFrame(base | {n: pu[n][metric] for n in pu})

    def lists(self, user_ids: list[Any], k: int | None = None) -> pl.DataFrame:
        """(user_id, model, rank, item_id, hit) of every model's list for these users;
        `hit`: the item is among the user's held-out events."""
        k = k or self.k
        a = self.analysis
        rows = self.analysis["_user_ids"].to_frame().with_row_index("_row")
        want = rows.join(pl.DataFrame({USER: user_ids}).cast(rows.schema[USER]), on=USER)
        held = self.held_out(user_ids).with_columns(pl.lit(True).alias("hit"))
        frames = []
        for name, recs in a["_lists"].items():
            sub = recs[want["_row"].to_numpy(), :k]
            n = sub.shape[1]
            frames.append(
                pl.DataFrame(
                    {
                        USER: want[USER].gather(np.repeat(np.arange(len(want)), n)),
                        "model": name,
                        "rank": np.tile(np.arange(1, n + 1, dtype=np.int32), len(want)),
                        ITEM: a["_item_ids"].gather(sub.ravel().clip(0)),
                        "_ok": sub.ravel() >= 0,
                    }
                )
                .filter(pl.col("_ok"))
                .drop("_ok")
            )
        out = pl.concat(frames).join(held, on=[USER, ITEM], how="left")
        return out.with_columns(pl.col("hit").fill_null(False))

    def history(self, user_ids: list[Any]) -> pl.DataFrame:
        """(user_id, item_id, timestamp) training events of these users, oldest first:
        what every model saw (the held-out events are not in it)."""
        t = self.analysis["_train"]
        return t.filter(pl.col(USER).is_in(pl.Series(user_ids).cast(t.schema[USER]).implode()))

    def held_out(self, user_ids: list[Any]) -> pl.DataFrame:
        """(user_id, item_id) of the held-out events of these users."""
        t = self.analysis["_test"]
        return t.filter(pl.col(USER).is_in(pl.Series(user_ids).cast(t.schema[USER]).implode()))


def evaluate(
    interactions: pl.DataFrame,
    items: pl.DataFrame,
    config: PipelineConfig | None = None,
    k: int = 10,
    holdout: float = 0.2,
    with_baselines: bool = True,
    ablation: bool = True,
    ks: tuple[int, ...] = KS,
    n_boot: int = 1000,
) -> Report:
    """Fit every model on the training part and measure it on the held-out part.

    With `ablation` (and `config.use_lm`), the pipeline is fitted a second time with
    `use_lm = False` when the first fit has language-model features, so the report
    shows what the language model adds. `rep.analysis` holds metrics at every k in
    `ks`, segments, exposure and bootstrap intervals (see `recsys.analysis`).
    """
    config = config or PipelineConfig()
    kmax = max(max(ks), k)
    user_index = IdIndex.from_values(interactions[USER])
    item_index = IdIndex(items[ITEM])
    ev = to_internal(interactions, user_index, item_index)
    hist, test = split_last_fraction(ev, holdout)
    users = np.sort(test[U].unique().to_numpy()).astype(np.int64)
    rep = Report(k, len(users), len(item_index), len(hist), len(test))
    rep.tied_holdout = tied_holdout_share(hist, test)
    rep.machine = machine()
    rep.seed = config.seed
    if rep.tied_holdout > TIED_WARN:
        log.warning(
            "%.0f%% of the held-out events have the time of their user's last training event "
            "(times in whole days?), so the input's row order decided which were held out. If "
            "that order follows the items (a file grouped by item), models learn it and the "
            "figures flatter them; `recsys ingest amazon` writes such events in an order "
            "drawn from the ids instead",
            100 * rep.tied_holdout,
        )
    h = History(hist, len(user_index), len(item_index))
    lists: dict[str, np.ndarray] = {}
    if with_baselines:
        for name, model in baselines(config.seed).items():
            t0 = time.perf_counter()
            model.fit(h)
            recs = source_top_k(model, h, users, kmax)
            lists[name] = recs
            rep.rows[name] = summarize(recs, users, test, k, len(item_index)) | {
                "seconds": time.perf_counter() - t0
            }
            log.info("%-10s ndcg@%d %.4f", name, k, rep.rows[name][f"ndcg@{k}"])
    train = to_canonical(hist, user_index, item_index)
    variants = [("recsys" if config.use_lm else "recsys (no LM)", config)]
    for name, cfg in variants:
        t0 = time.perf_counter()
        pipe = Pipeline(cfg).fit(train, items)
        uidx = pipe.user_index_.lookup(user_index.take(users))
        recs, _ = pipe.recommend_indices(uidx, kmax)
        lists[name] = recs
        rep.rows[name] = summarize(recs, users, test, k, len(item_index)) | {
            "seconds": time.perf_counter() - t0
        }
        rep.importances[name] = pipe.ranker_.importances().to_dicts()
        rep.pipelines[name] = pipe
        lm = getattr(pipe, "lm", None)
        if lm is not None and getattr(lm, "precision_", None):
            rep.machine["lm"] = lm.precision_
        log.info("%-10s ndcg@%d %.4f", name, k, rep.rows[name][f"ndcg@{k}"])
        if ablation and cfg.use_lm and len(variants) == 1:
            if uses_lm(pipe):
                variants.append(("recsys (no LM)", cfg.model_copy(update={"use_lm": False})))
                rep.ablation = {"with": name, "without": "recsys (no LM)"}
            else:
                rep.ablation = {
                    "note": "The fitted pipeline has no language-model feature (no language "
                    "model was available or it was switched off), so the pipeline without it "
                    "is the row above; not fitted twice."
                }
    item_cats = item_categories(items, item_index, config.category_columns)
    rep.analysis = analyse(
        lists, users, hist, test, len(user_index), len(item_index), item_cats,
        k=k, ks=ks, n_boot=n_boot, seed=config.seed,
    )  # fmt: skip
    rep.analysis["_user_ids"] = user_index.take(users).rename(USER)
    rep.analysis["_lists"] = lists
    rep.analysis["_item_ids"] = item_index.ids
    rep.analysis["_train"] = train
    rep.analysis["_test"] = to_canonical(test, user_index, item_index).select(USER, ITEM).unique()
    rep.analysis["_history"] = np.bincount(hist[U].to_numpy(), minlength=len(user_index))[users]
    if rep.ablation.get("with") in lists and rep.ablation.get("without") in lists:
        pu = rep.analysis["_per_user"]
        head = {n: pu[n][f"ndcg@{k}"] for n in (rep.ablation["with"], rep.ablation["without"])}
        rep.ablation["paired"] = bootstrap(
            head, rep.ablation["without"], n_boot=n_boot, seed=config.seed
        )[1][rep.ablation["with"]]
    return rep


def uses_lm(pipe: Pipeline) -> bool:
    """Whether a fitted pipeline has a language model, or its ranker sees a feature
    named like one (`lm_*`, `*_lm`, `*_lm_*`)."""
    if getattr(pipe, "lm", None) is not None:
        return True
    return any(is_lm_feature(f) for f in pipe.ranker_.features_)


def write_report(rep: Report, out_dir: str | Path) -> tuple[Path, Path]:
    """metrics.json, report.md (each written to a temp file and renamed) and the PNG
    plots of `recsys.report`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = (out / "metrics.json", out / "report.md")
    d = rep.to_dict()
    for path, text in zip(paths, (json.dumps(d, indent=2), markdown(d)), strict=True):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    if rep.analysis:
        write_plots(d, out)
    return paths
