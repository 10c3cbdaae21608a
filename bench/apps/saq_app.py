"""saq's benchmark app: a Redis queue; the job is a sync function, which saq runs in its worker's
thread pool (like offload's sync task)."""

from __future__ import annotations

import os
from typing import Any

from saq import Queue

from bench import jobs

queue = Queue.from_url(os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/5"), name="default")


def job(ctx: Any, *, kind: str, enqueued: float) -> None:
    jobs.run(kind, enqueued)


settings = {
    "queue": queue,
    "functions": [("bench.job", job)],
    "concurrency": int(os.environ.get("BENCH_ASYNC_CONCURRENCY", "32")),
}
