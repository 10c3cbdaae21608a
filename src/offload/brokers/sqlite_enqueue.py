"""Enqueue for the SQLite broker: several callers' sends written as one operation.

App gathers the sends made concurrently on one event loop (offload/send_batching.py) and hands
them to `SqliteBroker.enqueue_calls`, which writes them with one operation of the group-commit
writer: one thread hand-off, one bound check per queue, a few multi-row INSERTs and one loop
wake-up, instead of all that per call, which made a durable HTTP submit several times dearer
than the HTTP work around it (bench/api_bench.py).

Joining calls must not join their fates: each call stays all-or-nothing on its own. The
operation decides every call's bound check and idempotency keys before it writes anything, in
the order the calls were made, so a call refused with `QueueFull` writes nothing and does not
stop the calls after it; the rows of the accepted calls are then inserted together.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any

from offload.brokers.base import Enqueued, lease_seconds
from offload.errors import QueueFull
from offload.message import Message

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
