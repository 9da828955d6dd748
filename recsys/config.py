"""Pipeline settings: one pydantic model, readable from a TOML file."""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from recsys.lm.config import LMConfig


class SourcesConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    use: list[str] = Field(
        default_factory=lambda: ["pop", "recent_pop", "itemknn", "ease", "als", "next"],
        description="candidate sources, in order",
    )
    per_source: int = Field(100, ge=1, description="candidates taken from each source")
    recent_window_days: float = Field(14.0, gt=0)
    itemknn_k: int = Field(100, ge=0)
    ease_l2: float = Field(200.0, gt=0)
    ease_max_items: int = Field(
        10_000, ge=1, description="EASE runs on this many most popular items"
    )
    ease_keep: int = Field(256, ge=1, description="weights kept per item of the EASE matrix")
    als_factors: int = Field(64, ge=1)
    als_iterations: int = Field(15, ge=1)
    next_max_gap: int = Field(5, ge=1)
    next_last_n: int = Field(10, ge=1)
    next_decay: float = Field(0.8, gt=0, le=1)
    next_keep: int = Field(
        100, ge=0, description="successors kept per item by the next-item source (0: all)"
    )


class RankerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    n_estimators: int = Field(1000, ge=1)
    learning_rate: float = Field(0.03, gt=0)
    num_leaves: int = Field(15, ge=2)
    min_child_samples: int = Field(100, ge=1)
    subsample: float = Field(0.8, gt=0, le=1)
    colsample_bytree: float = Field(0.8, gt=0, le=1)
    early_stopping_rounds: int = Field(150, ge=1)
    n_folds: int | None = Field(
        None,
        ge=1,
        description="models averaged, each early-stopped on its own fold of users; None: 3 "
        "below `fold_users` training users (early stopping on a few hundred users is noisy, "
        "and the mean of three models is steadier), else 1 (enough users to stop on, and a "
        "third of the trees to train and to evaluate per user)",
    )
    fold_users: int = Field(
        3000, ge=1, description="training users from which n_folds = None means one model"
    )
    valid_fraction: float = Field(0.2, gt=0, lt=1, description="held-out users when n_folds is 1")
    refit: bool = Field(
        False,
        description="the folds only choose the number of trees (their mean); one model with "
        "that many trees is then trained on every user and predicts alone",
    )
    lm_gain: float = Field(
        0.5,
        ge=0,
        le=1,
        description="factor on the split gain of the language model's features (LightGBM's "
        "feature_contri): fitted on the history the ranker's examples come from, they tell "
        "its targets apart better there than when recommending, so the ranker trusts them "
        "less (1: as any feature; 0: never split on)",
    )


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    target_fraction: float = Field(
        0.2, gt=0, lt=1, description="share of each user's latest events used as ranker targets"
    )
    max_train_users: int = Field(
        100_000, ge=10, description="most users whose candidates train the ranker (sampled)"
    )
    ranker_max_rows: int = Field(
        2_000_000,
        ge=1000,
        description="most ranker examples (candidate pairs of users with a target): users "
        "beyond it are not used. Time and memory of the ranker grow with it; quality "
        "barely does past a few thousand users",
    )
    chunk_memory_mb: float = Field(
        256,
        gt=0,
        description="memory for the dense score rows of a chunk of users; sets how many "
        "users are scored at once (fit, recommend)",
    )
    category_columns: list[str] | None = Field(
        None, description="item columns holding categories ('|' or ',' separated); None = auto"
    )
    use_lm: bool = Field(True, description="use the language model when one is available")
    new_item_every: int = Field(
        5,
        ge=0,
        description="new-item slots: places after+n, after+2n, ... of each list go to the "
        "user's best items without interactions, by the language model's score of the user "
        "against the item's text (0: off; needs the language model)",
    )
    new_item_after: int = Field(
        10,
        ge=0,
        description="places at the head of each list left to the ranker alone (the default "
        "5 after 10 keeps every top-10 and gives new items places 15, 20, ..., 50)",
    )
    lm: LMConfig = Field(default_factory=LMConfig, description="the language model")
    seed: int = 0
    sources: SourcesConfig = Field(default_factory=SourcesConfig)
    ranker: RankerConfig = Field(default_factory=RankerConfig)

    @classmethod
    def from_toml(cls, path: str | Path) -> PipelineConfig:
        """Settings from a TOML file; a file that is missing, not TOML or not valid
        settings is a DataError naming the file and the offending keys."""
        from recsys.schema import DataError

        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise DataError(f"cannot read the settings ({e.strerror})", file=str(path)) from e
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"not valid TOML: {e}", file=str(path)) from e
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            errors = e.errors()
            shown = "; ".join(
                f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in errors[:5]
            )
            more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
            raise DataError(f"invalid settings: {shown}{more}", file=str(path)) from e
