"""Every knob of the server, read from the environment (prefix RECSYS_)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RECSYS_", extra="ignore")

    bundle: Path | None = Field(None, description="bundle directory to serve")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1, description="server processes")
    load_before_serving: bool | None = Field(
        None,
        description="a worker loads its bundle before it takes connections (unset: when "
        "workers > 1); else it answers 503 until loaded",
    )
    admin_token: SecretStr | None = Field(
        None, description="bearer token of POST /admin/reload; unset disables it"
    )
    admin_max_failures: int = Field(
        5, ge=1, description="failed admin token attempts per client within the window"
    )
    admin_failure_window_s: float = Field(
        60.0,
        gt=0,
        allow_inf_nan=False,
        description="seconds a failed admin attempt counts; a client with "
        "admin_max_failures of them gets 429 with Retry-After until the oldest expires",
    )
    state_dir: Path | None = Field(
        None, description="shared by the workers: fresh events and the bundle to serve"
    )
    redis_url: SecretStr | None = Field(
        None,
        description="Redis shared by a fleet of servers (fresh events, lists, reloads) "
        "instead of state_dir; never logged with its password",
    )
    tree_cache: Path | None = Field(None, description="compiled ranker models")
    cache: bool = Field(
        True, description="keep ranked lists per user until their next event or TTL"
    )
    cache_users: int = Field(50_000, ge=0)
    list_ttl_s: float = Field(
        3600.0,
        gt=0,
        allow_inf_nan=False,
        description="a cached list older than this is not served; lists read in the last "
        "quarter of it are recomputed in the background",
    )
    refresh: bool = Field(
        True,
        description="recompute lists off the read path: a user's events request ranks "
        "them before it is answered, lists near their TTL are ranked in the background",
    )
    refresh_inline_users: int = Field(
        8,
        ge=0,
        description="users of one events request ranked before it is answered (a few ms "
        "each); the request's other users are ranked in the background (0: all)",
    )
    refresh_socket: str | None = Field(
        None,
        description="the server's refresher process (set by `recsys serve --workers N`; "
        "a path, or @name in Linux's abstract namespace): an events request hands its "
        "users' lists to it instead of ranking them",
    )
    refresher_handoff: Literal["idle", "always"] = Field(
        "idle",
        description="when an events request hands its users to the refresher process: "
        "idle, while a core is idle (else it ranks them, once, itself); always",
    )
    lists: Path | None = Field(
        None, description="a `recsys recommend` output whose lists seed the cache at start"
    )
    events_log_max_bytes: int = Field(
        64 << 20, ge=4096, description="the state folder's events log is compacted past this"
    )
    prefill: bool = Field(False, description="rank the bundle's users into the cache before ready")
    max_k: int = Field(1000, ge=1)
    max_body_bytes: int = Field(256_000, ge=1024)
    max_events_per_user: int = Field(500, ge=1)
    max_fresh_users: int = Field(100_000, ge=1)
    new_item_every: int | None = Field(
        None,
        ge=0,
        description="every n-th place of a list goes to an item without interactions "
        "(language-model bundles; 0: off); unset: the bundle's own setting",
    )
