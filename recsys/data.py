"""Internal form of the canonical tables: dense integer ids, epoch seconds, sparse matrices.

Users and items keep their ids as given (string or integer) in `IdIndex`; every
algorithm works on dense int32 indices, and results are mapped back at the boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import scipy.sparse as sp

from recsys.schema import ITEM, LABEL, TS, USER

# Internal event columns: user index, item index, epoch seconds, order within the log.
U, I, T = "u", "i", "t"


@dataclass(frozen=True)
class IdIndex:
    """A bijection between external ids (as given) and dense indices 0..n-1."""

    ids: pl.Series

    @classmethod
    def from_values(cls, values: pl.Series) -> IdIndex:
        return cls(values.unique(maintain_order=True).rename("id"))

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dtype(self) -> pl.DataType:
        return self.ids.dtype

    def frame(self, name: str, index_name: str) -> pl.DataFrame:
        return pl.DataFrame({name: self.ids, index_name: np.arange(len(self.ids), dtype=np.int32)})

    def lookup(self, values: pl.Series) -> np.ndarray:
        """Indices of `values` (-1 where unknown), in the order given."""
        values = _cast_like(values, self.ids.dtype)
        m = (
            pl.DataFrame({"v": values})
            .with_row_index("pos")
            .join(self.frame("v", "idx"), on="v", how="left")
            .sort("pos")
        )
        return m["idx"].fill_null(-1).to_numpy().astype(np.int32)

    def take(self, idx: np.ndarray) -> pl.Series:
        return self.ids.gather(np.asarray(idx, dtype=np.int64))


def _cast_like(values: pl.Series, dtype: pl.DataType) -> pl.Series:
    if values.dtype == dtype:
        return values
    return values.cast(dtype, strict=False)


def positive_events(interactions: pl.DataFrame) -> pl.DataFrame:
    """Rows that are interactions: impression negatives (label 0) are not."""
    if LABEL in interactions.columns:
        return interactions.filter(pl.col(LABEL).fill_null(1) == 1)
    return interactions


def to_internal(interactions: pl.DataFrame, users: IdIndex, items: IdIndex) -> pl.DataFrame:
    """Canonical interactions -> (u, i, t) sorted by user then time, stable in log order.

    Rows whose user or item is not in the indices are dropped.
    """
    df = positive_events(interactions).select(USER, ITEM, TS).with_row_index("_pos")
    df = df.join(users.frame(USER, U), on=USER, how="inner").join(
        items.frame(ITEM, I), on=ITEM, how="inner"
    )
    return (
        df.select(
            pl.col(U),
            pl.col(I),
            pl.col(TS).dt.epoch("s").alias(T),
            pl.col("_pos"),
        )
        .sort([U, T, "_pos"])
        .drop("_pos")
    )


def user_item_matrix(
    ev: pl.DataFrame, n_users: int, n_items: int, binary: bool = True
) -> sp.csr_matrix:
    """Users x items matrix of interaction counts (or 1/0 when binary)."""
    u = ev[U].to_numpy()
    i = ev[I].to_numpy()
    m = sp.csr_matrix((np.ones(len(u), dtype=np.float32), (u, i)), shape=(n_users, n_items))
    m.sum_duplicates()
    if binary:
        m.data[:] = 1.0
    return m


def to_canonical(ev: pl.DataFrame, users: IdIndex, items: IdIndex) -> pl.DataFrame:
    """Internal (u, i, t) events back to canonical interactions with the original ids."""
    return pl.DataFrame(
        {
            USER: users.take(ev[U].to_numpy()),
            ITEM: items.take(ev[I].to_numpy()),
            TS: pl.from_epoch(ev[T], "s").dt.replace_time_zone("UTC").dt.cast_time_unit("us"),
        }
    )
