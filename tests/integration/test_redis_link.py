"""AsyncLink (redis_link): the Redis broker's scripts and pipelines on the event loop.

The contract suite runs the broker through it; these tests hold the link itself to what the
redis-py client it replaces gave: a connection dropped while idle is replaced without an error, a
cancelled call never leaves its reply for the next caller, callers beyond max_connections wait
and then give up, error replies are redis-py's exceptions, and a broker whose scripts were
flushed reloads them. On the shared test server (OFFLOAD_TEST_REDIS_URL; skipped if unreachable,
failed when CI=true).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import pytest
import redis
import redis.asyncio as aioredis
from redis import exceptions as rex

from contract import redis_store
from offload.brokers.base import Settle
from offload.brokers.redis import RedisBroker
from offload.brokers.redis_link import AsyncLink

if TYPE_CHECKING:
    from integration.conftest import RedisItem

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def pool(redis_url: str) -> AsyncIterator[aioredis.BlockingConnectionPool]:
    pool = aioredis.BlockingConnectionPool.from_url(redis_store.REDIS_URL, max_connections=2)
    yield pool
    await pool.aclose()


@pytest.fixture
async def link(pool: aioredis.BlockingConnectionPool) -> AsyncIterator[AsyncLink]:
    made = AsyncLink(pool, wait=1.0)
    yield made
    await made.close()


@pytest.fixture
def key() -> Iterator[str]:
    made = f"offload-test-link:{uuid.uuid4().hex}"
    yield made
    client = redis.Redis.from_url(redis_store.REDIS_URL)
    try:
        client.delete(made)
    finally:
        client.close()


def _kill_connections_running(command: str) -> int:
    """CLIENT KILL every connection whose last command was `command` (the test's own survives)."""
    client = redis.Redis.from_url(redis_store.REDIS_URL)
    try:
        mine, killed = client.client_id(), 0
        for info in client.client_list():
            if int(info["id"]) != mine and info["cmd"] == command:
                client.client_kill_filter(_id=info["id"])
                killed += 1
        return killed
    finally:
        client.close()


async def test_replies_come_back_in_order_and_error_replies_are_redis_py_exceptions(
    link: AsyncLink, key: str
) -> None:
    assert await link.call("SET", key, "v", "EX", 60) == b"OK"
    replies = await link.pipeline([("GET", key), ("INCR", key), ("EVALSHA", "0" * 40, 0), ("PING",)])
    assert replies[0] == b"v"
    assert isinstance(replies[1], rex.ResponseError)  # not an integer: returned, not raised
    assert isinstance(replies[2], rex.NoScriptError)
    assert replies[3] == b"PONG"
    with pytest.raises(rex.NoScriptError):
        await link.call("EVALSHA", "0" * 40, 0)
    assert await link.call("DEL", key) == 1  # an error reply leaves the connection usable


async def test_a_connection_killed_while_idle_is_replaced_without_an_error(link: AsyncLink) -> None:
    assert await link.call("ECHO", "before") == b"before"
    assert _kill_connections_running("echo") == 1
    await asyncio.sleep(0.1)  # the EOF reaches the idle connection's transport
    assert await link.call("ECHO", "after") == b"after"


async def test_a_cancelled_call_never_leaves_its_reply_to_the_next_caller(link: AsyncLink, key: str) -> None:
    blocked = asyncio.ensure_future(link.call("BLPOP", key, 2))
    await asyncio.sleep(0.2)
    blocked.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocked
    assert await link.call("PING") == b"PONG"  # not the BLPOP's nil, read off its connection
    await link.call("RPUSH", key, "late")
    await asyncio.sleep(0.1)
    assert await link.call("LLEN", key) == 1  # the cancelled BLPOP is gone from the server


async def test_callers_beyond_max_connections_wait_then_give_up(
    pool: aioredis.BlockingConnectionPool, key: str
) -> None:
    link = AsyncLink(pool, wait=0.3)  # the pool allows 2 connections
    holders = [asyncio.ensure_future(link.call("BLPOP", key, 1)) for _ in range(2)]
    await asyncio.sleep(0.1)
    with pytest.raises(rex.ConnectionError, match="max_connections"):
        await link.call("PING")  # both connections stay busy past the wait
    waiter = asyncio.ensure_future(link.call("PING"))
    await asyncio.sleep(0.05)
    other = aioredis.Redis.from_url(redis_store.REDIS_URL)
    try:
        await other.rpush(key, "x")  # frees one holder
    finally:
        await other.aclose()
    assert await waiter == b"PONG"  # the waiter got the connection given back
    assert [await h for h in holders].count(None) == 1
    await link.close()


async def test_a_broker_reloads_scripts_flushed_under_it(
    redis_broker: RedisBroker, redis_item: RedisItem
) -> None:
    assert redis_broker._async_link is not None  # this redis-py has what the link uses
    await redis_broker.enqueue([redis_item()])
    client = redis.Redis.from_url(redis_store.REDIS_URL)
    try:
        client.script_flush()  # as after a server restart
    finally:
        client.close()
    [d] = await redis_broker.fetch(["default"], 1, 0)  # FETCH through the link: NOSCRIPT, reload
    assert await redis_broker.settle([Settle(d, "ack")]) == [True]
