"""The recommendation service behind the HTTP endpoint, usable without HTTP.

`RecService` holds one loaded bundle (`Model`: the online ranker, id maps, fallback
list) and the fresh events posted since it started. Requests read `self.model` once,
so a reload that assigns a new `Model` swaps atomically: a request in flight finishes
on the model it started with.

Fresh events are kept per user, at most `max_events_per_user` each and for at most
`max_fresh_users` users (least recently updated dropped first). With several worker
processes, `state_dir` makes them share fresh events and reloads through two files:
`events.jsonl` (appended by whichever worker took the POST, read by all before each
request) and `bundle.json` (the bundle every worker should serve).

A bundle fitted on pseudonymized user ids (`recsys.pseudonym`) loads only with the key
they were hashed with in RECSYS_PSEUDONYM_KEY. Clients still send raw ids: each is
hashed where it enters (`Model.bundle_user_id`), fresh events and cached lists are kept
under the pseudonym, and a list names the user by the id the client sent.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recsys.candidates import ItemKNN
from recsys.online import OnlineRanker, Ranked, UserState
from recsys.pipeline import Pipeline
from recsys.pseudonym import for_manifest

log = logging.getLogger("recsys")

Id = int | str


class ServiceError(Exception):
    """A request the service cannot answer because of what the client sent."""

    status = 422


class NotFoundError(ServiceError):
    status = 404


class NotReadyError(ServiceError):
    status = 503


@dataclass
class Recommendation:
    user_id: Id | None
    items: list[tuple[Id, float | None]]
    model_version: str
    fallback: str | None = None  # None: ranked; "popular" or "history" otherwise


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
        manifest = pipeline.manifest_
        digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
        self.version = f"{manifest.get('created_at', 'unsaved')}-{digest[:12]}"
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
class _Fresh:
    items: deque[Id]
    times: deque[int]
    version: int = 0


@dataclass
class ServiceLimits:
    max_events_per_user: int = 500
    max_fresh_users: int = 100_000
    cache_users: int = 50_000
    prefill: bool = False  # rank the bundle's users into the cache before ready
    max_k: int = 1000
    new_item_every: int | None = None  # new-item slots; None: the bundle's setting


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
    ) -> None:
        self._model = model
        # a server's process: after each bundle swap, what is alive (the bundle, the
        # libraries) leaves the cyclic collector's view, whose full passes over it
        # would otherwise stall a request now and then (see `_settle_gc`)
        self.freeze_gc = freeze_gc
        self.limits = limits or ServiceLimits()
        self.tree_cache = tree_cache
        self.use_cache = cache
        self._fresh: OrderedDict[Id, _Fresh] = OrderedDict()
        self._cache: OrderedDict[str, tuple[Model, Ranked]] = OrderedDict()
        self._lock = threading.RLock()
        self._reload_lock = threading.Lock()
        self.state_dir = Path(state_dir) if state_dir else None
        self._log_offset = 0
        self._bundle_mtime = 0.0
        self._bg_reload: threading.Thread | None = None
        if self.state_dir is not None:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self._events_path = self.state_dir / "events.jsonl"
            self._events_path.touch(exist_ok=True)
            self._bundle_file = self.state_dir / "bundle.json"
            if self._bundle_file.exists():
                self._bundle_mtime = self._bundle_file.stat().st_mtime
            self.sync()

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
        fresh = self._fresh_events(user_id, m) if user_id is not None else None
        if hist_idx is not None:
            t_hist = max(m.now, self._last_t(m, u, fresh))
            extra_items = hist_idx if fresh is None else np.concatenate([fresh[0], hist_idx])
            extra_times = np.full(len(hist_idx), t_hist, dtype=np.int64)
            if fresh is not None:
                extra_times = np.concatenate([fresh[1], extra_times])
            state = m.ranker.user_state(u, (extra_items, extra_times))
            ranked = m.ranker.rank(state)
            kind = None if u >= 0 else "history"
        else:
            state = None
            ranked = None
            if u >= 0 or fresh is not None:
                ranked = self._ranked_cached(m, user_id, u, fresh)
            kind = None
            if ranked is None:
                kind = "popular"
        items = self._top(m, ranked, state, u, fresh, k, excl_idx)
        uid = user_id
        if u >= 0:
            uid = m.user_ids[u]
        if m.pseudonym is not None:  # the client's own id, never the pseudonym
            uid = client_id
        return Recommendation(uid, items, m.version, kind)

    def _ranked_cached(
        self, m: Model, user_id: Id | None, u: int, fresh: tuple[np.ndarray, np.ndarray] | None
    ) -> Ranked | None:
        key = str(_user_key(m, user_id))
        if self.use_cache:
            hit = self._cache.get(key)
            if hit is not None and hit[0] is m:
                return hit[1]
        state = m.ranker.user_state(u, fresh)
        if len(state.items) == 0:
            return None
        r = m.ranker.rank(state)
        if self.use_cache:
            with self._lock:
                self._cache[key] = (m, r)
                if len(self._cache) > self.limits.cache_users:
                    self._cache.popitem(last=False)
        return r

    def _top(
        self,
        m: Model,
        ranked: Ranked | None,
        state: UserState | None,
        u: int,
        fresh: tuple[np.ndarray, np.ndarray] | None,
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
        """(user_id, item_id, epoch seconds or None) rows; all or none are taken."""
        m = self.model
        m.item_indices([e[1] for e in events], "events")
        rows = []
        for client_id, item_id, t in events:
            user_id = m.bundle_user_id(client_id)
            u = m.user_index(user_id)
            key = _user_key(m, user_id)
            if t is None:
                fresh = self._fresh_events(key, m)
                t = max(m.now, self._last_t(m, u, fresh))
            rows.append((key, m.item_ids[m.item_index(item_id)], int(t)))
        if self.state_dir is not None:
            data = "".join(json.dumps({"u": r[0], "i": r[1], "t": r[2]}) + "\n" for r in rows)
            fd = os.open(self._events_path, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, data.encode())
            finally:
                os.close(fd)
            self.sync()
        else:
            self._apply(rows)
        return len(rows)

    def _apply(self, rows: list[tuple[Id, Id, int]]) -> None:
        lim = self.limits
        with self._lock:
            for user, item, t in rows:
                f = self._fresh.get(user)
                if f is None:
                    n = lim.max_events_per_user
                    f = self._fresh[user] = _Fresh(deque(maxlen=n), deque(maxlen=n))
                    while len(self._fresh) > lim.max_fresh_users:
                        old, _ = self._fresh.popitem(last=False)
                        self._drop_cached(old)
                else:
                    self._fresh.move_to_end(user)
                f.items.append(item)
                f.times.append(t)
                f.version += 1
                self._drop_cached(user)

    def _drop_cached(self, user: Id) -> None:
        self._cache.pop(str(user), None)

    def _fresh_events(self, user_id: Id, m: Model) -> tuple[np.ndarray, np.ndarray] | None:
        f = self._fresh.get(_user_key(m, user_id))
        if f is None:
            return None
        with self._lock:
            items, times = list(f.items), list(f.times)
        idx = np.asarray([m.item_index(x) for x in items], dtype=np.int64)
        keep = idx >= 0  # items gone from a reloaded catalogue
        return idx[keep], np.asarray(times, dtype=np.int64)[keep]

    # -- sharing state between worker processes ---------------------------------------------
    def sync(self) -> None:
        """Take in events other workers appended, and a bundle another worker swapped in."""
        if self.state_dir is None:
            return
        try:
            size = os.stat(self._events_path).st_size
        except FileNotFoundError:
            size = 0
        if size > self._log_offset:
            with self._lock:
                with open(self._events_path, "rb") as f:
                    f.seek(self._log_offset)
                    data = f.read(size - self._log_offset)
                end = data.rfind(b"\n") + 1  # a line being written is taken next time
                rows = []
                for line in data[:end].splitlines():
                    try:
                        r = json.loads(line)
                        rows.append((r["u"], r["i"], int(r["t"])))
                    except (ValueError, KeyError, TypeError):
                        log.warning("skipping a malformed line of %s", self._events_path)
                self._log_offset += end
                self._apply(rows)
        try:
            mtime = os.stat(self._bundle_file).st_mtime
        except FileNotFoundError:
            return
        if mtime != self._bundle_mtime and (
            self._bg_reload is None or not self._bg_reload.is_alive()
        ):
            self._bundle_mtime = mtime
            try:
                target = json.loads(self._bundle_file.read_text())
            except (OSError, ValueError):
                return
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

    def _prefilled(self, m: Model) -> OrderedDict[str, tuple[Model, Ranked]]:
        """Ranked lists of the most active bundle users, up to `cache_users`."""
        n_events = np.diff(m.ranker._hist_ptr)
        users = np.argsort(-n_events, kind="stable")[: self.limits.cache_users]
        out: OrderedDict[str, tuple[Model, Ranked]] = OrderedDict()
        for u in users[n_events[users] > 0].tolist():
            key = str(m.user_ids[u])
            if key not in self._fresh:
                out[key] = (m, m.ranker.rank(m.ranker.user_state(u)))
        return out

    # -- reloading ------------------------------------------------------------------------
    def reload(self, path: str | Path | None = None) -> tuple[str, str]:
        """Load and warm a bundle beside the serving one, then swap. On any failure the
        old bundle keeps serving and the error is raised. Returns (old, new) versions."""
        old = self.model.version
        path = str(path or self.model.path)
        new = self._swap(path)
        if self.state_dir is not None:
            tmp = self._bundle_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"path": path, "version": new}))
            os.replace(tmp, self._bundle_file)
            self._bundle_mtime = self._bundle_file.stat().st_mtime
        return old, new

    def _swap(self, path: str, only_first: bool = False) -> str:
        with self._reload_lock:
            if only_first and self._model is not None:
                return self._model.version  # a reload taken meanwhile is newer
            t0 = time.perf_counter()
            model = Model.load(path, self.tree_cache, self.limits.new_item_every)
            model.warm()
            filled = self._prefilled(model) if self.use_cache and self.limits.prefill else None
            self._model = model
            with self._lock:
                self._cache = filled if filled is not None else OrderedDict()
            if self.freeze_gc:
                _settle_gc()
            log.info(
                "serving bundle %s (%s), loaded in %.1f s",
                path,
                model.version,
                time.perf_counter() - t0,
            )
            return model.version
