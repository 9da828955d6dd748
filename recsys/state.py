"""What a serving process keeps beside its bundle, and what its workers share.

Two things change while a bundle serves: the fresh events users post, and the ranked
lists computed from the bundle and those events. Both are bounded:

- `FreshEvents`: per user at most `max_events_per_user` events (the oldest dropped),
  for at most `max_fresh_users` users (the least recently updated dropped first).
  Each user's events carry a version, the sequence number of the last event taken for
  them, which a cached list records so a list computed before an event is never served
  after it.
- `ListCache`: ranked lists by user, at most `cache_users` of them (oldest first out).

What the worker processes of one server (or the servers of a fleet) share goes
through a `SharedState`:

- `LocalState`: nothing shared (one process: tests, notebooks, `--workers 1`).
- `FileState(state_dir)`: the embedded default of `recsys serve --workers N`. Events
  are appended to `events.jsonl` under an exclusive lock, and every worker reads what
  was appended before each request; `bundle.json` names the bundle to serve. When the
  log passes `compact_bytes` it is rewritten with only what the bounds above keep
  (temporary file, then rename), so it cannot grow without bound. A full disk refuses
  the events with `StateWriteError` and leaves the log as it was. The lists ranked
  after fresh events go to `lists/` (`FolderLists`), one file per user with fresh
  events (pruned with the log), so an event costs one rank whichever worker reads.
- `RedisState(url)` (`recsys.redis_state`, `RECSYS_REDIS_URL`): a fleet. Events go to
  a stream, fresh histories and ranked lists to keys with time-to-lives, the bundle to
  serve to a key; lists computed by one server are served by every other.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import struct
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("recsys")

Id = int | str
Row = tuple[Id, Id, int]  # (user key, item id, epoch seconds)


class StateWriteError(OSError):
    """Shared state could not be written (a full disk, a lost connection): the events
    were not taken, and nothing was half-written."""


@dataclass(frozen=True)
class Fresh:
    """One user's fresh events, oldest first, and their version."""

    items: list[Id]
    times: list[int]
    version: int


@dataclass
class _User:
    items: deque[Id]
    times: deque[int]
    version: int = 0


class FreshEvents:
    """Fresh events per user in this process, bounded (see the module's text)."""

    def __init__(self, max_events_per_user: int, max_users: int) -> None:
        self.max_events_per_user = max_events_per_user
        self.max_users = max_users
        self._users: OrderedDict[Id, _User] = OrderedDict()
        self._seq = 0
        self._lock = threading.Lock()

    def apply(self, rows: Iterable[Row]) -> set[Id]:
        """Take events in order; returns the users whose events changed (dropped ones
        included)."""
        changed: set[Id] = set()
        n = self.max_events_per_user
        with self._lock:
            for user, item, t in rows:
                f = self._users.get(user)
                if f is None:
                    f = self._users[user] = _User(deque(maxlen=n), deque(maxlen=n))
                    while len(self._users) > self.max_users:
                        old, _ = self._users.popitem(last=False)
                        changed.add(old)
                else:
                    self._users.move_to_end(user)
                self._seq += 1
                f.items.append(item)
                f.times.append(int(t))
                f.version = self._seq
                changed.add(user)
        return changed

    def get(self, user: Id) -> Fresh | None:
        with self._lock:
            f = self._users.get(user)
            if f is None:
                return None
            return Fresh(list(f.items), list(f.times), f.version)

    def version(self, user: Id) -> int:
        f = self._users.get(user)
        return 0 if f is None else f.version

    def users(self) -> list[Id]:
        """Least recently updated first."""
        with self._lock:
            return list(self._users)

    def rows(self) -> Iterator[Row]:
        """Every kept event, users least recently updated first: replaying them rebuilds
        the same bounded state."""
        with self._lock:
            snapshot = [(u, list(f.items), list(f.times)) for u, f in self._users.items()]
        for u, items, times in snapshot:
            for i, t in zip(items, times, strict=True):
                yield u, i, t

    def clear(self) -> set[Id]:
        with self._lock:
            users = set(self._users)
            self._users.clear()
        return users

    def __len__(self) -> int:
        return len(self._users)


