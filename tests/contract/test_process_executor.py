"""Tasks with executor="process" run in spawned children that import the app by its path."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from offload import App, JobState

from .support import drain

pytestmark = pytest.mark.timeout(60)

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def process_app(broker_url: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[App]:
    # Children are spawned with this sys.path and environment, and import tests.apps.process_app.
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    monkeypatch.setenv("OFFLOAD_BROKER_URL", broker_url)
    from tests.apps.process_app import make_app

    app = make_app(broker_url)
    try:
        yield app
    finally:
        await app.close_async()


async def test_process_task_returns_its_result(process_app: App) -> None:
    square, pid = process_app.tasks["proc.square"], process_app.tasks["proc.pid"]
    jobs = [await square.send_async(n) for n in range(5)]
    child = await pid.send_async()
    await drain(process_app, concurrency=2, process_slots=1)
    assert [await j.wait(1) for j in jobs] == [0, 1, 4, 9, 16]
    assert await child.wait(1) != os.getpid()


async def test_process_task_with_short_timeout_is_not_charged_for_the_child_starting(
    process_app: App,
) -> None:
    # The first job on a fresh pool waits for a child to boot (import Python, offload, the app):
    # that start-up must not count against the task's own 0.1s timeout.
    job = await process_app.tasks["proc.quick"].send_async()
    await drain(process_app, concurrency=1, process_slots=1)
    assert await job.wait(1) == "quick"


async def test_process_task_past_its_timeout_is_killed(process_app: App) -> None:
    job = await process_app.tasks["proc.sleepy"].send_async(30)
    started = time.monotonic()
    await drain(process_app, concurrency=1, process_slots=1)
    assert time.monotonic() - started < 20, "the child was not killed at the timeout"
    record = await job.info_async()
    assert record.state is JobState.DEAD
    assert record.attempts == 2  # timed out, retried once, timed out again
    assert record.error is not None and "TaskTimeout" in record.error


async def test_process_task_errors_follow_the_retry_rules(process_app: App) -> None:
    rejected = await process_app.tasks["proc.reject"].send_async("bad input")
    crashed = await process_app.tasks["proc.crash"].send_async()
    await drain(process_app, concurrency=2, process_slots=1)
    record = await rejected.info_async()
    assert record.state is JobState.DEAD and record.attempts == 1
    assert record.error is not None and "bad input" in record.error
    record = await crashed.info_async()
    assert record.state is JobState.DEAD  # the child died each time: retried, then dead-lettered
    assert record.error is not None and "child process died" in record.error
