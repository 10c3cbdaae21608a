"""Fixtures shared by the Redis integration tests (test_redis.py, test_redis_blocking.py).

They use the shared test server (OFFLOAD_TEST_REDIS_URL, default 127.0.0.1:6379): skipped if it is
unreachable, failed instead when CI=true (see tests/contract/redis_store.py).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from contract import redis_store
from offload.brokers import broker_from_url
from offload.brokers.redis import RedisBroker
from offload.message import Message, encode, new_job_id

RedisItem = Callable[..., tuple[Message, bytes]]


def _item(**fields: object) -> tuple[Message, bytes]:
    m = Message(id=new_job_id(), task="t", created_at=time.time(), **fields)  # type: ignore[arg-type]
    return m, encode(m)


@pytest.fixture
def redis_item() -> RedisItem:
    """Makes a (message, body) pair for `enqueue`: `redis_item(queue="q", priority=5, ...)`."""
    return _item


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """The shared test server's URL with a prefix of this test's own; its keys are deleted after."""
    made = redis_store.redis_url(tmp_path)
    yield made
    redis_store.cleanup(made)


@pytest.fixture
async def redis_broker(redis_url: str) -> AsyncIterator[RedisBroker]:
    """A connected RedisBroker on `redis_url`, closed after the test."""
    b = broker_from_url(redis_url)
    assert isinstance(b, RedisBroker)
    await b.connect()
    try:
        yield b
    finally:
        await b.close()
