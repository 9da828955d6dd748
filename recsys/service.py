"""The recommendation service behind the HTTP endpoint, usable without HTTP.

`RecService` holds one loaded bundle (`Model`: the online ranker, id maps, fallback
list) and the fresh events posted since it started. Requests read `self.model` once,
so a reload that assigns a new `Model` swaps atomically: a request in flight finishes
on the model it started with.

Fresh events and ranked lists are kept as `recsys.state` describes: bounded, and shared
between worker processes through a `SharedState` (a state folder by default, Redis for
a fleet). A list is served while it was computed by the serving bundle from the user's
current fresh events and is younger than `list_ttl_s`; an event makes the user's list
stale at once, and the events request ranks it again before it answers (or hands it
to the server's refresher process, `serving.refresher`, through `handoff`); a
background thread (`Refresher`) recomputes a list read in the last quarter of its
time-to-live. A read that finds no valid list ranks
synchronously. A batch job's output can seed the lists at start (`seed_lists`).

A bundle fitted on pseudonymized user ids (`recsys.pseudonym`) loads only with the key
they were hashed with in RECSYS_PSEUDONYM_KEY. Clients still send raw ids: each is
hashed where it enters (`Model.bundle_user_id`), fresh events and cached lists are kept
under the pseudonym, and a list names the user by the id the client sent.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np
import polars as pl

from recsys.bundle import bundle_version, lists_problem
from recsys.candidates import ItemKNN
from recsys.online import OnlineRanker, Ranked, UserState
from recsys.pipeline import Pipeline
from recsys.pseudonym import for_manifest
from recsys.state import (
    CachedList,
    FileState,
    Fresh,
    ListCache,
    LocalState,
    Refresher,
    SharedState,
    StateWriteError,
)

log = logging.getLogger("recsys")

Id = int | str


class ServiceError(Exception):
    """A request the service cannot answer because of what the client sent."""

    status = 422


class NotFoundError(ServiceError):
    status = 404


class NotReadyError(ServiceError):
    status = 503


class StorageError(ServiceError):
    """Shared state could not be written; nothing was taken. The client may retry."""

    status = 503


@dataclass
class Recommendation:
    user_id: Id | None
    items: list[tuple[Id, float | None]]
    model_version: str
    fallback: str | None = None  # None: ranked; "popular" or "history" otherwise
    age_s: float = 0.0  # how long ago the list was ranked (0: for this request)


def _id_map(ids: pl.Series) -> tuple[dict[Any, int], bool]:
    is_int = ids.dtype.is_integer()
    return {v: j for j, v in enumerate(ids.to_list())}, is_int


class Model:
    """One loaded bundle, ready to rank: nothing in it changes after `warm`."""

    def __init__(
        self,
        pipeline: Pipeline,
        path: str | Path,
        tree_cache: Path | None = None,
        new_item_every: int | None = None,
    ):
        self.path = str(path)
        self.pipeline = pipeline
        # the key that hashes requests' user ids, when the bundle's ids are pseudonyms;
        # PseudonymKeyError (the bundle refused) when the environment lacks that key
        self.pseudonym = for_manifest(pipeline.manifest_, self.path)
        if new_item_every is not None:  # the server's setting over the bundle's
            pipeline.new_item_every = new_item_every
        self.ranker = OnlineRanker(pipeline, tree_cache=tree_cache)
        self.users, self.user_int = _id_map(pipeline.user_index_.ids)
        self.items, self.item_int = _id_map(pipeline.item_index_.ids)
        self.item_ids: list[Id] = pipeline.item_index_.ids.to_list()
        self.user_ids: list[Id] = pipeline.user_index_.ids.to_list()
        self.fallback = np.asarray(pipeline.fallback_, dtype=np.int64)
        self.version = bundle_version(pipeline.manifest_)
        self.now = self.ranker.now
        knn = [s for s in pipeline.sources_ if isinstance(s, ItemKNN)]
        self._sim = knn[0].sim_.tocsr() if knn else None
        self.warmed = False

    @classmethod
    def load(
        cls, path: str | Path, tree_cache: Path | None = None, new_item_every: int | None = None
    ) -> Model:
        return cls(Pipeline.load(path), path, tree_cache, new_item_every)

    def warm(self, n_users: int = 8) -> None:
        """Rank a few users (compiles, fills caches) and check the tree evaluator gives
        LightGBM's scores; raises when it does not."""
        warm_users = np.flatnonzero(np.diff(self.ranker._hist_ptr) > 0)[:n_users]
        for u in warm_users.tolist():
            st = self.ranker.user_state(u)
            _, X = self.ranker.feature_matrix(st)
            if len(X):
                self.ranker.trees.check(X, atol=1e-6)
            self.ranker.rank(st)
        self.warmed = True

    # -- ids ----------------------------------------------------------------------------
    def bundle_user_id(self, user_id: Id) -> Id:
        """The id the bundle knows a client's user id by: its pseudonym when the bundle
        was fitted on pseudonymized ids, else the id itself."""
        return self.pseudonym(user_id) if self.pseudonym is not None else user_id

    def user_index(self, user_id: Id) -> int:
        return self.users.get(_coerce(user_id, self.user_int), -1)

    def item_index(self, item_id: Id) -> int:
        return self.items.get(_coerce(item_id, self.item_int), -1)

    def item_indices(self, item_ids: list[Id], what: str) -> np.ndarray:
        idx = [self.item_index(x) for x in item_ids]
        unknown = [x for x, j in zip(item_ids, idx, strict=True) if j < 0]
        if unknown:
            shown = ", ".join(repr(x) for x in unknown[:10])
            more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
            raise ServiceError(f"unknown item id(s) in {what}: {shown}{more}")
        return np.asarray(idx, dtype=np.int64)

    def similar(self, item: int, k: int) -> list[tuple[Id, float]]:
        if self._sim is not None:
            lo, hi = self._sim.indptr[item], self._sim.indptr[item + 1]
            cols, vals = self._sim.indices[lo:hi], self._sim.data[lo:hi]
        else:  # no ItemKNN source: cosine of the ALS item factors, when there are some
            cols, vals = np.zeros(0, np.int64), np.zeros(0, np.float32)
        order = np.lexsort((cols, -vals))[:k]
        return [(self.item_ids[int(cols[j])], float(vals[j])) for j in order]


