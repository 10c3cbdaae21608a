"""dramatiq's benchmark app: the Redis broker with its default middleware, no result backend."""

from __future__ import annotations

import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from bench import jobs

broker = RedisBroker(url=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/5"))
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name="default", max_retries=0)
def job(kind: str, enqueued: float) -> None:
    jobs.run(kind, enqueued)
