"""The broker port: the few async operations every broker implements.

A broker stores jobs and their outcomes (the result backend defaults to the same store). Every
operation that can be batched takes a batch, so one call is one round trip or one transaction.

Leases: `fetch` hands out each job under a lease that expires `lease_seconds` after it is taken
(sized from the task's timeout when the job was enqueued). A `Delivery` carries the lease's
`token`; `settle` and `extend` with a token that is no longer current are refused (fencing).
A lease that expires makes the job deliverable again; a job already delivered `max_deliveries`
times is dead-lettered instead.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from offload.job import JobInfo, JobState
from offload.message import Message, decode, decode_value

# A job's lease is its timeout plus a margin (up to this much), so that a worker enforcing the
# timeout still has time to settle before anyone else may take the job.
LEASE_MARGIN = 5.0
# Lease for jobs without a timeout; the worker renews it while the job runs.
DEFAULT_LEASE = 30.0


def lease_seconds(timeout: float | None) -> float:
    if timeout is None:
        return DEFAULT_LEASE
    return timeout + min(LEASE_MARGIN, max(1.0, timeout))


@dataclass(frozen=True, slots=True)
class Delivery:
    """One job handed to one worker under one lease."""

    job_id: str
    queue: str
    body: bytes  # the encoded envelope, decoded by the worker
    token: int  # fencing token of this lease
    deliveries: int  # including this one
    attempts: int  # executions of this job that ended in an error before this one
    lease_seconds: float


@dataclass(frozen=True, slots=True)
class Enqueued:
    job_id: str
    created: bool  # False: an idempotency key matched and this is the existing job


SettleKind = Literal["ack", "retry", "dead", "release"]


@dataclass(frozen=True, slots=True)
class Settle:
    """How a delivery ended.

    ack:     succeeded, `result` is the encoded return value
    retry:   failed, run again after `delay` seconds (the attempt counts)
    dead:    failed for good, `error` says why; goes to the dead-letter queue
    release: not run (graceful shutdown); hand the job back at once, the delivery does not count
    """

    delivery: Delivery
    kind: SettleKind
    result: bytes | None = None
    error: str | None = None
    delay: float = 0.0


@dataclass(frozen=True, slots=True)
class QueueStats:
    queue: str
    ready: int  # deliverable now
    delayed: int  # waiting for their time (delays and scheduled retries)
    running: int
    dead: int
    max_depth: int | None
    drain_rate: float  # jobs finished per second over the last minute

    @property
    def depth(self) -> int:
        """Jobs waiting, ready or delayed: what `max_depth` bounds."""
        return self.ready + self.delayed


class Broker(abc.ABC):
    """Async port implemented by every broker. One instance belongs to one event loop."""

    url: str

    async def connect(self) -> None:  # noqa: B027 - optional hook
        """Open connections and create the store's schema if needed."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections. Leases still held are left to expire."""

    @abc.abstractmethod
    async def declare_queue(self, name: str, max_depth: int | None) -> None:
        """Create the queue if needed and set its bound (None: unbounded)."""

    @abc.abstractmethod
    async def enqueue(self, items: Sequence[tuple[Message, bytes]]) -> list[Enqueued]:
        """Store jobs durably, all or nothing. Raises QueueFull if a queue would pass its bound.

        An item whose idempotency key is held by a job enqueued within that key's window is not
        stored; its result names the existing job.
        """

    # Set by a broker whose `enqueue_calls` does several calls in one round trip or transaction:
    # then App gathers concurrent sends into batches for it (offload/send_batching.py).
    batches_enqueue_calls: bool = False

    async def enqueue_calls(
        self, calls: Sequence[Sequence[tuple[Message, bytes]]]
    ) -> Sequence[list[Enqueued] | Exception]:
        """Several independent `enqueue` calls at once, applied in order, each all-or-nothing.

        Returns each call's outcome in order: its results, or the exception that call raised
        (QueueFull for a call that would pass a bound; the calls after it still run). This
        default makes one `enqueue` after another.
        """
        outcomes: list[list[Enqueued] | Exception] = []
        for items in calls:
            try:
                outcomes.append(await self.enqueue(items))
            except Exception as exc:  # noqa: BLE001 - that call's outcome, handed to its caller
                outcomes.append(exc)
        return outcomes

    async def _enqueue_as_one_call(self, items: Sequence[tuple[Message, bytes]]) -> list[Enqueued]:
        """`enqueue` for a broker whose `enqueue_calls` does the work: a batch of one call."""
        [outcome] = await self.enqueue_calls([items])
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    @abc.abstractmethod
    async def fetch(self, queues: Sequence[str], limit: int, wait: float) -> list[Delivery]:
        """Lease up to `limit` ready jobs, highest priority first, then oldest.

        Waits up to `wait` seconds for one to become ready (pushed, not sleep-polled, where the
        broker allows). Returns [] on timeout.
        """

    @abc.abstractmethod
    async def settle(self, outcomes: Sequence[Settle]) -> list[bool]:
        """Apply outcomes; False for each whose lease is no longer current (nothing changed)."""

    @abc.abstractmethod
    async def extend(self, deliveries: Sequence[Delivery]) -> list[bool]:
        """Renew leases by their own length from now; False for each lease already lost."""

    @abc.abstractmethod
    async def cancel(self, job_id: str) -> bool:
        """Cancel a queued job. False if it is not queued (running, finished or unknown)."""

    @abc.abstractmethod
    async def get_job(self, job_id: str) -> JobInfo | None:
        """The job's record, or None if unknown or pruned."""

    async def wait_job(self, job_id: str, timeout: float) -> JobInfo | None:
        """Wait until the job has finished or `timeout` passed; return its record then.

        This default re-reads the record with a backoff from 1 ms to 50 ms; a broker that can be
        told of changes (NATS watches the job's key) overrides it.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pause = 0.001
        while True:
            info = await self.get_job(job_id)
            remaining = deadline - loop.time()
            if info is None or info.state.finished or remaining <= 0:
                return info
            await asyncio.sleep(min(pause, remaining))
            pause = min(pause * 2, 0.05)

    @abc.abstractmethod
    async def stats(self, queues: Sequence[str] | None = None) -> list[QueueStats]:
        """Counts per queue (all known queues when None)."""

    @abc.abstractmethod
    async def dead_jobs(self, queue: str | None = None, limit: int = 100) -> list[JobInfo]:
        """Jobs in the dead-letter queue, newest first."""

    @abc.abstractmethod
    async def replay_dead(self, job_ids: Sequence[str] | None = None, queue: str | None = None) -> int:
        """Put dead jobs back in their queue with fresh counters. Returns how many."""

    @abc.abstractmethod
    async def purge_dead(self, job_ids: Sequence[str] | None = None, queue: str | None = None) -> int:
        """Delete dead jobs. Returns how many."""

    @abc.abstractmethod
    async def purge(self, queue: str) -> int:
        """Delete the queue's waiting jobs (not running or finished ones). Returns how many."""

    @abc.abstractmethod
    async def prune(self) -> int:
        """Delete finished jobs past their result TTL and expired idempotency keys."""


