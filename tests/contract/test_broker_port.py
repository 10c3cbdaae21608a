"""Promises 1-4 and 6-7, checked through the broker port itself (no worker)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from offload import JobState, QueueFull
from offload.brokers import Broker, Settle, broker_from_url
from offload.brokers.base import lease_seconds
from offload.message import encode_value

from .support import item, put

# The smallest lease a job can have: timeout + min(5, max(1, timeout)) is just over a second.
TINY_TIMEOUT = 0.05

# A broken promise must fail a test, not hang the suite.
pytestmark = pytest.mark.timeout(30)


async def expire(*leases: float) -> None:
    """Let leases of these lengths (taken just now) run out."""
    await asyncio.sleep(max(leases) + 0.1)


# -- 1. nothing acknowledged is lost ---------------------------------------------------------------


async def test_acknowledged_enqueue_is_durable(broker_url: str) -> None:
    first = broker_from_url(broker_url)
    await first.connect()
    enqueued = await first.enqueue([item(args=(n,), priority=n % 3) for n in range(5)])
    ids = [e.job_id for e in enqueued]
    assert all(e.created for e in enqueued)
    await first.close()

    # A new broker instance on the same store (for SQLite: a new connection to the same file).
    second = broker_from_url(broker_url)
    await second.connect()
    try:
        for n, job_id in enumerate(ids):
            record = await second.get_job(job_id)
            assert record is not None
            assert record.state is JobState.QUEUED
            assert record.args == (n,)
            assert record.task == "contract.noop"
        deliveries = await second.fetch(["default"], 10, 0)
        assert sorted(d.job_id for d in deliveries) == sorted(ids)
    finally:
        await second.close()


# -- 2. at-least-once execution under leases -------------------------------------------------------


async def test_fetch_hands_out_each_job_once_under_a_lease(broker: Broker, broker_url: str) -> None:
    ids = {e.job_id for e in await broker.enqueue([item(args=(n,), timeout=10) for n in range(30)])}
    other = broker_from_url(broker_url)  # a second consumer of the same store
    await other.connect()
    try:
        seen: list[str] = []
        while True:
            batches = await asyncio.gather(
                broker.fetch(["default"], 7, 0),
                other.fetch(["default"], 7, 0),
                broker.fetch(["default"], 3, 0),
                other.fetch(["default"], 3, 0),
            )
            got = [d for batch in batches for d in batch]
            if not got:
                break
            for d in got:
                assert d.deliveries == 1
                assert d.attempts == 0
                assert d.lease_seconds == pytest.approx(lease_seconds(10))
            seen.extend(d.job_id for d in got)
        assert len(seen) == len(set(seen)), "a job was handed to two consumers"
        assert set(seen) == ids
        for job_id in ids:
            record = await broker.get_job(job_id)
            assert record is not None and record.state is JobState.RUNNING
        assert await broker.fetch(["default"], 10, 0) == []
    finally:
        await other.close()


async def test_fetch_with_nothing_ready_returns_empty_after_its_wait(broker: Broker) -> None:
    started = time.monotonic()
    assert await broker.fetch(["default"], 5, 0.2) == []
    assert 0.15 <= time.monotonic() - started < 5


async def test_fetch_wakes_when_a_job_arrives(broker: Broker, broker_url: str) -> None:
    producer = broker_from_url(broker_url)
    await producer.connect()
    try:
        waiting = asyncio.create_task(broker.fetch(["default"], 1, 10))
        await asyncio.sleep(0.1)  # let the consumer start waiting
        started = time.monotonic()
        job_id = await put(producer)
        deliveries = await asyncio.wait_for(waiting, 10)
        assert [d.job_id for d in deliveries] == [job_id]
        # Pushed, not polled: well under the SQLite broker's 0.5s safety re-check, for example.
        assert time.monotonic() - started < 0.3, "a waiting fetch was not woken by the enqueue"
    finally:
        await producer.close()


async def test_waiting_fetch_does_not_spin_on_other_queues_work(broker: Broker) -> None:
    # Ready and delayed jobs in a queue this fetch does not serve must not turn its wait into a
    # busy loop (measured as this process's CPU time over the wait).
    await put(broker, queue="someone-elses")
    await put(broker, queue="someone-elses", eta=time.time() + 60)
    cpu = time.process_time()
    assert await broker.fetch(["mine"], 1, 0.6) == []
    assert time.process_time() - cpu < 0.05, "the waiting fetch busy-looped"


async def test_cancelled_fetch_leaves_no_job_leased(broker: Broker) -> None:
    # A worker told to stop cancels its fetch. Whenever the cancel lands (before, during or after
    # the broker leased jobs), no job may be left leased to nobody until its lease expires.
    ids = {await put(broker, timeout=60) for _ in range(3)}
    for _ in range(5):
        fetching = asyncio.create_task(broker.fetch(["default"], 3, 0))
        await asyncio.sleep(0)  # let the fetch start
        fetching.cancel()
        try:
            held = await fetching  # it finished before the cancel landed: the jobs are ours
        except asyncio.CancelledError:
            held = []
        assert await broker.settle([Settle(d, "release") for d in held]) == [True] * len(held)
        # A cancelled fetch either leased nothing or hands what it leased back at once.
        got = []
        while len(got) < 3:
            batch = await broker.fetch(["default"], 3, 2)
            assert batch, "a cancelled fetch left jobs leased"
            got.extend(batch)
        assert {d.job_id for d in got} == ids
        assert all(d.deliveries == 1 for d in got), "a handed-back delivery was counted"
        assert await broker.settle([Settle(d, "release") for d in got]) == [True] * 3
    # A waiting (not yet leasing) fetch cancels cleanly too, and the broker still works after.
    waiting = asyncio.create_task(broker.fetch(["other"], 1, 10))
    await asyncio.sleep(0.05)
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    job_id = await put(broker, queue="other")
    assert [d.job_id for d in await broker.fetch(["other"], 1, 1)] == [job_id]


async def test_priorities_order_delivery(broker: Broker) -> None:
    # Enqueued one at a time, so "oldest" is well defined among equal priorities.
    names = {}
    for name, priority in [("a", 0), ("b", 5), ("c", 9), ("d", 5), ("e", 0), ("f", 9)]:
        names[await put(broker, args=(name,), priority=priority)] = name
    deliveries = await broker.fetch(["default"], 10, 0)
    assert [names[d.job_id] for d in deliveries] == ["c", "f", "b", "d", "a", "e"]

    # The same order one job at a time, and across queues.
    for name, priority, queue in [("a", 0, "q1"), ("b", 5, "q2"), ("c", 9, "q1"), ("d", 5, "q1")]:
        names[await put(broker, args=(name,), priority=priority, queue=queue)] = name
    order = []
    while deliveries := await broker.fetch(["q1", "q2"], 1, 0):
        order.extend(names[d.job_id] for d in deliveries)
    assert order == ["c", "b", "d", "a"]


async def test_jobs_sent_in_one_batch_are_delivered_in_the_order_sent(broker: Broker) -> None:
    batch = [item(args=(i,)) for i in range(200)]
    enqueued = await broker.enqueue(batch)
    order = []
    while deliveries := await broker.fetch(["default"], 7, 0):
        order.extend(d.job_id for d in deliveries)
    assert order == [e.job_id for e in enqueued]


async def test_delayed_job_is_not_delivered_before_its_eta(broker: Broker) -> None:
    eta = time.time() + 0.4
    delayed = await put(broker, eta=eta)
    assert await broker.fetch(["default"], 5, 0) == []
    record = await broker.get_job(delayed)
    assert record is not None and record.state is JobState.QUEUED
    assert record.run_at == pytest.approx(eta)
    [stats] = await broker.stats(["default"])
    assert (stats.ready, stats.delayed) == (0, 1)

    # A delayed job does not hold back ready ones.
    ready = await put(broker)
    assert [d.job_id for d in await broker.fetch(["default"], 5, 0)] == [ready]

    # The broker holds the eta itself: a waiting fetch gets the job once it is due, not before.
    deliveries = await broker.fetch(["default"], 5, 3)
    assert [d.job_id for d in deliveries] == [delayed]
    assert time.time() >= eta


async def test_expired_lease_makes_job_deliverable_again(broker: Broker) -> None:
    job_id = await put(broker, timeout=TINY_TIMEOUT)
    [first] = await broker.fetch(["default"], 1, 0)
    assert first.lease_seconds == pytest.approx(lease_seconds(TINY_TIMEOUT))
    assert await broker.fetch(["default"], 1, 0) == [], "a leased job was handed out twice"
    taken = time.monotonic()
    # The "worker" holding `first` died: after its lease, the job is handed out again.
    [second] = await broker.fetch(["default"], 1, first.lease_seconds + 3)
    assert time.monotonic() - taken >= first.lease_seconds - 0.1
    assert second.job_id == job_id
    assert second.deliveries == 2
    assert second.token != first.token


# -- 3. fencing --------------------------------------------------------------------------------------


async def test_late_ack_from_expired_lease_is_rejected(broker: Broker) -> None:
    redelivered = await put(broker, timeout=TINY_TIMEOUT)
    expired_only = await put(broker, timeout=TINY_TIMEOUT)
    old = {d.job_id: d for d in await broker.fetch(["default"], 2, 0)}
    await expire(*(d.lease_seconds for d in old.values()))

    # After expiry, before anyone took the job again: the late outcome is refused.
    late = Settle(old[expired_only], "ack", result=encode_value("late"))
    assert await broker.settle([late]) == [False]
    record = await broker.get_job(expired_only)
    assert record is not None and record.state is not JobState.SUCCEEDED and record.result is None

    # After re-delivery: the old token is refused, the new one accepted, and the old one cannot
    # overwrite the newer attempt's result.
    new = {d.job_id: d for d in await broker.fetch(["default"], 2, 0)}
    assert set(new) == {redelivered, expired_only}
    assert await broker.settle([Settle(old[redelivered], "ack", result=encode_value("old"))]) == [False]
    assert await broker.settle([Settle(old[redelivered], "dead", error="old")]) == [False]
    assert await broker.settle([Settle(old[redelivered], "retry", error="old")]) == [False]
    assert await broker.settle([Settle(old[redelivered], "release")]) == [False]
    assert await broker.settle([Settle(new[redelivered], "ack", result=encode_value("new"))]) == [True]
    assert await broker.settle([Settle(old[redelivered], "ack", result=encode_value("old"))]) == [False]
    record = await broker.get_job(redelivered)
    assert record is not None
    assert record.state is JobState.SUCCEEDED and record.result == "new"
    # A settled lease cannot be settled twice either.
    assert await broker.settle([Settle(new[redelivered], "dead", error="again")]) == [False]
    assert await broker.settle([Settle(new[expired_only], "ack", result=encode_value(1))]) == [True]


async def test_extend_renews_a_live_lease(broker: Broker) -> None:
    await put(broker, timeout=TINY_TIMEOUT)
    [d] = await broker.fetch(["default"], 1, 0)
    await asyncio.sleep(d.lease_seconds * 0.6)
    assert await broker.extend([d]) == [True]
    await asyncio.sleep(d.lease_seconds * 0.6)  # past the original lease, inside the renewed one
    assert await broker.fetch(["default"], 1, 0) == [], "a renewed lease expired"
    assert await broker.settle([Settle(d, "ack", result=encode_value(None))]) == [True]
    assert await broker.extend([d]) == [False], "extended a lease that was settled"


async def test_extend_of_lost_lease_returns_false(broker: Broker) -> None:
    await put(broker, timeout=TINY_TIMEOUT)
    await put(broker, timeout=TINY_TIMEOUT)
    old = await broker.fetch(["default"], 2, 0)
    await expire(*(d.lease_seconds for d in old))
    assert await broker.extend(old[:1]) == [False]  # expired, not yet taken again
    new = await broker.fetch(["default"], 2, 0)
    assert len(new) == 2
    assert await broker.extend([*old, *new]) == [False, False, True, True]


# -- 4. poison jobs stop -----------------------------------------------------------------------------


async def test_crash_looping_job_is_dead_lettered_after_max_deliveries_with_reason(broker: Broker) -> None:
    job_id = await put(broker, timeout=TINY_TIMEOUT, max_deliveries=2)
    [first] = await broker.fetch(["default"], 1, 0)  # the worker "crashes": never settles
    [second] = await broker.fetch(["default"], 1, first.lease_seconds + 3)
    assert (second.job_id, second.deliveries) == (job_id, 2)
    await expire(second.lease_seconds)  # crashes again
    assert await broker.fetch(["default"], 1, 0) == [], "delivered past max_deliveries"
    record = await broker.get_job(job_id)
    assert record is not None
    assert record.state is JobState.DEAD
    assert record.deliveries == 2
    assert record.error is not None and "max_deliveries=2" in record.error
    assert [r.id for r in await broker.dead_jobs()] == [job_id]
    [stats] = await broker.stats(["default"])
    assert (stats.ready, stats.running, stats.dead) == (0, 0, 1)


async def test_release_hands_a_job_back_without_counting_the_delivery(broker: Broker) -> None:
    job_id = await put(broker, max_deliveries=1)
    for _ in range(3):
        [d] = await broker.fetch(["default"], 1, 0)
        assert d.deliveries == 1
        assert await broker.settle([Settle(d, "release")]) == [True]
    record = await broker.get_job(job_id)
    assert record is not None and record.state is JobState.QUEUED and record.deliveries == 0


async def test_retry_settle_past_max_deliveries_dead_letters(broker: Broker) -> None:
    job_id = await put(broker, max_deliveries=2)
    [d] = await broker.fetch(["default"], 1, 0)
    assert await broker.settle([Settle(d, "retry", error="ValueError: one", delay=0)]) == [True]
    [d] = await broker.fetch(["default"], 1, 0)
    assert await broker.settle([Settle(d, "retry", error="ValueError: two", delay=0)]) == [True]
    record = await broker.get_job(job_id)
    assert record is not None and record.state is JobState.DEAD
    assert record.attempts == 2
    assert record.error is not None and "ValueError: two" in record.error


async def test_retry_settle_delays_the_next_delivery(broker: Broker) -> None:
    await put(broker)
    [d] = await broker.fetch(["default"], 1, 0)
    assert await broker.settle([Settle(d, "retry", error="E", delay=0.3)]) == [True]
    assert await broker.fetch(["default"], 1, 0) == []
    [stats] = await broker.stats(["default"])
    assert stats.delayed == 1
    [again] = await broker.fetch(["default"], 1, 3)
    assert (again.deliveries, again.attempts) == (2, 1)


# -- 5. the dead-letter queue (port level) -----------------------------------------------------------


async def test_dlq_list_replay_purge(broker: Broker) -> None:
    a = await put(broker, queue="q1")
    b = await put(broker, queue="q1")
    c = await put(broker, queue="q2")
    for d in await broker.fetch(["q1", "q2"], 3, 0):
        assert await broker.settle([Settle(d, "dead", error=f"broken {d.job_id}")]) == [True]

    dead = await broker.dead_jobs()
    assert {r.id for r in dead} == {a, b, c}
    assert all(r.state is JobState.DEAD and r.error == f"broken {r.id}" for r in dead)
    assert {r.id for r in await broker.dead_jobs(queue="q1")} == {a, b}
    assert len(await broker.dead_jobs(limit=1)) == 1

    assert await broker.replay_dead([a]) == 1
    record = await broker.get_job(a)
    assert record is not None
    assert (record.state, record.deliveries, record.attempts) == (JobState.QUEUED, 0, 0)
    assert [d.job_id for d in await broker.fetch(["q1"], 5, 0)] == [a]

    assert await broker.purge_dead([b]) == 1
    assert await broker.get_job(b) is None
    assert await broker.replay_dead(queue="q2") == 1
    assert await broker.purge_dead() == 0
    assert await broker.dead_jobs() == []


async def test_purge_deletes_waiting_jobs_only(broker: Broker) -> None:
    running = await put(broker)
    await broker.fetch(["default"], 1, 0)
    waiting = [await put(broker), await put(broker, eta=time.time() + 60)]
    assert await broker.purge("default") == 2
    assert all([await broker.get_job(j) is None for j in waiting])
    assert await broker.get_job(running) is not None


# -- 6. bounded queues --------------------------------------------------------------------------------


async def test_bounded_queue_refuses_a_batch_all_or_nothing(broker: Broker) -> None:
    await broker.declare_queue("small", 3)
    await broker.enqueue([item(queue="small") for _ in range(2)])
    with pytest.raises(QueueFull) as caught:
        await broker.enqueue([item(queue="small") for _ in range(2)])
    assert (caught.value.depth, caught.value.max_depth, caught.value.queue) == (2, 3, "small")
    [stats] = await broker.stats(["small"])
    assert (stats.depth, stats.max_depth) == (2, 3)
    # Delayed jobs count against the bound too.
    await broker.enqueue([item(queue="small", eta=time.time() + 60)])
    with pytest.raises(QueueFull):
        await broker.enqueue([item(queue="small")])
    # Running jobs do not: taking one makes room.
    await broker.fetch(["small"], 2, 0)
    await broker.enqueue([item(queue="small")])
    # An idempotent duplicate of an accepted job is not new work: it is answered, not refused.
    [kept] = await broker.enqueue([item(queue="small", idempotency_key="once")])
    [again] = await broker.enqueue([item(queue="small", idempotency_key="once")])
    assert (again.job_id, again.created) == (kept.job_id, False)
    # Raising the bound (or removing it) applies at once.
    await broker.declare_queue("small", None)
    await broker.enqueue([item(queue="small") for _ in range(10)])


# -- 7. idempotent enqueue (port level) --------------------------------------------------------------


async def test_idempotency_key_deduplicates_within_one_batch(broker: Broker) -> None:
    results = await broker.enqueue([item(idempotency_key="k"), item(idempotency_key="k"), item()])
    assert results[0].created and not results[1].created and results[2].created
    assert results[1].job_id == results[0].job_id
    [stats] = await broker.stats(["default"])
    assert stats.ready == 2


# -- stats and job records -----------------------------------------------------------------------------


async def test_stats_counts_and_drain_rate(broker: Broker) -> None:
    await broker.declare_queue("stats", 100)
    ids = [await put(broker, queue="stats") for _ in range(4)]
    await put(broker, queue="stats", eta=time.time() + 60)
    taken = await broker.fetch(["stats"], 2, 0)
    [stats] = await broker.stats(["stats"])
    assert (stats.ready, stats.delayed, stats.running, stats.dead) == (2, 1, 2, 0)
    assert stats.depth == 3 and stats.max_depth == 100

    assert await broker.settle([Settle(taken[0], "ack", result=encode_value(1))]) == [True]
    assert await broker.settle([Settle(taken[1], "dead", error="E")]) == [True]
    [stats] = await broker.stats(["stats"])
    assert (stats.ready, stats.delayed, stats.running, stats.dead) == (2, 1, 0, 1)
    assert stats.drain_rate > 0
    assert "stats" in [s.queue for s in await broker.stats()]
    [unknown] = await broker.stats(["never-used"])
    assert (unknown.ready, unknown.delayed, unknown.running, unknown.dead) == (0, 0, 0, 0)
    assert unknown.drain_rate == 0

    record = await broker.get_job(ids[0])
    assert record is not None and record.queue == "stats"


async def test_get_job_of_unknown_id_is_none(broker: Broker) -> None:
    assert await broker.get_job("0" * 32) is None
    assert await broker.cancel("0" * 32) is False
    started = time.monotonic()
    assert await broker.wait_job("0" * 32, 5) is None
    assert time.monotonic() - started < 1


async def test_job_record_keeps_the_send_options(broker: Broker) -> None:
    """The DLQ scan finds a dead job's webhook in its record's options."""
    job_id = await put(broker, options={"webhook": "https://example.com/hook"})
    [delivery] = await broker.fetch(["default"], 1, wait=1.0)
    await broker.settle([Settle(delivery, "dead", error="boom")])
    [dead] = await broker.dead_jobs("default")
    assert dead.id == job_id and dead.options == {"webhook": "https://example.com/hook"}


async def test_enqueue_calls_keeps_each_call_all_or_nothing(broker: Broker) -> None:
    """Several calls at once (how App sends concurrent sends), applied in order, each whole."""
    await broker.declare_queue("calls", 3)
    pair, pair2, single = (
        [item(queue="calls") for _ in range(2)],
        [item(queue="calls") for _ in range(2)],
        [item(queue="calls")],
    )
    outcomes = await broker.enqueue_calls([pair, pair2, [], single])

    assert isinstance(outcomes[0], list) and all(e.created for e in outcomes[0])
    assert isinstance(outcomes[1], QueueFull)  # 2 + 2 > 3: refused whole, and the rest go on
    assert outcomes[2] == []
    assert isinstance(outcomes[3], list) and outcomes[3][0].created
    [stats] = await broker.stats(["calls"])
    assert stats.depth == 3
