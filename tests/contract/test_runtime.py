"""Promises kept by the runtime on top of each broker: an App sends, an in-process Worker runs.

Workers run in burst mode (they return once their queues hold nothing waiting or running), so
no test sleeps to wait for work.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import Any

import msgspec
import pytest

from offload import (
    App,
    EncodeError,
    JobFailed,
    JobNotFound,
    JobState,
    NonRetryable,
    QueueFull,
    Retry,
)
from offload.brokers import base
from offload.worker import Worker

from .support import RUN_LIMIT, drain, info, message

# -- 2. at-least-once: the runtime renews leases ---------------------------------------------------

# A broken promise must fail a test, not hang the suite.
pytestmark = pytest.mark.timeout(30)


async def test_worker_renews_leases_of_long_running_jobs(app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    # A job without a timeout gets the default lease; shrink it so the job outlives it
    # twice over. Without renewal the job would be handed out again (the worker has a free slot
    # and keeps fetching) and its ack refused.
    monkeypatch.setattr(base, "DEFAULT_LEASE", 0.6)
    runs: list[float] = []

    @app.task(timeout=None)
    async def long_running() -> str:
        runs.append(time.monotonic())
        await asyncio.sleep(1.3)
        return "done"

    job = await long_running.send_async()
    await drain(app, concurrency=2)
    assert len(runs) == 1, "the job was delivered twice: its lease was not renewed"
    record = await info(app, job.id)
    assert record.state is JobState.SUCCEEDED and record.deliveries == 1
    assert await job.wait(1) == "done"


# -- 5. retries ------------------------------------------------------------------------------------


async def test_successful_job_stores_its_result(app: App) -> None:
    @app.task
    def add(a: int, b: int) -> int:
        return a + b

    @app.task
    async def greet(name: str, *, punctuation: str = "!") -> dict[str, Any]:
        return {"greeting": f"hello {name}{punctuation}"}

    jobs = [await add.send_async(2, 3), await greet.send_async("ann", punctuation="?")]
    await drain(app)
    assert await jobs[0].wait(1) == 5
    assert await jobs[1].wait(1) == {"greeting": "hello ann?"}
    record = await jobs[0].info_async()
    assert (record.state, record.deliveries, record.attempts, record.error) == (
        JobState.SUCCEEDED,
        1,
        0,
        None,
    )
    assert record.started_at is not None and record.finished_at is not None


async def test_result_is_converted_to_the_annotated_return_type(app: App) -> None:
    @app.task
    def stamp(year: int) -> dt.datetime:
        return dt.datetime(year, 1, 2, tzinfo=dt.UTC)

    job = await stamp.send_async(2030)
    await drain(app)
    assert await job.wait(1) == dt.datetime(2030, 1, 2, tzinfo=dt.UTC)
    assert await app.job(job.id).wait(1) == "2030-01-02T00:00:00Z"  # untyped handle: the JSON


async def test_retries_use_backoff_then_dead_letter(app: App) -> None:
    runs: list[float] = []

    @app.task(retries=2, backoff=0.05, backoff_max=0.1)
    def flaky() -> None:
        runs.append(time.monotonic())
        raise ValueError(f"boom {len(runs)}")

    job = await flaky.send_async()
    await drain(app)
    assert len(runs) == 3  # the first run and two retries
    record = await job.info_async()
    assert record.state is JobState.DEAD
    assert (record.deliveries, record.attempts) == (3, 3)
    assert record.error is not None and "retries exhausted" in record.error and "boom 3" in record.error
    assert [r.id for r in await (await app.broker()).dead_jobs()] == [job.id]
    with pytest.raises(JobFailed, match="dead"):
        await job.wait(1)


async def test_failed_job_that_recovers_succeeds_on_retry(app: App) -> None:
    runs = []

    @app.task(retries=3, backoff=0.01)
    def recovers() -> str:
        runs.append(1)
        if len(runs) < 3:
            raise ConnectionError("not yet")
        return "ok"

    job = await recovers.send_async()
    await drain(app)
    assert await job.wait(1) == "ok"
    record = await job.info_async()
    assert (record.deliveries, record.attempts) == (3, 2)


async def test_retry_exception_sets_delay(app: App) -> None:
    runs: list[float] = []

    @app.task(retries=3, backoff=0.0)  # without Retry(delay=...) a retry would be immediate
    async def later() -> int:
        runs.append(time.monotonic())
        if len(runs) == 1:
            raise Retry(delay=0.4, reason="upstream busy")
        return len(runs)

    job = await later.send_async()
    await drain(app)
    assert await job.wait(1) == 2
    assert runs[1] - runs[0] >= 0.38


async def test_non_retryable_error_goes_straight_to_dlq(app: App) -> None:
    runs = []

    @app.task(retries=5, backoff=0.0)
    def reject(payload: str) -> None:
        runs.append(payload)
        raise NonRetryable(f"invalid payload {payload!r}")

    job = await reject.send_async("x")
    await drain(app)
    assert runs == ["x"]
    record = await job.info_async()
    assert record.state is JobState.DEAD and record.attempts == 1
    assert record.error is not None and "invalid payload 'x'" in record.error


async def test_dont_retry_on_errors_are_dead_lettered_at_once(app: App) -> None:
    runs = []

    @app.task(retries=5, backoff=0.0, dont_retry_on=(KeyError,))
    def lookup() -> None:
        runs.append(1)
        raise KeyError("missing")

    job = await lookup.send_async()
    await drain(app)
    assert len(runs) == 1
    record = await job.info_async()
    assert record.state is JobState.DEAD
    assert record.error is not None and "KeyError" in record.error


async def test_retry_on_limits_which_errors_are_retried(app: App) -> None:
    runs: dict[str, int] = {"network": 0, "bug": 0}

    @app.task(retries=5, backoff=0.0, retry_on=(ConnectionError,))
    def network() -> str:
        runs["network"] += 1
        if runs["network"] < 3:
            raise ConnectionError("reset")
        return "ok"

    @app.task(retries=5, backoff=0.0, retry_on=(ConnectionError,))
    def bug() -> None:
        runs["bug"] += 1
        raise ValueError("a bug, not an outage")

    ok, bad = await network.send_async(), await bug.send_async()
    await drain(app)
    assert await ok.wait(1) == "ok"
    assert runs == {"network": 3, "bug": 1}
    record = await bad.info_async()
    assert record.state is JobState.DEAD
    assert record.error is not None and "ValueError" in record.error and "not retried" in record.error


async def test_retry_deadline(app: App) -> None:
    runs = []

    @app.task(retries=100, backoff=0.0, retry_deadline=0.5)
    async def slowly_failing() -> None:
        runs.append(1)
        raise Retry(delay=0.2)

    job = await slowly_failing.send_async()
    started = time.monotonic()
    await drain(app)
    # Retries at about 0.2s and 0.4s fit the deadline; one at 0.6s would not.
    assert 2 <= len(runs) <= 3
    assert time.monotonic() - started < 2
    record = await job.info_async()
    assert record.state is JobState.DEAD
    assert record.error is not None and "deadline" in record.error


async def test_retries_never_pass_max_deliveries(app: App) -> None:
    runs = []

    @app.task(retries=10, backoff=0.0, max_deliveries=2)
    def failing() -> None:
        runs.append(1)
        raise RuntimeError("again")

    job = await failing.send_async()
    await drain(app)
    assert len(runs) == 2
    record = await job.info_async()
    assert record.state is JobState.DEAD
    assert record.error is not None and "max_deliveries" in record.error


async def test_task_timeout_fails_the_attempt(app: App) -> None:
    @app.task(timeout=0.1, retries=0)
    async def stuck() -> None:
        await asyncio.sleep(10)

    job = await stuck.send_async()
    started = time.monotonic()
    await drain(app)
    assert time.monotonic() - started < 3
    record = await job.info_async()
    assert record.state is JobState.DEAD
    assert record.error is not None and "TaskTimeout" in record.error


# -- 5. the dead-letter queue ----------------------------------------------------------------------


async def test_dlq_list_replay_and_purge_through_a_worker(app: App) -> None:
    fixed: set[int] = set()

    @app.task(retries=0)
    def fragile(n: int) -> int:
        if n not in fixed:
            raise ValueError(f"cannot handle {n} yet")
        return n

    jobs = [await fragile.send_async(n) for n in (1, 2)]
    await drain(app)
    broker = await app.broker()
    dead = await broker.dead_jobs()
    assert {r.id for r in dead} == {j.id for j in jobs}
    assert all(r.error is not None and "cannot handle" in r.error for r in dead)

    fixed.add(1)  # "deploy the fix", then replay the one job and purge the other
    assert await broker.replay_dead([jobs[0].id]) == 1
    assert await broker.purge_dead([jobs[1].id]) == 1
    await drain(app)
    assert await jobs[0].wait(1) == 1
    with pytest.raises(JobNotFound):
        await jobs[1].info_async()
    assert await (await app.broker()).dead_jobs() == []


# -- 6. bounded queues -----------------------------------------------------------------------------


async def test_bounded_queue_raises_queue_full_with_depth_and_estimated_wait_and_drops_nothing(
    app: App,
) -> None:
    app.queue("bounded", max_depth=3)

    @app.task(queue="bounded")
    def work(n: int) -> int:
        return n * 10

    accepted = [await work.send_async(n) for n in range(3)]
    with pytest.raises(QueueFull) as caught:
        await work.send_async(99)
    full = caught.value
    assert (full.queue, full.depth, full.max_depth) == ("bounded", 3, 3)
    assert full.retry_after > 0
    assert "bounded" in str(full) and "3/3" in str(full)
    with pytest.raises(QueueFull):  # a batch that does not fit enqueues none of it
        await app.send_many_async([work.message(100), work.message(101)])

    await drain(app, ["bounded"])
    assert [await j.wait(1) for j in accepted] == [0, 10, 20]
    [stats] = await (await app.broker()).stats(["bounded"])
    assert (stats.depth, stats.dead) == (0, 0)
    assert stats.drain_rate > 0

    # Once drained it accepts work again, and the wait estimate comes from the measured rate.
    more = [await work.send_async(n) for n in range(3)]
    with pytest.raises(QueueFull) as caught:
        await work.send_async(99)
    assert caught.value.drain_rate > 0
    assert caught.value.retry_after >= 1.0
    await drain(app, ["bounded"])
    assert [await j.wait(1) for j in more] == [0, 10, 20]


# -- 7. idempotent enqueue -------------------------------------------------------------------------


async def test_idempotency_key_returns_existing_job_within_window(app: App) -> None:
    @app.task
    def charge(order: int) -> int:
        return order

    first = await charge.options(idempotency_key="order-1").send_async(1)
    again = await charge.options(idempotency_key="order-1").send_async(1)
    other = await charge.options(idempotency_key="order-2").send_async(2)
    assert first.created and not again.created and other.created
    assert again.id == first.id and other.id != first.id

    await drain(app)
    assert await first.wait(1) == 1
    # Still within the window after the job ran: no second charge.
    after = await charge.options(idempotency_key="order-1").send_async(1)
    assert after.id == first.id and not after.created


async def test_idempotency_key_makes_a_new_job_after_its_window_expires(app: App) -> None:
    @app.task
    def tick() -> None:
        pass

    first = await tick.options(idempotency_key="slot", idempotency_window=0.2).send_async()
    await asyncio.sleep(0.3)  # let the window pass
    second = await tick.options(idempotency_key="slot", idempotency_window=0.2).send_async()
    assert second.created and second.id != first.id
    await (await app.broker()).prune()  # pruning expired keys does not disturb the new one
    third = await tick.options(idempotency_key="slot", idempotency_window=0.2).send_async()
    assert third.id == second.id and not third.created


# -- results ---------------------------------------------------------------------------------------


async def test_results_stored_and_pruned_after_ttl(app: App) -> None:
    @app.task(result_ttl=0.2)
    def short_lived() -> dict[str, int]:
        return {"x": 1}

    @app.task
    def long_lived() -> int:
        return 2

    short, long = await short_lived.send_async(), await long_lived.send_async()
    await drain(app)
    assert await short.wait(1) == {"x": 1}
    assert (await short.info_async()).result == {"x": 1}
    await asyncio.sleep(0.3)  # let the TTL pass
    assert await (await app.broker()).prune() >= 1
    with pytest.raises(JobNotFound):
        await short.info_async()
    with pytest.raises(JobNotFound):
        await short.wait(1)
    assert await long.wait(1) == 2


# -- cancel ----------------------------------------------------------------------------------------


async def test_cancel_queued_job(app: App) -> None:
    runs = []

    @app.task
    def side_effect(n: int) -> None:
        runs.append(n)

    cancelled, kept = await side_effect.send_async(1), await side_effect.send_async(2)
    assert await cancelled.cancel_async() is True
    assert await cancelled.cancel_async() is False  # already cancelled
    await drain(app)
    assert runs == [2]
    assert (await cancelled.info_async()).state is JobState.CANCELLED
    with pytest.raises(JobFailed, match="cancelled"):
        await cancelled.wait(1)
    assert await kept.cancel_async() is False  # finished


async def test_cancel_of_running_job_returns_false(app: App) -> None:
    @app.task
    def noop() -> None:
        pass

    job = await noop.send_async()
    broker = await app.broker()
    [delivery] = await broker.fetch(["default"], 1, 0)
    assert delivery.job_id == job.id
    assert await job.cancel_async() is False
    assert (await job.info_async()).state is JobState.RUNNING


# -- 9. graceful shutdown --------------------------------------------------------------------------


@pytest.mark.parametrize("concurrency", [1, 4])
async def test_graceful_shutdown_hands_back_unfinished_leases_at_once(app: App, concurrency: int) -> None:
    started = asyncio.Event()
    finished: list[str] = []

    @app.task(timeout=60)
    async def slow() -> None:
        started.set()
        await asyncio.sleep(60)

    @app.task(timeout=60)
    async def quick() -> None:
        await started.wait()
        await asyncio.sleep(0.05)
        finished.append("quick")

    job = await slow.send_async()
    quick_job = await quick.send_async() if concurrency > 1 else None
    worker = Worker(app, ["default"], concurrency=concurrency, grace=0.3)
    running = asyncio.create_task(worker.run())
    await asyncio.wait_for(started.wait(), RUN_LIMIT)
    stopped_at = time.monotonic()
    worker.stop()
    await asyncio.wait_for(running, 10)
    assert time.monotonic() - stopped_at < 3, "the worker did not stop after its grace period"

    if quick_job is not None:  # a job that finishes within the grace period is settled
        assert finished == ["quick"]
        assert (await quick_job.info_async()).state is JobState.SUCCEEDED
    record = await job.info_async()
    assert record.state is JobState.QUEUED
    assert record.deliveries == 0, "a handed-back delivery was counted"
    # Deliverable at once: no waiting for the 60s lease to expire.
    broker = await app.broker()
    [delivery] = await broker.fetch(["default"], 1, 0)
    assert delivery.job_id == job.id and delivery.deliveries == 1


async def test_stopped_worker_takes_no_new_jobs(app: App) -> None:
    @app.task
    def noop() -> None:
        pass

    worker = Worker(app, ["default"], concurrency=2, grace=0.1, fetch_wait=10)
    running = asyncio.create_task(worker.run())
    await asyncio.sleep(0.1)  # let it start waiting for work
    worker.stop()
    await asyncio.wait_for(running, 5)
    job = await noop.send_async()
    assert (await job.info_async()).state is JobState.QUEUED


# -- 8. safe payloads ------------------------------------------------------------------------------


async def test_unknown_task_is_dead_lettered_with_reason(app: App) -> None:
    [enqueued] = await app.send_many_async([message("billing.no_such_task", args=(1,))])
    await drain(app)
    record = await info(app, enqueued.id)
    assert record.state is JobState.DEAD
    assert record.error is not None and "unknown task 'billing.no_such_task'" in record.error
    assert [r.id for r in await (await app.broker()).dead_jobs()] == [enqueued.id]


async def test_unencodable_argument_fails_at_send_naming_the_argument(app: App) -> None:
    @app.task
    def store(data: Any, *, meta: Any = None) -> None:
        pass

    with pytest.raises(EncodeError, match="argument 0") as caught:
        await store.send_async(object())
    assert "object" in str(caught.value)
    with pytest.raises(EncodeError, match="argument 'meta'"):
        await store.send_async(1, meta={"when": lambda: None})
    with pytest.raises(EncodeError, match="cannot take these arguments"):
        await store.send_async(1, 2, 3)  # type: ignore[call-arg]
    [stats] = await (await app.broker()).stats(["default"])
    assert stats.depth == 0, "a refused send enqueued something"


async def test_oversized_payload_is_refused_at_send(broker_url: str) -> None:
    app = App(broker_url, max_message_bytes=2048)
    try:

        @app.task
        def upload(blob: str) -> None:
            pass

        with pytest.raises(EncodeError, match="2,048-byte limit"):
            await upload.send_async("x" * 5000)
        [stats] = await (await app.broker()).stats(["default"])
        assert stats.depth == 0
        await upload.send_async("x" * 100)
    finally:
        await app.close_async()


async def test_bad_arguments_at_run_time_are_dead_lettered(app: App) -> None:
    @app.task(retries=3)
    def when(moment: dt.datetime) -> str:
        return moment.isoformat()

    # The sender bypassed the typed handle: the worker cannot convert "soon" to a datetime.
    [bad] = await app.send_many_async([message(when.name, args=("soon",))])
    good = await when.send_async(dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC))
    await drain(app)
    assert await good.wait(1) == "2024-01-02T03:04:05+00:00"
    record = await bad.info_async()
    assert record.state is JobState.DEAD and record.attempts == 1
    assert record.error is not None and "arguments do not match" in record.error


async def test_malformed_envelope_is_dead_lettered_with_reason(app: App) -> None:
    broker = await app.broker()
    newer = message("contract.noop").replace(v=99)
    results = await broker.enqueue(
        [(message("contract.noop"), b"{not json"), (newer, msgspec.json.encode(newer))]
    )
    await drain(app)
    garbled, from_the_future = [await info(app, r.job_id) for r in results]
    assert garbled.state is JobState.DEAD and from_the_future.state is JobState.DEAD
    assert garbled.error is not None and "malformed job envelope" in garbled.error
    assert from_the_future.error is not None and "upgrade the worker" in from_the_future.error


async def test_unencodable_result_is_dead_lettered_with_reason(app: App) -> None:
    @app.task(retries=3)
    def leaky() -> Any:
        return object()

    job = await leaky.send_async()
    await drain(app)
    record = await job.info_async()
    assert record.state is JobState.DEAD and record.attempts == 1
    assert record.error is not None and "result could not be stored" in record.error


# -- bulk and the sync API -------------------------------------------------------------------------


async def test_bulk_send_many(app: App) -> None:
    @app.task
    def double(n: int) -> int:
        return 2 * n

    messages = [double.message(n) for n in range(300)]
    messages += [double.options(priority=9, queue="urgent").message(n) for n in range(300, 310)]
    jobs = await app.send_many_async(messages)
    assert len(jobs) == 310 and len({j.id for j in jobs}) == 310
    assert all(j.created for j in jobs)
    stats = {s.queue: s for s in await (await app.broker()).stats(["default", "urgent"])}
    assert (stats["default"].ready, stats["urgent"].ready) == (300, 10)
    await drain(app, ["default", "urgent"], concurrency=16)
    results = [await j.wait(1) for j in jobs]
    assert results == [2 * n for n in range(310)]


async def test_sync_api_send_and_result(app: App) -> None:
    @app.task
    def square(n: int) -> int:
        return n * n

    job = await asyncio.to_thread(square.send, 12)  # as a web handler in a thread would
    consumer = asyncio.create_task(drain(app))
    assert await asyncio.to_thread(job.result, 10) == 144
    await consumer
    assert await asyncio.to_thread(job.status) is JobState.SUCCEEDED
    assert await asyncio.to_thread(app.job(job.id).cancel) is False


async def test_delayed_send_runs_after_its_delay(app: App) -> None:
    ran_at: list[float] = []

    @app.task
    def later() -> None:
        ran_at.append(time.time())

    sent_at = time.time()
    job = await later.options(delay=0.3).send_async()
    record = await job.info_async()
    assert record.state is JobState.QUEUED and record.run_at >= sent_at + 0.29
    [stats] = await (await app.broker()).stats(["default"])
    assert stats.delayed == 1
    await drain(app)
    assert ran_at and ran_at[0] >= sent_at + 0.29


async def test_stats_after_work(app: App) -> None:
    @app.task(retries=0)
    def maybe(fail: bool) -> None:
        if fail:
            raise NonRetryable("no")

    for fail in (False, False, True):
        await maybe.send_async(fail)
    await drain(app)
    await maybe.options(delay=60).send_async(False)
    [stats] = await (await app.broker()).stats(["default"])
    assert (stats.ready, stats.delayed, stats.running, stats.dead) == (0, 1, 0, 1)
    assert stats.depth == 1
    assert stats.drain_rate > 0