# The columns an SQL broker selects to build a JobInfo with `job_info_from_row`, in this order.
JOB_ROW_COLUMNS = (
    "id", "queue", "task", "state", "priority", "run_at", "created_at", "deliveries", "attempts",
    "max_deliveries", "started_at", "finished_at", "worker", "idempotency_key", "body", "result",
    "error",
)  # fmt: skip


def job_info_from_row(row: Sequence[Any]) -> JobInfo:
    """A JobInfo from a row of JOB_ROW_COLUMNS (times as epoch seconds, body and result as JSON)."""
    (job_id, queue, task, state, priority, run_at, created_at, deliveries, attempts,
     max_deliveries, started_at, finished_at, worker, key, body, result, error) = row  # fmt: skip
    try:
        message = decode(body)
        args, kwargs, options = message.args, message.kwargs, message.options
    except Exception:  # noqa: BLE001 - a malformed body still has a record worth showing
        args, kwargs, options = (), {}, {}
    return JobInfo(
        id=job_id, task=task, queue=queue, state=JobState(state), priority=priority,
        args=args, kwargs=kwargs, deliveries=deliveries, attempts=attempts,
        max_deliveries=max_deliveries, created_at=created_at, run_at=run_at,
        started_at=started_at, finished_at=finished_at, result=decode_value(result),
        error=error, worker=worker, idempotency_key=key, options=options,
    )  # fmt: skip
