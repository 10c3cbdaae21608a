"""What the API answers, as typed msgspec Structs (unknown members are ignored, for forward compatibility)."""

from __future__ import annotations

from typing import Any

import msgspec

from offload.job import JobState


class Job(msgspec.Struct, kw_only=True, frozen=True):
    """A job as the API reports it (`GET /v1/jobs/{id}`). Times are epoch seconds."""

    id: str
    task: str
    queue: str
    state: JobState
    attempts: int = 0
    deliveries: int = 0
    max_deliveries: int = 0
    priority: int = 0
    created_at: float = 0.0
    run_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    result: Any = None
    error: str | None = None
    progress: Any = None

    @property
    def finished(self) -> bool:
        """Succeeded, dead (failed for good) or cancelled: the state will not change again."""
        return self.state.finished


class JobAccepted(msgspec.Struct, kw_only=True, frozen=True):
    """The answer to a submit: `created` is False when the Idempotency-Key matched an earlier job."""

    id: str
    state: JobState
    created: bool
    location: str = ""


class QueueStats(msgspec.Struct, kw_only=True, frozen=True):
    """One queue's counts (`GET /v1/queues`)."""

    queue: str
    ready: int = 0  # deliverable now
    delayed: int = 0  # waiting for their time (delays and scheduled retries)
    running: int = 0
    dead: int = 0
    max_depth: int | None = None
    drain_rate: float = 0.0  # jobs finished per second over the last minute
    depth: int = 0  # jobs waiting (ready + delayed): what max_depth bounds


class CancelResult(msgspec.Struct, kw_only=True, frozen=True):
    """The answer to `POST /v1/jobs/{id}/cancel`."""

    id: str
    cancelled: bool
    state: JobState


class Count(msgspec.Struct, frozen=True):
    """The answer to the DLQ replay and purge calls."""

    count: int
