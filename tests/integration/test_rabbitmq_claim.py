"""The RabbitMQ broker's CLAIM script against real servers: a job claimed once per batch.

After a worker's crash, RabbitMQ's redelivery of a job's message and the sweeper's re-publish of
it can reach one consumer's buffer together, so one claim batch can name a job twice. Uses the
shared test servers (skipped if unreachable unless CI=true).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from contract import rabbitmq_store
from contract.support import item
from offload.brokers import Delivery, Settle
from offload.brokers.rabbitmq import RabbitMQBroker
from offload.message import encode_value

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[RabbitMQBroker]:
    url = rabbitmq_store.rabbitmq_url(tmp_path)
    b = RabbitMQBroker(url)
    await b.connect()
    try:
        yield b
    finally:
        await b.close()
        await asyncio.to_thread(rabbitmq_store.cleanup, url)


async def test_a_job_named_twice_in_one_claim_batch_is_leased_once(broker: RabbitMQBroker) -> None:
    [made] = await broker.enqueue([item()])
    reply = await broker._run("CLAIM", [broker.worker_name, made.job_id, made.job_id])

    assert [v[0] for v in reply] == [b"take", b"drop"]
    [stats] = await broker.stats(["default"])
    assert stats.running == 1

    _, queue, body, token, deliveries, attempts, lease = reply[0]
    lease_held = Delivery(
        made.job_id, queue.decode(), body, int(token), int(deliveries), int(attempts), float(lease)
    )
    assert await broker.settle([Settle(lease_held, "ack", result=encode_value(None))]) == [True]
    [stats] = await broker.stats(["default"])
    assert (stats.running, stats.depth) == (0, 0)  # so a burst worker sees the queue idle
