"""Redis as the shared state of a serving fleet (`RECSYS_REDIS_URL`).

Install the client with `pip install 'recsys[redis]'`; the server must be Redis 7 or
later (one server, or a primary with replicas; not Redis Cluster, since one event
batch touches the keys of many users in one script). Every key starts with `prefix`
(default `recsys:`), so servers of different deployments can share a Redis:

- `seq`: the global event sequence. Each event takes the next number; a user's
  version is the number of their last event, so versions only grow.
- `fresh:<user>`: the user's fresh events, a list of JSON `[item, t]`, oldest first,
  trimmed to the last `max_events_per_user`. `ver:<user>`: its version. Both live
  `fresh_ttl_s` (7 days) after the user's last event.
- `events`: a stream of every event taken (`u`, `i`: JSON ids, `t`, `v`: its sequence
  number), capped near `stream_maxlen` entries, for consumers outside the servers
  (a retraining job); the servers themselves read the keys above.
- `list:<user>`: a ranked list (`CachedList`: a JSON header, then the int64 items and
  float64 scores), living `list_ttl_s` after it was stored. Lists are shared: one
  ranked by any server is served by all while the service finds it valid (the serving
  bundle's version, the user's current version, younger than the list TTL).
- `bundle` and `bundle:n`: the bundle to serve, `{"path", "version"}`, and a counter
  of announcements. Servers read the counter at most every `bundle_check_s` and follow
  a new announcement; one made before a server started is not followed (its own
  `RECSYS_BUNDLE` wins). The path must name the bundle on every server's machine.

`max_fresh_users` has no Redis equivalent: Redis bounds fresh users by the time-to-live
of their keys and by the server's `maxmemory` policy (`volatile-ttl` or `volatile-lru`
evict these keys first), not by a count. Likewise the lists' capacity is not a count.

User keys are the service's (`recsys.service._user_key`): the bundle's id, or the
client's id as a string when the bundle does not know it. They are stored as text:
user 7 and user "7" are one key, as they are one user for the service (a bundle of
integer ids maps the text "7" to 7, and a bundle of text ids knows no integer 7).

Events are taken by one Lua script: every row or none (Redis runs a script alone, and
refuses one that would write while the server is out of memory before it starts).
When Redis cannot be reached, events are refused with `StateWriteError` (503 at the
endpoint) and reads degrade for `retry_s`: no cached list, no fresh events, so lists
are ranked from the bundle alone until Redis answers again.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import struct
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from recsys.state import (
    CachedList,
    Fresh,
    Id,
    ListCache,
    Row,
    SharedState,
    StateWriteError,
)
from recsys.state import pack_list as _pack
from recsys.state import unpack_list as _unpack

log = logging.getLogger("recsys")

_ADD = """#!lua
local n = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local maxlen = ARGV[3]
local rows = (#ARGV - 3) / 3
for j = 0, rows - 1 do
  local u, i, t = ARGV[4 + 3 * j], ARGV[5 + 3 * j], ARGV[6 + 3 * j]
  local fk, vk = KEYS[3 + 2 * j], KEYS[4 + 2 * j]
  local seq = redis.call('INCR', KEYS[1])
  redis.call('RPUSH', fk, '[' .. i .. ',' .. t .. ']')
  redis.call('LTRIM', fk, -n, -1)
  redis.call('EXPIRE', fk, ttl)
  redis.call('SET', vk, seq, 'EX', ttl)
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', 'u', u, 'i', i, 't', t, 'v', seq)
end
return rows
"""


class RedisStateError(RuntimeError):
    """Redis cannot serve as the shared state (no client library, no server)."""


def _redis() -> Any:
    try:
        import redis
    except ImportError as e:  # pragma: no cover - the extra is not installed
        raise RedisStateError(
            "RECSYS_REDIS_URL needs the Redis client: pip install 'recsys[redis]'"
        ) from e
    return redis


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable Redis URL>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _text(user: Id) -> str:
    return str(user)


class RedisState(SharedState):
    """Fresh events, ranked lists and the bundle to serve in Redis (see the module)."""

    def __init__(
        self,
        url: str,
        max_events_per_user: int = 500,
        max_fresh_users: int = 100_000,
        fresh_ttl_s: float = 7 * 86400,
        list_ttl_s: float = 3600.0,
        prefix: str = "recsys:",
        stream_maxlen: int = 1_000_000,
        bundle_check_s: float = 0.5,
        retry_s: float = 1.0,
        timeout_s: float = 2.0,
    ) -> None:
        redis = _redis()
        self._errors: tuple[type[Exception], ...] = (
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
        )
        self.url = redact(url)
        self.max_events_per_user = max_events_per_user
        self.max_fresh_users = max_fresh_users  # not enforced: see the module's text
        self.fresh_ttl_s = max(1, math.ceil(fresh_ttl_s))
        self.list_ttl_s = max(1, math.ceil(list_ttl_s))
        self.prefix = prefix
        self.stream_maxlen = stream_maxlen
        self.bundle_check_s = bundle_check_s
        self.retry_s = retry_s
        try:
            self.r = redis.Redis.from_url(
                url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
            )
            info = self.r.info("server")
        except (*self._errors, redis.exceptions.RedisError, ValueError) as e:
            raise RedisStateError(f"cannot use Redis at {self.url}: {e}") from None
        major = int(str(info.get("redis_version", "0")).split(".")[0] or 0)
        if major < 7:
            raise RedisStateError(
                f"Redis at {self.url} is version {info.get('redis_version')}; "
                "recsys needs Redis 7 or later"
            )
        self._add = self.r.register_script(_ADD)
        self._down_until = 0.0
        self._bundle_n = self._get_bundle()[0]  # announcements before now are not followed
        self._bundle_checked = time.monotonic()
        log.info("shared state in Redis at %s (prefix %r)", self.url, prefix)

    # -- keys ----------------------------------------------------------------------------
    def _fresh_key(self, user: Id) -> str:
        return f"{self.prefix}fresh:{_text(user)}"

    def _ver_key(self, user: Id) -> str:
        return f"{self.prefix}ver:{_text(user)}"

    def _list_key(self, key: str) -> str:
        return f"{self.prefix}list:{key}"

    # -- Redis out of reach ------------------------------------------------------------
    def _down(self) -> bool:
        return time.monotonic() < self._down_until

    def _lost(self, e: Exception, what: str) -> None:
        if not self._down():
            log.error(
                "Redis at %s: %s failed (%s); reads degrade for %.1f s",
                self.url,
                what,
                e,
                self.retry_s,
            )
        self._down_until = time.monotonic() + self.retry_s

    # -- events ------------------------------------------------------------------------
    def add(self, rows: list[Row]) -> set[Id]:
        if not rows:
            return set()
        if self._down():
            raise StateWriteError(errno.ECONNREFUSED, f"Redis at {self.url} is out of reach")
        keys = [f"{self.prefix}seq", f"{self.prefix}events"]
        args: list[Any] = [self.max_events_per_user, self.fresh_ttl_s, self.stream_maxlen]
        for u, i, t in rows:
            keys += [self._fresh_key(u), self._ver_key(u)]
            args += [json.dumps(u), json.dumps(i), int(t)]
        try:
            self._add(keys=keys, args=args)
        except self._errors as e:
            self._lost(e, "storing events")
            raise StateWriteError(
                errno.ECONNREFUSED, f"could not store events in Redis at {self.url}: {e}"
            ) from None
        except _redis().exceptions.ResponseError as e:  # out of memory, read-only replica
            raise StateWriteError(
                errno.EIO, f"Redis at {self.url} refused the events: {e}"
            ) from None
        return {r[0] for r in rows}

    def fresh(self, user: Id) -> Fresh | None:
        if self._down():
            return None
        p = self.r.pipeline(transaction=True)
        p.lrange(self._fresh_key(user), 0, -1)
        p.get(self._ver_key(user))
        try:
            raw, ver = p.execute()
        except self._errors as e:
            self._lost(e, "reading fresh events")
            return None
        if not raw or ver is None:
            return None
        items: list[Id] = []
        times: list[int] = []
        for x in raw:
            i, t = json.loads(x)
            items.append(i)
            times.append(int(t))
        return Fresh(items, times, int(ver))

    def version(self, user: Id) -> int:
        if self._down():
            return 0
        try:
            v = self.r.get(self._ver_key(user))
        except self._errors as e:
            self._lost(e, "reading a version")
            return 0
        return 0 if v is None else int(v)

    def sync(self) -> set[Id]:
        return set()  # lists are shared and carry versions: nothing to invalidate here

    def lists(self, capacity: int) -> ListCache:
        return RedisLists(self, capacity)

    # -- the bundle to serve -------------------------------------------------------------
    def _get_bundle(self) -> tuple[int, bytes | None]:
        n, target = self.r.mget(f"{self.prefix}bundle:n", f"{self.prefix}bundle")
        return int(n or 0), target

    def bundle_target(self) -> dict[str, str] | None:
        now = time.monotonic()
        if now - self._bundle_checked < self.bundle_check_s or self._down():
            return None
        self._bundle_checked = now
        try:
            n, raw = self._get_bundle()
        except self._errors as e:
            self._lost(e, "reading the bundle to serve")
            return None
        if n == self._bundle_n or raw is None:
            return None
        self._bundle_n = n
        try:
            target = json.loads(raw)
        except ValueError:
            return None
        return target if isinstance(target, dict) and "path" in target else None

    def announce_bundle(self, path: str, version: str) -> None:
        value = json.dumps({"path": path, "version": version})
        p = self.r.pipeline(transaction=True)
        p.incr(f"{self.prefix}bundle:n")
        p.set(f"{self.prefix}bundle", value)
        p.publish(f"{self.prefix}bundle", value)
        try:
            n, _, _ = p.execute()
        except self._errors as e:
            self._lost(e, "announcing a bundle")
            raise StateWriteError(
                errno.ECONNREFUSED, f"could not announce the bundle in Redis at {self.url}: {e}"
            ) from None
        self._bundle_n = int(n)

    def close(self) -> None:
        self.r.close()


class RedisLists(ListCache):
    """Ranked lists in Redis, shared by every server of the fleet. `capacity` only
    turns the cache off (0); Redis bounds the lists by their time-to-live and its
    `maxmemory` policy. Reading one is one command (MGET), which also reads the user's
    version for the service's check."""

    shared = True

    def __init__(self, state: RedisState, capacity: int) -> None:
        super().__init__(capacity)
        self.state = state

    def get(self, key: str) -> CachedList | None:
        return self.get_checked(key, self.state)[0]

    def get_checked(self, user: Id, state: SharedState) -> tuple[CachedList | None, int]:
        """The list and the user's version in one round trip."""
        return self.get_checked_many([user], state)[0]

    def get_checked_many(
        self, users: list[Id], state: SharedState, batch: int = 1000
    ) -> list[tuple[CachedList | None, int]]:
        """Each user's list and version, read together by one MGET (a single command,
        so atomic as a transaction would be, for a third less of a read's round trip
        than MULTI, two GETs and EXEC), one round trip per `batch` of users (seeding
        50,000 lists one round trip at a time took most of a 40 s start)."""
        s = self.state
        out: list[tuple[CachedList | None, int]] = []
        for lo in range(0, len(users), batch):
            keys = [_text(u) for u in users[lo : lo + batch]]
            if self.capacity <= 0 or s._down():
                out += [(None, 0)] * len(keys)
                continue
            try:
                got = s.r.mget([k for key in keys for k in (s._list_key(key), s._ver_key(key))])
            except s._errors as e:
                s._lost(e, "reading a list")
                out += [(None, 0)] * len(keys)
                continue
            for key, raw, ver in zip(keys, got[0::2], got[1::2], strict=True):
                out.append((self._decode(raw, key), 0 if ver is None else int(ver)))
        return out

    def _decode(self, raw: bytes | None, key: str) -> CachedList | None:
        if raw is None:
            return None
        try:
            return _unpack(raw)
        except (ValueError, KeyError, struct.error):
            log.warning("skipping a malformed list in Redis under %r", self.state._list_key(key))
            return None

    def put(self, key: str, entry: CachedList, fresh: Fresh | None = None) -> None:
        s = self.state
        if self.capacity <= 0 or s._down():
            return
        try:
            s.r.set(s._list_key(key), _pack(entry), ex=s.list_ttl_s)
        except s._errors as e:
            s._lost(e, "storing a list")

    def put_many(self, entries: Iterable[tuple[str, CachedList]], batch: int = 1000) -> None:
        """`put` of many lists, one round trip per `batch` of them."""
        s = self.state
        todo = list(entries)
        for lo in range(0, len(todo), batch):
            if self.capacity <= 0 or s._down():
                return
            p = s.r.pipeline(transaction=False)
            for key, entry in todo[lo : lo + batch]:
                p.set(s._list_key(key), _pack(entry), ex=s.list_ttl_s)
            try:
                p.execute()
            except s._errors as e:
                s._lost(e, "storing lists")

    def drop(self, key: str) -> None:
        s = self.state
        try:
            s.r.delete(s._list_key(key))
        except s._errors as e:
            s._lost(e, "dropping a list")

    def _keys(self) -> list[bytes]:
        s = self.state
        return list(s.r.scan_iter(match=f"{s.prefix}list:*", count=1000))

    def clear(self) -> None:
        """Delete every list of this prefix (the service never does: lists carry the
        bundle's version, so an old bundle's lists are simply not served)."""
        keys = self._keys()
        for lo in range(0, len(keys), 1000):
            self.state.r.unlink(*keys[lo : lo + 1000])

    def __contains__(self, key: str) -> bool:
        s = self.state
        return bool(s.r.exists(s._list_key(key)))

    def __len__(self) -> int:
        """The lists stored now, counted by a SCAN over the keys: for tests and
        diagnostics, not for a request's path."""
        return len(self._keys())
