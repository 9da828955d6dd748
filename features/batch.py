"""A chunk of users: their histories and their candidates, as CSR-like arrays.

Every feature kernel takes a chunk of users, whatever its size: the batch job passes
thousands of users at a time (a memory budget sets how many), a request passes one.
The arrays are plain numpy, so a kernel's arithmetic for one user does not depend on
which other users share the chunk: the same state gives the same values on both paths.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

import numpy as np
import scipy.sparse as sp

_T = TypeVar("_T")


class EndTimeMemo(Generic[_T]):
    """What a chunk of one user computes from their end time alone (the counts in a
    window before it), kept for the `size` end times asked for most recently.

    Requests share end times: every user without a history of their own ends at the
    bundle's "now", so every such request would count the same windows again. A value
    is computed on the `after`-th request of its key (a key asked once, as most users'
    own last event is, costs nothing extra) and is read-only from then on. Safe across
    threads (the endpoint ranks in the background too); not pickled."""

    def __init__(self, size: int = 8, after: int = 1, seen: int = 256) -> None:
        self.size, self.after, self.n_seen = size, after, seen
        self._lock = threading.Lock()
        self._vals: OrderedDict[Hashable, _T] = OrderedDict()
        self._asked: OrderedDict[Hashable, int] = OrderedDict()

    def get(self, key: Hashable, compute: Callable[[], _T]) -> _T | None:
        """The value of `key`: kept, computed now (and kept), or None while the key has
        been asked fewer than `after` times."""
        with self._lock:
            if key in self._vals:
                self._vals.move_to_end(key)
                return self._vals[key]
            n = self._asked.pop(key, 0) + 1
            self._asked[key] = n
            while len(self._asked) > self.n_seen:
                self._asked.popitem(last=False)
        if n < self.after:
            return None
        v = compute()
        with self._lock:
            self._vals[key] = v
            self._asked.pop(key, None)
            while len(self._vals) > self.size:
                self._vals.popitem(last=False)
        return v

    def __getstate__(self) -> dict[str, int]:
        return {"size": self.size, "after": self.after, "seen": self.n_seen}

    def __setstate__(self, st: dict[str, int]) -> None:
        self.__init__(st["size"], st["after"], st["seen"])  # type: ignore[misc]


def segment_index(ptr: np.ndarray) -> np.ndarray:
    """The segment (row) of every element of a CSR-like layout."""
    if len(ptr) == 2:  # one segment (a request's user): skip the repeat
        return np.zeros(int(ptr[1] - ptr[0]), dtype=np.int64)
    return np.repeat(np.arange(len(ptr) - 1, dtype=np.int64), np.diff(ptr))


def segment_offsets(ptr: np.ndarray) -> np.ndarray:
    """Each element's position within its segment (0-based); `ptr` starts at 0."""
    n = int(ptr[-1])
    if len(ptr) == 2:
        return np.arange(n, dtype=np.int64)
    return np.arange(n, dtype=np.int64) - np.repeat(ptr[:-1], np.diff(ptr))


def segment_max(vals: np.ndarray, ptr: np.ndarray, empty: float = 0.0) -> np.ndarray:
    """Max of each segment's values; `empty` for empty segments."""
    out = np.full(len(ptr) - 1, empty, dtype=np.float64)
    nz = np.flatnonzero(np.diff(ptr) > 0)
    if len(nz):
        out[nz] = np.maximum.reduceat(vals, ptr[nz])
    return out


@dataclass(frozen=True)
class Histories:
    """Users' events, each user's oldest first.

    `users` is each user's row in the fitted state (-1: a user it does not know);
    `fresh` marks histories holding events beyond that state's (a model with learned
    per-user parameters then re-derives them from the events)."""

    ptr: np.ndarray  # int64 [B + 1]
    items: np.ndarray  # int64 item indices
    times: np.ndarray  # int64 epoch seconds
    users: np.ndarray  # int64 [B]
    fresh: np.ndarray  # bool [B]
    # values computed once per chunk and shared by its consumers (e.g. a model's user
    # vectors, which a candidate source and the new-item slots both use)
    memo: dict[object, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def one(
        cls, items: np.ndarray, times: np.ndarray, user: int = -1, fresh: bool = False
    ) -> Histories:
        return cls(
            np.array([0, len(items)], dtype=np.int64),
            np.asarray(items, dtype=np.int64),
            np.asarray(times, dtype=np.int64),
            np.array([user], dtype=np.int64),
            np.array([fresh]),
        )

    def __len__(self) -> int:
        return len(self.ptr) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.ptr)

    @property
    def last_t(self) -> np.ndarray:
        """Each user's last event time (-1 without events)."""
        out = np.full(len(self), -1, dtype=np.int64)
        nz = self.lengths > 0
        out[nz] = self.times[self.ptr[1:][nz] - 1]
        return out

    @property
    def first_t(self) -> np.ndarray:
        out = np.full(len(self), -1, dtype=np.int64)
        nz = self.lengths > 0
        out[nz] = self.times[self.ptr[:-1][nz]]
        return out

    def take(self, rows: np.ndarray) -> Histories:
        """The histories of `rows` (positions in this chunk), in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        lo, hi = self.ptr[rows], self.ptr[rows + 1]
        lens = hi - lo
        ptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        at = np.repeat(lo - ptr[:-1], lens) + np.arange(int(ptr[-1]))
        return Histories(ptr, self.items[at], self.times[at], self.users[rows], self.fresh[rows])

    def last(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Each user's last `n` items, most recent first: (ptr, items)."""
        lens = np.minimum(self.lengths, n)
        ptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        at = np.repeat(self.ptr[1:] - 1, lens) - segment_offsets(ptr)
        return ptr, self.items[at]

    def last_list(self, n: int) -> list[np.ndarray]:
        ptr, items = self.last(n)
        return [items[ptr[r] : ptr[r + 1]] for r in range(len(self))]

    def seen(self, n_items: int) -> sp.csr_matrix:
        """[B, n_items] binary float32: the items each user has met, indices sorted
        (computed once per chunk; do not modify)."""
        key = ("seen", n_items)
        m = self.memo.get(key)
        if m is None:
            keys = np.unique(segment_index(self.ptr) * n_items + self.items)
            rows = keys // n_items
            ptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(self)))])
            m = sp.csr_matrix(
                (np.ones(len(keys), np.float32), (keys % n_items).astype(np.int32),
                 ptr.astype(np.int32)),
                shape=(len(self), n_items),
            )  # fmt: skip
            m.has_sorted_indices = True
            self.memo[key] = m
        return m


