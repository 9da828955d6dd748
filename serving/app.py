"""The HTTP layer: parse, call the service, format. No model logic lives here.

`create_app(service, settings)` builds the app over a `recsys.service.RecService`;
`app_from_env()` is the factory `recsys serve` hands to uvicorn (one per worker).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import pathlib
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
from fastapi import Body, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from recsys.pseudonym import PseudonymKeyError, check_bundle
from recsys.service import RecService, ServiceError, ServiceLimits
from serving.metrics import Metrics
from serving.refresher import RefreshClient
from serving.settings import Settings

log = logging.getLogger("recsys.serving")

MAX_ID_LEN = 256
MAX_LIST = 1000
MAX_K = 1000  # the largest k a request may ask for (settings.max_k may cap it lower)
MAX_EVENTS = 1000

StrId = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LEN)]
IntId = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
Id = IntId | StrId


class ScoredItem(BaseModel):
    item_id: int | str
    score: float | None = Field(description="ranker score; null for unranked filler items")


class RecommendationOut(BaseModel):
    user_id: int | str | None
    items: list[ScoredItem]
    model_version: str
    fallback: str | None = Field(
        None, description="null when ranked for the user; 'popular' or 'history' otherwise"
    )


class RecommendationIn(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    user_id: Id | None = None
    history: list[Id] | None = Field(None, max_length=MAX_LIST, description="recent items")
    k: int = Field(10, ge=1, le=MAX_K)
    exclude: list[Id] | None = Field(None, max_length=MAX_LIST)


class EventIn(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    user_id: Id
    item_id: Id
    timestamp: datetime | None = Field(
        None,
        description="epoch seconds or ISO 8601 (naive = UTC, years 1 to 9999); "
        "default: the service's clock",
    )

    @field_validator("timestamp")
    @classmethod
    def _naive_is_utc(cls, t: datetime | None) -> datetime | None:
        # as in the canonical data; .timestamp() of a naive time would use the server's
        # local zone (and fail for the year 1)
        return t.replace(tzinfo=UTC) if t is not None and t.tzinfo is None else t


class EventsIn(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    events: list[EventIn] = Field(..., min_length=1, max_length=MAX_EVENTS)


class EventsOut(BaseModel):
    accepted: int


class SimilarOut(BaseModel):
    item_id: int | str
    items: list[ScoredItem]
    model_version: str


class ReloadIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bundle: Annotated[str, StringConstraints(min_length=1, max_length=4096)] | None = None


class ReloadOut(BaseModel):
    old_version: str
    model_version: str


class Problem(BaseModel):
    detail: Any


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem},
    404: {"model": Problem},
    413: {"model": Problem},
    422: {"model": Problem},
    503: {"model": Problem},
}


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(obj), status_code=status, media_type="application/json", headers=headers
    )


class FailureLimiter:
    """Failed admin attempts per client address: after `max_failures` within `window_s`
    seconds the client is refused (429, Retry-After) until the oldest failure leaves the
    window; a success clears its count. In-process and per worker (W workers allow W x
    max_failures), at most `max_clients` addresses tracked (least recent dropped)."""

    def __init__(
        self,
        max_failures: int,
        window_s: float,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.max_clients = max_clients
        self.clock = clock
        self._fails: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> deque[float] | None:
        q = self._fails.get(client)
        while q and q[0] <= now - self.window_s:
            q.popleft()
        return q

    def retry_after(self, client: str) -> float:
        """Seconds until `client` may try again; 0 when it may now."""
        with self._lock:
            now = self.clock()
            q = self._recent(client, now)
            if q is not None and len(q) >= self.max_failures:
                return q[0] + self.window_s - now
            return 0.0

    def failed(self, client: str) -> None:
        with self._lock:
            now = self.clock()
            q = self._recent(client, now)
            if q is None:
                q = self._fails[client] = deque(maxlen=self.max_failures)
                while len(self._fails) > self.max_clients:
                    self._fails.popitem(last=False)
            self._fails.move_to_end(client)
            q.append(now)

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._fails.pop(client, None)


def _token_matches(given: str, token: str) -> bool:
    """Constant time, and the digests hide the token's length too."""
    a = hashlib.sha256(given.encode()).digest()
    return hmac.compare_digest(a, hashlib.sha256(token.encode()).digest())