@dataclass
class CachedList:
    """A ranked list as the service keeps it between requests."""

    model_version: str
    fresh_version: int  # the user's fresh-events version it was computed from
    at: float  # epoch seconds when computed
    items: np.ndarray  # int64 item indices, best first
    scores: np.ndarray  # float64
    complete: bool = True  # False: the top of a list only (seeded from a batch job's file)


class ListCache:
    """Ranked lists in this process, at most `capacity`, the oldest put first out."""

    shared = False  # every list is shared with the other processes (Redis)
    shares_fresh = False  # the lists ranked after events are (a state folder)

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lists: OrderedDict[str, CachedList] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> CachedList | None:
        return self._lists.get(key)

    def get_checked(self, user: Id, state: SharedState) -> tuple[CachedList | None, int]:
        """The list of `user` and their current fresh-events version, which a list must
        match to be served."""
        return self._lists.get(str(user)), state.version(user)

    def get_checked_many(
        self, users: list[Id], state: SharedState
    ) -> list[tuple[CachedList | None, int]]:
        """`get_checked` of each of `users` (a shared cache reads them in batches)."""
        return [self.get_checked(u, state) for u in users]

    def put(self, key: str, entry: CachedList, fresh: Fresh | None = None) -> None:
        """Keep `entry`, ranked from the user's fresh events `fresh` (None: none)."""
        if self.capacity <= 0:
            return
        with self._lock:
            self._lists[key] = entry
            self._lists.move_to_end(key)
            while len(self._lists) > self.capacity:
                self._lists.popitem(last=False)

    def put_many(self, entries: Iterable[tuple[str, CachedList]]) -> None:
        for key, e in entries:
            self.put(key, e)

    def drop(self, key: str) -> None:
        with self._lock:
            self._lists.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._lists.clear()

    def __contains__(self, key: str) -> bool:
        return key in self._lists

    def __len__(self) -> int:
        return len(self._lists)


_HEAD = struct.Struct("<I")  # the length of a stored list's JSON header


def pack_list(e: CachedList, **extra: object) -> bytes:
    """A list as bytes: a length, a JSON header (with `extra`), int64 items, float64
    scores (little-endian)."""
    head = json.dumps(
        {"m": e.model_version, "f": e.fresh_version, "a": e.at, "c": e.complete,
         "n": len(e.items), **extra}
    ).encode()  # fmt: skip
    items = np.ascontiguousarray(e.items, dtype="<i8").tobytes()
    scores = np.ascontiguousarray(e.scores, dtype="<f8").tobytes()
    return _HEAD.pack(len(head)) + head + items + scores


def unpack_list(raw: bytes) -> CachedList:
    return unpack_list_head(raw)[0]


def unpack_list_head(raw: bytes) -> tuple[CachedList, dict[str, object]]:
    """The list of `pack_list`'s bytes, and its header. ValueError when malformed."""
    try:
        (h,) = _HEAD.unpack_from(raw)
        head = json.loads(raw[_HEAD.size : _HEAD.size + h])
        n = int(head["n"])
        at = _HEAD.size + h
        if len(raw) != at + 16 * n:
            raise ValueError(f"{len(raw)} bytes where the header says {at + 16 * n}")
        items = np.frombuffer(raw, dtype="<i8", count=n, offset=at).astype(np.int64)
        scores = np.frombuffer(raw, dtype="<f8", count=n, offset=at + 8 * n).astype(np.float64)
        e = CachedList(head["m"], int(head["f"]), float(head["a"]), items, scores, bool(head["c"]))
    except (struct.error, KeyError, TypeError) as err:
        raise ValueError(f"not a stored list: {err}") from None
    return e, head


def events_digest(f: Fresh) -> str:
    """What identifies a user's fresh events across processes (their versions are
    sequence numbers of one process's reading of the log)."""
    return hashlib.sha256(json.dumps([f.items, f.times]).encode()).hexdigest()


def list_file_name(user: Id) -> str:
    return hashlib.sha256(str(user).encode()).hexdigest()[:40] + ".list"


