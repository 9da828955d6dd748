"""Why a user got their list: per item, the ranker's strongest feature contributions
(LightGBM TreeSHAP, averaged over the ranker's boosters, so contributions + bias = the
score) and the user's history items most similar to it (cosine over who interacted
with what, the ItemKNN similarity).

`explain(pipeline, user_id, k)` is the one entry point, used by the
`recsys explain` command and (through `Explanation.to_dict`) the serving layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from recsys.data import I
from recsys.schema import ITEM

if TYPE_CHECKING:
    from recsys.pipeline import Pipeline

TEXT_COLUMNS = ("title", "name", "headline", "category", "genres", "subcategory")


def item_text(items: pl.DataFrame, max_chars: int = 80) -> pl.DataFrame:
    """(item_id, text): a short display text per item from its title-like columns."""
    cols = [c for c in TEXT_COLUMNS if c in items.columns and items[c].dtype == pl.String]
    if not cols:
        cols = [c for c, t in items.schema.items() if c != ITEM and t == pl.String][:2]
    if not cols:
        return items.select(ITEM, pl.col(ITEM).cast(pl.String).alias("text"))
    return items.select(
        ITEM,
        pl.concat_str([pl.col(c) for c in cols], separator="  ·  ", ignore_nulls=True)
        .fill_null("")
        .str.slice(0, max_chars)
        .alias("text"),
    )


@dataclass
class Explanation:
    """The top-k of one user with the reasons for each item.

    items: rank, item_id, score, bias, source ('ranker', or 'fallback' for items that
    came from the popularity fallback and have no contributions), text.
    contributions: rank, item_id, feature, value, contribution; every feature of every
    ranked item, largest |contribution| first within an item.
    similar: rank, item_id, history_item_id, similarity, history_text.
    """

    user_id: Any
    known: bool
    history_length: int
    items: pl.DataFrame
    contributions: pl.DataFrame
    similar: pl.DataFrame

    def top_contributions(self, n: int = 3) -> pl.DataFrame:
        """The `n` contributions of largest magnitude per item."""
        return self.contributions.group_by("rank", maintain_order=True).head(n)

    def to_dict(self, n_contributions: int = 5) -> dict[str, Any]:
        """JSON-ready form, e.g. for an HTTP response."""
        top = self.top_contributions(n_contributions)
        out = []
        for row in self.items.iter_rows(named=True):
            r = row["rank"]
            out.append(
                row
                | {
                    "contributions": top.filter(pl.col("rank") == r)
                    .select("feature", "value", "contribution")
                    .to_dicts(),
                    "similar_history": self.similar.filter(pl.col("rank") == r)
                    .select("history_item_id", "similarity", "history_text")
                    .to_dicts(),
                }
            )
        return {
            "user_id": self.user_id,
            "known_user": self.known,
            "history_length": self.history_length,
            "items": out,
        }


def explain(pipe: Pipeline, user_id: Any, k: int = 10, n_similar: int = 3) -> Explanation:
    """The user's top-k (exactly what `pipe.recommend` returns) with, per item, every
    feature contribution and the `n_similar` most similar items of the user's history."""
    uidx = int(pipe.user_index_.lookup(pl.Series([user_id]))[0])
    h = pipe.history_
    known = uidx >= 0 and h.user_last_t[uidx] >= 0
    users = np.array([uidx], dtype=np.int64)
    # the features of every candidate, computed once: recommend ranks them, and the
    # contributions below come from the listed items' rows
    all_feats = pipe.candidate_features(users) if known else None
    recs, scores = pipe.recommend_indices(users, k)
    recs, scores = recs[0], scores[0]
    valid = recs >= 0
    recs, scores = recs[valid], scores[valid]
    ranks = np.arange(1, len(recs) + 1, dtype=np.int32)
    hist_items = h.X[uidx].indices if known else np.array([], dtype=np.int32)
    text = item_text(pipe.items_)
    ids = pipe.item_index_.take(recs)

    features = pipe.ranker_.features_
    contrib_rows: list[pl.DataFrame] = []
    bias = np.full(len(recs), np.nan)
    source = np.array(["fallback"] * len(recs), dtype=object)
    if all_feats is not None and len(recs):
        feats = all_feats.filter(pl.col(I).is_in(recs.tolist()))
        if len(feats):
            pos = {int(i): r for r, i in enumerate(recs.tolist())}
            row_of = np.array([pos[int(i)] for i in feats[I].to_list()])
            X = feats.select(features).to_numpy().astype(np.float32)
            contrib = pipe.ranker_.contributions(X)
            bias[row_of] = contrib[:, -1]
            source[row_of] = "ranker"
            values = feats.select(features).to_numpy().astype(np.float64)
            for j, r in enumerate(row_of.tolist()):
                contrib_rows.append(
                    pl.DataFrame(
                        {
                            "rank": np.full(len(features), ranks[r]),
                            ITEM: ids.gather([r] * len(features)),
                            "feature": features,
                            "value": values[j],
                            "contribution": contrib[j, :-1],
                        }
                    )
                )
    contributions = (
        pl.concat(contrib_rows).sort(
            ["rank", pl.col("contribution").abs()], descending=[False, True]
        )
        if contrib_rows
        else pl.DataFrame(
            schema={
                "rank": pl.Int32,
                ITEM: pipe.item_index_.dtype,
                "feature": pl.String,
                "value": pl.Float64,
                "contribution": pl.Float64,
            }
        )
    )
    items = (
        pl.DataFrame(
            {"rank": ranks, ITEM: ids, "score": scores, "bias": bias, "source": source.tolist()}
        )
        .join(text, on=ITEM, how="left")
        .sort("rank")
    )
    similar = _similar_history(pipe, recs, ranks, hist_items, n_similar, text)
    return Explanation(user_id, bool(known), len(hist_items), items, contributions, similar)


