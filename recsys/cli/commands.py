"""`recsys` commands: parse, call the Python API, print."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl
import typer
from rich.console import Console
from rich.table import Table

from recsys.cli.app import app
from recsys.cli.ingest import ingest_app
from recsys.cli.lm import bench_app, encode_items
from recsys.cli.serve import serve
from recsys.cli.synth import synth
from recsys.config import PipelineConfig

if TYPE_CHECKING:
    from recsys.evaluate import Report

console = Console(stderr=False)
log = logging.getLogger("recsys")

app.add_typer(
    ingest_app,
    name="ingest",
    help="Convert public data sets or CSV/Parquet to the canonical Parquet tables.",
)
app.command("synth")(synth)
app.command("serve")(serve)
app.command("encode-items")(encode_items)
app.add_typer(bench_app, name="bench", help="Throughput benchmarks (`recsys bench encode`).")


def _config(path: Path | None, no_lm: bool = False, seed: int | None = None) -> PipelineConfig:
    cfg = PipelineConfig.from_toml(path) if path else PipelineConfig()
    if no_lm:
        cfg = cfg.model_copy(update={"use_lm": False})
    if seed is not None:
        cfg = cfg.model_copy(update={"seed": seed})
    return cfg


def _load_data(
    interactions: Path, items: Path, drop_unknown_items: bool
) -> tuple[pl.DataFrame, pl.DataFrame]:
    from recsys.schema import read_interactions, read_items

    it = read_items(items)
    inter = read_interactions(interactions, items=it, drop_unknown_items=drop_unknown_items)
    log.info(
        "read %d interactions (%s) and %d items (%s)", len(inter), interactions, len(it), items
    )
    return inter, it


@app.command()
def fit(
    interactions: Path = typer.Option(
        ...,
        "--interactions",
        help="Parquet (or CSV) of events: user_id, item_id, timestamp "
        "[, event, rating, weight, label].",
    ),
    items: Path = typer.Option(
        ..., "--items", help="Parquet (or CSV) of items: item_id and text columns."
    ),
    out: Path = typer.Option(..., "--out", help="Bundle directory to write (replaced atomically)."),
    config: Path | None = typer.Option(
        None, "--config", help="TOML file with pipeline settings (see recsys.config)."
    ),
    no_lm: bool = typer.Option(False, "--no-lm", help="Fit without the language model (ablation)."),
    drop_unknown_items: bool = typer.Option(
        False,
        "--drop-unknown-items",
        help="Drop events whose item is not in the items table instead of failing.",
    ),
) -> None:
    """Fit the pipeline (sources, features, LambdaRank ranker) and write a bundle.

    The input is split in time by fit itself: the last part of each user's history
    becomes ranker targets and early-stopping data. No test set is needed. Interactions
    written by `recsys ingest --pseudonymize` mark the bundle as pseudonymized.
    """
    from recsys.pipeline import Pipeline
    from recsys.pseudonym import MANIFEST_FIELD, check_pseudonyms, read_sidecar, sidecar_path
    from recsys.schema import USER

    t0 = time.perf_counter()
    inter, it = _load_data(interactions, items, drop_unknown_items)
    # ingest --pseudonymize left a record beside the interactions: the bundle carries
    # it, so a server hashes the raw ids requests bring (recsys.pseudonym)
    pseudonym = read_sidecar(interactions)
    if pseudonym is not None:
        check_pseudonyms(inter[USER], sidecar_path(interactions))
    p = Pipeline(_config(config, no_lm)).fit(inter, it)
    p.save(out, None if pseudonym is None else {MANIFEST_FIELD: pseudonym})
    if pseudonym is not None:
        console.print(
            f"user ids are pseudonyms (key fingerprint {pseudonym.get('key_fingerprint')}): "
            "serving needs RECSYS_PSEUDONYM_KEY"
        )
    console.print(f"bundle written to [bold]{out}[/] in {time.perf_counter() - t0:.1f} s")
    _print_timings(p.timings_)
    if p.lm is not None:
        console.print(
            "language model: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in p.lm.timings_.items())
            + f"; validation recall@{p.lm.recall_at_} {p.lm.best_recall_:.4f}"
        )


def _print_timings(timings: dict[str, float]) -> None:
    t = Table(title="fit time by stage")
    t.add_column("stage")
    t.add_column("seconds", justify="right")
    for k, v in timings.items():
        t.add_row(k, f"{v:.1f}")
    t.add_row("total", f"{sum(timings.values()):.1f}")
    console.print(t)


@app.command()
def recommend(
    bundle: Path = typer.Option(..., "--bundle", help="Bundle directory written by `recsys fit`."),
    users: Path = typer.Option(
        ...,
        "--users",
        help="Parquet (or CSV) with a user_id column; unknown users get a fallback list.",
    ),
    k: int = typer.Option(10, "--k", min=1, max=10_000, help="List length per user."),
    out: Path = typer.Option(
        ..., "--out", help="Parquet to write: user_id, item_id, rank (1..k), score."
    ),
    batch_size: int = typer.Option(
        1000,
        "--batch-size",
        min=1,
        help="Users per part; finished parts survive an interruption and a rerun resumes. "
        "Smaller parts even out the workers' last parts.",
    ),
    new_item_every: int | None = typer.Option(
        None,
        "--new-item-every",
        min=0,
        help="Every n-th place after the bundle's new_item_after (default 10) goes to the "
        "user's best item without interactions (by the language model; score empty). 0 turns "
        "it off; default: the bundle's setting (5).",
    ),
    engine: str = typer.Option(
        "local",
        "--engine",
        help="'local': this machine, in --workers processes; 'ray': a Ray cluster (started "
        "locally, or the one at --address / RAY_ADDRESS; needs `pip install 'recsys[ray]'`).",
    ),
    workers: int = typer.Option(
        0,
        "--workers",
        min=0,
        help="Processes ranking parts side by side (each holds the bundle once); 0: one per "
        "CPU this process may use (its affinity, within a container's CPU quota). Fewer "
        "start when the memory available would not hold them (a warning says so). With "
        "--engine ray: actors (0: one per CPU of the cluster).",
    ),
    address: str | None = typer.Option(
        None, "--address", help="Ray cluster to attach to (default: RAY_ADDRESS, else local)."
    ),
) -> None:
    """Top-k lists for every user in a file, in resumable parts with a progress bar.

    Memory is one bundle and one part per worker, whatever the number of users; a
    rerun after an interruption skips the parts already written."""
    from recsys.batch import WorkerLost, recommend_file
    from recsys.schema import check_id_file

    if engine not in ("local", "ray"):
        raise typer.BadParameter("'local' or 'ray'", param_hint="--engine")
    check_id_file(users)  # a list or float user_id column is refused before any work
    if engine == "local" and not workers:
        from recsys import resources

        workers = resources.usable_cpus()
        log.info(
            "recommend: %d worker process%s, one per CPU: %s",
            workers,
            "" if workers == 1 else "es",
            resources.describe(),
        )
    t0 = time.perf_counter()
    try:
        n_users, n_rows = recommend_file(
            bundle, users, out, k=k, batch_size=batch_size, new_item_every=new_item_every,
            engine=engine, workers=workers, address=address,
        )  # fmt: skip
    except WorkerLost as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    dt = time.perf_counter() - t0
    console.print(
        f"{n_rows} rows for {n_users} users written to [bold]{out}[/] in {dt:.1f} s "
        f"({n_users / max(dt, 1e-9):.0f} users/s)"
    )


@app.command()
def evaluate(
    interactions: Path = typer.Option(..., "--interactions", help="Parquet (or CSV) of events."),
    items: Path = typer.Option(..., "--items", help="Parquet (or CSV) of items."),
    out: Path = typer.Option(..., "--out", help="Report directory: metrics.json and report.md."),
    config: Path | None = typer.Option(None, "--config", help="TOML file with pipeline settings."),
    no_lm: bool = typer.Option(
        False, "--no-lm", help="Evaluate the pipeline without the language model."
    ),
    k: int = typer.Option(10, "--k", min=1, help="Cut-off of the metrics."),
    drop_unknown_items: bool = typer.Option(
        False, "--drop-unknown-items", help="Drop events whose item is not in the items table."
    ),
    ablation: bool = typer.Option(
        True,
        "--ablation/--no-ablation",
        help="Also fit the pipeline without the language model when it uses one.",
    ),
    seed: int | None = typer.Option(
        None,
        "--seed",
        min=0,
        help="Seed of the fits (ALS, the language model, the ranker), over the settings' "
        "`seed`. The language model's effect on a small data set can be as large as the "
        "spread between seeds: benchmarks/seeds.py runs several.",
    ),
) -> None:
    """Pipeline against MostPop, ItemKNN, EASE and ALS on one time split.

    Per user, the last 20% of events (at least one) are held out; every item the user
    has not met in training is ranked; NDCG, Recall, HR, MRR at 5/10/20/50, coverage,
    novelty, diversity, segments, exposure, a bootstrap interval of NDCG@k paired
    against EASE, and ranker importances: report.md, metrics.json and PNG plots.
    """
    from recsys.evaluate import evaluate as run_eval
    from recsys.evaluate import write_report

    inter, it = _load_data(interactions, items, drop_unknown_items)
    rep = run_eval(inter, it, _config(config, no_lm, seed), k=k, ablation=ablation)
    paths = write_report(rep, out)
    print_report(rep)
    ci = rep.analysis.get("bootstrap", {}).get("ci", {})
    for name, c in ci.items():
        if name.startswith("recsys"):
            console.print(f"{name}: NDCG@{k} {c['mean']:.4f} (95% CI {c['lo']:.4f}–{c['hi']:.4f})")
    plots = sorted(p.name for p in Path(out).glob("*.png"))
    console.print(f"report written to {paths[0]} and {paths[1]}; plots: {', '.join(plots)}")


@app.command()
def explain(
    bundle: Path = typer.Option(..., "--bundle", help="Bundle directory written by `recsys fit`."),
    user: str = typer.Option(..., "--user", help="The user id (as in the interactions)."),
    k: int = typer.Option(10, "--k", min=1, max=1000, help="List length."),
    n_contributions: int = typer.Option(
        3, "--contributions", min=1, help="Feature contributions shown per item."
    ),
) -> None:
    """Why a user gets their list: per item, the ranker's strongest feature
    contributions (they add up, with the bias, to the score) and the most similar
    items of the user's history."""
    from recsys.explain import explain
    from recsys.pipeline import Pipeline

    pipe = Pipeline.load(str(bundle))
    e = explain(pipe, user, k=k)
    state = f"{e.history_length} items in history" if e.known else "unknown user: fallback list"
    t = Table(title=f"user {user} ({state})", show_lines=True)
    t.add_column("#", justify="right")
    t.add_column("item")
    t.add_column("score", justify="right")
    t.add_column("strongest contributions (feature = value: contribution)")
    t.add_column("similar in history (cosine)")
    top = e.top_contributions(n_contributions)
    for row in e.items.iter_rows(named=True):
        r = row["rank"]
        contrib = "\n".join(
            f"{c['feature']} = {c['value']:.3g}: {c['contribution']:+.3f}"
            for c in top.filter(pl.col("rank") == r).iter_rows(named=True)
        )
        if row["source"] == "ranker":
            contrib += f"\n(bias {row['bias']:+.3f})"
        else:
            contrib = "popular fallback (not ranked)"
        sim = "\n".join(
            f"{s['history_text'] or s['history_item_id']} ({s['similarity']:.2f})"
            for s in e.similar.filter(pl.col("rank") == r).iter_rows(named=True)
        )
        t.add_row(
            str(r),
            f"{row['item_id']}\n{row['text'] or ''}",
            f"{row['score']:.3f}",
            contrib,
            sim,
        )
    console.print(t)


def print_report(rep: Report) -> None:
    from recsys.report import results_table

    console.print(results_table(rep.to_dict()))


@app.command()
def demo(
    out: Path = typer.Option(
        Path("recsys-demo"),
        "--out",
        help="Working directory for the demo's data, bundle and report.",
    ),
    users: int = typer.Option(2000, "--users", help="Synthetic users."),
    items: int = typer.Option(1500, "--items", help="Synthetic items."),
    events: int = typer.Option(150_000, "--events", help="Synthetic events."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """The main job on the embedded synthetic data, end to end.

    Generates the data, evaluates the pipeline against the baselines, fits a bundle
    and shows a few users' lists with item text.
    """
    from recsys.demo import run_demo

    run_demo(out, n_users=users, n_items=items, n_events=events, seed=seed, console=console)
