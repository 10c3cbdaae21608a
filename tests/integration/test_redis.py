"""The Redis broker against real servers: URL options, keys, eviction policy, errors, wake-ups.

Most tests use the shared test server (OFFLOAD_TEST_REDIS_URL, default 127.0.0.1:6379, skipped if
unreachable unless CI=true); the eviction-policy tests start a redis-server of their own.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from contract import redis_store
from offload import BrokerError, ConfigurationError, MissingExtraError
from offload.brokers import Settle, broker_from_url
from offload.brokers.redis import RedisBroker
from offload.brokers.redis_keys import keyspace
from offload.brokers.redis_url import parse_redis_url
from offload.message import encode_value

if TYPE_CHECKING:
    from integration.conftest import RedisItem

pytestmark = pytest.mark.timeout(60)


# -- URLs ---------------------------------------------------------------------------------------


def test_url_options_are_parsed_and_checked() -> None:
    parsed = parse_redis_url(
        "redis://:secret@example.com:6380/2?prefix=jobs:&require_noeviction=true&socket_timeout=3"
    )
    assert (parsed.prefix, parsed.require_noeviction, parsed.wait_replicas) == ("jobs:", True, 0)
    assert parsed.client_url == "redis://:secret@example.com:6380/2?socket_timeout=3"
    assert parsed.where == "example.com:6380" and parsed.sentinels == ()
    parsed = parse_redis_url("rediss://h/0")
    assert (parsed.prefix, parsed.require_noeviction) == ("offload:", False)
    with pytest.raises(ConfigurationError, match="unknown Redis URL option 'prefx'"):
        broker_from_url("redis://127.0.0.1/0?prefx=x")
    with pytest.raises(ConfigurationError, match="require_noeviction"):
        broker_from_url("redis://127.0.0.1/0?require_noeviction=maybe")
    with pytest.raises(ConfigurationError, match="empty prefix"):
        broker_from_url("redis://127.0.0.1/0?prefix=")
    with pytest.raises(ConfigurationError) as caught:  # messages never show the password
        broker_from_url("redis://user:s3cret@127.0.0.1/0?prefx=x")
    assert "s3cret" not in str(caught.value) and "user:***@" in str(caught.value)


def test_keys_share_one_hash_tag_derived_from_the_prefix() -> None:
    assert keyspace("offload:") == "offload:{offload}:"
    assert keyspace("app:{jobs}:") == "app:{jobs}:"  # a tag chosen by the user is kept


def test_missing_client_library_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # makes `import redis` fail
    with pytest.raises(MissingExtraError, match=r"pip install 'offload\[redis\]'"):
        broker_from_url("redis://127.0.0.1:6379/0")


async def test_unreachable_server_is_a_one_line_broker_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    b = broker_from_url(f"redis://127.0.0.1:{port}/0")
    with pytest.raises(BrokerError) as caught:
        await b.connect()
    message = str(caught.value)
    assert "\n" not in message
    assert f"cannot reach Redis at 127.0.0.1:{port}" in message and "OFFLOAD_BROKER_URL" in message


# -- keys and behaviour on the shared server ------------------------------------------------------


async def test_every_key_lives_under_the_prefix(
    redis_broker: RedisBroker, redis_url: str, redis_item: RedisItem
) -> None:
    import redis.asyncio as aioredis

    await redis_broker.declare_queue("bounded", 10)
    await redis_broker.enqueue(
        [redis_item(queue="bounded", idempotency_key="k"), redis_item(eta=time.time() + 60)]
    )
    [d] = await redis_broker.fetch(["bounded"], 1, 0)
    assert await redis_broker.settle([Settle(d, "ack", result=encode_value(1))]) == [True]
    client = aioredis.Redis.from_url(redis_store.REDIS_URL)
    try:
        keys = [k.decode() async for k in client.scan_iter(match=f"{redis_broker.prefix}*")]
        kinds = {k.split("}:", 1)[1].split(":")[0] for k in keys}
        assert kinds >= {"job", "delayed", "idem", "queues", "drain", "expiring"}, kinds
        assert all(k.startswith(redis_broker.namespace) for k in keys)
        # A finished job's record expires by itself too, in case nothing prunes.
        assert await client.pttl(f"{redis_broker.namespace}job:{d.job_id}") > 0
    finally:
        await client.aclose()


async def test_one_enqueue_wakes_one_of_many_waiting_fetches(
    redis_broker: RedisBroker, redis_url: str, redis_item: RedisItem
) -> None:
    others = [broker_from_url(redis_url) for _ in range(3)]
    for other in others:
        await other.connect()
    try:
        waiting = [asyncio.create_task(b.fetch(["default"], 1, 1.5)) for b in [redis_broker, *others]]
        await asyncio.sleep(0.1)
        await redis_broker.enqueue([redis_item()])
        started = time.monotonic()
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        assert time.monotonic() - started < 0.3
        results = await asyncio.gather(*waiting)
        assert sorted(len(r) for r in results) == [0, 0, 0, 1]
    finally:
        for other in others:
            await other.close()


async def test_enqueue_resent_after_a_lost_reply_is_not_stored_twice(
    redis_broker: RedisBroker, redis_item: RedisItem
) -> None:
    batch = [redis_item() for _ in range(3)]
    first = await redis_broker.enqueue(batch)
    again = await redis_broker.enqueue(batch)  # the same messages: the caller never saw the first reply
    assert [e.job_id for e in again] == [e.job_id for e in first]
    [stats] = await redis_broker.stats(["default"])
    assert stats.ready == 3


async def test_a_lease_lost_in_a_failover_is_not_given_the_same_token_again(
    redis_broker: RedisBroker, redis_item: RedisItem
) -> None:
    # A failover to a replica that missed the last writes: the namespace as it was before a
    # fetch, restored after it. The job is leased again; the first holder's late ack must fail.
    import redis.asyncio as aredis

    client = aredis.from_url(redis_store.REDIS_URL)
    try:
        await redis_broker.enqueue([redis_item()])
        keys = await client.keys(f"{redis_broker.namespace}*")
        before = {k: await client.dump(k) for k in keys}
        [first] = await redis_broker.fetch(["default"], 1, 0)
        await client.delete(*await client.keys(f"{redis_broker.namespace}*"))
        for key, value in before.items():
            await client.restore(key, 0, value)
        [second] = await redis_broker.fetch(["default"], 1, 0)

        assert second.job_id == first.job_id and second.token != first.token
        assert await redis_broker.settle([Settle(first, "ack", result=encode_value(1))]) == [False]
        assert await redis_broker.settle([Settle(second, "ack", result=encode_value(2))]) == [True]
    finally:
        await client.aclose()


async def test_pipelined_calls_reload_the_scripts_a_restarted_server_lost(
    redis_broker: RedisBroker, redis_item: RedisItem
) -> None:
    import redis.asyncio as aredis

    client = aredis.from_url(redis_store.REDIS_URL)
    try:
        await client.script_flush()  # as after a restart: enqueue_calls pipelines EVALSHA
        outcomes = await redis_broker.enqueue_calls([[redis_item()], [redis_item()]])
        assert all(isinstance(o, list) and o[0].created for o in outcomes)
        await client.script_flush()  # a waiting fetch pipelines BLPOP and FETCH
        waiting = asyncio.create_task(redis_broker.fetch(["default"], 5, 2.0))
        assert len(await waiting) == 2  # the first look (a plain FETCH) takes both
        waiting = asyncio.create_task(redis_broker.fetch(["default"], 5, 5.0))
        await asyncio.sleep(0.2)  # now it waits in the pipelined BLPOP, its FETCH queued behind
        await client.script_flush()
        await redis_broker.enqueue([redis_item()])
        started = time.monotonic()
        assert len(await waiting) == 1
        assert time.monotonic() - started < 1.0  # the wake-up was not lost to the reload
    finally:
        await client.aclose()


async def test_a_batch_too_large_for_one_command_is_staged_and_stays_all_or_nothing(
    redis_broker: RedisBroker, monkeypatch: pytest.MonkeyPatch, redis_item: RedisItem
) -> None:
    import redis.asyncio as aioredis

    from offload import QueueFull
    from offload.brokers import redis_records

    monkeypatch.setattr(redis_records, "STAGE_BYTES", 1000)  # stage in chunks of about 1 KB
    batch = [redis_item(args=("x" * 200, n)) for n in range(50)]
    enqueued = await redis_broker.enqueue(batch)
    assert all(e.created for e in enqueued)
    order = []
    while deliveries := await redis_broker.fetch(["default"], 7, 0):
        order.extend(deliveries)
    assert [d.job_id for d in order] == [e.job_id for e in enqueued]
    assert [d.body for d in order] == [body for _, body in batch]

    await redis_broker.declare_queue("small", 10)
    with pytest.raises(QueueFull):
        await redis_broker.enqueue([redis_item(queue="small", args=("x" * 200,)) for _ in range(20)])
    client = aioredis.Redis.from_url(redis_store.REDIS_URL)
    try:  # the staged bodies of the refused batch are gone with it
        assert [k async for k in client.scan_iter(match=f"{redis_broker.namespace}stage:*")] == []
    finally:
        await client.aclose()


# -- the eviction policy, on a server of our own ----------------------------------------------------


@pytest.fixture
def evicting_server(tmp_path: Path) -> Iterator[int]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(
        [
            "redis-server",
            *("--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path)),
            *("--maxmemory-policy", "allkeys-lru"),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait(10)


async def test_an_evicting_server_is_refused_when_the_url_requires_noeviction(evicting_server: int) -> None:
    b = broker_from_url(f"redis://127.0.0.1:{evicting_server}/0?require_noeviction=true")
    with pytest.raises(BrokerError, match="maxmemory-policy=allkeys-lru"):
        await b.connect()


async def test_an_evicting_server_is_used_with_a_loud_warning(
    evicting_server: int, caplog: pytest.LogCaptureFixture, redis_item: RedisItem
) -> None:
    b = broker_from_url(f"redis://127.0.0.1:{evicting_server}/0")
    with caplog.at_level(logging.WARNING, logger="offload.broker"):
        await b.connect()
    try:
        assert any("maxmemory-policy=allkeys-lru" in r.getMessage() for r in caplog.records)
        [e] = await b.enqueue([redis_item()])
        assert e.created
    finally:
        await b.close()
