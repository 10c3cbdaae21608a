"""A pair of JetStream KV buckets per contract test: unique names on the test server, deleted afterwards.

The server is OFFLOAD_TEST_NATS_URL (default nats://127.0.0.1:4222, JetStream enabled). If it cannot
be reached the NATS tests are skipped, unless CI=true, where a missing server fails them instead.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

NATS_URL = os.environ.get("OFFLOAD_TEST_NATS_URL", "nats://127.0.0.1:4222")
_probe_result: list[str | None] = []  # [None] reachable, [reason] not, [] not probed yet


def _in_thread(fn: Any) -> Any:
    """Run a coroutine function on a loop of its own (the test's loop may be set but not running)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, fn()).result()


async def _quiet(exc: Exception) -> None:
    pass


def _probe() -> str | None:
    if not _probe_result:

        async def ping() -> None:
            import nats

            # max_reconnect_attempts=1: with 0 (or -1) nats-py retries an unreachable server forever
            nc = await nats.connect(NATS_URL, connect_timeout=3, max_reconnect_attempts=1, error_cb=_quiet)
            try:
                await nc.jetstream().account_info()  # JetStream must be enabled too
            finally:
                await nc.close()

        try:
            _in_thread(ping)
            _probe_result.append(None)
        except Exception as exc:
            _probe_result.append(f"{type(exc).__name__}: {exc}")
    return _probe_result[0]


def nats_url(tmp_path: Path) -> str:
    problem = _probe()
    if problem is not None:
        message = f"NATS JetStream at {NATS_URL} is not reachable ({problem})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(
                f"{message}; CI=true requires it: start `nats-server -js` or set OFFLOAD_TEST_NATS_URL",
                pytrace=False,
            )
        pytest.skip(f"{message}; start `nats-server -js` to run the NATS contract tests")
    return f"{NATS_URL}?bucket=offload-test-{uuid.uuid4().hex}"


def cleanup(url: str) -> None:
    """Delete the test's buckets (the job bucket and its drain-rate bucket) and its ready stream."""
    from offload.brokers.nats import delete_bucket

    _in_thread(lambda: delete_bucket(url))