@dataclass
class Candidates:
    """Each user's candidate items, ascending, with per-pair columns."""

    ptr: np.ndarray  # int64 [B + 1]
    items: np.ndarray  # int64
    cols: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.items)

    @property
    def rows(self) -> np.ndarray:
        """The chunk row (user position) of every pair."""
        return segment_index(self.ptr)

    def positions(self, rows: np.ndarray, items: np.ndarray, n_items: int) -> np.ndarray:
        """The pair index of each (row, item) (-1 where it is not a candidate)."""
        keys = self.rows * n_items + self.items  # ascending: rows, then items
        q = np.asarray(rows, dtype=np.int64) * n_items + np.asarray(items, dtype=np.int64)
        return lookup(keys, np.arange(len(keys), dtype=np.int64), q, default=-1)


try:  # the C++ row gather behind scipy's `csr[rows]`, without its per-call overhead
    from scipy.sparse._sparsetools import csr_row_index as _csr_row_index
except ImportError:  # pragma: no cover - a scipy that moved it: the numpy gather
    _csr_row_index = None


def gather_rows(m: sp.csr_matrix, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The stored entries of CSR rows `rows`, in row order then stored order:
    (entries per row, column indices, values)."""
    rows = np.asarray(rows, dtype=np.int64)
    lo = m.indptr[rows]
    lens = (m.indptr[rows + 1] - lo).astype(np.int64)
    total = int(lens.sum())
    if _csr_row_index is not None and m.indptr.dtype == m.indices.dtype:
        cols = np.empty(total, dtype=m.indices.dtype)
        vals = np.empty(total, dtype=m.data.dtype)
        _csr_row_index(
            len(rows), rows.astype(m.indptr.dtype, copy=False), m.indptr, m.indices, m.data,
            cols, vals,
        )  # fmt: skip
        return lens, cols, vals
    starts = np.cumsum(lens) - lens
    at = np.arange(total) + np.repeat(lo - starts, lens)
    return lens, m.indices[at], m.data[at]


def search(keys: np.ndarray, q: np.ndarray, side: Literal["left", "right"] = "left") -> np.ndarray:
    """`np.searchsorted(keys, q, side)` with the queries sorted first: a binary search
    per query walks far less memory when the queries come in order (about eight
    times faster on a few million keys), and the answers are the same."""
    q = np.asarray(q)
    if len(q) < 64 or bool((q[1:] >= q[:-1]).all()):  # in order already
        return np.searchsorted(keys, q, side=side).astype(np.int64)
    o = np.argsort(q, kind="stable")
    out = np.empty(len(q), dtype=np.int64)
    out[o] = np.searchsorted(keys, q[o], side=side)
    return out


def lookup(
    keys: np.ndarray,
    values: np.ndarray,
    q: np.ndarray,
    default: float = 0.0,
    q_sorted: bool = False,
) -> np.ndarray:
    """values[i] where keys[i] == q (keys sorted and distinct), `default` elsewhere;
    `q_sorted`: the queries are ascending already (no sort needed)."""
    integral = isinstance(default, int) and values.dtype.kind in "iu"
    out = np.full(
        len(q),
        default,
        dtype=values.dtype if integral else np.result_type(values.dtype, np.float32),
    )
    if len(keys) == 0 or len(q) == 0:
        return out
    at = np.searchsorted(keys, q) if q_sorted else search(keys, q)
    at_c = np.minimum(at, len(keys) - 1)
    hit = keys[at_c] == q
    out[hit] = values[at_c[hit]]
    return out
