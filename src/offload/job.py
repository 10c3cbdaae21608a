"""Job states, the allowed transitions between them (pure), and the record a broker reports."""

from __future__ import annotations

import enum
import time
from typing import Any

import msgspec


class JobState(enum.StrEnum):
    QUEUED = "queued"  # waiting; `run_at` in the future means delayed (or a scheduled retry)
    RUNNING = "running"  # leased by a worker
    SUCCEEDED = "succeeded"
    DEAD = "dead"  # in the dead-letter queue: failed for good, with a reason
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in FINISHED


FINISHED = frozenset({JobState.SUCCEEDED, JobState.DEAD, JobState.CANCELLED})

# Every move a job can make. Brokers implement these; the memory broker asserts them.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED, JobState.DEAD}),
    # RUNNING -> QUEUED: retry, lease expiry, or a graceful hand-back
    JobState.RUNNING: frozenset({JobState.QUEUED, JobState.SUCCEEDED, JobState.DEAD}),
    JobState.SUCCEEDED: frozenset(),
    JobState.DEAD: frozenset({JobState.QUEUED}),  # replay
    JobState.CANCELLED: frozenset(),
}


def can_move(source: JobState, target: JobState) -> bool:
    return target in TRANSITIONS[source]


class JobInfo(msgspec.Struct, kw_only=True):
    """What a broker knows of one job: its state, counters, outcome and timestamps."""

    id: str
    task: str
    queue: str
    state: JobState
    priority: int = 0
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = {}
    deliveries: int = 0  # times handed to a worker (crashes included)
    attempts: int = 0  # executions that ended in an error
    max_deliveries: int = 0
    created_at: float = 0.0
    run_at: float = 0.0  # not delivered before this time
    started_at: float | None = None  # the latest delivery
    finished_at: float | None = None
    result: Any = None
    error: str | None = None
    worker: str | None = None
    idempotency_key: str | None = None
    # The send's extra options (its webhook, say): for offload's own use, not shown by the HTTP API.
    options: dict[str, Any] = {}

    @property
    def delayed(self) -> bool:
        """Waiting for a time still in the future (a delay, an eta or a scheduled retry)."""
        return self.state is JobState.QUEUED and self.run_at > time.time()
