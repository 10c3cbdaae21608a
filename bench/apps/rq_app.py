"""rq's benchmark job: rq enqueues a function by its import path, so this module only holds it."""

from __future__ import annotations

from bench import jobs


def job(kind: str, enqueued: float) -> None:
    jobs.run(kind, enqueued)
