"""The NATS broker against the shared test server: what its ready stream promises, and operations
cut off between their writes (as a server crash does) leaving nothing that stats would count.

The server is OFFLOAD_TEST_NATS_URL (default nats://127.0.0.1:4222; skipped if unreachable unless
CI=true). Each test has buckets of its own, deleted afterwards with the contract tests' cleanup.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from contract import nats_store
from offload import BrokerError, QueueFull
from offload.brokers import Settle
from offload.brokers.nats import NatsBroker
from offload.message import Message, encode, new_job_id

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def app_url(tmp_path: Path) -> Iterator[str]:
    url = nats_store.nats_url(tmp_path)
    yield url
    nats_store.cleanup(url)


@pytest.fixture(params=["stream", "kv"])
async def broker(app_url: str, request: pytest.FixtureRequest) -> AsyncIterator[NatsBroker]:
    b = NatsBroker(f"{app_url}&transport={request.param}")
    await b.connect()
    try:
        yield b
    finally:
        await b.close()


def _job(i: int) -> tuple[Message, bytes]:
    message = Message(id=new_job_id(), task="quick", args=(i,), timeout=1.0, created_at=time.time())
    return message, encode(message)  # timeout 1 s: a 2 s lease


def _fail_once(when: Callable[..., bool], real: Callable[..., Any]) -> Callable[..., Any]:
    """`real`, except that the first call for which `when(*args)` holds raises BrokerError, as an
    operation whose request was lost with the server does."""
    failed: list[bool] = []

    async def call(*args: Any) -> Any:
        if not failed and when(*args):
            failed.append(True)
            raise BrokerError("cut off")
        return await real(*args)

    return call


async def _keys(broker: NatsBroker, family: str) -> list[str]:
    return [e.key for e in await broker._scan(f"{family}.>", meta_only=True)]


async def _stream_messages(broker: NatsBroker) -> int:
    assert broker._js is not None
    info = await broker._js.stream_info(broker._ready_stream)
    return int(info.state.messages)


async def _drain(broker: NatsBroker, n: int) -> None:
    taken = []
    while len(taken) < n:
        got = await broker.fetch(["default"], n, 5)
        assert got, f"only {len(taken)} of {n} jobs were handed out"
        taken += got
    assert await broker.settle([Settle(d, "ack") for d in taken]) == [True] * n
    if broker.stream:  # settle acks the jobs' messages (a publish): let the stream drop them
        deadline = time.monotonic() + 5
        while await _stream_messages(broker) > 0:
            assert time.monotonic() < deadline, "the settled jobs' messages stayed in the stream"
            await asyncio.sleep(0.02)


def test_stream_is_the_default_transport(app_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OFFLOAD_NATS_TRANSPORT", raising=False)
    assert NatsBroker(app_url).stream
    assert not NatsBroker(f"{app_url}&transport=kv").stream


async def test_a_claim_cut_off_after_its_cas_leaves_no_ready_key(
    broker: NatsBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim leased the job in its record but never deleted the ready key (the server died
    before answering): the worker got nothing, the lease expires, and whatever brings the job back
    deletes that key too (transport=stream: the takeover of the redelivered message; kv: the lease
    recovery), so stats do not count a job that already ran."""
    [sent] = await broker.enqueue([_job(1)])
    real = broker._delete
    monkeypatch.setattr(broker, "_delete", _fail_once(lambda *keys: keys[0].startswith("w."), real))
    with pytest.raises(BrokerError):
        await broker.fetch(["default"], 10, 0)
    [stats] = await broker.stats(["default"])
    assert (stats.ready, stats.running) == (1, 1)  # the stray ready key, the leased record
    await asyncio.sleep(2.2)  # past the 2 s lease
    [delivery] = await broker.fetch(["default"], 10, 5)  # recovers the lease, takes the job again
    assert (delivery.job_id, delivery.deliveries) == (sent.job_id, 2)
    assert await broker.settle([Settle(delivery, "ack")]) == [True]
    [stats] = await broker.stats(["default"])
    assert (stats.ready, stats.delayed, stats.running) == (0, 0, 0)
    assert await _keys(broker, "w") == []


async def test_a_fetch_whose_claims_partly_fail_returns_the_jobs_it_leased(
    broker: NatsBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    await broker.enqueue([_job(i) for i in range(3)])
    real = broker._delete
    monkeypatch.setattr(broker, "_delete", _fail_once(lambda *keys: keys[0].startswith("w."), real))
    taken = await broker.fetch(["default"], 3, 0)
    assert len(taken) == 2  # the third claim was cut off; its lease will expire
    assert await broker.settle([Settle(d, "ack") for d in taken]) == [True, True]


async def test_a_re_sent_enqueue_writes_each_job_once(
    broker: NatsBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An enqueue cut off after its index keys (and ready messages) were written, before the
    records: re-sent, the jobs get the same keys, and the same Nats-Msg-Id, so neither a second
    ready key nor a second ready message is left behind."""
    jobs = [_job(i) for i in range(5)]
    real = broker._create_record
    monkeypatch.setattr(broker, "_create_record", _fail_once(lambda *args: args[0] == jobs[2][0].id, real))
    with pytest.raises(BrokerError):
        await broker.enqueue(jobs)
    monkeypatch.setattr(broker, "_create_record", real)
    sent = await broker.enqueue(jobs)
    assert [s.job_id for s in sent] == [m.id for m, _ in jobs]
    assert len(await _keys(broker, "w")) == 5
    if broker.stream:
        assert await _stream_messages(broker) == 5
    [stats] = await broker.stats(["default"])
    assert stats.ready == 5
    await _drain(broker, 5)
    [stats] = await broker.stats(["default"])
    assert (stats.ready, stats.running) == (0, 0)
    if broker.stream:
        assert await _stream_messages(broker) == 0


async def test_a_full_ready_stream_refuses_the_batch_with_queue_full(app_url: str) -> None:
    """The stream is bounded (max_msgs, discard=new) behind the queues' max_depth: a batch it
    refuses raises QueueFull, and nothing of it is stored."""
    broker = NatsBroker(f"{app_url}&transport=stream")
    broker.ready_backstop = 3
    try:
        await broker.connect()
        assert broker._js is not None
        config = (await broker._js.stream_info(broker._ready_stream)).config
        assert (config.max_msgs, config.discard, config.duplicate_window) == (3, "new", 120.0)
        await broker.enqueue([_job(i) for i in range(2)])
        refused = [_job(i) for i in range(2, 4)]
        with pytest.raises(QueueFull) as raised:
            await broker.enqueue(refused)
        assert (raised.value.queue, raised.value.max_depth) == ("default", 3)
        assert [await broker.get_job(m.id) for m, _ in refused] == [None, None]
        [stats] = await broker.stats(["default"])
        assert stats.ready == 2
        await _drain(broker, 2)
        await broker.enqueue([_job(i) for i in range(4, 7)])  # room again
    finally:
        await broker.close()


async def test_an_unreachable_server_is_a_broker_error_after_the_connect_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from offload.brokers import nats_kv

    monkeypatch.setattr(nats_kv, "CONNECT_TIMEOUT", 1.0)  # the first connect rides out 10 s by default
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    b = NatsBroker(f"nats://127.0.0.1:{port}?bucket=nowhere")
    started = time.monotonic()
    with pytest.raises(BrokerError, match=r"cannot reach NATS .* within 1s .*is it running\?"):
        await b.connect()
    assert time.monotonic() - started < 5
    await b.close()
