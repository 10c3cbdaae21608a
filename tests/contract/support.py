"""Helpers shared by the contract tests (not tests themselves)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from offload import App, JobInfo
from offload.brokers import Broker
from offload.message import Message, encode, new_job_id
from offload.worker import Worker

# Every wait in the suite is bounded, so a broken promise fails a test instead of hanging it.
RUN_LIMIT = 30.0


def message(task: str = "contract.noop", **fields: Any) -> Message:
    return Message(id=new_job_id(), task=task, created_at=time.time(), **fields)


def item(task: str = "contract.noop", **fields: Any) -> tuple[Message, bytes]:
    m = message(task, **fields)
    return m, encode(m)


async def put(broker: Broker, task: str = "contract.noop", **fields: Any) -> str:
    """Enqueue one job through the port and return its id."""
    [enqueued] = await broker.enqueue([item(task, **fields)])
    assert enqueued.created
    return enqueued.job_id


async def drain(
    app: App, queues: Sequence[str] = ("default",), concurrency: int = 4, **options: Any
) -> Worker:
    """Run a burst worker in this process until the queues hold nothing waiting or running."""
    worker = Worker(app, list(queues), concurrency=concurrency, burst=True, **options)
    await asyncio.wait_for(worker.run(), RUN_LIMIT)
    return worker


async def info(app: App, job_id: str) -> JobInfo:
    broker = await app.broker()
    record = await broker.get_job(job_id)
    assert record is not None, f"job {job_id} is unknown to the broker"
    return record
