"""Concurrent sends on one event loop share the broker's writes; each keeps its own outcome."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from contract import postgres_store, redis_store
from offload import App, BrokerError, QueueFull

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["sqlite", "redis", "postgres"])
async def app(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[App]:
    """An App on a broker that batches calls: SQLite (one writer operation), Redis (one
    pipeline), PostgreSQL (one transaction)."""
    if request.param == "redis":
        url = redis_store.redis_url(tmp_path)
        request.addfinalizer(lambda: redis_store.cleanup(url))
    elif request.param == "postgres":
        url = postgres_store.postgres_url(tmp_path)
        request.addfinalizer(lambda: postgres_store.drop_schema(url))
    else:
        url = f"sqlite:///{tmp_path / 'offload.db'}"
    a = App(url, name="batching")
    a.queue("small", max_depth=3)

    @a.task(name="t.add")
    def add(x: int, y: int) -> int:
        return x + y

    try:
        yield a
    finally:
        await a.close_async()
        a.close()


async def test_concurrent_sends_share_a_few_writes(app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    broker = await app.broker()
    batches: list[int] = []
    enqueue_calls = broker.enqueue_calls

    async def counting(calls: Any) -> Any:
        batches.append(len(calls))
        return await enqueue_calls(calls)

    monkeypatch.setattr(broker, "enqueue_calls", counting)
    jobs = await asyncio.gather(*(app.tasks["t.add"].send_async(i, 1) for i in range(50)))

    assert len({job.id for job in jobs}) == 50 and all(job.created for job in jobs)
    assert sum(batches) == 50 and len(batches) <= 3  # the first alone at most, then the rest


async def test_each_concurrent_send_gets_its_own_refusal(app: App) -> None:
    add = app.tasks["t.add"].options(queue="small")
    outcomes = await asyncio.gather(*(add.send_async(i, 1) for i in range(5)), return_exceptions=True)

    assert [type(o).__name__ for o in outcomes] == ["Job", "Job", "Job", "QueueFull", "QueueFull"]
    assert all(isinstance(o, QueueFull) and o.queue == "small" for o in outcomes[3:])


async def test_a_send_cancelled_before_its_batch_is_sent_leaves_no_job(app: App) -> None:
    add = app.tasks["t.add"]
    await add.send_async(0, 0)  # connected, and the batcher exists
    kept = asyncio.ensure_future(add.send_async(1, 1))
    dropped = asyncio.ensure_future(add.send_async(2, 2))
    await asyncio.sleep(0)  # both wait for the batch to be handed over
    dropped.cancel()
    job = await kept

    assert dropped.cancelled() and job.created
    [stats] = await (await app.broker()).stats(["default"])
    assert stats.depth == 2


async def test_closing_answers_the_batch_in_flight_and_fails_sends_not_yet_handed_over(app: App) -> None:
    add = app.tasks["t.add"]
    await add.send_async(0, 0)
    first = asyncio.ensure_future(add.send_async(1, 1))
    await asyncio.sleep(0)
    await asyncio.sleep(0)  # the first send's batch is with the broker now
    second = asyncio.ensure_future(add.send_async(2, 2))
    await asyncio.sleep(0)  # the second waits for the first batch to be answered
    await app.close_async()

    assert (await first).created
    with pytest.raises(BrokerError, match="closed before this send was handed to it"):
        await second


async def test_a_send_the_store_rejects_fails_alone_and_its_batch_mates_land(app: App) -> None:
    add = app.tasks["t.add"]
    await add.send_async(0, 0)  # connected, and the batcher exists
    # A NUL in an idempotency key: PostgreSQL's text type refuses it (the other stores take it),
    # which aborts the batch's transaction; the calls then run one by one.
    rejected = app.broker_url.startswith("postgresql")
    sends = [add.options(idempotency_key=key).send_async(1, 1) for key in ("a", "b\x00c", "d", "e")]
    outcomes = await asyncio.gather(*sends, return_exceptions=True)

    errors = [type(o).__name__ for o in outcomes if isinstance(o, BaseException)]
    assert errors == (["BrokerError"] if rejected else [])
    [stats] = await (await app.broker()).stats(["default"])
    assert stats.depth == 1 + len(sends) - len(errors)
