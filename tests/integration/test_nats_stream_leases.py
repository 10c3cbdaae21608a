"""transport=stream against the shared NATS server: the ready message is the lease on the stream's
side. It stays un-acked while its job runs, in-progress acks keep it, JetStream's redelivery after
ack_wait brings back the job of a worker that went silent, and MaxDeliver ends in the DLQ.

A worker "dies" here by losing its in-progress acks without a nak, as a SIGKILL or a cut link
makes it (`_go_silent`); the broker object stays connected, so its late settle can be sent.
The server is OFFLOAD_TEST_NATS_URL (default nats://127.0.0.1:4222; skipped if unreachable unless
CI=true). Each test has buckets of its own, deleted afterwards with the contract tests' cleanup.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.js import errors as js_errors

from contract import nats_store
from offload import JobState
from offload.brokers import Delivery, Settle
from offload.brokers import nats_keys as k
from offload.brokers.nats import NatsBroker
from offload.message import Message, encode, encode_value, new_job_id

pytestmark = pytest.mark.timeout(60)

ACK_WAIT = 1.0  # the consumers' ack wait in these tests (the default is 2 s)


@pytest.fixture
def app_url(tmp_path: Path) -> Iterator[str]:
    url = nats_store.nats_url(tmp_path)
    yield url
    nats_store.cleanup(url)


@pytest.fixture
async def connect(app_url: str) -> AsyncIterator[Callable[..., Awaitable[NatsBroker]]]:
    """Brokers (worker processes) on the test's bucket, transport=stream, ack_wait=1 s."""
    made: list[NatsBroker] = []

    async def make(options: str = "") -> NatsBroker:
        b = NatsBroker(f"{app_url}&transport=stream&ack_wait={ACK_WAIT}{options}")
        await b.connect()
        made.append(b)
        return b

    try:
        yield make
    finally:
        for b in made:
            await b.close()


def _job(timeout: float, max_deliveries: int = 5) -> tuple[Message, bytes]:
    message = Message(
        id=new_job_id(),
        task="quick",
        timeout=timeout,  # the lease: timeout + min(5, max(1, timeout))
        max_deliveries=max_deliveries,
        created_at=time.time(),
    )
    return message, encode(message)


def _go_silent(broker: NatsBroker) -> None:
    """The worker process dies (or its link is cut): no more in-progress acks, no nak."""
    if broker._keeper is not None:
        broker._keeper.cancel()
    broker._held.clear()


def _held_seq(broker: NatsBroker, d: Delivery) -> tuple[int, int]:
    """(stream sequence, delivery count) of the ready message the broker holds for `d`."""
    metadata = broker._held[(d.job_id, d.token)].msg.metadata
    return metadata.sequence.stream, metadata.num_delivered


async def _consumer(broker: NatsBroker) -> Any:
    assert broker._js is not None
    name = k.consumer_name("default", k.prio_token(0))
    return await broker._js.consumer_info(broker._ready_stream, name)


async def _stream_messages(broker: NatsBroker) -> int:
    assert broker._js is not None
    return int((await broker._js.stream_info(broker._ready_stream)).state.messages)