def _similar_history(
    pipe: Pipeline,
    recs: np.ndarray,
    ranks: np.ndarray,
    hist_items: np.ndarray,
    n: int,
    text: pl.DataFrame,
) -> pl.DataFrame:
    """Per recommended item, the history items with the largest cosine similarity over
    the users who interacted with both (zero-similarity items left out)."""
    schema: dict[str, pl.DataType] = {
        "rank": pl.Int32(),
        ITEM: pipe.item_index_.dtype,
        "history_item_id": pipe.item_index_.dtype,
        "similarity": pl.Float64(),
    }
    if not len(recs) or not len(hist_items) or n < 1:
        return pl.DataFrame(schema=schema).with_columns(pl.lit("").alias("history_text"))
    Xc = pipe.history_.X.tocsc().astype(np.float32)
    norms = np.sqrt(np.asarray(Xc.multiply(Xc).sum(axis=0)).ravel())
    co = np.asarray((Xc[:, recs].T @ Xc[:, hist_items]).todense())
    sim = co / (norms[recs][:, None] * norms[hist_items][None, :] + 1e-9)
    rows = []
    for r in range(len(recs)):
        best = np.argsort(-sim[r], kind="stable")[:n]
        best = best[sim[r, best] > 0]
        rows += [(int(ranks[r]), int(recs[r]), int(hist_items[b]), float(sim[r, b])) for b in best]
    if not rows:
        return pl.DataFrame(schema=schema).with_columns(pl.lit("").alias("history_text"))
    arr = np.array(rows, dtype=np.float64)
    return pl.DataFrame(
        {
            "rank": arr[:, 0].astype(np.int32),
            ITEM: pipe.item_index_.take(arr[:, 1].astype(np.int64)),
            "history_item_id": pipe.item_index_.take(arr[:, 2].astype(np.int64)),
            "similarity": arr[:, 3],
        }
    ).join(
        text.rename({ITEM: "history_item_id", "text": "history_text"}),
        on="history_item_id",
        how="left",
    )
