"""App.completion_hooks: the worker calls them with (message, outcome) before settling ack / dead."""

from __future__ import annotations

from typing import Any

from offload import App, Retry
from offload.brokers.base import Settle
from offload.message import Message

from .support import poll, running_worker


async def test_hooks_see_successes_and_deaths_before_the_settle(app: App) -> None:
    seen: list[tuple[str, str, str | None, str]] = []
    broker = await app.broker()

    async def hook(message: Message, outcome: Settle) -> None:
        info = await broker.get_job(message.id)
        assert info is not None
        seen.append((message.task, outcome.kind, outcome.error, info.state.value))

    attempts = {"n": 0}

    @app.task(name="t.flaky", retries=3, backoff=0.0)
    def flaky() -> str:
        attempts["n"] += 1
        if attempts["n"] < 3:
            raise Retry(delay=0.0)
        return "ok"

    app.completion_hooks.append(hook)
    good = await app.tasks["t.add"].send_async(1, 2)
    bad = await app.tasks["t.fail"].send_async("boom")
    retried = await flaky.send_async()
    async with running_worker(app):
        for job in (good, bad, retried):
            await job.wait(timeout=10) if job is not bad else await _dead(job)
    assert sorted((task, kind, state) for task, kind, _, state in seen) == [
        ("t.add", "ack", "running"),  # called before the settle: the job is still leased
        ("t.fail", "dead", "running"),
        ("t.flaky", "ack", "running"),  # once, for the final outcome, not per retry
    ]
    assert any(error and "boom" in error for _, _, error, _ in seen)


async def _dead(job: Any) -> None:
    await poll(lambda: _state(job, "dead"), what="the job to die")


async def _state(job: Any, state: str) -> bool:
    return (await job.info_async()).state.value == state


async def test_a_failing_hook_does_not_stop_the_settle(app: App) -> None:
    async def broken(message: Message, outcome: Settle) -> None:
        raise RuntimeError("hook bug")

    app.completion_hooks.insert(0, broken)
    job = await app.tasks["t.add"].send_async(2, 2)
    async with running_worker(app):
        assert await job.wait(timeout=10) == 4


async def test_workers_also_serve_the_notification_queue(app: App) -> None:
    from offload.worker import Worker

    assert Worker(app, ["emails"]).queues == ["emails", "offload.webhooks"]
    assert Worker(app, ["offload.webhooks", "a"]).queues == ["offload.webhooks", "a"]
