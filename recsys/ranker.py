"""LightGBM LambdaRank over candidate features, grouped by user."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from recsys.schema import DataError

if TYPE_CHECKING:
    import lightgbm as lgb

log = logging.getLogger("recsys")


class Ranker:
    """LambdaRank, early-stopped on NDCG@10 of held-out users.

    With `n_folds` > 1 the users are cut into folds and one model is trained per fold,
    early-stopped on that fold; predictions are the mean of the models. Early stopping
    on a few hundred users is noisy, and the average of the folds is much steadier
    than any one of them. `n_folds = None` takes 3 folds below `fold_users` groups and
    one model (early-stopped on `valid_fraction` of the groups) from there on.

    With `refit`, the folds only choose the number of trees (the mean of their early
    stopping points); one model is then trained on every user with that many trees
    and predicts alone: a third of the trees of three folds to evaluate per request.
    """

    def __init__(
        self,
        n_estimators: int = 1000,
        learning_rate: float = 0.03,
        num_leaves: int = 15,
        min_child_samples: int = 100,
        subsample: float = 0.8,
        colsample_bytree: float = 0.8,
        early_stopping_rounds: int = 150,
        valid_fraction: float = 0.2,
        n_folds: int | None = None,
        fold_users: int = 3000,
        seed: int = 0,
        n_jobs: int = 0,
        refit: bool = False,
        feature_gain: dict[str, float] | None = None,
    ) -> None:
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.num_leaves = num_leaves
        self.min_child_samples = min_child_samples
        self.subsample = subsample
        self.colsample_bytree = colsample_bytree
        self.early_stopping_rounds = early_stopping_rounds
        self.valid_fraction = valid_fraction
        self.n_folds = n_folds
        self.fold_users = fold_users
        self.seed = seed
        self.n_jobs = n_jobs
        self.refit = refit
        # a factor on the split gain of named features (LightGBM's feature_contri);
        # the rest keep 1
        self.feature_gain = dict(feature_gain or {})

    @classmethod
    def from_texts(cls, texts: list[str], features: list[str], best_score: float) -> Ranker:
        """A fitted ranker from its models' LightGBM texts (a bundle's files). LightGBM
        is imported when the boosters are first used: compiled trees whose cache was
        checked against LightGBM need neither (a batch job's workers start faster)."""
        r = cls()
        r.__dict__["_model_texts"] = list(texts)
        r.features_ = list(features)
        r.best_score_ = best_score
        return r

    @property
    def boosters_(self) -> list[lgb.Booster]:
        boosters: list[lgb.Booster] | None = self.__dict__.get("_boosters")
        if boosters is None:
            texts = self.__dict__.get("_model_texts")
            if texts is None:
                raise AttributeError("the ranker is not fitted")
            import lightgbm as lgb

            boosters = self.__dict__["_boosters"] = [lgb.Booster(model_str=t) for t in texts]
        return boosters

    @boosters_.setter
    def boosters_(self, boosters: list[lgb.Booster]) -> None:
        self.__dict__["_boosters"] = boosters
        self.__dict__.pop("_model_texts", None)

    def model_texts(self) -> list[str]:
        """Each model's LightGBM text (as read from the bundle, else from the boosters)."""
        texts: list[str] | None = self.__dict__.get("_model_texts")
        return texts if texts is not None else [b.model_to_string() for b in self.boosters_]

    def _params(self, features: list[str]) -> dict[str, object]:
        params: dict[str, object] = {
            "objective": "lambdarank",
            "metric": "ndcg",
            "eval_at": [10],
            "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "min_data_in_leaf": self.min_child_samples,
            "bagging_fraction": self.subsample,
            "bagging_freq": 1,
            "feature_fraction": self.colsample_bytree,
            "lambdarank_truncation_level": 20,
            "seed": self.seed,
            "num_threads": self.n_jobs,
            "verbosity": -1,
        }
        gain = [float(self.feature_gain.get(f, 1.0)) for f in features]
        if any(g != 1.0 for g in gain):
            params["feature_contri"] = gain
        return params

    def fit(
        self, X: np.ndarray, y: np.ndarray, group_ids: np.ndarray, features: list[str]
    ) -> Ranker:
        """X: [rows, features] float32, rows contiguous per group."""
        import lightgbm as lgb

        self.features_ = list(features)
        rng = np.random.default_rng(self.seed)
        groups = rng.permutation(np.unique(group_ids))
        if len(groups) < 2:  # one to train on and one to stop early on
            raise DataError(
                f"{len(groups)} user(s) with a ranker target among their candidates; the "
                "ranker needs at least 2",
                file="interactions",
                expected="more users with several events each",
            )
        n_folds = min(self.n_folds or (3 if len(groups) < self.fold_users else 1), len(groups))
        if n_folds > 1:
            folds = np.array_split(groups, n_folds)
        else:
            folds = [groups[: max(1, int(len(groups) * self.valid_fraction))]]
        params = self._params(self.features_)
        Xn = np.asarray(X, dtype=np.float32)
        self.boosters_ = []
        scores = []
        for f, valid_groups in enumerate(folds):
            va = np.isin(group_ids, valid_groups)
            tr = ~va
            train = lgb.Dataset(
                Xn[tr], y[tr], group=_group_sizes(group_ids[tr]), feature_name=self.features_
            )
            valid = lgb.Dataset(Xn[va], y[va], group=_group_sizes(group_ids[va]), reference=train)
            booster = lgb.train(
                params | {"seed": self.seed + f},
                train,
                num_boost_round=self.n_estimators,
                valid_sets=[valid],
                valid_names=["valid"],
                callbacks=[lgb.early_stopping(self.early_stopping_rounds, verbose=False)],
            )
            best = int(booster.best_iteration or self.n_estimators)
            score = float(booster.best_score["valid"]["ndcg@10"])
            # keep only the trees up to the best iteration
            self.boosters_.append(
                lgb.Booster(model_str=booster.model_to_string(num_iteration=best))
            )
            scores.append(score)
            log.info(
                "ranker model %d/%d: %d trees, validation NDCG@10 %.4f (%d users held out)",
                f + 1,
                len(folds),
                best,
                score,
                len(valid_groups),
            )
        self.best_score_ = float(np.mean(scores))
        self.fold_trees_ = [b.num_trees() for b in self.boosters_]
        if self.refit:
            n_trees = max(1, round(float(np.mean(self.fold_trees_))))
            train = lgb.Dataset(Xn, y, group=_group_sizes(group_ids), feature_name=self.features_)
            self.boosters_ = [lgb.train(params, train, num_boost_round=n_trees)]
            log.info("ranker: one model on all %d users, %d trees", len(groups), n_trees)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Scores of [rows, features_] (in the order of `features_`)."""
        return np.mean([b.predict(X) for b in self.boosters_], axis=0)

    def contributions(self, X: np.ndarray) -> np.ndarray:
        """[rows, features + 1]: each feature's contribution to the score (TreeSHAP,
        LightGBM's `pred_contrib`), the last column the bias. The mean over the
        boosters, as `predict` is, so every row adds up to its `predict` score."""
        Xn = X
        return np.mean([b.predict(Xn, pred_contrib=True) for b in self.boosters_], axis=0)

    def importances(self) -> pl.DataFrame:
        return pl.DataFrame(
            {
                "feature": self.features_,
                "gain": np.mean([b.feature_importance("gain") for b in self.boosters_], axis=0),
                "split": np.mean([b.feature_importance("split") for b in self.boosters_], axis=0),
            }
        ).sort("gain", descending=True)


def _group_sizes(group_ids: np.ndarray) -> np.ndarray:
    _, idx, counts = np.unique(group_ids, return_index=True, return_counts=True)
    return counts[np.argsort(idx)]
