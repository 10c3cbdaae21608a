"""RedisBroker.enqueue_blocking: the sync senders' path, with the promises of `enqueue`.

The contract suite runs every broker through the async port; these tests hold the blocking path
to the same promises (all or nothing under a bound, idempotency keys, FIFO, wake-ups, errors) on
the shared test server (OFFLOAD_TEST_REDIS_URL; skipped if unreachable, failed when CI=true).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import pytest

from contract import redis_store
from offload import App, BrokerError, QueueFull
from offload import app as app_module
from offload.brokers import Broker, Enqueued, broker_from_url, redis_records
from offload.brokers import redis as redis_module
from offload.brokers.rabbitmq import RabbitMQBroker
from offload.brokers.redis import RedisBroker
from offload.brokers.redis_blocking import BlockingLink
from offload.message import Message

if TYPE_CHECKING:
    from integration.conftest import RedisItem

pytestmark = pytest.mark.timeout(60)

Blocking = Callable[[Sequence[tuple[Message, bytes]]], list[Enqueued]]


def blocking(redis_broker: RedisBroker) -> Blocking:
    send = redis_broker.enqueue_blocking
    assert send is not None
    return send


async def in_thread(send: Blocking, items: Sequence[tuple[Message, bytes]]) -> list[Enqueued]:
    """Call the blocking path from a thread of its own, as a sync sender would."""
    return await asyncio.to_thread(send, items)


async def test_jobs_are_fetched_in_batch_order_with_their_bodies(
    redis_broker: RedisBroker, redis_item: RedisItem
) -> None:
    batch = [redis_item(args=(n,)) for n in range(20)] + [redis_item(args=("later",), eta=time.time() + 60)]
    enqueued = await in_thread(blocking(redis_broker), batch)
    assert [e.job_id for e in enqueued] == [m.id for m, _ in batch]
    assert all(e.created for e in enqueued)
    taken = []
    while deliveries := await redis_broker.fetch(["default"], 6, 0):
        taken.extend(deliveries)
    assert [d.job_id for d in taken] == [m.id for m, _ in batch[:20]]  # FIFO; the delayed one waits
    assert [d.body for d in taken] == [body for _, body in batch[:20]]
    [stats] = await redis_broker.stats(["default"])
    assert (stats.ready, stats.delayed, stats.running) == (0, 1, 20)
    info = await redis_broker.get_job(batch[-1][0].id)
    assert info is not None and info.run_at > time.time() + 50


async def test_priorities_order_a_batch_as_enqueue_does(
    redis_broker: RedisBroker, redis_item: RedisItem
) -> None:
    batch = [redis_item(priority=p, args=(n,)) for n, p in enumerate([0, 5, 0, 5, -1])]
    await in_thread(blocking(redis_broker), batch)
    taken = await redis_broker.fetch(["default"], 10, 0)
    ids = [m.id for m, _ in batch]
    assert [d.job_id for d in taken] == [ids[1], ids[3], ids[0], ids[2], ids[4]]


async def test_a_full_queue_refuses_the_whole_batch(redis_broker: RedisBroker, redis_item: RedisItem) -> None:
    await redis_broker.declare_queue("small", 3)
    send = blocking(redis_broker)
    await in_thread(send, [redis_item(queue="small"), redis_item(queue="small")])
    with pytest.raises(QueueFull) as caught:
        await in_thread(
            send, [redis_item(queue="small"), redis_item(queue="small"), redis_item(queue="default")]
        )
    assert (caught.value.queue, caught.value.depth, caught.value.max_depth) == ("small", 2, 3)
    assert caught.value.drain_rate == 0.0
    stats = {s.queue: s for s in await redis_broker.stats(["small", "default"])}
    assert stats["small"].ready == 2 and stats["default"].ready == 0  # none of the refused batch
    [one] = await in_thread(send, [redis_item(queue="small")])  # exactly up to the bound
    assert one.created


async def test_idempotency_keys_deduplicate_within_and_across_batches(
    redis_broker: RedisBroker, redis_item: RedisItem
) -> None:
    send = blocking(redis_broker)
    first, twin, other = await in_thread(
        send,
        [
            redis_item(idempotency_key="k1"),
            redis_item(idempotency_key="k1"),
            redis_item(idempotency_key="k2"),
        ],
    )
    assert first.created and other.created and not twin.created
    assert twin.job_id == first.job_id
    [again] = await in_thread(send, [redis_item(idempotency_key="k1")])
    assert (again.job_id, again.created) == (first.job_id, False)
    # The async path sees the same keys.
    [from_async] = await redis_broker.enqueue([redis_item(idempotency_key="k2")])
    assert (from_async.job_id, from_async.created) == (other.job_id, False)
    [stats] = await redis_broker.stats(["default"])
    assert stats.ready == 2
    info = await redis_broker.get_job(first.job_id)
    assert info is not None and info.idempotency_key == "k1"


async def test_a_resent_batch_is_not_stored_twice(redis_broker: RedisBroker, redis_item: RedisItem) -> None:
    batch = [redis_item() for _ in range(3)]
    first = await in_thread(blocking(redis_broker), batch)
    again = await in_thread(blocking(redis_broker), batch)  # the caller never saw the first reply
    assert [e.job_id for e in again] == [e.job_id for e in first]
    [stats] = await redis_broker.stats(["default"])
    assert stats.ready == 3


async def test_a_waiting_fetch_is_woken(
    redis_broker: RedisBroker, redis_url: str, redis_item: RedisItem
) -> None:
    waiting = asyncio.create_task(redis_broker.fetch(["default"], 1, 3.0))
    await asyncio.sleep(0.2)  # the fetch is blocked in BLPOP by now
    [enqueued] = await in_thread(blocking(redis_broker), [redis_item()])
    started = time.monotonic()
    [delivery] = await asyncio.wait_for(waiting, 2.0)
    assert time.monotonic() - started < 0.5
    assert delivery.job_id == enqueued.job_id


async def test_many_threads_send_at_once(redis_broker: RedisBroker, redis_item: RedisItem) -> None:
    send = blocking(redis_broker)
    ids: list[str] = []
    errors: list[BaseException] = []

    def sender() -> None:
        try:
            for _ in range(25):
                ids.extend(e.job_id for e in send([redis_item()]))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=sender) for _ in range(8)]
    await asyncio.to_thread(lambda: [t.start() for t in threads] and [t.join() for t in threads])
    assert errors == []
    assert len(set(ids)) == 200
    [stats] = await redis_broker.stats(["default"])
    assert stats.ready == 200


async def test_a_large_batch_is_staged_and_stays_all_or_nothing(
    redis_broker: RedisBroker, monkeypatch: pytest.MonkeyPatch, redis_item: RedisItem
) -> None:
    monkeypatch.setattr(redis_records, "STAGE_BYTES", 1000)  # stage in chunks of about 1 KB
    send = blocking(redis_broker)
    batch = [redis_item(args=("x" * 200, n)) for n in range(30)]
    enqueued = await in_thread(send, batch)
    assert all(e.created for e in enqueued)
    taken = []
    while deliveries := await redis_broker.fetch(["default"], 7, 0):
        taken.extend(deliveries)
    assert [d.body for d in taken] == [body for _, body in batch]

    await redis_broker.declare_queue("small", 10)
    with pytest.raises(QueueFull):
        await in_thread(send, [redis_item(queue="small", args=("x" * 200,)) for _ in range(20)])
    import redis

    client = redis.Redis.from_url(redis_store.REDIS_URL)
    try:  # the staged bodies of the refused batch are gone with it
        assert list(client.scan_iter(match=f"{redis_broker.namespace}stage:*")) == []
    finally:
        client.close()


async def test_a_connection_dropped_while_idle_is_replaced(
    redis_broker: RedisBroker, redis_item: RedisItem
) -> None:
    import redis

    send = blocking(redis_broker)
    await in_thread(send, [redis_item()])
    client = redis.Redis.from_url(redis_store.REDIS_URL)
    try:
        # Kill every connection of this broker's blocking path (the test's own survives).
        mine = client.client_id()
        for info in client.client_list():
            if int(info["id"]) != mine and info["cmd"] == "evalsha":
                client.client_kill_filter(_id=info["id"])
    finally:
        client.close()
    [e] = await in_thread(send, [redis_item()])
    assert e.created


async def test_a_flushed_script_cache_is_reloaded(redis_broker: RedisBroker, redis_item: RedisItem) -> None:
    import redis

    send = blocking(redis_broker)
    await in_thread(send, [redis_item()])
    client = redis.Redis.from_url(redis_store.REDIS_URL)
    try:
        client.script_flush()  # as after a server restart (other clients reload theirs likewise)
    finally:
        client.close()
    [e] = await in_thread(send, [redis_item()])
    assert e.created


async def test_an_unreachable_server_is_the_async_paths_broker_error(
    redis_broker: RedisBroker, redis_item: RedisItem
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    redis_broker._blocking_link = BlockingLink.from_url(f"redis://127.0.0.1:{port}/0", {}, 5.0)
    with pytest.raises(BrokerError) as caught:
        await in_thread(blocking(redis_broker), [redis_item()])
    message = str(caught.value)
    assert "\n" not in message and "cannot reach Redis" in message and "OFFLOAD_BROKER_URL" in message


async def test_needs_connect_and_stops_at_close(redis_url: str, redis_item: RedisItem) -> None:
    b = broker_from_url(redis_url)
    assert isinstance(b, RedisBroker)
    with pytest.raises(RuntimeError, match="connect"):
        blocking(b)([redis_item()])
    await b.connect()
    assert blocking(b)([]) == []
    await b.close()
    with pytest.raises(RuntimeError, match="connect"):
        blocking(b)([redis_item()])


def test_rabbitmq_which_publishes_over_amqp_has_no_blocking_path() -> None:
    redis_broker = RabbitMQBroker("amqp://guest:guest@127.0.0.1:5672/?state=redis://127.0.0.1:6379/0")
    assert redis_broker.enqueue_blocking is None  # App sends through its enqueue on the portal loop


def test_app_sync_sends_take_the_blocking_path(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    app = App(redis_url)
    app.queue("bounded", max_depth=2)

    @app.task(queue="bounded")
    def work(n: int) -> int:
        return n

    calls: list[int] = []
    original = RedisBroker._enqueue_blocking

    def counting(self: RedisBroker, items: Sequence[tuple[Message, bytes]]) -> list[Enqueued]:
        calls.append(len(items))
        return original(self, items)

    monkeypatch.setattr(RedisBroker, "_enqueue_blocking", counting)
    try:
        job = work.send(1)
        assert job.status() == "queued"
        with pytest.raises(QueueFull):
            app.send_many([work.message(2), work.message(3)])
        assert calls == [1, 2]
        [stats] = app.run_sync(lambda b: b.stats(["bounded"]))
        assert stats.ready == 1
    finally:
        app.close()


def _fetched_ids(app: App) -> list[str]:
    """Lease everything ready in the default queue, in order."""

    async def fetch(b: Broker) -> list[str]:
        return [d.job_id for d in await b.fetch(["default"], 100, 0)]

    return app.run_sync(fetch)


def test_send_many_past_one_batch_stores_every_batch_in_order(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app_module, "SEND_BATCH", 3)  # 10 jobs: four batches, the last of one
    app = App(redis_url)

    @app.task
    def work(n: int) -> int:
        return n

    try:
        jobs = app.send_many([work.message(n) for n in range(10)])
        assert len({j.id for j in jobs}) == 10
        assert _fetched_ids(app) == [j.id for j in jobs]  # FIFO across the batches
    finally:
        app.close()


def test_send_many_stops_at_the_first_refused_batch(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app_module, "SEND_BATCH", 2)
    app = App(redis_url)
    app.queue("bounded", max_depth=5)

    @app.task(queue="bounded")
    def work(n: int) -> int:
        return n

    try:
        with pytest.raises(QueueFull) as caught:
            app.send_many([work.message(n) for n in range(7)])  # batches 2, 2, 2, 1: the third is refused
        assert (caught.value.depth, caught.value.max_depth) == (4, 5)
        [stats] = app.run_sync(lambda b: b.stats(["bounded"]))
        assert stats.ready == 4  # the two batches before it; not the fourth, which would fit
    finally:
        app.close()


def test_send_many_stages_a_large_batch_among_the_others(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app_module, "SEND_BATCH", 3)
    monkeypatch.setattr(redis_records, "STAGE_BYTES", 1000)  # a batch of 3 large jobs is staged
    app = App(redis_url)

    @app.task
    def work(text: str) -> str:
        return text

    staged: list[int] = []
    original = RedisBroker._enqueue_staged

    def counting(self: RedisBroker, conn: object, items: Sequence[tuple[Message, bytes]]) -> object:
        staged.append(len(items))
        return original(self, conn, items)

    monkeypatch.setattr(RedisBroker, "_enqueue_staged", counting)
    try:
        texts = ["x" * 500, "y" * 500, "z" * 500, "a", "b", "c", "w" * 400]
        jobs = app.send_many([work.message(t) for t in texts])  # batches of 3, 3, 1
        assert staged == [3]  # the first batch; the one-job batch fits one ENQUEUE_ONE
        assert _fetched_ids(app) == [j.id for j in jobs]
    finally:
        app.close()


def test_send_many_reloads_scripts_flushed_between_batches(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis

    monkeypatch.setattr(app_module, "SEND_BATCH", 2)
    app = App(redis_url)

    @app.task
    def work(n: int) -> int:
        return n

    original = redis_records.enqueue_command
    built: list[int] = []

    def flushing(items: Sequence[tuple[Message, bytes]]) -> tuple[str, list[object]] | None:
        built.append(len(items))
        if len(built) == 2:  # while the first batch is on the server: as after a restart
            client = redis.Redis.from_url(redis_store.REDIS_URL)
            try:
                client.script_flush()
            finally:
                client.close()
        return original(items)

    try:
        work.send(0)  # connects, scripts loaded
        monkeypatch.setattr(redis_module, "enqueue_command", flushing)
        jobs = app.send_many([work.message(n) for n in range(1, 7)])
        assert built == [2, 2, 2]
        [stats] = app.run_sync(lambda b: b.stats(["default"]))
        assert stats.ready == 7 and len(jobs) == 6
    finally:
        app.close()


def test_senders_beyond_max_connections_wait_for_one_and_give_up_after_the_wait(redis_url: str) -> None:
    from offload.brokers.redis_blocking import command

    link = BlockingLink.from_url(redis_url.split("?")[0], {"max_connections": 2}, wait=0.3)
    inside, most, lock = [0], [0], threading.Lock()

    def ping(conn: object) -> object:
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.01)  # hold the connection, so the other senders queue up for it
        with lock:
            inside[0] -= 1
        return command(conn, "PING")

    try:
        threads = [threading.Thread(target=lambda: [link.run(ping) for _ in range(5)]) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert most[0] == 2  # never more than max_connections in use, and both were
        assert link._open == 2  # the idle ones are reused, not replaced

        held, release = threading.Event(), threading.Event()

        def hold(conn: object) -> object:
            held.set()
            release.wait(5)
            return command(conn, "PING")

        holders = [threading.Thread(target=link.run, args=(hold,)) for _ in range(2)]
        for t in holders:
            t.start()
        held.wait(5)
        time.sleep(0.05)
        begin = time.monotonic()
        with pytest.raises(Exception, match=r"no free connection within 0\.3 s"):
            link.run(ping)
        assert 0.25 < time.monotonic() - begin < 2
        release.set()
        for t in holders:
            t.join()
        assert link.run(ping) in (b"PONG", "PONG", True)
    finally:
        link.close()
