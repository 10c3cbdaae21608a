"""A RabbitMQ namespace per contract test: unique queue/exchange prefix plus a Redis state prefix.

The server is OFFLOAD_TEST_AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/), its state store
OFFLOAD_TEST_REDIS_URL. If either cannot be reached the tests are skipped, unless CI=true.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest

from . import redis_store

AMQP_URL = os.environ.get("OFFLOAD_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def _probe() -> str | None:
    parts = urlsplit(AMQP_URL)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5672), timeout=2):
            pass
    except OSError as exc:
        return f"RabbitMQ at {AMQP_URL}: {exc}"
    try:
        import aio_pika  # noqa: F401
    except ImportError:
        return "aio-pika is not installed"
    return redis_store._probe()


def rabbitmq_url(tmp_path: Path) -> str:
    problem = _probe()
    if problem is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{problem}; CI=true requires RabbitMQ and Redis", pytrace=False)
        pytest.skip(f"{problem}; start RabbitMQ and Redis to run the RabbitMQ contract tests")
    prefix = f"offload-test-{uuid.uuid4().hex}"
    query = urlencode({"state": redis_store.REDIS_URL, "prefix": prefix})
    return f"{AMQP_URL}?{query}"


def cleanup(url: str) -> None:
    """Delete the test's queues and exchanges (named in its state store), then its Redis keys."""
    import redis

    from offload.brokers.rabbitmq import AMQP_NAMES
    from offload.brokers.redis_keys import keyspace

    [prefix] = parse_qs(urlsplit(url).query)["prefix"]
    client = redis.Redis.from_url(redis_store.REDIS_URL)
    try:
        names = [n.decode() for n in client.smembers(keyspace(f"{prefix}:") + AMQP_NAMES)]  # type: ignore[union-attr]
    finally:
        client.close()

    asyncio.run(delete_rabbitmq_names(AMQP_URL, prefix, names))
    redis_store.cleanup(f"{redis_store.REDIS_URL}?prefix={prefix}:")


async def delete_rabbitmq_names(amqp: str, prefix: str, queues: Iterable[str]) -> None:
    """Delete a RabbitMQ broker's queues (as named in its state store) and its two exchanges."""
    import aio_pika

    connection = await aio_pika.connect(amqp, timeout=10)
    try:
        channel = await connection.channel()
        for name in queues:
            await channel.queue_delete(name)
        for exchange in (f"{prefix}.work", f"{prefix}.delay"):
            await channel.exchange_delete(exchange)
    finally:
        await connection.close()