_READ_PREFIX = "/v1/recommendations/"
_READ_ROUTE = "/v1/recommendations/{user_id}"
_POST_FIELDS = frozenset(RecommendationIn.model_fields)
_EVENTS_FIELDS = frozenset(EventsIn.model_fields)
_EVENT_FIELDS = frozenset(EventIn.model_fields)


def _json_object(scope: Scope, body: bytes, fields: frozenset[str]) -> dict[str, Any] | None:
    """A JSON body's object when the request says JSON and it has only `fields`."""
    for k, v in scope.get("headers", ()):
        if k == b"content-type" and v.lower().startswith(b"application/json"):
            break
    else:
        return None
    try:
        d = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return d if type(d) is dict and d.keys() <= fields else None


def _plain_k(query: bytes) -> int | None:
    """k from a query string that is empty (10) or exactly `k=N`, N a plain integer
    from 1 to MAX_K; None for anything else (the route validates it)."""
    if not query:
        return 10
    if not query.startswith(b"k=") or not 3 <= len(query) <= 6 or not query[2:].isdigit():
        return None
    k = int(query[2:])
    return k if 1 <= k <= MAX_K and query[2:3] != b"0" else None


def _plain_id(x: Any) -> bool:
    """An id as `Id` takes it without coercion: an int in int64 (not a bool) or a
    string of 1 to MAX_ID_LEN characters."""
    t = type(x)
    return (t is int and -(2**63) <= x < 2**63) or (t is str and 0 < len(x) <= MAX_ID_LEN)


def _plain_ids(xs: Any) -> bool:
    return xs is None or (type(xs) is list and len(xs) <= MAX_LIST and all(map(_plain_id, xs)))


def _recommendation(rec: Any) -> Response:
    # Age: seconds since the list was ranked, when it was served from the list cache
    headers = {"Age": str(int(rec.age_s))} if rec.age_s > 0 else None
    return _json(
        {
            "user_id": rec.user_id,
            "items": [{"item_id": i, "score": s} for i, s in rec.items],
            "model_version": rec.model_version,
            "fallback": rec.fallback,
        },
        headers=headers,
    )


