"""Example data for notebooks and demos: the synthetic default, or ml-latest-small when
it is present, chosen by name or by the RECSYS_DATA environment variable."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import polars as pl

from recsys.config import PipelineConfig

ENV = "RECSYS_DATA"
SYNTHETIC = "synthetic"
MOVIELENS = "ml-latest-small"


def _shared_datasets() -> list[Path]:
    here = Path.cwd().resolve()
    repo = Path(__file__).resolve().parents[1]
    return [p / "shared" / "datasets" for p in (repo.parent, here.parent, here.parent.parent)]


def find_dataset(name: str) -> Path | None:
    """The folder of a public data set in ../shared/datasets (or a path), if present."""
    p = Path(name).expanduser()
    if p.is_dir():
        return p
    for root in _shared_datasets():
        if (root / name).is_dir():
            return root / name
    return None


def example_data(
    name: str | None = None,
    workdir: str | Path | None = None,
    n_users: int = 500,
    n_items: int = 300,
    n_events: int = 20_000,
    seed: int = 0,
) -> tuple[pl.DataFrame, pl.DataFrame, str]:
    """(interactions, items, name) in canonical form.

    name: 'synthetic' (default), 'ml-latest-small' (from ../shared/datasets) or a
    MovieLens folder; None reads RECSYS_DATA. The synthetic default is small, so a
    notebook runs in a minute or two.
    """
    from recsys.schema import read_interactions, read_items

    name = name or os.environ.get(ENV) or SYNTHETIC
    out = Path(workdir or tempfile.mkdtemp(prefix="recsys-example-"))
    if name == SYNTHETIC:
        from recsys.synth import generate

        inter_path, items_path = generate(
            out / "synthetic",
            n_users=n_users,
            n_items=n_items,
            n_events=n_events,
            seed=seed,
            progress=False,
        )
    else:
        from recsys.ingest import ingest_movielens

        src = find_dataset(name)
        if src is None:
            raise FileNotFoundError(
                f"data set {name!r} not found as a folder or in "
                f"{', '.join(str(p) for p in _shared_datasets())}"
            )
        inter_path, items_path = ingest_movielens(src, out / Path(name).name)
    items = read_items(items_path)
    return read_interactions(inter_path, items=items), items, name


# a short language-model fit for the small synthetic set (fields the LM does not have
# are left out, so this follows the LM's settings as they change)
LIGHT_LM = {"cpu_time_budget_s": 30.0, "encoder_epochs": 0, "epochs": 5, "checkpoints": False}


def example_config(name: str, use_lm: bool | None = None) -> PipelineConfig:
    """Settings for the example: the defaults on real data; on the small synthetic set a
    lighter ranker, fewer candidates and a short language-model fit, so notebooks stay
    fast. `use_lm` overrides the default (on)."""
    if name != SYNTHETIC:
        cfg = PipelineConfig()
    else:
        settings: dict[str, object] = {
            "sources": {"per_source": 50, "als_iterations": 5},
            "ranker": {"n_estimators": 100, "early_stopping_rounds": 20, "n_folds": 1},
        }
        lm_field = PipelineConfig.model_fields.get("lm")
        lm_type = getattr(lm_field, "annotation", None)
        if lm_type is not None and hasattr(lm_type, "model_fields"):
            settings["lm"] = {k: v for k, v in LIGHT_LM.items() if k in lm_type.model_fields}
        cfg = PipelineConfig.model_validate(settings)
    if use_lm is not None:
        cfg = cfg.model_copy(update={"use_lm": use_lm})
    return cfg
