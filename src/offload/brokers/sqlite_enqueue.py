"""Enqueue for the SQLite broker: many callers' sends written as one operation.

An API server answering hundreds of submits at once calls `enqueue` once per request. Handing
each call to the writer thread on its own costs a savepoint, a bound check, an INSERT and two
thread wake-ups per job, which made a durable submit several times dearer than the HTTP work
around it (bench/api_bench.py). `EnqueueBatcher` instead collects the calls made on one event
loop during one loop iteration and hands them to the writer as a single operation, which then
answers all of them with one wake-up of the loop.

Joining calls must not join their fates: each call stays all-or-nothing on its own. The
operation decides every call's bound check and idempotency keys before it writes anything, in
the order the calls were made, so a call refused with `QueueFull` writes nothing and does not
stop the calls after it; the rows of the accepted calls are then inserted together.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from offload.brokers.base import Enqueued, lease_seconds
from offload.brokers.sqlite_writer import GroupCommitWriter
from offload.errors import BrokerError, QueueFull
from offload.message import Message

CLOSED_BEFORE_WRITE = "the SQLite broker was closed before this enqueue was written; nothing was stored"

Items = Sequence[tuple[Message, bytes]]
Outcome = list[Enqueued] | QueueFull
DrainRate = Callable[[sqlite3.Connection, str, float], float]

_INSERT_JOBS = (
    "INSERT INTO offload_jobs (id, queue, task, state, priority, run_at, created_at, "
    "lease_seconds, max_deliveries, result_ttl, idempotency_key, body) VALUES "
)
_JOB_VALUES = "(?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?)"
# Rows per INSERT statement. One statement for many rows, not executemany: the sqlite3 module
# releases and re-takes the GIL around every statement step, and each re-take waits for the
# event loop thread, so a row per step made the writer thread crawl beside a busy API server.
# 64 rows x 11 values stays far below SQLite's limit on bound variables.
INSERT_CHUNK = 64
_INSERT_SQL = {n: _INSERT_JOBS + ", ".join([_JOB_VALUES] * n) for n in (1, 2, 4, 8, 16, 32, INSERT_CHUNK)}
_INSERT_KEYS = "INSERT OR REPLACE INTO offload_idempotency (key, job_id, expires_at) VALUES (?, ?, ?)"


def enqueue_calls_op(
    calls: Sequence[Items], drain_rate: DrainRate
) -> Callable[[sqlite3.Connection], list[Outcome]]:
    """One writer operation for several enqueue calls: each call's jobs, or its QueueFull."""

    def op(conn: sqlite3.Connection) -> list[Outcome]:
        now = time.time()
        bounds: dict[str, tuple[int | None, int]] = {}  # queue -> (max_depth, queued before)
        added: dict[str, int] = {}  # queue -> rows accepted so far in this operation
        held: dict[str, str] = {}  # idempotency key -> job id, keys taken so far
        rows: list[tuple[Any, ...]] = []
        keys: list[tuple[str, str, float]] = []
        outcomes: list[Outcome] = []
        for items in calls:
            call = _plan_call(conn, items, now, held)
            refusal = None
            for name, count in call.adding.items():
                if name not in bounds:
                    row = conn.execute(
                        "SELECT max_depth, queued FROM offload_queues WHERE name = ?", (name,)
                    ).fetchone()
                    bounds[name] = (None, 0) if row is None else (row[0], row[1])
                max_depth, queued = bounds[name]
                depth = queued + added.get(name, 0)
                if max_depth is not None and depth + count > max_depth:
                    refusal = QueueFull(name, depth, max_depth, drain_rate(conn, name, now))
                    break
            if refusal is not None:
                outcomes.append(refusal)
                continue
            for name, count in call.adding.items():
                added[name] = added.get(name, 0) + count
            held.update(call.held)
            rows.extend(call.rows)
            keys.extend(call.keys)
            created = iter(call.rows)
            outcomes.append([e if e is not None else Enqueued(next(created)[0], True) for e in call.out])
        insert_rows(conn, rows)
        if keys:
            conn.executemany(_INSERT_KEYS, keys)
        return outcomes

    return op


