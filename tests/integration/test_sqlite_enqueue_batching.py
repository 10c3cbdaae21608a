"""Concurrent enqueues on one event loop share a write, but each stays all-or-nothing on its own."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from offload.brokers.sqlite import SqliteBroker
from offload.errors import BrokerError, QueueFull
from offload.message import Message, encode, new_job_id

pytestmark = pytest.mark.timeout(60)


def item(queue: str = "default", key: str | None = None) -> tuple[Message, bytes]:
    m = Message(id=new_job_id(), task="t", queue=queue, created_at=time.time(), idempotency_key=key)
    return m, encode(m)


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[SqliteBroker]:
    b = SqliteBroker(f"sqlite:///{tmp_path / 'offload.db'}")
    await b.connect()
    try:
        yield b
    finally:
        await b.close()


async def test_concurrent_sends_to_a_bounded_queue_are_refused_whole_and_only_past_the_bound(
    broker: SqliteBroker,
) -> None:
    await broker.declare_queue("small", 5)
    calls = [[item("small"), item("small")] for _ in range(4)]  # 8 jobs offered, room for 5
    results = await asyncio.gather(*(broker.enqueue(c) for c in calls), return_exceptions=True)

    accepted = [r for r in results if isinstance(r, list)]
    refused = [r for r in results if isinstance(r, QueueFull)]
    assert len(accepted) == 2 and len(refused) == 2  # calls 1-2 fit (4 jobs); a third would make 6
    assert [isinstance(r, list) for r in results] == [True, True, False, False]  # in call order
    assert refused[0].depth == 4 and refused[0].max_depth == 5
    [stats] = [s for s in await broker.stats() if s.queue == "small"]
    assert stats.depth == 4  # nothing of a refused call was written


async def test_a_refused_call_does_not_stop_a_later_call_that_fits(broker: SqliteBroker) -> None:
    await broker.declare_queue("small", 3)
    big, small = [item("small") for _ in range(4)], [item("small")]
    results = await asyncio.gather(broker.enqueue(big), broker.enqueue(small), return_exceptions=True)

    assert isinstance(results[0], QueueFull)
    assert isinstance(results[1], list) and results[1][0].created
    [stats] = [s for s in await broker.stats() if s.queue == "small"]
    assert stats.depth == 1


async def test_idempotency_key_sent_by_two_concurrent_calls_makes_one_job(broker: SqliteBroker) -> None:
    first, second = await asyncio.gather(
        broker.enqueue([item(key="order-7")]), broker.enqueue([item(key="order-7")])
    )

    assert first[0].created and not second[0].created
    assert second[0].job_id == first[0].job_id


async def test_key_of_a_refused_call_is_not_held(broker: SqliteBroker) -> None:
    await broker.declare_queue("small", 1)
    results = await asyncio.gather(
        broker.enqueue([item("small", key="k"), item("small")]),  # refused: 2 > 1
        broker.enqueue([item("small", key="k")]),
        return_exceptions=True,
    )

    assert isinstance(results[0], QueueFull)
    assert isinstance(results[1], list) and results[1][0].created  # the key was free to take


async def test_send_cancelled_before_its_write_leaves_no_job(broker: SqliteBroker) -> None:
    kept = asyncio.ensure_future(broker.enqueue([item()]))
    dropped = asyncio.ensure_future(broker.enqueue([item()]))
    await asyncio.sleep(0)  # both are waiting for the shared write to be handed over
    dropped.cancel()
    [enqueued] = await kept

    assert dropped.cancelled()
    assert await broker.get_job(enqueued.job_id) is not None
    [stats] = [s for s in await broker.stats() if s.queue == "default"]
    assert stats.depth == 1


async def test_close_finishes_the_write_in_flight_and_fails_sends_not_yet_handed_over(
    tmp_path: Path,
) -> None:
    broker = SqliteBroker(f"sqlite:///{tmp_path / 'offload.db'}")
    await broker.connect()
    first = asyncio.ensure_future(broker.enqueue([item()]))
    await asyncio.sleep(0)
    await asyncio.sleep(0)  # the first send is with the writer now
    second = asyncio.ensure_future(broker.enqueue([item()]))
    await asyncio.sleep(0)  # the second waits for the first to be answered
    await broker.close()

    assert (await first)[0].created
    with pytest.raises(BrokerError, match="closed before this enqueue was written"):
        await second
