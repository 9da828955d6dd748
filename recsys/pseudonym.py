"""Pseudonymous user ids: a keyed hash in place of each raw user id, from ingest to serving.

`recsys ingest ... --pseudonymize` writes every user id as HMAC-SHA256(key, id), the first
32 hex digits (128 bits: no collision is to be expected below about 10^18 users, and each
id takes half the room of the whole digest in every event row and in the bundle). The
canonical `user_id` may be a string (DESIGN.md, data contract), so pseudonyms are strings.
A raw id is hashed as its text (`str(id)`, UTF-8), so the integer 42 and the string "42"
that reaches a server in a URL get the same pseudonym.

The key comes from the environment variable RECSYS_PSEUDONYM_KEY (its UTF-8 bytes, at
least 16 characters) and is never written anywhere. What travels with the data is a
record, `{"pseudonymized": true, "key_fingerprint": ..., "scheme": ...}`: ingest writes it
beside the interactions (`interactions.pseudonym.json`), `recsys fit` copies it into the
bundle's manifest, and a server serving that bundle refuses to start without the same
key, then hashes every user id a request brings. The fingerprint is an HMAC of a fixed
label under the key: it tells whether two keys are the same without revealing either.
"""

from __future__ import annotations

import hmac
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any

import polars as pl

from recsys.schema import USER, DataError, atomic_path

ENV_VAR = "RECSYS_PSEUDONYM_KEY"
MIN_KEY_CHARS = 16
HEX_DIGITS = 32
SCHEME = f"hmac-sha256-hex{HEX_DIGITS}"
MANIFEST_FIELD = "pseudonym"  # the record's key in a bundle manifest
SIDECAR_SUFFIX = ".pseudonym.json"  # interactions.parquet -> interactions.pseudonym.json
_FINGERPRINT_LABEL = b"\x00recsys pseudonym key fingerprint v1"
_PSEUDONYM = re.compile(rf"^[0-9a-f]{{{HEX_DIGITS}}}$")
_MAKE_KEY = "e.g. python -c 'import secrets; print(secrets.token_hex(32))'"


class PseudonymKeyError(ValueError):
    """RECSYS_PSEUDONYM_KEY missing, too short, or not the key a bundle's data was
    pseudonymized with. The CLI prints the message and exits with status 2."""


@dataclass(frozen=True)
class Pseudonymizer:
    """Raw user id -> pseudonym under one key (the key never shows in its repr)."""

    key: bytes = field(repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Pseudonymizer:
        value = (os.environ if environ is None else environ).get(ENV_VAR, "")
        if not value:
            raise PseudonymKeyError(
                f"{ENV_VAR} is not set: pseudonymous user ids need the secret key "
                f"({_MAKE_KEY}); keep it out of the data and the bundle"
            )
        if len(value) < MIN_KEY_CHARS:
            raise PseudonymKeyError(
                f"{ENV_VAR} is {len(value)} characters long; use a random key of at least "
                f"{MIN_KEY_CHARS} ({_MAKE_KEY}): a short key can be guessed from the pseudonyms"
            )
        return cls(value.encode())

    @property
    def fingerprint(self) -> str:
        """16 hex digits that identify the key without revealing it."""
        return hmac.digest(self.key, _FINGERPRINT_LABEL, "sha256").hex()[:16]

    def record(self) -> dict[str, Any]:
        """What the data and the bundle keep of the key: the flag and its fingerprint."""
        return {"pseudonymized": True, "key_fingerprint": self.fingerprint, "scheme": SCHEME}

    def __call__(self, user_id: int | str) -> str:
        return hmac.digest(self.key, str(user_id).encode(), sha256).hex()[:HEX_DIGITS]

    def series(self, ids: pl.Series) -> pl.Series:
        """Every id of a column replaced by its pseudonym (each distinct id hashed once)."""
        raw = ids.cast(pl.String)
        distinct = raw.unique().drop_nulls()
        hashed = pl.Series([self(x) for x in distinct.to_list()], dtype=pl.String)
        if hashed.n_unique() != len(hashed):  # 2^-64 odds at 10^10 users; checked anyway
            raise DataError("two user ids got the same pseudonym", column=ids.name)
        return raw.replace_strict(distinct, hashed, return_dtype=pl.String).alias(ids.name)


# -- the record beside the ingested interactions ----------------------------------------
def sidecar_path(interactions: str | os.PathLike[str]) -> Path:
    return Path(interactions).with_suffix(SIDECAR_SUFFIX)


def write_sidecar(interactions: str | os.PathLike[str], pseudonymizer: Pseudonymizer) -> Path:
    path = sidecar_path(interactions)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(pseudonymizer.record(), indent=2) + "\n")
    return path


def read_sidecar(interactions: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The pseudonym record beside an interactions file, or None when it has none."""
    path = sidecar_path(interactions)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read the pseudonym record ({e})", file=str(path)) from e
    if not isinstance(record, dict) or record.get("pseudonymized") is not True:
        raise DataError(
            "not a pseudonym record",
            file=str(path),
            expected='{"pseudonymized": true, "key_fingerprint": ..., "scheme": ...}',
        )
    return record


def check_pseudonyms(ids: pl.Series, record_path: str | os.PathLike[str]) -> None:
    """Refuse raw ids under a pseudonym record (one left behind by an earlier ingest):
    a bundle marked pseudonymized would make the server hash ids that were never hashed."""
    distinct = ids.cast(pl.String).unique()
    bad = distinct.filter(~distinct.str.contains(_PSEUDONYM.pattern))
    if len(bad):
        raise DataError(
            f"{len(bad)} user id(s) are not pseudonyms although {record_path} says the "
            "interactions were pseudonymized; ingest again (with or without --pseudonymize)",
            column=USER,
            expected=f"{HEX_DIGITS} lowercase hex digits per user id",
        )


# -- serving ------------------------------------------------------------------------------
def for_manifest(
    manifest: Mapping[str, Any], bundle: str, environ: Mapping[str, str] | None = None
) -> Pseudonymizer | None:
    """The pseudonymizer a server needs for a bundle: None when its data kept raw ids;
    PseudonymKeyError when the key is missing or not the one the data was hashed with."""
    record = manifest.get(MANIFEST_FIELD)
    if not record or not record.get("pseudonymized"):
        return None
    if record.get("scheme") != SCHEME:
        raise PseudonymKeyError(
            f"{bundle}: user ids pseudonymized by scheme {record.get('scheme')!r}, "
            f"this recsys knows {SCHEME!r}"
        )
    try:
        p = Pseudonymizer.from_env(environ)
    except PseudonymKeyError as e:
        raise PseudonymKeyError(
            f"{bundle} was fitted on pseudonymized user ids and needs the key they were "
            f"hashed with: {e}"
        ) from None
    if not hmac.compare_digest(p.fingerprint, str(record.get("key_fingerprint"))):
        raise PseudonymKeyError(
            f"{ENV_VAR} is not the key {bundle}'s user ids were pseudonymized with (its "
            f"fingerprint is {p.fingerprint}, the bundle's {record.get('key_fingerprint')}); "
            "set the key used at ingest, or fit a bundle on data ingested with this key"
        )
    return p


def check_bundle(bundle: str | os.PathLike[str]) -> Pseudonymizer | None:
    """`for_manifest` on a bundle directory's manifest, read without verifying checksums
    (the loader does that): a server's quick refusal before it loads anything."""
    from recsys.bundle import MANIFEST

    try:
        manifest = json.loads((Path(bundle) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None  # no readable manifest: the bundle loader says what is wrong
    return for_manifest(manifest, str(bundle)) if isinstance(manifest, dict) else None
