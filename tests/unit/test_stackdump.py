"""The SIGUSR1 dump names where each asyncio task waits, down through the coroutines it awaits."""

from __future__ import annotations

import asyncio
import io

from offload.worker import stackdump


async def _innermost(release: asyncio.Event) -> None:
    await release.wait()


async def _middle(release: asyncio.Event) -> None:
    await _innermost(release)


async def test_task_dump_shows_the_whole_await_chain_and_the_awaited_future() -> None:
    release = asyncio.Event()
    task = asyncio.create_task(_middle(release), name="offload-job-abc")
    await asyncio.sleep(0)  # let it reach its wait
    out = io.StringIO()
    stackdump.dump_tasks(out)
    release.set()
    await task

    text = out.getvalue()
    [section] = [s for s in text.split("\nTask ") if s.startswith("'offload-job-abc':")]
    frames = [line for line in section.splitlines() if line.startswith("  File ")]
    assert [f.rsplit(" in ", 1)[1] for f in frames[:3]] == ["_middle", "_innermost", "wait"]
    assert "waiting on <Future pending" in section
    assert text.rstrip().endswith("--- end of tasks")


def test_awaiting_a_finished_coroutine_lists_nothing() -> None:
    async def done() -> None:
        return None

    coro = done()
    try:
        coro.send(None)
    except StopIteration:
        pass
    assert stackdump.awaiting(coro) == []
