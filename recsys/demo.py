"""`recsys demo`: the main job end to end on the embedded synthetic data."""

from __future__ import annotations

import time
from pathlib import Path

import polars as pl
from rich.console import Console
from rich.table import Table

from recsys.config import PipelineConfig
from recsys.schema import ITEM, TS, USER


def _text(items: pl.DataFrame) -> pl.DataFrame:
    """A short display text per item: its title and category when it has them."""
    cols = [c for c in ("title", "category", "genres") if c in items.columns]
    if not cols:
        return items.select(ITEM, pl.col(ITEM).cast(pl.String).alias("text"))
    return items.select(
        ITEM,
        pl.concat_str([pl.col(c).fill_null("") for c in cols], separator="  ·  ").alias("text"),
    )


def demo_config() -> PipelineConfig:
    """The defaults, but one ranker model instead of three folds and a one-minute
    budget for training the language model on CPU: the demo fits three times (the
    evaluated pipeline, its no-LM ablation, the bundle) and should end in minutes."""
    return PipelineConfig.model_validate(
        {"ranker": {"n_folds": 1}, "lm": {"cpu_time_budget_s": 60.0}}
    )


def run_demo(
    out: Path, n_users: int, n_items: int, n_events: int, seed: int, console: Console
) -> None:
    from recsys.evaluate import evaluate, write_report
    from recsys.pipeline import Pipeline
    from recsys.report import results_table
    from recsys.schema import read_interactions, read_items
    from recsys.synth import generate

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    console.rule("1. synthetic data")
    inter_path, items_path = generate(
        out / "data", n_users=n_users, n_items=n_items, n_events=n_events, seed=seed
    )
    items = read_items(items_path)
    inter = read_interactions(inter_path, items=items)
    console.print(
        f"{len(inter)} events, {inter[USER].n_unique()} users, {len(items)} items in {out / 'data'}"
    )

    console.rule("2. offline evaluation: pipeline against the baselines")
    cfg = demo_config()
    rep = evaluate(inter, items, cfg)
    write_report(rep, out / "report")
    console.print(results_table(rep.to_dict()))

    console.rule("3. fit on everything and write the bundle")
    pipe = Pipeline(cfg).fit(inter, items)
    pipe.save(str(out / "bundle"))
    console.print(f"bundle: {out / 'bundle'}")

    console.rule("4. example lists")
    pipe = Pipeline.load(str(out / "bundle"))
    text = _text(items)
    sample = inter.group_by(USER).len().sort([USER]).filter(pl.col("len") >= 10)[USER].head(3)
    recs = pipe.recommend(sample, k=5).join(text, on=ITEM, how="left")
    for uid in sample.to_list():
        t = Table(title=f"user {uid}", show_lines=False)
        t.add_column("recent history (newest first)")
        t.add_column("recommended")
        t.add_column("score", justify="right")
        hist = (
            inter.filter(pl.col(USER) == uid)
            .sort(TS)
            .tail(5)
            .reverse()
            .join(text, on=ITEM, how="left")["text"]
            .to_list()
        )
        r = recs.filter(pl.col(USER) == uid).sort("rank")
        for j in range(5):
            t.add_row(
                hist[j] if j < len(hist) else "",
                r["text"][j] if j < len(r) else "",
                f"{r['score'][j]:.3f}" if j < len(r) else "",
            )
        console.print(t)
    console.print(f"demo finished in {time.perf_counter() - t0:.0f} s; outputs in {out}")
