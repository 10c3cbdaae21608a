"""API keys: scoped, rate-limited, and stored only as hashes in a JSON keys file.

A key looks like `ofk_<id>_<secret>`: `id` (12 hex digits) names the key in `offload keys list`
and `revoke`; `secret` is 256 random bits. The keys file keeps, per key, its id, the SHA-256 of
the whole key, its scopes, its rate limit and its creation/revocation times: never the key
itself, which `offload keys create` prints once.

Why a plain SHA-256 and not bcrypt/scrypt/argon2: slow hashes exist to make guessing a
low-entropy secret (a password) expensive. A 256-bit random key cannot be guessed however fast
the hash is, so a slow one would add nothing but milliseconds of CPU to every request (and hand
unauthenticated callers a way to burn that CPU). The stored hash still means a leaked keys file
does not leak usable keys.

Scopes: `submit` (submit and cancel jobs), `read` (job status, events, queues), `admin` (the
dead-letter queue; implies the others). Each key may carry a rate limit, "N/s", "N/m" or "N/h",
enforced per key and per API process by a token bucket holding up to N requests.

A running server notices changes to the keys file (a new or revoked key) within a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from offload.errors import ConfigurationError

log = logging.getLogger("offload.api")

SCOPES = ("submit", "read", "admin")
KEY_PREFIX = "ofk"
FILE_VERSION = 1
RELOAD_EVERY = 1.0  # seconds between checks of the keys file for changes
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_rate(text: str) -> tuple[float, float]:
    """ "100/s" -> (100.0 tokens per second, bucket of 100); "/m" and "/h" per minute and hour."""
    match = _RATE.match(text)
    if match is None or float(match.group(1)) <= 0:
        raise ConfigurationError(f"rate {text!r} is not valid: use N/s, N/m or N/h with N > 0 (e.g. 100/s)")
    count = float(match.group(1))
    return count / _UNIT_SECONDS[match.group(2)[0].lower()], max(1.0, count)


def parse_scopes(text: str | Iterable[str]) -> frozenset[str]:
    items = text.split(",") if isinstance(text, str) else list(text)
    scopes = frozenset(s.strip().lower() for s in items if s.strip())
    unknown = scopes - set(SCOPES)
    if not scopes or unknown:
        raise ConfigurationError(
            f"scopes must be a comma-separated subset of {', '.join(SCOPES)}, not {text!r}"
        )
    return scopes


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    id: str
    sha256: str
    scopes: frozenset[str]
    rate: str | None = None  # "100/s"; None: unlimited
    created_at: float = 0.0
    name: str | None = None
    revoked_at: float | None = None

    def allows(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "sha256": self.sha256,
            "scopes": sorted(self.scopes),
            "rate": self.rate,
            "created_at": self.created_at,
            "name": self.name,
            "revoked_at": self.revoked_at,
        }

    @classmethod
    def from_json(cls, data: Any) -> ApiKey:
        if not isinstance(data, dict):
            raise ValueError("each key must be an object")
        rate = data.get("rate")
        if rate is not None:
            parse_rate(rate)
        return cls(
            id=str(data["id"]),
            sha256=str(data["sha256"]),
            scopes=parse_scopes(data["scopes"]),
            rate=rate,
            created_at=float(data.get("created_at") or 0.0),
            name=data.get("name"),
            revoked_at=data.get("revoked_at"),
        )


@dataclass
class TokenBucket:
    rate: float  # tokens per second
    capacity: float
    tokens: float = field(init=False)
    updated: float = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = self.capacity
        self.updated = time.monotonic()

    def take(self) -> float:
        """Take a token: 0.0 if there was one, else the seconds until there will be."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class KeyStore:
    """The keys file, loaded into memory; reloaded when it changes on disk."""

    def __init__(self, path: str | os.PathLike[str], keys: Iterable[ApiKey] = ()) -> None:
        self.path = Path(path)
        self._keys: dict[str, ApiKey] = {k.id: k for k in keys}
        self._buckets: dict[str, tuple[str, TokenBucket]] = {}
        self._stamp: tuple[int, int] | None = None
        self._checked = time.monotonic()

    # -- the file --------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, create: bool = False) -> KeyStore:
        """Load the keys file; with `create`, a missing file is an empty store (saved on first key)."""
        store = cls(path)
        if not store.path.exists():
            if create:
                return store
            raise ConfigurationError(
                f"no keys file at {str(store.path)!r}: create a key with "
                f"`offload keys create --scopes submit,read --keys-file {store.path}`"
            )
        store._load()
        return store

    def _load(self) -> None:
        try:
            stamp = self._file_stamp()
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("version") != FILE_VERSION:
                raise ValueError(f"not an offload keys file (version {FILE_VERSION})")
            keys = [ApiKey.from_json(item) for item in data.get("keys", [])]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigurationError(f"cannot read keys file {str(self.path)!r}: {exc}") from None
        self._keys = {k.id: k for k in keys}
        self._stamp = stamp

    def _file_stamp(self) -> tuple[int, int]:
        st = os.stat(self.path)
        return st.st_mtime_ns, st.st_size

    def save(self) -> None:
        """Write the file atomically (a temporary file renamed over it), readable by its owner only."""
        body = json.dumps(
            {"version": FILE_VERSION, "keys": [k.to_json() for k in self._keys.values()]}, indent=2
        )
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(body + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._stamp = self._file_stamp()

    def _reload_if_changed(self) -> None:
        now = time.monotonic()
        if now - self._checked < RELOAD_EVERY:
            return
        self._checked = now
        try:
            stamp = self._file_stamp()
        except FileNotFoundError:
            if self._keys:
                log.warning("keys file %s is gone: every API key is refused until it is back", self.path)
            self._keys, self._stamp = {}, None
            return
        except OSError as exc:
            log.warning("cannot check keys file %s: %s", self.path, exc)
            return
        if stamp != self._stamp:
            try:
                self._load()
                log.info("keys file %s reloaded: %d active key(s)", self.path, len(self.active()))
            except ConfigurationError as exc:
                log.error("%s; keeping the keys loaded before", exc)

    # -- managing keys -------------------------------------------------------------------------

    def all(self) -> list[ApiKey]:
        return sorted(self._keys.values(), key=lambda k: k.created_at)

    def active(self) -> list[ApiKey]:
        return [k for k in self.all() if k.revoked_at is None]

    def create(
        self, scopes: str | Iterable[str], rate: str | None = None, name: str | None = None
    ) -> tuple[ApiKey, str]:
        """Make and save a new key; returns its record and the key itself (shown once)."""
        if rate is not None:
            parse_rate(rate)
        key_id = secrets.token_hex(6)
        while key_id in self._keys:
            key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)  # 256 bits
        plaintext = f"{KEY_PREFIX}_{key_id}_{secret}"
        record = ApiKey(
            id=key_id,
            sha256=hash_key(plaintext),
            scopes=parse_scopes(scopes),
            rate=rate,
            created_at=time.time(),
            name=name,
        )
        self._keys[key_id] = record
        self.save()
        return record, plaintext

    def revoke(self, key_id: str) -> bool:
        key = self._keys.get(key_id)
        if key is None or key.revoked_at is not None:
            return False
        self._keys[key_id] = replace(key, revoked_at=time.time())
        self.save()
        return True

    # -- serving -----------------------------------------------------------------------------

    def authenticate(self, token: str) -> ApiKey | None:
        """The active key `token` is, or None (malformed, unknown, revoked, or wrong secret)."""
        self._reload_if_changed()
        prefix, _, rest = token.partition("_")
        key_id, _, secret = rest.partition("_")
        if prefix != KEY_PREFIX or not secret:
            return None
        key = self._keys.get(key_id)
        if key is None or key.revoked_at is not None:
            return None
        if not hmac.compare_digest(hash_key(token), key.sha256):
            return None
        return key

    def retry_after(self, key: ApiKey) -> int | None:
        """None if the key may make a request now, else whole seconds (>= 1) to wait."""
        if key.rate is None:
            return None
        held = self._buckets.get(key.id)
        if held is None or held[0] != key.rate:
            rate, burst = parse_rate(key.rate)
            held = self._buckets[key.id] = (key.rate, TokenBucket(rate, burst))
        wait = held[1].take()
        return None if wait <= 0 else max(1, math.ceil(wait))
