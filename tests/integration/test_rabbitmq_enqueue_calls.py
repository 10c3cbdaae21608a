"""The RabbitMQ broker's enqueue_calls against real servers: concurrent sends share round trips,
and a call RabbitMQ refuses (x-max-length, reject-publish) is rolled back alone.

Uses the shared test servers (OFFLOAD_TEST_AMQP_URL, OFFLOAD_TEST_REDIS_URL; skipped if either is
unreachable unless CI=true).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from contract import rabbitmq_store
from contract.support import item
from offload import App, QueueFull
from offload.brokers.rabbitmq import RabbitMQBroker
from offload.brokers.rabbitmq_url import UNPUBLISHED

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def url(tmp_path: Path) -> AsyncIterator[str]:
    made = rabbitmq_store.rabbitmq_url(tmp_path)
    yield made
    await asyncio.to_thread(rabbitmq_store.cleanup, made)


async def test_a_call_rabbitmq_refuses_is_rolled_back_alone(url: str) -> None:
    broker = RabbitMQBroker(url + "&max_length=1")
    await broker.connect()
    try:
        assert broker.batches_enqueue_calls
        # x-max-length=1: a quorum queue refuses publishes once it is over the limit (2 here).
        kept = [(await broker.enqueue([item(queue="full")]))[0].job_id for _ in range(2)]
        full_one, other = [item(queue="full")], [item(queue="other")]
        full_two = [item(queue="full"), item(queue="full")]
        outcomes = await broker.enqueue_calls([full_one, other, [], full_two])

        assert isinstance(outcomes[0], QueueFull)
        assert isinstance(outcomes[1], list) and outcomes[1][0].created
        assert outcomes[2] == []
        assert isinstance(outcomes[3], QueueFull)
        for m, _ in full_one + full_two:
            assert await broker.get_job(m.id) is None  # rolled back, with its mark
        full, others = await broker.stats(["full", "other"])
        assert (full.depth, others.depth) == (2, 1)
        await asyncio.sleep(0.2)  # the background unmark
        client = await broker._redis()
        assert await client.zcard(broker.namespace + UNPUBLISHED) == 0

        got = await broker.fetch(["full", "other"], 10, wait=2.0)
        assert sorted(d.job_id for d in got) == sorted([*kept, other[0][0].id])
    finally:
        await broker.close()


async def test_concurrent_sends_share_round_trips(url: str) -> None:
    app = App(url)
    app.queue("burst", max_depth=None)

    @app.task(queue="burst")
    def noop(i: int) -> None:
        return None

    broker = await app.broker()
    calls: list[int] = []
    original = broker.enqueue_calls

    async def counted(batch):  # type: ignore[no-untyped-def]
        calls.append(len(batch))
        return await original(batch)

    broker.enqueue_calls = counted  # type: ignore[method-assign]
    try:
        jobs = await asyncio.gather(*(noop.send_async(i) for i in range(40)))
        assert len({j.id for j in jobs}) == 40
        assert sum(calls) == 40 and len(calls) < 40  # batched
        [stats] = await broker.stats(["burst"])
        assert stats.ready == 40
    finally:
        await app.close_async()


async def test_concurrent_sends_reload_the_scripts_a_restarted_redis_lost(url: str) -> None:
    broker = RabbitMQBroker(url)
    await broker.connect()
    try:
        client = await broker._redis()
        await client.script_flush()  # as after a restart of the state store
        outcomes = await broker.enqueue_calls([[item()], [item()]])
        assert all(isinstance(o, list) and o[0].created for o in outcomes)
        got = await broker.fetch(["default"], 10, wait=2.0)
        assert len(got) == 2
    finally:
        await broker.close()


@pytest.mark.parametrize("delayed", [False, True], ids=["ready", "delayed"])
async def test_a_send_to_a_queue_deleted_behind_the_brokers_back_is_not_lost(url: str, delayed: bool) -> None:
    """RabbitMQ returns a message it cannot route (its queue is gone: an operator deleted it) and
    then confirms it: the send must not take that confirm as stored. (A delayed job's message
    goes to a delay bucket first: the bucket is the queue deleted then.)"""
    import time

    import aio_pika

    def eta() -> float | None:
        return time.time() + 0.5 if delayed else None

    broker = RabbitMQBroker(url)
    await broker.connect()
    try:
        await broker.enqueue([item(queue="gone", eta=eta())])
        [name] = (
            [n for n in broker._link._declared if ".delay." in n]
            if delayed
            else [broker._link.name("gone", 0)]
        )
        other = await aio_pika.connect(broker._link.options.amqp_url)
        try:
            channel = await other.channel()
            await channel.queue_delete(name)  # with the first job's message
        finally:
            await other.close()

        [second] = await broker.enqueue([item(queue="gone", eta=eta())])
        assert second.created
        got = await broker.fetch(["gone"], 10, wait=5.0)
        assert [d.job_id for d in got] == [second.job_id], "the second send's message was lost"
    finally:
        await broker.close()


async def test_a_worker_whose_queue_was_deleted_declares_it_again(url: str) -> None:
    import aio_pika

    from offload.brokers.base import Settle

    sender = RabbitMQBroker(url)
    await sender.connect()
    worker = RabbitMQBroker(url)  # started after the deletion: its first fetch consumes
    try:
        [first] = await sender.enqueue([item(queue="gone", priority=5)])  # its own class queue
        other = await aio_pika.connect(sender._link.options.amqp_url)
        try:
            channel = await other.channel()
            await channel.queue_delete(sender._link.name("gone", 5))  # with the job's message
        finally:
            await other.close()

        await worker.connect()
        assert await worker.fetch(["gone"], 1, wait=0.3) == []
        [again] = await worker.enqueue([item(queue="gone", priority=5)])
        [d] = await worker.fetch(["gone"], 1, wait=2.0)
        assert d.job_id == again.job_id
        assert await worker.settle([Settle(d, "ack")]) == [True]
        assert first.created  # (its message went with the queue: nothing can bring it back)
    finally:
        await worker.close()
        await sender.close()