async def _eventually(check: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, f"{what}: not within {within}s"
        await asyncio.sleep(0.05)


async def test_consumers_have_the_ack_wait_and_max_deliver_of_the_url(
    connect: Callable[..., Awaitable[NatsBroker]],
) -> None:
    broker = await connect("&max_deliver=7")
    await broker.enqueue([_job(1.0)])
    config = (await _consumer(broker)).config
    assert (config.ack_wait, config.max_deliver, config.ack_policy) == (ACK_WAIT, 7, "explicit")


async def test_a_held_jobs_message_is_redelivered_by_jetstream_after_ack_wait_when_its_worker_goes_silent_and_the_late_settle_is_refused(  # noqa: E501
    connect: Callable[..., Awaitable[NatsBroker]],
) -> None:
    first, second = await connect(), await connect()
    [sent] = await first.enqueue([_job(1.0)])  # a 2 s lease
    [d1] = await first.fetch(["default"], 1, 0)
    taken = time.monotonic()
    seq, _ = _held_seq(first, d1)
    # The message stays in the stream, un-acked, while the job runs.
    assert (await _consumer(first)).num_ack_pending == 1
    assert await _stream_messages(first) == 1

    _go_silent(first)
    [d2] = await second.fetch(["default"], 1, 10)
    back_after = time.monotonic() - taken
    assert (d2.job_id, d2.deliveries) == (sent.job_id, 2)
    assert d2.token != d1.token
    assert back_after >= d1.lease_seconds - 0.1, "taken over before the lease ran out"
    assert back_after < d1.lease_seconds + ACK_WAIT + 2
    # JetStream redelivered the same message (no new one was published for the job).
    again, delivered = _held_seq(second, d2)
    assert again == seq and delivered >= 2

    # The silent worker's late outcome is refused, and does not touch the message.
    assert await first.settle([Settle(d1, "ack", result=encode_value("late"))]) == [False]
    assert await first.extend([d1]) == [False]
    assert (await _consumer(first)).num_ack_pending == 1

    assert await second.settle([Settle(d2, "ack", result=encode_value("new"))]) == [True]
    info = await second.get_job(sent.job_id)
    assert info is not None and (info.state, info.result) == (JobState.SUCCEEDED, "new")

    async def gone() -> bool:
        return await _stream_messages(second) == 0

    await _eventually(gone, 5, "the settled job's message left the stream")


async def test_extend_keeps_a_job_past_ack_wait_without_redelivery(
    connect: Callable[..., Awaitable[NatsBroker]],
) -> None:
    worker, other = await connect(), await connect()
    await worker.enqueue([_job(5.0)])  # a 10 s lease
    [d] = await worker.fetch(["default"], 1, 0)
    # Only extend() speaks for the job now: the broker's own in-progress acks are stopped.
    assert worker._keeper is not None
    worker._keeper.cancel()
    for _ in range(7):  # 3.5 s: three and a half ack waits
        await asyncio.sleep(0.5)
        assert await worker.extend([d]) == [True]
        assert await other.fetch(["default"], 1, 0) == []
    consumer = await _consumer(worker)
    assert consumer.delivered.consumer_seq == 1, "the message was redelivered"
    assert (consumer.num_ack_pending, consumer.num_redelivered) == (1, 0)
    assert await worker.settle([Settle(d, "ack", result=encode_value(None))]) == [True]


async def test_a_job_running_past_ack_wait_keeps_its_message_while_its_lease_is_live(
    connect: Callable[..., Awaitable[NatsBroker]],
) -> None:
    """Between extends (a lease is renewed once a third of it has passed, here every 3.3 s),
    the broker's own in-progress acks keep the message."""
    worker, other = await connect(), await connect()
    await worker.enqueue([_job(5.0)])  # a 10 s lease
    [d] = await worker.fetch(["default"], 1, 0)
    for _ in range(7):
        await asyncio.sleep(0.5)
        assert await other.fetch(["default"], 1, 0) == []
    consumer = await _consumer(worker)
    assert consumer.delivered.consumer_seq == 1, "the message was redelivered"
    assert consumer.num_ack_pending == 1
    assert await worker.settle([Settle(d, "ack", result=encode_value(None))]) == [True]


async def test_a_job_delivered_max_deliveries_times_lands_in_the_dlq_with_a_clear_error_and_its_message_leaves_the_stream(  # noqa: E501
    connect: Callable[..., Awaitable[NatsBroker]],
) -> None:
    a, b, c = await connect(), await connect(), await connect()
    [sent] = await a.enqueue([_job(0.05, max_deliveries=2)])  # a lease of just over 1 s
    [d1] = await a.fetch(["default"], 1, 0)
    seq, _ = _held_seq(a, d1)
    assert (await _consumer(a)).num_ack_pending == 1  # un-acked while the job runs
    _go_silent(a)
    [d2] = await b.fetch(["default"], 1, 10)  # redelivered: taken over
    assert (d2.job_id, d2.deliveries, _held_seq(b, d2)[0]) == (sent.job_id, 2, seq)
    _go_silent(b)

    async def dead() -> bool:
        assert await c.fetch(["default"], 1, 0.2) == [], "delivered past max_deliveries"
        info = await c.get_job(sent.job_id)
        return info is not None and info.state is JobState.DEAD

    await _eventually(dead, 15, "the job to be dead-lettered")
    info = await c.get_job(sent.job_id)
    assert info is not None and info.deliveries == 2
    assert info.error is not None
    assert "delivered 2 times without being settled (max_deliveries=2)" in info.error
    assert [j.id for j in await c.dead_jobs()] == [sent.job_id]
    [stats] = await c.stats(["default"])
    assert (stats.ready, stats.running, stats.dead) == (0, 0, 1)
    assert await _stream_messages(c) == 0  # terminated: JetStream dropped it
    assert (await _consumer(c)).num_ack_pending == 0


async def _exhaust_the_message(
    connect: Callable[..., Awaitable[NatsBroker]],
) -> tuple[NatsBroker, NatsBroker, NatsBroker, Any, Delivery, Delivery, int]:
    """Three brokers whose consumers have max_deliver=2, and a job (max_deliveries 5) whose
    message the first two took in turn and went silent with: JetStream will not deliver it
    again. Returns (a, b, c, the job as enqueued, a's delivery, b's delivery, the message's
    stream sequence)."""
    a, b, c = [await connect("&max_deliver=2") for _ in range(3)]
    [sent] = await a.enqueue([_job(0.05, max_deliveries=5)])
    [d1] = await a.fetch(["default"], 1, 0)
    _go_silent(a)
    [d2] = await b.fetch(["default"], 1, 10)  # the message's second (and last) delivery
    assert d2.deliveries == 2
    seq, _ = _held_seq(b, d2)
    _go_silent(b)
    return a, b, c, sent, d1, d2, seq


async def test_the_servers_max_deliver_advisory_dead_letters_the_job(
    connect: Callable[..., Awaitable[NatsBroker]],
) -> None:
    """The consumers' max_deliver (here 2) is reached before the job's max_deliveries (5): the
    server will not deliver the message again and says so in an advisory; the job is
    dead-lettered and the message deleted, so nothing stays un-acked for ever."""
    a, b, c, sent, d1, d2, _ = await _exhaust_the_message(connect)

    async def dead() -> bool:
        assert await c.fetch(["default"], 1, 0.2) == []
        info = await c.get_job(sent.job_id)
        return info is not None and info.state is JobState.DEAD

    await _eventually(dead, 15, "the job to be dead-lettered")
    info = await c.get_job(sent.job_id)
    assert info is not None and info.error is not None
    assert "max_deliver (2 deliveries of it)" in info.error, info.error
    assert info.deliveries == 2 < info.max_deliveries
    assert [j.id for j in await c.dead_jobs()] == [sent.job_id]

    async def gone() -> bool:
        return await _stream_messages(c) == 0

    await _eventually(gone, 5, "the exhausted message deleted")
    assert await a.settle([Settle(d1, "ack")]) == [False]
    assert await b.settle([Settle(d2, "ack")]) == [False]


async def test_a_job_left_running_whose_message_is_gone_is_recovered_by_maintenance(
    connect: Callable[..., Awaitable[NatsBroker]],
) -> None:
    """The last resort: the message that would bring the job back is lost (as with a crashed
    server): maintenance requeues the job once its lease has long run out."""
    worker, other = await connect(), await connect()
    [sent] = await worker.enqueue([_job(0.05)])
    [d1] = await worker.fetch(["default"], 1, 0)
    seq, _ = _held_seq(worker, d1)
    _go_silent(worker)
    assert worker._js is not None
    await worker._js.delete_msg(worker._ready_stream, seq)
    other.rescue_after = 0.5  # instead of ack_wait + 30 s
    [d2] = await other.fetch(["default"], 1, 15)
    assert (d2.job_id, d2.deliveries) == (sent.job_id, 2)
    assert await worker.settle([Settle(d1, "ack")]) == [False]
    assert await other.settle([Settle(d2, "ack")]) == [True]


async def test_a_job_whose_max_deliver_advisory_was_missed_is_recovered_by_maintenance(
    connect: Callable[..., Awaitable[NatsBroker]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last resort again, for the other way a job is left running: its message reached the
    consumers' max_deliver (2, below the job's max_deliveries of 5), so JetStream will not
    deliver it again, and the advisory that would have said so was missed (no process was
    subscribed at that moment). Maintenance requeues the job with a new message once its lease
    has long run out, and deletes the exhausted one."""

    async def missed(self: NatsBroker, msg: Any) -> None:
        return None  # the advisory never arrives

    monkeypatch.setattr(NatsBroker, "_on_max_deliveries", missed)
    a, b, c, sent, d1, d2, exhausted = await _exhaust_the_message(connect)
    c.rescue_after = 0.5  # instead of ack_wait + 30 s
    [d3] = await c.fetch(["default"], 1, 15)
    assert (d3.job_id, d3.deliveries) == (sent.job_id, 3)
    assert c._js is not None
    with pytest.raises(js_errors.NotFoundError):
        await c._js.get_msg(c._ready_stream, exhausted)  # deleted with the rescue
    assert await a.settle([Settle(d1, "ack")]) == [False]
    assert await b.settle([Settle(d2, "ack")]) == [False]
    assert await c.settle([Settle(d3, "ack")]) == [True]
    info = await c.get_job(sent.job_id)
    assert info is not None and info.state is JobState.SUCCEEDED
