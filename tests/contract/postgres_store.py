"""A PostgreSQL schema per contract test: a unique schema in the test database, dropped afterwards.

The server is OFFLOAD_TEST_POSTGRES_URL (default postgresql://postgres@127.0.0.1:5432/test). If it
cannot be reached the PostgreSQL tests are skipped, unless CI=true, where they fail instead.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

POSTGRES_URL = os.environ.get("OFFLOAD_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
_probe_result: list[str | None] = []  # [None] reachable, [reason] not, [] not probed yet


def _in_thread(fn: Any) -> Any:
    """Run a coroutine function on a loop of its own (the test's loop may be set but not running)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, fn()).result()


def _probe() -> str | None:
    if not _probe_result:

        async def ping() -> None:
            import asyncpg

            conn = await asyncpg.connect(POSTGRES_URL, timeout=3)
            await conn.close()

        try:
            _in_thread(ping)
            _probe_result.append(None)
        except Exception as exc:
            _probe_result.append(f"{type(exc).__name__}: {exc}")
    return _probe_result[0]


def require_postgres() -> str:
    """The test server's URL, or skip (fail under CI=true) when it is not reachable."""
    problem = _probe()
    if problem is not None:
        message = f"PostgreSQL at {POSTGRES_URL} is not reachable ({problem})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(
                f"{message}; CI=true requires it: start PostgreSQL or set OFFLOAD_TEST_POSTGRES_URL",
                pytrace=False,
            )
        pytest.skip(f"{message}; start PostgreSQL to run the PostgreSQL tests")
    return POSTGRES_URL


def postgres_url(tmp_path: Path) -> str:
    base = require_postgres()
    return f"{base}?schema=offload_test_{uuid.uuid4().hex[:16]}"


def drop_schema(url: str) -> None:
    [schema] = parse_qs(urlsplit(url).query)["schema"]

    async def drop() -> None:
        import asyncpg

        conn = await asyncpg.connect(POSTGRES_URL, timeout=5)
        try:
            await conn.execute("SET lock_timeout = '10s'")
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()

    _in_thread(drop)


cleanup = drop_schema