def create_app(service: RecService, settings: Settings | None = None) -> Guard:
    settings = settings or Settings()
    metrics = Metrics()

    app = FastAPI(
        title="recsys",
        version="1",
        description="Top-k recommendations from a recsys bundle, in real time.",
    )
    app.state.service = service
    app.state.metrics = metrics
    limiter = FailureLimiter(settings.admin_max_failures, settings.admin_failure_window_s)
    app.state.admin_limiter = limiter
    if service.refresher is not None:
        service.refresher.on_done = lambda outcome: metrics.refreshes.labels(outcome).inc()

    def _served(rec: Any) -> Response:
        metrics.list_age.observe(rec.age_s)
        return _recommendation(rec)

    def cached_read(scope: Scope) -> Response | None:
        """GET /v1/recommendations/{user_id} answered without FastAPI's routing and
        validation when nothing needs them: a plain id, `k` absent or a plain integer
        in range, and a list that needs no rank (cached, or the fallback of a user
        without events). That is most of a server's requests, and FastAPI's layers
        cost several times the lookup. Anything else (None) takes the route below,
        which answers the same request with the same bytes."""
        path = scope["path"]
        if scope["method"] != "GET" or not path.startswith(_READ_PREFIX) or scope.get("root_path"):
            return None
        user_id = path[len(_READ_PREFIX) :]
        if not 0 < len(user_id) <= MAX_ID_LEN or "/" in user_id:
            return None
        k = _plain_k(scope["query_string"])
        if k is None:
            return None
        try:
            rec = service.recommend_unranked(user_id, k=min(k, settings.max_k))
        except ServiceError:  # the route formats the error
            return None
        return None if rec is None else _served(rec)

    def recommend_body(scope: Scope, body: bytes) -> Response | None:
        """POST /v1/recommendations answered without FastAPI's layers (0.6 ms of an
        unknown user's request) when the body needs no coercion: a JSON object of
        `RecommendationIn`'s fields, ids as plain ints or strings, `k` a plain int in
        range. The answer, errors included, is the route's. Anything else (None)
        takes the route, which validates it."""
        d = _json_object(scope, body, _POST_FIELDS)
        if d is None:
            return None
        user_id, history, exclude, k = (
            d.get("user_id"),
            d.get("history"),
            d.get("exclude"),
            d.get("k", 10),
        )
        if not (user_id is None or _plain_id(user_id)) or type(k) is not int:
            return None
        if not (1 <= k <= MAX_K and _plain_ids(history) and _plain_ids(exclude)):
            return None
        try:
            return recommend_post_answer(user_id, history, k, exclude)
        except ServiceError as e:
            return problem(e)

    def events_body(scope: Scope, body: bytes) -> Response | None:
        """POST /v1/events the same way: `{"events": [...]}` of 1 to MAX_EVENTS objects
        with plain `user_id` and `item_id` and no timestamp (the service's clock); a
        timestamp, or anything else, takes the route."""
        d = _json_object(scope, body, _EVENTS_FIELDS)
        events = None if d is None else d.get("events")
        if type(events) is not list or not 1 <= len(events) <= MAX_EVENTS:
            return None
        rows: list[tuple[Any, Any, int | None]] = []
        for e in events:
            if type(e) is not dict or not e.keys() <= _EVENT_FIELDS:
                return None
            user_id, item_id = e.get("user_id"), e.get("item_id")
            if e.get("timestamp") is not None or not (_plain_id(user_id) and _plain_id(item_id)):
                return None
            rows.append((user_id, item_id, None))
        try:
            return _json({"accepted": service.add_events(rows)})
        except ServiceError as e:
            return problem(e)

    def recommend_post_answer(
        user_id: Any, history: list[Any] | None, k: int, exclude: list[Any] | None
    ) -> Response:
        if user_id is None and not history:
            raise ServiceError("give a user_id, a non-empty history, or both")
        rec = service.recommend(user_id, k=min(k, settings.max_k), history=history, exclude=exclude)
        return _served(rec)

    def problem(e: ServiceError) -> Response:
        retry = {"Retry-After": "1"} if e.status == 503 else None
        return _json({"detail": str(e)}, e.status, headers=retry)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, e: ServiceError) -> Response:
        return problem(e)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> Response:
        errors = [
            {"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type")}
            for err in e.errors()
        ]
        return _json({"detail": errors}, 422)

    @app.get(
        _READ_ROUTE,
        response_model=RecommendationOut,
        responses=ERRORS,
        summary="Top-k for a user (a fallback list for unknown users)",
    )
    async def recommend_get(
        user_id: Annotated[str, Path(min_length=1, max_length=MAX_ID_LEN)],
        k: Annotated[int, Query(ge=1, le=MAX_K)] = 10,
    ) -> Response:
        return _served(service.recommend(user_id, k=min(k, settings.max_k)))

    @app.post(
        "/v1/recommendations",
        response_model=RecommendationOut,
        responses=ERRORS,
        summary="Top-k for a user id and/or an explicit recent history",
    )
    async def recommend_post(req: RecommendationIn) -> Response:
        return recommend_post_answer(req.user_id, req.history, req.k, req.exclude)

    @app.post(
        "/v1/events",
        response_model=EventsOut,
        responses=ERRORS,
        summary="Fresh events; the users' next lists take them into account",
    )
    async def post_events(req: EventsIn) -> Response:
        rows = [
            (e.user_id, e.item_id, int(e.timestamp.timestamp()) if e.timestamp else None)
            for e in req.events
        ]
        return _json({"accepted": service.add_events(rows)})

    @app.get(
        "/v1/items/{item_id}/similar",
        response_model=SimilarOut,
        responses=ERRORS,
        summary="Items most similar to an item (item-item cosine of co-occurrence)",
    )
    async def similar(
        item_id: Annotated[str, Path(min_length=1, max_length=MAX_ID_LEN)],
        k: Annotated[int, Query(ge=1, le=MAX_K)] = 10,
    ) -> Response:
        service.sync()
        iid, items, version = service.similar(item_id, k)
        return _json(
            {
                "item_id": iid,
                "items": [{"item_id": i, "score": s} for i, s in items],
                "model_version": version,
            }
        )

    @app.get("/healthz", summary="The process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": Problem}}, summary="Bundle loaded and warm")
    async def readyz() -> Response:
        service.sync()  # follow a reload another worker took
        if service.ready:
            return _json({"status": "ready", "model_version": service.model.version})
        return _json({"detail": "not ready: the bundle is loading or warming up"}, 503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus() -> Response:
        if service.ready:
            metrics.set_bundle(service.model.version)
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)

    @app.post(
        "/admin/reload",
        response_model=ReloadOut,
        responses={
            401: {"model": Problem},
            403: {"model": Problem},
            409: {"model": Problem},
            429: {"model": Problem},
        },
        summary="Load a bundle beside the serving one and swap (bearer token; failed "
        "attempts are rate-limited per client)",
    )
    def reload(
        request: Request,
        req: Annotated[ReloadIn | None, Body()] = None,
        authorization: Annotated[str | None, Header(max_length=4096)] = None,
    ) -> Response:
        token = settings.admin_token.get_secret_value() if settings.admin_token else ""
        if not token:
            return _json({"detail": "admin endpoints are disabled (RECSYS_ADMIN_TOKEN unset)"}, 403)
        client = request.client.host if request.client else "unknown"
        wait = limiter.retry_after(client)
        if wait > 0:  # refused before the token is even compared
            secs = max(1, math.ceil(wait))
            return _json(
                {"detail": f"too many failed admin attempts; try again in {secs} s"},
                429,
                headers={"Retry-After": str(secs)},
            )
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not _token_matches(given, token):
            limiter.failed(client)  # the token, given or expected, is never logged
            log.warning("admin: missing or wrong bearer token from %s", client)
            return _json({"detail": "missing or wrong bearer token"}, 401)
        limiter.succeeded(client)
        try:
            old, new = service.reload(req.bundle if req else None)
        except ServiceError as e:
            return _json({"detail": str(e)}, e.status)
        except Exception as e:  # the old bundle keeps serving
            log.warning("reload refused: %s", e)
            return _json({"detail": f"reload refused, still serving the old bundle: {e}"}, 409)
        metrics.set_bundle(new)
        return _json({"old_version": old, "model_version": new})

    plain_posts = {"/v1/recommendations": recommend_body, "/v1/events": events_body}
    return Guard(app, metrics, settings.max_body_bytes, cached_read, plain_posts)


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class Guard:
    """ASGI wrapper: refuses oversized bodies with 413, answers cached reads itself
    (`fast`: a Response, or None for the app to answer) and plain POSTs once it has
    read their body (`fast_posts` by path: a Response, or None to replay the body to
    the app), and records request metrics. Attribute access falls through to the
    FastAPI app (routes, state, openapi)."""

    def __init__(
        self,
        app: FastAPI,
        metrics: Metrics,
        max_body: int,
        fast: Callable[[Scope], Response | None] | None = None,
        fast_posts: Mapping[str, Callable[[Scope, bytes], Response | None]] | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body
        self.fast = fast
        self.fast_posts = fast_posts or {}  # by path: POSTs answered once their body is read

    def __getattr__(self, name: str) -> Any:
        return getattr(self.app, name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        if self.fast is not None:
            r = self.fast(scope)
            if r is not None:
                await r(scope, receive, send)
                self.metrics.observe(_READ_ROUTE, "GET", r.status_code, t0)
                return
        status = 500
        length = None
        for k, v in scope.get("headers", ()):
            if k == b"content-length":
                length = v
        path = scope["path"]
        post = None
        if scope["method"] == "POST" and not scope.get("root_path"):
            post = self.fast_posts.get(path)
        messages: list[Message] | None = None
        if length is not None:
            try:
                too_big = int(length) > self.max_body
            except ValueError:
                too_big = False
            if post and not too_big:
                messages, too_big = await self._read_body(receive)
        elif scope["method"] in ("POST", "PUT", "PATCH"):
            # no length given (chunked): read up to the limit here, then replay
            messages, too_big = await self._read_body(receive)
        else:
            too_big = False
        if too_big:
            await self._refuse(send)
            self.metrics.observe("unmatched", scope["method"], 413, t0)
            return
        if messages is not None:
            last = messages[-1]
            if post and last["type"] == "http.request" and not last.get("more_body", False):
                body = b"".join(m.get("body", b"") for m in messages)
                try:
                    r = post(scope, body)
                except Exception:
                    self.metrics.observe(path, "POST", 500, t0)
                    raise
                if r is not None:
                    await r(scope, receive, send)
                    self.metrics.observe(path, "POST", r.status_code, t0)
                    return
            replay = iter(messages)

            async def receive_replayed() -> Message:
                nxt = next(replay, None)
                return nxt if nxt is not None else await receive()

            receive = receive_replayed

        async def send_status(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            self.metrics.observe(getattr(route, "path", "unmatched"), scope["method"], status, t0)

    async def _read_body(self, receive: Receive) -> tuple[list[Message], bool]:
        """The request's messages up to its end or past `max_body` (then True)."""
        messages, seen = [], 0
        while True:
            msg = await receive()
            messages.append(msg)
            if msg["type"] != "http.request":
                return messages, False
            seen += len(msg.get("body", b""))
            if seen > self.max_body:
                return messages, True
            if not msg.get("more_body", False):
                return messages, False

    async def _refuse(self, send: Send) -> None:
        body = orjson.dumps({"detail": f"request body larger than {self.max_body} bytes"})
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


def service_from_settings(settings: Settings, refresher: bool = False) -> RecService:
    """The service a worker (or, `refresher`, the refresher process) builds from the
    settings: its limits, state folder or Redis, list seed. The refresher keeps few
    lists in memory (it writes them to the shared state) and seeds none."""
    state = None
    if settings.redis_url is not None:  # a fleet: events, lists and reloads in Redis
        from recsys.redis_state import RedisState, RedisStateError

        try:
            state = RedisState(
                settings.redis_url.get_secret_value(),
                settings.max_events_per_user,
                settings.max_fresh_users,
                list_ttl_s=settings.list_ttl_s,
            )
        except RedisStateError as e:
            raise SystemExit(f"error: {e}") from None
    return RecService(
        None,
        limits=ServiceLimits(
            max_events_per_user=settings.max_events_per_user,
            max_fresh_users=settings.max_fresh_users,
            cache_users=min(settings.cache_users, 1000) if refresher else settings.cache_users,
            prefill=settings.prefill and not refresher,
            max_k=settings.max_k,
            new_item_every=settings.new_item_every,
            list_ttl_s=settings.list_ttl_s,
            refresh=settings.refresh and not refresher,
            refresh_inline_users=settings.refresh_inline_users,
            compact_bytes=settings.events_log_max_bytes,
        ),
        state_dir=settings.state_dir,
        tree_cache=settings.tree_cache,
        cache=settings.cache and settings.cache_users > 0,
        freeze_gc=True,
        state=state,
        seed_lists=None if refresher else settings.lists,
    )


def refresher_service() -> tuple[RecService, pathlib.Path]:
    """The refresher process's service and bundle, from the workers' environment."""
    settings = Settings()
    if settings.bundle is None:
        raise SystemExit("RECSYS_BUNDLE is not set: the bundle directory to serve")
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    return service_from_settings(settings, refresher=True), settings.bundle


def app_from_env() -> Guard:
    """The uvicorn factory: settings from the environment. With one worker the bundle
    loads and warms in the background while /healthz answers and /readyz says 503; with
    several (or RECSYS_LOAD_BEFORE_SERVING=true) each worker loads it before it takes a
    connection, so the others serve meanwhile."""
    settings = Settings()
    if settings.bundle is None:
        raise SystemExit("RECSYS_BUNDLE is not set: the bundle directory to serve")
    try:  # a bundle of pseudonymized ids never serves under another key, nor none
        check_bundle(settings.bundle)
    except PseudonymKeyError as e:
        raise SystemExit(f"error: {e}") from None
    service = service_from_settings(settings)
    if settings.refresh_socket is not None and service.refresher is not None:
        # the server's refresher process ranks the lists of users with new events
        client = RefreshClient(settings.refresh_socket, settings.refresher_handoff == "always")
        service.handoff = client.send
    bundle = settings.bundle
    if settings.workers > 1:  # a worker of `recsys serve`: it goes when its master does
        from serving.workers import exit_with_parent

        exit_with_parent(os.getppid())

    def load() -> None:
        try:
            from threadpoolctl import threadpool_limits

            threadpool_limits(1)  # one request, one core: BLAS threads only contend
            service.start(bundle)
        except Exception:
            log.exception("could not load the bundle %s", bundle)

    app = create_app(service, settings)
    if settings.load_before_serving is None:
        before = settings.workers > 1
    else:
        before = settings.load_before_serving
    if before:
        # this worker takes no connection until its bundle is ready: a restarted worker
        # leaves every request to the others meanwhile instead of answering 503
        load()
        if not service.ready:
            raise SystemExit(f"error: could not load the bundle {bundle}")
    else:
        threading.Thread(target=load, name="bundle-loader", daemon=True).start()
    return app
