"""taskiq's benchmark app: taskiq-redis's RedisStreamBroker (acknowledged delivery through a
consumer group), no result backend; the task is a sync function (taskiq runs it in a thread)."""

from __future__ import annotations

import os

from taskiq_redis import RedisStreamBroker

from bench import jobs

broker = RedisStreamBroker(
    url=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/5"), queue_name="default"
)


@broker.task(task_name="bench.job")
def job(kind: str, enqueued: float) -> None:
    jobs.run(kind, enqueued)
