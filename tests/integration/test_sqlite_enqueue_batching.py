"""Several enqueue calls in one SQLite write: each call stays all-or-nothing on its own."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from offload.brokers.sqlite import SqliteBroker
from offload.errors import QueueFull
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


async def depth(broker: SqliteBroker, queue: str) -> int:
    [stats] = [s for s in await broker.stats() if s.queue == queue]
    return stats.depth


async def test_calls_to_a_bounded_queue_are_refused_whole_and_only_past_the_bound(
    broker: SqliteBroker,
) -> None:
    await broker.declare_queue("small", 5)
    calls = [[item("small"), item("small")] for _ in range(4)]  # 8 jobs offered, room for 5
    outcomes = await broker.enqueue_calls(calls)

    assert [isinstance(o, list) for o in outcomes] == [True, True, False, False]  # in call order
    refused = outcomes[2]
    assert isinstance(refused, QueueFull) and (refused.depth, refused.max_depth) == (4, 5)
    assert await depth(broker, "small") == 4  # nothing of a refused call was written


async def test_a_refused_call_does_not_stop_a_later_call_that_fits(broker: SqliteBroker) -> None:
    await broker.declare_queue("small", 3)
    big, small = [item("small") for _ in range(4)], [item("small")]
    outcomes = await broker.enqueue_calls([big, small])

    assert isinstance(outcomes[0], QueueFull)
    assert isinstance(outcomes[1], list) and outcomes[1][0].created
    assert await depth(broker, "small") == 1


async def test_idempotency_key_sent_by_two_calls_makes_one_job(broker: SqliteBroker) -> None:
    first, second = await broker.enqueue_calls([[item(key="order-7")], [item(key="order-7")]])

    assert isinstance(first, list) and isinstance(second, list)
    assert first[0].created and not second[0].created
    assert second[0].job_id == first[0].job_id


async def test_key_of_a_refused_call_is_not_held(broker: SqliteBroker) -> None:
    await broker.declare_queue("small", 1)
    outcomes = await broker.enqueue_calls(
        [[item("small", key="k"), item("small")], [item("small", key="k")]]  # the first: 2 > 1
    )

    assert isinstance(outcomes[0], QueueFull)
    assert isinstance(outcomes[1], list) and outcomes[1][0].created  # the key was free to take


async def test_many_rows_are_inserted_in_chunks_and_keep_their_order(broker: SqliteBroker) -> None:
    items = [item() for _ in range(200)]  # 64 + 64 + 64 + 8: every statement size is used
    [outcome] = await broker.enqueue_calls([items])

    assert isinstance(outcome, list) and [e.job_id for e in outcome] == [m.id for m, _ in items]
    deliveries = await broker.fetch(["default"], 200, wait=0)
    assert [d.job_id for d in deliveries] == [m.id for m, _ in items]  # FIFO within the batch
