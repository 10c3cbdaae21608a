"""A Redis namespace per contract test: a unique key prefix on the test server, deleted afterwards.

The server is OFFLOAD_TEST_REDIS_URL (default redis://127.0.0.1:6379/0). If it cannot be reached
the Redis tests are skipped, unless CI=true, where a missing server fails them instead.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

REDIS_URL = os.environ.get("OFFLOAD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
_probe_result: list[str | None] = []  # [None] reachable, [reason] not, [] not probed yet


def _probe() -> str | None:
    if not _probe_result:
        try:
            import redis

            client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=5)
            try:
                client.ping()
            finally:
                client.close()
            _probe_result.append(None)
        except Exception as exc:
            _probe_result.append(f"{type(exc).__name__}: {exc}")
    return _probe_result[0]


def redis_url(tmp_path: Path) -> str:
    problem = _probe()
    if problem is not None:
        message = f"Redis at {REDIS_URL} is not reachable ({problem})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(
                f"{message}; CI=true requires it: start redis-server or set OFFLOAD_TEST_REDIS_URL",
                pytrace=False,
            )
        pytest.skip(f"{message}; start redis-server to run the Redis contract tests")
    return f"{REDIS_URL}?prefix=offload-test-{uuid.uuid4().hex}:"


def cleanup(url: str) -> None:
    """Delete every key of the test's namespace (SCAN + DEL)."""
    import redis

    [prefix] = parse_qs(urlsplit(url).query)["prefix"]
    client = redis.Redis.from_url(REDIS_URL)
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                client.delete(*batch)
                batch.clear()
        if batch:
            client.delete(*batch)
    finally:
        client.close()