def _current(e: CachedList | None, m: Model, version: int) -> TypeGuard[CachedList]:
    """A cached list ranked with this bundle from the user's current fresh events."""
    return e is not None and e.model_version == m.version and e.fresh_version == version


def _complete_of(e: CachedList | None, m: Model) -> bool:
    """A complete list ranked by `m`'s bundle (a shared one another server made stays)."""
    return e is not None and e.complete and e.model_version == m.version


def _user_key(m: Model, user_id: Id | None) -> Id:
    """Fresh events and cached lists are keyed by the bundle's id, or the id as a string."""
    u = m.user_index(user_id) if user_id is not None else -1
    return m.user_ids[u] if u >= 0 else str(user_id)


def _coerce(x: Id, to_int: bool) -> Any:
    """A client's id as the bundle's id type. Only the canonical text of an integer maps
    to an integer id: int() would also take ' 7', '+7', '0_7', '007' and other scripts'
    digits ('٧'), each then naming user 7."""
    if to_int:
        if isinstance(x, int):
            return x
        if len(x) > 20 or not x.isascii():
            return None
        try:
            n = int(x)
        except ValueError:
            return None
        return n if str(n) == x else None
    return x if isinstance(x, str) else str(x)


@dataclass
class ServiceLimits:
    max_events_per_user: int = 500
    max_fresh_users: int = 100_000
    cache_users: int = 50_000
    prefill: bool = False  # rank the bundle's users into the cache before ready
    max_k: int = 1000
    new_item_every: int | None = None  # new-item slots; None: the bundle's setting
    list_ttl_s: float = 3600.0  # a cached list older than this is ranked again
    refresh: bool = True  # recompute invalidated and ageing lists off the read path
    # users of an events request ranked before it is answered (the rest: background)
    refresh_inline_users: int = 8
    compact_bytes: int = 64 << 20  # the state folder's events log is compacted past this


