"""A cancel swallowed on the way (asyncio.wait_for on 3.11) does not leave a task running forever."""

from __future__ import annotations

import asyncio
import sys

import pytest

from offload.brokers.memory import MemoryBroker
from offload.cancellation import cancel_requested, stop_tasks
from offload.maintenance import Maintenance, run_periodically


async def _swallow_the_next_cancel(finishing: asyncio.Event) -> None:
    """Await a wait_for whose inner wait finishes in the loop turn the cancel arrives in."""
    await asyncio.wait_for(finishing.wait(), 5)


async def _cancel_as_it_finishes(task: asyncio.Task[None], finishing: asyncio.Event) -> None:
    await asyncio.sleep(0.01)  # the task is inside its wait_for now
    finishing.set()  # the inner wait is woken first ...
    task.cancel()  # ... the cancel reaches wait_for after it finished: 3.11 returns its result


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="asyncio.wait_for keeps the cancel since 3.12")
async def test_python_311_wait_for_swallows_a_cancel_that_cancelling_still_counts() -> None:
    finishing = asyncio.Event()
    seen: list[bool] = []

    async def body() -> None:
        await _swallow_the_next_cancel(finishing)
        seen.append(cancel_requested())

    task = asyncio.create_task(body())
    await _cancel_as_it_finishes(task, finishing)
    await task  # ended normally: no CancelledError
    assert seen == [True]


async def test_a_maintenance_chore_whose_cancel_was_swallowed_still_stops() -> None:
    finishing = asyncio.Event()
    runs = 0

    async def chore(_broker: object) -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            await _swallow_the_next_cancel(finishing)

    helper = asyncio.create_task(run_periodically(Maintenance("chore", 0.01, chore), MemoryBroker()))
    await asyncio.sleep(0.02)  # past the random start
    await _cancel_as_it_finishes(helper, finishing)
    done, _ = await asyncio.wait([helper], timeout=1.0)
    assert done, "the chore kept running after its cancel"
    assert helper.cancelled()
    assert runs == 1


async def test_stop_tasks_cancels_again_a_task_that_ignored_a_cancel() -> None:
    cancels = 0

    async def stubborn() -> None:
        nonlocal cancels
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancels += 1
                if cancels == 1:
                    continue  # as a library's swallowed cancel would
                raise

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    assert await stop_tasks([task], again_after=0.05, give_up_after=5) == set()
    assert task.cancelled() and cancels == 2


async def test_stop_tasks_gives_up_on_a_task_that_never_stops() -> None:
    stubborn = True

    async def immortal() -> None:
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if not stubborn:
                    raise

    task = asyncio.create_task(immortal(), name="immortal")
    await asyncio.sleep(0)
    assert await stop_tasks([task], again_after=0.02, give_up_after=0.1) == {task}
    stubborn = False
    assert await stop_tasks([task]) == set()