def insert_rows(conn: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """INSERT the job rows with few statements: chunks of 64, then powers of two (cached SQL)."""
    start = 0
    while start < len(rows):
        size = next(n for n in (INSERT_CHUNK, 32, 16, 8, 4, 2, 1) if n <= len(rows) - start)
        chunk = rows[start : start + size]
        conn.execute(_INSERT_SQL[size], [value for row in chunk for value in row])
        start += size


class _Plan:
    __slots__ = ("adding", "held", "keys", "out", "rows")

    def __init__(self) -> None:
        self.out: list[Enqueued | None] = []  # None: a new job, the next of `rows`
        self.rows: list[tuple[Any, ...]] = []
        self.keys: list[tuple[str, str, float]] = []
        self.held: dict[str, str] = {}
        self.adding: dict[str, int] = {}


def _plan_call(conn: sqlite3.Connection, items: Items, now: float, held: dict[str, str]) -> _Plan:
    """What one call would write, given the keys earlier accepted calls already took."""
    plan = _Plan()
    for message, body in items:
        key = message.idempotency_key
        if key is not None:
            existing = plan.held.get(key) or held.get(key) or _held_key(conn, key, now)
            if existing is not None:
                plan.out.append(Enqueued(existing, created=False))
                continue
            plan.held[key] = message.id
            plan.keys.append((key, message.id, now + message.idempotency_window))
        run_at = max(now, message.eta) if message.eta is not None else now
        plan.rows.append(
            (
                message.id,
                message.queue,
                message.task,
                message.priority,
                run_at,
                message.created_at or now,
                lease_seconds(message.timeout),
                message.max_deliveries,
                message.result_ttl,
                key,
                body,
            )
        )
        plan.adding[message.queue] = plan.adding.get(message.queue, 0) + 1
        plan.out.append(None)
    return plan


def _held_key(conn: sqlite3.Connection, key: str, now: float) -> str | None:
    row = conn.execute(
        "SELECT job_id FROM offload_idempotency WHERE key = ? AND expires_at > ?", (key, now)
    ).fetchone()
    return None if row is None else str(row[0])


def outcome_of(outcome: Outcome) -> list[Enqueued]:
    if isinstance(outcome, QueueFull):
        raise outcome
    return outcome


class EnqueueBatcher:
    """Joins the enqueue calls made on one event loop into as few writer operations as it can.

    At most one operation is with the writer at a time: calls made meanwhile wait in `_pending`
    and go together as the next one as soon as it is answered. The writer could not start them
    any sooner (it runs one transaction at a time), and handing it one operation per loop
    iteration instead cost a thread wake-up and GIL hand-over per handful of requests.
    """

    def __init__(self, writer: GroupCommitWriter, drain_rate: DrainRate) -> None:
        self._writer = writer
        self._drain_rate = drain_rate
        self._pending: list[Call] = []
        self._in_flight = False
        self._scheduled = False
        self._closed = False

    async def enqueue(self, items: Items) -> list[Enqueued]:
        if self._closed:
            raise BrokerError("the SQLite broker is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Enqueued]] = loop.create_future()
        self._pending.append((items, future))
        if not self._in_flight and not self._scheduled:
            # After the callbacks already due in this iteration, so that the other requests
            # whose bodies arrived together join this operation.
            self._scheduled = True
            loop.call_soon(self._flush, loop)
        return await future

    def close(self) -> None:
        """Refuse new calls; calls not yet handed to the writer fail (nothing of theirs is written)."""
        self._closed = True
        pending, self._pending = self._pending, []
        for _, future in pending:
            if not future.done():
                future.set_exception(
                    BrokerError("the SQLite broker was closed before this enqueue was written")
                )

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        self._scheduled = False
        # A caller cancelled before this point is left out: its jobs are never written.
        calls = [(items, future) for items, future in self._pending if not future.done()]
        self._pending = []
        if not calls:
            return
        self._in_flight = True
        try:
            done = self._writer.submit(
                enqueue_calls_op([items for items, _ in calls], self._drain_rate), wakes=True
            )
        except BaseException:
            self._in_flight = False
            raise
        done.add_done_callback(lambda finished: _call_soon(loop, self._answer, loop, calls, finished))

    def _answer(
        self, loop: asyncio.AbstractEventLoop, calls: list[Call], finished: Future[list[Outcome]]
    ) -> None:
        """On the loop, once per operation: hand each caller its outcome, then send the next."""
        self._in_flight = False
        _answer(calls, finished)
        if self._pending and not self._closed:
            self._flush(loop)


Call = tuple[Items, "asyncio.Future[list[Enqueued]]"]


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop closed while the write ran: nobody is waiting any more
        pass


def _answer(calls: list[Call], finished: Future[list[Outcome]]) -> None:
    """Each caller's own outcome: its jobs, its QueueFull, or the operation's error."""
    error = finished.exception()
    for index, (_, future) in enumerate(calls):
        if future.done():  # cancelled meanwhile; its jobs were written (like any late cancel)
            continue
        if error is not None:
            future.set_exception(error)
            continue
        outcome = finished.result()[index]
        if isinstance(outcome, QueueFull):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