def _settle_gc() -> None:
    """Collect the garbage (a replaced bundle's cycles included), then freeze what is
    left: Python's full collections then skip the ~100,000 objects that the bundle and
    the imported libraries keep alive, a pass of about 80 ms that would otherwise land
    inside some request. Objects freed by reference counting are freed as before."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class RecService:
    """Top-k lists, fresh events, similar items and reloads over a loaded bundle."""

    def __init__(
        self,
        model: Model | None = None,
        limits: ServiceLimits | None = None,
        state_dir: str | Path | None = None,
        tree_cache: Path | None = None,
        cache: bool = True,
        freeze_gc: bool = False,
        state: SharedState | None = None,
        seed_lists: str | Path | None = None,
    ) -> None:
        self._model = model
        # a server's process: after each bundle swap, what is alive (the bundle, the
        # libraries) leaves the cyclic collector's view, whose full passes over it
        # would otherwise stall a request now and then (see `_settle_gc`)
        self.freeze_gc = freeze_gc
        self.limits = lim = limits or ServiceLimits()
        self.tree_cache = tree_cache
        self.use_cache = cache and lim.cache_users > 0
        if state is None:
            if state_dir is not None:
                state = FileState(
                    state_dir, lim.max_events_per_user, lim.max_fresh_users, lim.compact_bytes
                )
            else:
                state = LocalState(lim.max_events_per_user, lim.max_fresh_users)
        self.state = state
        self.lists: ListCache = state.lists(lim.cache_users if self.use_cache else 0)
        self.refresher = Refresher(self._refresh) if self.use_cache and lim.refresh else None
        # hands an events request's users to another process that ranks their lists
        # (serving.refresher); True when it took them, else they are ranked here
        self.handoff: Callable[[list[Id]], bool] | None = None
        self.seed_path = Path(seed_lists) if seed_lists is not None else None
        self._reload_lock = threading.Lock()
        self._bg_reload: threading.Thread | None = None
        self._pending_target: dict[str, str] | None = None
        if model is not None and self.seed_path is not None:
            self.seed_lists(self.seed_path, model)

    @classmethod
    def from_bundle(cls, path: str | Path, warm: bool = True, **kw: Any) -> RecService:
        limits = kw.get("limits") or ServiceLimits()
        model = Model.load(path, kw.get("tree_cache"), limits.new_item_every)
        if warm:
            model.warm()
        return cls(model, **kw)

    @property
    def ready(self) -> bool:
        return self._model is not None and self._model.warmed

    @property
    def model(self) -> Model:
        m = self._model
        if m is None or not m.warmed:
            raise NotReadyError("the bundle is still loading; retry shortly")
        return m

    def start(self, path: str | Path) -> None:
        """Load and warm the first bundle (the server answers 503 until then)."""
        self._swap(str(path), only_first=True)

    # -- recommending -----------------------------------------------------------------
    def recommend(
        self,
        user_id: Id | None = None,
        k: int = 10,
        history: list[Id] | None = None,
        exclude: list[Id] | None = None,
    ) -> Recommendation:
        rec = self._recommend(user_id, k, history, exclude, may_rank=True)
        assert rec is not None
        return rec

    def recommend_unranked(self, user_id: Id, k: int = 10) -> Recommendation | None:
        """`recommend(user_id, k)` when it needs no rank (a current cached list, or
        the fallback of a user without events), else None: the server answers cached
        reads with it before its framework's routing, and sends the rest there."""
        return self._recommend(user_id, k, None, None, may_rank=False)

    def _recommend(
        self,
        user_id: Id | None,
        k: int,
        history: list[Id] | None,
        exclude: list[Id] | None,
        may_rank: bool,
    ) -> Recommendation | None:
        self.sync()
        m = self.model
        if not 1 <= k <= self.limits.max_k:
            raise ServiceError(f"k must be between 1 and {self.limits.max_k}, got {k}")
        client_id = user_id
        if user_id is not None:
            user_id = m.bundle_user_id(user_id)
        hist_idx = m.item_indices(history, "history") if history else None
        excl_idx = m.item_indices(exclude, "exclude") if exclude else None
        u = m.user_index(user_id) if user_id is not None else -1
        key = _user_key(m, user_id) if user_id is not None else None
        age = 0.0
        if hist_idx is not None:
            fresh = self._fresh_arrays(m, key)
            t_hist = max(m.now, self._last_t(m, u, fresh))
            extra_items = hist_idx if fresh is None else np.concatenate([fresh[0], hist_idx])
            extra_times = np.full(len(hist_idx), t_hist, dtype=np.int64)
            if fresh is not None:
                extra_times = np.concatenate([fresh[1], extra_times])
            st = m.ranker.user_state(u, (extra_items, extra_times))
            state: UserState | None = st
            ranked: Ranked | None = m.ranker.rank(st)
            kind = None if u >= 0 else "history"
        else:
            state = None
            ranked = None
            if key is not None:
                listed = self._list(m, key, u, k, may_rank)
                if listed is None:
                    return None
                ranked, age = listed
            kind = None if ranked is not None else "popular"
        items = self._top(m, ranked, state, u, key, k, excl_idx)
        uid = user_id
        if u >= 0:
            uid = m.user_ids[u]
        if m.pseudonym is not None:  # the client's own id, never the pseudonym
            uid = client_id
        return Recommendation(uid, items, m.version, kind, age)

    def _list(
        self, m: Model, key: Id, u: int, k: int, may_rank: bool = True
    ) -> tuple[Ranked | None, float] | None:
        """The user's ranked list and its age: the cached one while valid, else ranked
        now (and cached); None when that needs a rank and `may_rank` is false."""
        now = time.time()
        if self.use_cache:
            e, version = self.lists.get_checked(key, self.state)
            if (
                _current(e, m, version)
                and 0 <= now - e.at <= self.limits.list_ttl_s
                and (e.complete or k <= len(e.items))
            ):
                if self.refresher is not None and now - e.at > 0.75 * self.limits.list_ttl_s:
                    self.refresher.add([key])  # refreshed before it expires
                return Ranked(e.items, e.scores), now - e.at
        if not may_rank:
            if u >= 0 or self.state.fresh(key) is not None:
                return None
            return None, 0.0  # no events to rank: the fallback (`_rank_user` gives None)
        r = self._rank_user(m, key, u)
        return r, 0.0

    def _rank_user(self, m: Model, key: Id, u: int) -> Ranked | None:
        """Rank the user's bundle and fresh events, and cache the list."""
        fresh = self.state.fresh(key)
        if u < 0 and fresh is None:
            return None
        at = time.time()
        state = m.ranker.user_state(u, self._as_arrays(m, fresh))
        if len(state.items) == 0:
            return None
        r = m.ranker.rank(state)
        if self.use_cache:
            version = fresh.version if fresh is not None else 0
            e = CachedList(m.version, version, at, r.items, r.scores)
            self.lists.put(str(key), e, fresh)
        return r

    def refresh_user(self, key: Id, asked: float | None) -> bool:
        """Rank `key`'s list again (the refresher process's work); see `_refresh`."""
        return self._refresh(key, asked)

    def _refresh(self, key: Id, asked: float | None) -> bool:
        """The refresher's work: rank one user again with the serving bundle, unless
        their list was ranked from their current events after `asked` (a read that
        found no list ranked it, or another worker did). None: the caller has just
        taken the user's events, so no list can be current (not looked up, which for
        a state folder is a file read). False: skipped."""
        m = self._model
        if m is None or not m.warmed:
            return False
        if asked is not None:
            e, version = self.lists.get_checked(key, self.state)
            if _current(e, m, version) and e.at >= asked:
                return False
        if self._rank_user(m, key, m.user_index(key)) is None:
            self.lists.drop(str(key))
        return True

    def _top(
        self,
        m: Model,
        ranked: Ranked | None,
        state: UserState | None,
        u: int,
        key: Id | None,
        k: int,
        exclude: np.ndarray | None,
    ) -> list[tuple[Id, float | None]]:
        items = ranked.items if ranked is not None else np.zeros(0, np.int64)
        scores = ranked.scores if ranked is not None else np.zeros(0)
        if exclude is not None and len(exclude):
            keep = ~np.isin(items, exclude)
            items, scores = items[keep], scores[keep]
        ids = m.item_ids
        out: list[tuple[Id, float | None]] = [
            (ids[j], None if s != s else s)  # NaN: a new-item slot, not the ranker's
            for j, s in zip(items[:k].tolist(), scores[:k].tolist(), strict=True)
        ]
        if len(out) < k:  # too few candidates: popular items the user has not met, unscored
            if state is None:
                fresh = self._fresh_arrays(m, key) if key is not None else None
                state = m.ranker.user_state(u, fresh)
            taken = np.concatenate(
                [items[:k], state.items, exclude if exclude is not None else np.zeros(0, np.int64)]
            )
            fb = m.fallback
            fb = fb[~np.isin(fb, taken)][: k - len(out)]
            out.extend((ids[j], None) for j in fb.tolist())
        return out

    def _last_t(self, m: Model, u: int, fresh: tuple[np.ndarray, np.ndarray] | None) -> int:
        t = -1
        if u >= 0:
            lo, hi = m.ranker._hist_ptr[u], m.ranker._hist_ptr[u + 1]
            if hi > lo:
                t = int(m.ranker._hist_times[hi - 1])
        if fresh is not None and len(fresh[1]):
            t = max(t, int(fresh[1].max()))
        return t

    def similar(self, item_id: Id, k: int = 10) -> tuple[Id, list[tuple[Id, float]], str]:
        m = self.model
        j = m.item_index(item_id)
        if j < 0:
            raise NotFoundError(f"unknown item id {item_id!r}")
        return m.item_ids[j], m.similar(j, k), m.version

    # -- fresh events --------------------------------------------------------------------
    def add_events(self, events: list[tuple[Id, Id, int | None]]) -> int:
        """(user_id, item_id, epoch seconds or None) rows; all or none are taken. The
        users' lists are handed to another process (`handoff`) when it takes them, else
        recomputed before this returns (the first `refresh_inline_users` of them; the
        others in the background)."""
        m = self.model
        m.item_indices([e[1] for e in events], "events")
        rows = []
        now_of: dict[Id, int] = {}  # a user's clock: read once per request, not per event
        for client_id, item_id, t in events:
            user_id = m.bundle_user_id(client_id)
            key = _user_key(m, user_id)
            if t is None:
                if key not in now_of:
                    u = m.user_index(user_id)
                    now_of[key] = max(m.now, self._last_t(m, u, self._fresh_arrays(m, key)))
                t = now_of[key]
            rows.append((key, m.item_ids[m.item_index(item_id)], int(t)))
        try:
            changed = self.state.add(rows)
        except StateWriteError as e:
            reason = e.strerror or str(e)
            log.error("%s", reason)
            raise StorageError(f"events not taken: {reason}; retry later") from None
        if self.refresher is not None:
            mine = list(dict.fromkeys(r[0] for r in rows))
            if self.handoff is not None and self.handoff(mine):
                self.refresher.count("handed", len(mine))
            else:
                self.refresher.run(mine, self.limits.refresh_inline_users)
            self.refresher.add(self._cached(changed - set(mine)))
        return len(rows)

    def _cached(self, users: set[Id]) -> list[Id]:
        """Of `users`, those with a list in this process's cache (active here)."""
        if self.lists.shared or self.lists.shares_fresh:  # the worker that took them ranks
            return []
        return [x for x in users if str(x) in self.lists]

    def _fresh_arrays(self, m: Model, key: Id | None) -> tuple[np.ndarray, np.ndarray] | None:
        return self._as_arrays(m, self.state.fresh(key)) if key is not None else None

    @staticmethod
    def _as_arrays(m: Model, f: Fresh | None) -> tuple[np.ndarray, np.ndarray] | None:
        if f is None:
            return None
        idx = np.asarray([m.item_index(x) for x in f.items], dtype=np.int64)
        keep = idx >= 0  # items gone from a reloaded catalogue
        return idx[keep], np.asarray(f.times, dtype=np.int64)[keep]

    # -- sharing state between worker processes ---------------------------------------------
    def sync(self) -> None:
        """Take in events other workers stored, and a bundle another worker swapped in."""
        changed = self.state.sync()
        if changed and self.refresher is not None:
            self.refresher.add(self._cached(changed))
        target = self.state.bundle_target() or self._pending_target
        if target is None:
            return
        if self._bg_reload is not None and self._bg_reload.is_alive():
            self._pending_target = target  # followed once the running reload ends
            return
        self._pending_target = None
        if self._model is None or target.get("version") != self._model.version:
            self._bg_reload = threading.Thread(
                target=self._follow_reload, args=(target["path"],), daemon=True
            )
            self._bg_reload.start()

    def _follow_reload(self, path: str) -> None:
        try:
            self._swap(path)
        except Exception as e:
            log.error("could not follow the reload to %s: %s", path, e)

    def _prefill(self, m: Model) -> None:
        """Rank the most active bundle users into the cache, up to `cache_users`."""
        n_events = np.diff(m.ranker._hist_ptr)
        users = np.argsort(-n_events, kind="stable")[: self.limits.cache_users]
        for u in users[n_events[users] > 0].tolist():
            key = m.user_ids[u]
            if self.state.fresh(key) is None and not self._has_list(m, key):
                r = m.ranker.rank(m.ranker.user_state(u))
                self.lists.put(str(key), CachedList(m.version, 0, time.time(), r.items, r.scores))

    def _has_list(self, m: Model, key: Id) -> bool:
        """A complete list of the bundle's is already shared (another server made it)."""
        if not self.lists.shared:
            return False
        return _complete_of(self.lists.get(str(key)), m)

    def seed_lists(self, path: str | Path, m: Model | None = None) -> int:
        """Cache the lists of a batch job's output (`recsys recommend --out`: user_id,
        item_id, rank, score) for the users without fresh events; each serves requests
        for up to its length of items until its time-to-live (counted from now) ends.
        Returns the number of users seeded."""
        m = m or self.model
        lists = read_lists(path, m)
        if len(lists) > self.limits.cache_users:
            log.warning(
                "%s holds lists of %d users; the cache keeps %d (RECSYS_CACHE_USERS)",
                path,
                len(lists),
                self.limits.cache_users,
            )
        now = time.time()
        keys = list(lists)
        if self.lists.shared:  # a complete list of this bundle's, from another server, stays
            checked = self.lists.get_checked_many(keys, self.state)
        else:
            checked = [(None, self.state.version(key)) for key in keys]
        todo = [
            (str(key), CachedList(m.version, 0, now, *lists[key], complete=False))
            for key, (e, version) in zip(keys, checked, strict=True)
            if version == 0 and not _complete_of(e, m)
        ]
        self.lists.put_many(todo)
        log.info("seeded %d lists from %s", len(todo), path)
        return len(todo)

    # -- reloading ------------------------------------------------------------------------
    def reload(self, path: str | Path | None = None) -> tuple[str, str]:
        """Load and warm a bundle beside the serving one, then swap. On any failure the
        old bundle keeps serving and the error is raised. Returns (old, new) versions."""
        old = self.model.version
        path = str(path or self.model.path)
        new = self._swap(path)
        try:
            self.state.announce_bundle(path, new)
        except StateWriteError as e:
            raise StorageError(
                f"this worker serves {new}, but the other workers were not told: {e.strerror or e}"
            ) from None
        return old, new

    def _swap(self, path: str, only_first: bool = False) -> str:
        with self._reload_lock:
            if only_first and self._model is not None:
                return self._model.version  # a reload taken meanwhile is newer
            t0 = time.perf_counter()
            model = Model.load(path, self.tree_cache, self.limits.new_item_every)
            model.warm()
            # lists made before the swap: ready before the first request sees the bundle
            # (the old bundle's lists are never served again, and leave the bounded
            # cache as new ones come; a reload of the same bundle keeps them)
            if self.use_cache and self.limits.prefill:
                self._prefill(model)
            if self.use_cache and self.seed_path is not None and only_first:
                self.seed_lists(self.seed_path, model)
            self._model = model
            if self.freeze_gc:
                _settle_gc()
            log.info(
                "serving bundle %s (%s), loaded in %.1f s",
                path,
                model.version,
                time.perf_counter() - t0,
            )
            return model.version


def read_lists(path: str | Path, m: Model) -> dict[Id, tuple[np.ndarray, np.ndarray]]:
    """A batch job's lists by the bundle's user id: (item indices, scores) best first.
    Raises ServiceError naming the file and what is wrong with it."""
    problem = lists_problem(path, m.version, m.pipeline.item_index_.ids)
    if problem is not None:
        raise ServiceError(problem)
    df = pl.read_parquet(path).sort(["user_id", "rank"])
    items = [m.item_index(x) for x in df["item_id"].to_list()]
    idx = np.asarray(items, dtype=np.int64)
    scores = df["score"].cast(pl.Float64).fill_null(float("nan")).to_numpy()
    users = df["user_id"].to_list()
    out: dict[Id, tuple[np.ndarray, np.ndarray]] = {}
    new_user = (df["user_id"] != df["user_id"].shift(1)).fill_null(True).to_numpy()
    bounds = np.r_[np.flatnonzero(new_user), len(df)]
    for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        out[_user_key(m, users[lo])] = (idx[lo:hi], scores[lo:hi])
    return out
