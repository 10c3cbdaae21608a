"""Retry-After from depth and drain rate, and the short hold on queues the broker just refused."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from offload import App, QueueFull
from offload.api.backpressure import MAX_HOLD, FullQueues, queue_full_problem, retry_after_seconds
from offload.brokers.base import Broker

from .support import problem


@pytest.mark.parametrize(
    ("depth", "max_depth", "rate", "seconds"),
    [
        (100, 100, 10.0, 1),  # one slot frees in 0.1 s: at least 1
        (100, 100, 0.5, 2),  # one slot per 2 s
        (150, 100, 10.0, 6),  # 51 must drain: 5.1 s, rounded up
        (100, 100, 0.001, 1000),
        (10**9, 1, 0.001, 3600),  # capped at an hour
        (7, 7, 0.0, 7),  # not draining: one second per waiting job...
        (500, 500, 0.0, 60),  # ...at most a minute
        (3, 3, float("nan"), 3),
    ],
)
def test_retry_after_is_whole_seconds_from_depth_and_drain_rate(
    depth: int, max_depth: int, rate: float, seconds: int
) -> None:
    assert retry_after_seconds(depth, max_depth, rate) == seconds


def test_the_problem_carries_the_queue_and_its_numbers() -> None:
    p = queue_full_problem(QueueFull("q", 150, 100, 10.0))
    assert p.status == 503 and p.headers == {"Retry-After": "6"}
    assert p.extra == {"queue": "q", "depth": 150, "max_depth": 100, "drain_rate": 10.0, "retry_after": 6}


def fields(exc: QueueFull | None) -> tuple[object, ...]:
    assert exc is not None
    return exc.queue, exc.depth, exc.max_depth, exc.drain_rate


def test_the_held_refusal_keeps_no_traceback_of_the_request_that_was_refused() -> None:
    held = FullQueues()
    try:
        raise QueueFull("q", 10, 10, 1.0)
    except QueueFull as exc:
        held.remember(exc)
    refusal = held.refusal("q")
    assert refusal is not None and refusal.__traceback__ is None


def test_a_refused_queue_is_held_briefly() -> None:
    now = [0.0]
    held = FullQueues(clock=lambda: now[0])
    assert held.refusal("q") is None
    fast = QueueFull("q", 100, 100, 10_000.0)  # would empty its max_depth in 10 ms
    held.remember(fast)
    assert fields(held.refusal("q")) == fields(fast) and held.refusal("other") is None
    now[0] = 0.0026  # a quarter of max_depth at 10,000 jobs/s is 2.5 ms
    assert held.refusal("q") is None
    held.remember(QueueFull("q", 100, 100, 0.0))  # not draining: the longest hold
    now[0] += MAX_HOLD - 0.001
    assert held.refusal("q") is not None
    held.forget("q")
    assert held.refusal("q") is None


def test_when_a_hold_ends_one_submit_asks_the_broker_while_the_others_are_still_refused() -> None:
    now = [0.0]
    held = FullQueues(clock=lambda: now[0])
    full = QueueFull("q", 100, 100, 0.0)
    held.remember(full)
    now[0] = MAX_HOLD + 0.001
    assert held.refusal("q") is None  # the probe: it goes to the broker
    assert fields(held.refusal("q")) == fields(full) == fields(held.refusal("q"))  # the rest, meanwhile
    again = QueueFull("q", 100, 100, 0.0)
    held.remember(again)  # the broker said full again: a new hold
    assert held.refusal("q") is not None
    now[0] += MAX_HOLD + 0.001
    assert held.refusal("q") is None  # the next probe...
    held.forget("q")  # ...found room (or failed): nobody is refused from the hold any more
    assert held.refusal("q") is None and held.refusal("q") is None


async def test_refusals_in_the_hold_skip_the_broker(
    client: httpx.AsyncClient, app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    app.queue("tiny", max_depth=1)
    body = {"task": "t.add", "args": [1, 2], "queue": "tiny"}
    assert (await client.post("/v1/jobs", json=body)).status_code == 202
    broker: Broker = await app.broker()
    calls = {"n": 0}
    enqueue = broker.enqueue

    async def counting(*args: Any) -> Any:
        calls["n"] += 1
        return await enqueue(*args)

    monkeypatch.setattr(broker, "enqueue", counting)
    for _ in range(5):
        response = await client.post("/v1/jobs", json=body)
        assert problem(response, 503, "queue-full")["queue"] == "tiny"
        assert int(response.headers["retry-after"]) >= 1
    assert calls["n"] == 1  # the broker refused once; the next four were answered from the hold
    # An Idempotency-Key always asks the broker: it may name an existing job.
    await client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k"})
    assert calls["n"] == 2
    other = await client.post("/v1/jobs", json={"task": "t.add", "args": [1, 2]})
    assert other.status_code == 202  # other queues are unaffected
