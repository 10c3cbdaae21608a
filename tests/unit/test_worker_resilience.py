"""The worker rides out a broker that fails for a moment."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from offload import App
from offload.worker import Worker


async def test_burst_worker_keeps_going_when_reading_queue_stats_fails_once() -> None:
    app = App(f"memory://resilience-{uuid.uuid4()}")
    done: list[int] = []

    @app.task(name="record")
    async def record(i: int) -> None:
        done.append(i)

    await app.send_many_async([record.message(i) for i in range(5)])
    broker = await app.broker()
    real_stats = broker.stats
    failures = []

    async def flaky_stats(*args: Any, **kwargs: Any) -> Any:
        if not failures:
            failures.append(1)
            raise ConnectionError("broker restarting")
        return await real_stats(*args, **kwargs)

    broker.stats = flaky_stats  # type: ignore[method-assign]
    await asyncio.wait_for(Worker(app, ["default"], burst=True).run(), 10)
    assert sorted(done) == [0, 1, 2, 3, 4]
    assert failures == [1]
    await app.close_async()
