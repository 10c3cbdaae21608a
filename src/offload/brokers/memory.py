"""The in-memory broker: the reference implementation of the port, and the engine of test mode.

State lives in a store shared by every broker instance with the same URL in this process
(`memory://name`), so a worker's loop and the thread that sends jobs see the same queues. It is
not durable: everything is gone when the process exits.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from offload.brokers.base import Broker, Delivery, Enqueued, QueueStats, Settle, lease_seconds
from offload.errors import QueueFull
from offload.job import JobInfo, JobState, can_move
from offload.message import Message, decode_value

DRAIN_WINDOW = 60.0


@dataclass
class _Job:
    message: Message
    body: bytes
    state: JobState
    run_at: float
    lease_seconds: float
    deliveries: int = 0
    attempts: int = 0
    token: int = 0
    version: int = 0  # bumped on every requeue so stale heap entries are skipped
    lease_expires_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    expires_at: float | None = None
    result: bytes | None = None
    error: str | None = None


@dataclass
class _Queue:
    max_depth: int | None = None
    ready: list[tuple[int, int, str, int]] = field(default_factory=list)  # (-prio, seq, id, ver)
    finished: deque[float] = field(default_factory=deque)  # finish times in the drain window


class _Store:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.jobs: dict[str, _Job] = {}
        self.queues: dict[str, _Queue] = {}
        self.delayed: list[tuple[float, str, int]] = []  # (run_at, id, version)
        self.leases: list[tuple[float, str, int]] = []  # (expires_at, id, token)
        self.idempotency: dict[str, tuple[str, float]] = {}  # key -> (job id, expires at)
        self.seq = itertools.count()
        self.tokens = itertools.count(1)
        self.waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    def notify(self) -> None:
        for loop, event in list(self.waiters):
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # loop closed
                self.waiters.discard((loop, event))


_stores: dict[str, _Store] = {}
_stores_lock = threading.Lock()


def _store_for(url: str) -> _Store:
    with _stores_lock:
        return _stores.setdefault(url, _Store())


class MemoryBroker(Broker):
    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._s = _store_for(url)

    # -- helpers (call with the lock held) ---------------------------------------------------

    def _queue(self, name: str) -> _Queue:
        queue = self._s.queues.get(name)
        if queue is None:
            queue = self._s.queues[name] = _Queue()
        return queue

    def _make_ready(self, job: _Job) -> None:
        job.version += 1
        entry = (job.run_at, job.message.id, job.version)
        if job.run_at > time.time():
            heapq.heappush(self._s.delayed, entry)
        else:
            queue = self._queue(job.message.queue)
            heapq.heappush(
                queue.ready, (-job.message.priority, next(self._s.seq), job.message.id, job.version)
            )

    def _move(self, job: _Job, target: JobState) -> None:
        assert can_move(job.state, target), f"{job.state} -> {target}"
        if target.finished and job.state is JobState.RUNNING:
            self._queue(job.message.queue).finished.append(time.time())
        job.state = target

    def _finish(self, job: _Job, target: JobState, now: float) -> None:
        self._move(job, target)
        job.finished_at = now
        job.expires_at = now + job.message.result_ttl

    def _promote_and_recover(self, now: float) -> None:
        s = self._s
        while s.delayed and s.delayed[0][0] <= now:
            _, job_id, version = heapq.heappop(s.delayed)
            job = s.jobs.get(job_id)
            if job is not None and job.version == version and job.state is JobState.QUEUED:
                job.version -= 1  # _make_ready bumps it again
                job.run_at = min(job.run_at, now)
                self._make_ready(job)
        while s.leases and s.leases[0][0] <= now:
            _, job_id, token = heapq.heappop(s.leases)
            job = s.jobs.get(job_id)
            if job is None or job.token != token or job.state is not JobState.RUNNING:
                continue
            if job.lease_expires_at > now:  # extended since; re-arm
                heapq.heappush(s.leases, (job.lease_expires_at, job_id, token))
                continue
            self._expire_lease(job, now)

    def _expire_lease(self, job: _Job, now: float) -> None:
        if job.deliveries >= job.message.max_deliveries:
            job.error = (
                f"delivered {job.deliveries} times without being settled "
                f"(max_deliveries={job.message.max_deliveries}); the worker crashed or lost "
                "its lease each time"
            )
            self._finish(job, JobState.DEAD, now)
        else:
            self._move(job, JobState.QUEUED)
            job.run_at = now
            self._make_ready(job)

    def _depth(self, name: str) -> int:
        return sum(
            1 for job in self._s.jobs.values() if job.state is JobState.QUEUED and job.message.queue == name
        )

    def _drain_rate(self, queue: _Queue, now: float) -> float:
        while queue.finished and queue.finished[0] < now - DRAIN_WINDOW:
            queue.finished.popleft()
        if not queue.finished:
            return 0.0
        span = min(DRAIN_WINDOW, max(1.0, now - queue.finished[0]))
        return len(queue.finished) / span

    # -- the port ------------------------------------------------------------------------------

    async def declare_queue(self, name: str, max_depth: int | None) -> None:
        with self._s.lock:
            self._queue(name).max_depth = max_depth

    async def enqueue(self, items: Sequence[tuple[Message, bytes]]) -> list[Enqueued]:
        now = time.time()
        s = self._s
        with s.lock:
            results: list[Enqueued | None] = []
            fresh: list[tuple[Message, bytes]] = []
            keys_in_batch: dict[str, str] = {}
            for message, body in items:
                key = message.idempotency_key
                if key is not None:
                    held = s.idempotency.get(key)
                    if held is not None and held[1] > now:
                        results.append(Enqueued(held[0], created=False))
                        continue
                    if key in keys_in_batch:
                        results.append(Enqueued(keys_in_batch[key], created=False))
                        continue
                    keys_in_batch[key] = message.id
                results.append(None)
                fresh.append((message, body))
            adding: dict[str, int] = {}
            for message, _ in fresh:
                adding[message.queue] = adding.get(message.queue, 0) + 1
            for name, count in adding.items():
                queue = self._queue(name)
                if queue.max_depth is not None:
                    depth = self._depth(name)
                    if depth + count > queue.max_depth:
                        raise QueueFull(name, depth, queue.max_depth, self._drain_rate(queue, now))
            fresh_iter = iter(fresh)
            out: list[Enqueued] = []
            for result in results:
                if result is not None:
                    out.append(result)
                    continue
                message, body = next(fresh_iter)
                run_at = max(now, message.eta) if message.eta is not None else now
                job = _Job(message, body, JobState.QUEUED, run_at, lease_seconds(message.timeout))
                s.jobs[message.id] = job
                if message.idempotency_key is not None:
                    s.idempotency[message.idempotency_key] = (
                        message.id,
                        now + message.idempotency_window,
                    )
                self._make_ready(job)
                out.append(Enqueued(message.id, created=True))
        if fresh:
            s.notify()
        return out

    def _take(self, queues: Sequence[str], limit: int) -> list[Delivery]:
        now = time.time()
        s = self._s
        out: list[Delivery] = []
        with s.lock:
            self._promote_and_recover(now)
            while len(out) < limit:
                best: tuple[tuple[int, int, str, int], _Queue] | None = None
                for name in queues:
                    queue = s.queues.get(name)
                    if queue is None:
                        continue
                    while queue.ready:
                        _, _, job_id, version = queue.ready[0]
                        job = s.jobs.get(job_id)
                        if job is not None and job.version == version and job.state is JobState.QUEUED:
                            break
                        heapq.heappop(queue.ready)
                    if queue.ready and (best is None or queue.ready[0] < best[0]):
                        best = (queue.ready[0], queue)
                if best is None:
                    break
                _, _, job_id, _ = heapq.heappop(best[1].ready)
                job = s.jobs[job_id]
                self._move(job, JobState.RUNNING)
                job.deliveries += 1
                job.token = next(s.tokens)
                job.started_at = now
                job.lease_expires_at = now + job.lease_seconds
                heapq.heappush(s.leases, (job.lease_expires_at, job_id, job.token))
                out.append(
                    Delivery(
                        job_id,
                        job.message.queue,
                        job.body,
                        job.token,
                        job.deliveries,
                        job.attempts,
                        job.lease_seconds,
                    )
                )
        return out

    def _next_wakeup(self) -> float | None:
        with self._s.lock:
            times = [t[0] for t in (self._s.delayed[:1] + self._s.leases[:1])]
        return min(times) if times else None

    async def fetch(self, queues: Sequence[str], limit: int, wait: float) -> list[Delivery]:
        deadline = time.monotonic() + wait
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        waiter = (loop, event)
        self._s.waiters.add(waiter)
        try:
            while True:
                event.clear()
                out = self._take(queues, limit)
                remaining = deadline - time.monotonic()
                if out or remaining <= 0:
                    return out
                nxt = self._next_wakeup()
                if nxt is not None:
                    remaining = min(remaining, max(0.0, nxt - time.time()) + 0.001)
                try:
                    async with asyncio.timeout(remaining):
                        await event.wait()
                except TimeoutError:
                    pass
        finally:
            self._s.waiters.discard(waiter)

    async def settle(self, outcomes: Sequence[Settle]) -> list[bool]:
        now = time.time()
        accepted: list[bool] = []
        requeued = False
        with self._s.lock:
            for outcome in outcomes:
                d = outcome.delivery
                job = self._s.jobs.get(d.job_id)
                if (
                    job is None
                    or job.token != d.token
                    or job.state is not JobState.RUNNING
                    or job.lease_expires_at <= now
                ):
                    accepted.append(False)
                    continue
                job.token = next(self._s.tokens)  # the lease ends here
                if outcome.kind == "ack":
                    job.result = outcome.result
                    job.error = None
                    self._finish(job, JobState.SUCCEEDED, now)
                elif outcome.kind == "dead":
                    job.attempts += 1
                    job.error = outcome.error
                    self._finish(job, JobState.DEAD, now)
                elif outcome.kind == "retry":
                    job.attempts += 1
                    job.error = outcome.error
                    if job.deliveries >= job.message.max_deliveries:
                        job.error = (
                            f"max_deliveries ({job.message.max_deliveries}) reached; "
                            f"last error: {outcome.error}"
                        )
                        self._finish(job, JobState.DEAD, now)
                    else:
                        self._move(job, JobState.QUEUED)
                        job.run_at = now + outcome.delay
                        self._make_ready(job)
                        requeued = True
                else:  # release
                    job.deliveries -= 1
                    self._move(job, JobState.QUEUED)
                    job.run_at = now
                    self._make_ready(job)
                    requeued = True
                accepted.append(True)
        if requeued:
            self._s.notify()
        return accepted

    async def extend(self, deliveries: Sequence[Delivery]) -> list[bool]:
        now = time.time()
        alive: list[bool] = []
        with self._s.lock:
            for d in deliveries:
                job = self._s.jobs.get(d.job_id)
                ok = job is not None and job.token == d.token and job.state is JobState.RUNNING
                ok = ok and job is not None and job.lease_expires_at > now
                if ok and job is not None:
                    job.lease_expires_at = now + d.lease_seconds
                alive.append(ok)
        return alive

    async def cancel(self, job_id: str) -> bool:
        now = time.time()
        with self._s.lock:
            job = self._s.jobs.get(job_id)
            if job is None or job.state is not JobState.QUEUED:
                return False
            self._finish(job, JobState.CANCELLED, now)
            return True

    def _info(self, job: _Job) -> JobInfo:
        m = job.message
        return JobInfo(
            id=m.id,
            task=m.task,
            queue=m.queue,
            state=job.state,
            priority=m.priority,
            args=m.args,
            kwargs=m.kwargs,
            deliveries=job.deliveries,
            attempts=job.attempts,
            max_deliveries=m.max_deliveries,
            created_at=m.created_at,
            run_at=job.run_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            result=decode_value(job.result),
            error=job.error,
            idempotency_key=m.idempotency_key,
            options=m.options,
        )

    async def get_job(self, job_id: str) -> JobInfo | None:
        with self._s.lock:
            self._promote_and_recover(time.time())
            job = self._s.jobs.get(job_id)
            return None if job is None else self._info(job)

    async def stats(self, queues: Sequence[str] | None = None) -> list[QueueStats]:
        now = time.time()
        with self._s.lock:
            self._promote_and_recover(now)
            names = list(queues) if queues is not None else sorted(self._s.queues)
            counts = {name: {state: 0 for state in JobState} for name in names}
            delayed = dict.fromkeys(names, 0)
            for job in self._s.jobs.values():
                c = counts.get(job.message.queue)
                if c is None:
                    continue
                c[job.state] += 1
                if job.state is JobState.QUEUED and job.run_at > now:
                    delayed[job.message.queue] += 1
            return [
                QueueStats(
                    queue=name,
                    ready=counts[name][JobState.QUEUED] - delayed[name],
                    delayed=delayed[name],
                    running=counts[name][JobState.RUNNING],
                    dead=counts[name][JobState.DEAD],
                    max_depth=self._queue(name).max_depth,
                    drain_rate=self._drain_rate(self._queue(name), now),
                )
                for name in names
            ]

    def _dead(self, job_ids: Sequence[str] | None, queue: str | None) -> list[_Job]:
        wanted = set(job_ids) if job_ids is not None else None
        return [
            job
            for job in self._s.jobs.values()
            if job.state is JobState.DEAD
            and (wanted is None or job.message.id in wanted)
            and (queue is None or job.message.queue == queue)
        ]

    async def dead_jobs(self, queue: str | None = None, limit: int = 100) -> list[JobInfo]:
        with self._s.lock:
            jobs = sorted(self._dead(None, queue), key=lambda j: j.finished_at or 0, reverse=True)
            return [self._info(job) for job in jobs[:limit]]

    async def replay_dead(self, job_ids: Sequence[str] | None = None, queue: str | None = None) -> int:
        now = time.time()
        with self._s.lock:
            jobs = self._dead(job_ids, queue)
            for job in jobs:
                self._move(job, JobState.QUEUED)
                job.deliveries = job.attempts = 0
                job.run_at = now
                job.finished_at = job.expires_at = None
                self._make_ready(job)
        if jobs:
            self._s.notify()
        return len(jobs)

    async def purge_dead(self, job_ids: Sequence[str] | None = None, queue: str | None = None) -> int:
        with self._s.lock:
            jobs = self._dead(job_ids, queue)
            for job in jobs:
                del self._s.jobs[job.message.id]
            return len(jobs)

    async def purge(self, queue: str) -> int:
        with self._s.lock:
            doomed = [
                job_id
                for job_id, job in self._s.jobs.items()
                if job.state is JobState.QUEUED and job.message.queue == queue
            ]
            for job_id in doomed:
                del self._s.jobs[job_id]
            return len(doomed)

    async def prune(self) -> int:
        now = time.time()
        with self._s.lock:
            doomed = [
                job_id
                for job_id, job in self._s.jobs.items()
                if job.state in (JobState.SUCCEEDED, JobState.CANCELLED)
                and job.expires_at is not None
                and job.expires_at <= now
            ]
            for job_id in doomed:
                del self._s.jobs[job_id]
            for key in [k for k, (_, exp) in self._s.idempotency.items() if exp <= now]:
                del self._s.idempotency[key]
            return len(doomed)