class FolderLists(ListCache):
    """This process's lists, and the lists ranked after a user's fresh events written
    to a folder the other workers read: a worker that finds its own list of a user
    outdated by an event takes the one another worker ranked from the same events
    instead of ranking again, so each event costs one rank, not one per worker.

    A file holds the list and a digest of the fresh events it was ranked from; it is
    served only where this process's fresh events of the user have that digest (and,
    by the service's check, the bundle version matches). Written to a temporary name
    and renamed, so a reader sees a whole file or the previous one; a write that fails
    (a full disk) is skipped: the other workers then rank the user themselves."""

    shares_fresh = True

    def __init__(self, capacity: int, folder: Path) -> None:
        super().__init__(capacity)
        self.folder = folder
        self._warned = False

    def put(self, key: str, entry: CachedList, fresh: Fresh | None = None) -> None:
        super().put(key, entry)
        if fresh is None or self.capacity <= 0:
            return
        path = self.folder / list_file_name(key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(pack_list(entry, u=str(key), d=events_digest(fresh)))
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if not self._warned:  # once: the lists still serve from this process
                log.warning("could not share a ranked list in %s: %s", self.folder, e)
                self._warned = True

    def get_checked(self, user: Id, state: SharedState) -> tuple[CachedList | None, int]:
        e, version = super().get_checked(user, state)
        if version and (e is None or e.fresh_version != version):
            shared = self._read(user, state)
            if shared is not None:
                super().put(str(user), shared)
                e = shared
        return e, version

    def _read(self, user: Id, state: SharedState) -> CachedList | None:
        """Another worker's list of `user`, when ranked from the fresh events this
        process has for them (with this process's version of those events)."""
        try:
            raw = (self.folder / list_file_name(user)).read_bytes()
        except OSError:
            return None
        try:
            e, head = unpack_list_head(raw)
        except ValueError:
            return None
        f = state.fresh(user)
        if f is None or head.get("u") != str(user) or head.get("d") != events_digest(f):
            return None
        e.fresh_version = f.version
        return e


class SharedState:
    """Fresh events and the bundle to serve, as this process sees them."""

    def __init__(self, max_events_per_user: int = 500, max_fresh_users: int = 100_000) -> None:
        self.fresh_events = FreshEvents(max_events_per_user, max_fresh_users)

    def lists(self, capacity: int) -> ListCache:
        """Where ranked lists are kept: this process's memory unless the state shares
        them."""
        return ListCache(capacity)

    def add(self, rows: list[Row]) -> set[Id]:
        """Store events taken by this process (all or none); returns the users whose
        lists they invalidate here."""
        return self.fresh_events.apply(rows)

    def sync(self) -> set[Id]:
        """Take in what other processes stored since the last call; returns the users
        whose lists that invalidates here."""
        return set()

    def fresh(self, user: Id) -> Fresh | None:
        return self.fresh_events.get(user)

    def version(self, user: Id) -> int:
        return self.fresh_events.version(user)

    def bundle_target(self) -> dict[str, str] | None:
        """The bundle another process announced ({"path", "version"}), once per
        announcement; None when nothing new."""
        return None

    def announce_bundle(self, path: str, version: str) -> None:
        """Tell the other processes to serve this bundle."""

    def close(self) -> None:
        pass


class LocalState(SharedState):
    """Nothing shared: one process."""


class FileState(SharedState):
    """Workers of one machine share a folder (see the module's text)."""

    LOG = "events.jsonl"
    BUNDLE = "bundle.json"
    LOCK = "events.lock"
    LISTS = "lists"  # the lists ranked after fresh events (`FolderLists`)

    def __init__(
        self,
        state_dir: str | Path,
        max_events_per_user: int = 500,
        max_fresh_users: int = 100_000,
        compact_bytes: int = 64 << 20,
    ) -> None:
        super().__init__(max_events_per_user, max_fresh_users)
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.compact_bytes = compact_bytes
        self.log_path = self.dir / self.LOG
        self.bundle_path = self.dir / self.BUNDLE
        self._lock_path = self.dir / self.LOCK
        self.lists_dir = self.dir / self.LISTS
        self.lists_dir.mkdir(exist_ok=True)
        self._read_lock = threading.Lock()
        with self._locked():
            if not self.log_path.exists():
                self.log_path.touch()
        self._offset = 0
        self._inode = -1
        self._bundle_mtime = 0.0
        if self.bundle_path.exists():
            self._bundle_mtime = self.bundle_path.stat().st_mtime
        self.sync()

    def lists(self, capacity: int) -> ListCache:
        return FolderLists(capacity, self.lists_dir)

    # -- the lock every writer of the log takes -----------------------------------------
    def _locked(self) -> _FileLock:
        return _FileLock(self._lock_path)

    # -- events ------------------------------------------------------------------------
    def add(self, rows: list[Row]) -> set[Id]:
        data = "".join(json.dumps({"u": u, "i": i, "t": t}) + "\n" for u, i, t in rows).encode()
        with self._locked():
            _append_whole(self.log_path, data)
            big = os.stat(self.log_path).st_size > self.compact_bytes
            if big:
                self._compact_locked()
        return self.sync()

    def sync(self) -> set[Id]:
        try:
            st = os.stat(self.log_path)
        except FileNotFoundError:
            return set()
        if st.st_ino == self._inode and st.st_size <= self._offset:
            return set()  # the common case: nothing new, one stat
        changed: set[Id] = set()
        with self._read_lock:
            try:
                f = open(self.log_path, "rb")  # noqa: SIM115 - closed by the with below
            except FileNotFoundError:
                return changed
            with f:
                st = os.fstat(f.fileno())
                if st.st_ino != self._inode:  # first look, or compacted by some worker
                    changed |= self.fresh_events.clear()
                    self._inode, self._offset = st.st_ino, 0
                if st.st_size > self._offset:
                    f.seek(self._offset)
                    data = f.read(st.st_size - self._offset)
                    end = data.rfind(b"\n") + 1  # a line being written is taken next time
                    self._offset += end
                    changed |= self.fresh_events.apply(_parse(data[:end], self.log_path))
        return changed

    def _compact_locked(self) -> None:
        """Rewrite the log with what the bounds keep (the caller holds the lock)."""
        replay = FreshEvents(self.fresh_events.max_events_per_user, self.fresh_events.max_users)
        with open(self.log_path, "rb") as f:
            replay.apply(_parse(f.read(), self.log_path))
        tmp = self.log_path.with_name(f".{self.LOG}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                for u, i, t in replay.rows():
                    f.write((json.dumps({"u": u, "i": i, "t": t}) + "\n").encode())
                f.flush()
                os.fsync(f.fileno())
            before = os.stat(self.log_path).st_size
            os.replace(tmp, self.log_path)
        except OSError as e:  # a full disk: keep the old log, try again next time
            tmp.unlink(missing_ok=True)
            log.error("could not compact %s: %s", self.log_path, e)
            return
        # the shared lists of users whose fresh events the bounds dropped go too
        keep = {list_file_name(u) for u in replay.users()}
        for path in self.lists_dir.iterdir():
            if path.name not in keep:
                path.unlink(missing_ok=True)
        log.info(
            "compacted %s: %d -> %d bytes (%d users)",
            self.log_path,
            before,
            os.stat(self.log_path).st_size,
            len(replay),
        )

    # -- the bundle to serve -------------------------------------------------------------
    def bundle_target(self) -> dict[str, str] | None:
        try:
            mtime = os.stat(self.bundle_path).st_mtime
        except FileNotFoundError:
            return None
        if mtime == self._bundle_mtime:
            return None
        try:
            target = json.loads(self.bundle_path.read_text())
        except (OSError, ValueError):
            return None
        self._bundle_mtime = mtime
        return target if isinstance(target, dict) and "path" in target else None

    def announce_bundle(self, path: str, version: str) -> None:
        tmp = self.bundle_path.with_name(f".{self.BUNDLE}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps({"path": path, "version": version}))
            os.replace(tmp, self.bundle_path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise StateWriteError(
                e.errno, f"could not announce the bundle in {self.bundle_path}: {e.strerror}"
            ) from None
        self._bundle_mtime = self.bundle_path.stat().st_mtime


class _FileLock:
    """An exclusive flock on a file, held by one writer at a time across processes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1

    def __enter__(self) -> _FileLock:
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)


def _append_whole(path: Path, data: bytes) -> None:
    """Append all of `data` or nothing: a short write (a full disk) is cut back off,
    so no torn line can join the next one. The caller holds the log's lock."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        start = os.fstat(fd).st_size
        done = 0
        try:
            while done < len(data):
                done += os.write(fd, data[done:])
        except OSError as e:
            if done:
                os.ftruncate(fd, start)
            reason = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else e.strerror
            raise StateWriteError(e.errno, f"could not store events in {path}: {reason}") from None
    finally:
        os.close(fd)


def _parse(data: bytes, path: Path) -> list[Row]:
    rows: list[Row] = []
    for line in data.splitlines():
        try:
            r = json.loads(line)
            rows.append((r["u"], r["i"], int(r["t"])))
        except (ValueError, KeyError, TypeError):
            log.warning("skipping a malformed line of %s", path)
    return rows


class Refresher:
    """Recomputes lists off the read path: users whose events changed, and lists
    close to their time-to-live. `run` does some in the caller's thread (the request
    that brought the events); the rest wait for one daemon thread, at most
    `max_queue` users (beyond that a user's next read ranks, as when there is no list).

    `work(user, asked)` gets the time the user was first asked for since their last
    refresh, so it can skip a user whose list was ranked after that (by a read that
    found no list, or by another worker); it returns False when it skipped. `run`
    passes None: the caller has just changed the user's events, so there is nothing
    to look up before ranking."""

    def __init__(self, work: Callable[[Id, float | None], bool], max_queue: int = 10_000) -> None:
        self.work = work
        self.max_queue = max_queue
        self._queue: OrderedDict[Id, float] = OrderedDict()
        self._cv = threading.Condition()
        self._busy = False
        self._thread: threading.Thread | None = None
        # per outcome: "done", "failed", or "current" (ranked since it was asked)
        self.outcomes: Counter[str] = Counter()
        self.on_done: Callable[[str], None] | None = None

    def run(self, users: Iterable[Id], inline: int) -> None:
        """Refresh the first `inline` of `users` now, in the caller's thread, and queue
        the rest for the background thread. A worker's requests and its background
        thread share one interpreter lock: a request that needs it while the thread
        ranks waits up to a switch interval (5 ms) at each step, so a rank done inside
        the request that brought the event costs the other requests less than the
        same rank in the background (measured in benchmarks/README.md)."""
        users = list(users)
        for user in users[:inline]:
            self._do(user, None)
        self.add(users[inline:])

    def add(self, users: Iterable[Id]) -> None:
        now = time.time()
        with self._cv:
            for u in users:
                if u not in self._queue and len(self._queue) < self.max_queue:
                    self._queue[u] = now
            if self._queue:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(
                        target=self._run, name="list-refresher", daemon=True
                    )
                    self._thread.start()
                self._cv.notify()

    def pending(self) -> int:
        return len(self._queue)

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """True once nothing waits or runs (for tests and shutdown)."""
        end = time.monotonic() + timeout
        with self._cv:
            while self._queue or self._busy:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue:
                    self._busy = False
                    self._cv.notify_all()
                    self._cv.wait()
                user, asked = self._queue.popitem(last=False)
                self._busy = True
            self._do(user, asked)

    def _do(self, user: Id, asked: float | None) -> None:
        outcome = "done"
        try:
            if not self.work(user, asked):
                outcome = "current"
        except Exception as e:  # a list that cannot be refreshed is ranked on read
            outcome = "failed"
            log.warning("could not refresh the list of %r: %s", user, e)
        self.count(outcome)

    def count(self, outcome: str, n: int = 1) -> None:
        """Count `n` users' `outcome`; "handed": given to another process to rank."""
        with self._cv:  # counted from the caller's thread and the background one
            self.outcomes[outcome] += n
        if self.on_done is not None:
            for _ in range(n):
                self.on_done(outcome)
