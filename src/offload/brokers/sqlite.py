"""The embedded SQLite broker: offload's default, durable, for one machine and many processes.

Writes go through one group-commit thread per broker (see sqlite_writer); reads use a second
connection on a reader thread, which WAL lets run beside the writer. Several producer and worker
processes can share the file: each write is a `BEGIN IMMEDIATE` transaction, and waiting workers
are woken across processes by datagrams (see wakeup) rather than by polling.

Durability: `strict` (the default) commits with `synchronous=FULL`, so an acknowledged enqueue
survives power loss; `fast` uses `synchronous=NORMAL`, which survives a crash of any process but
may lose the last commits on power loss or an OS crash.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

from offload.brokers.base import (
    JOB_ROW_COLUMNS,
    Broker,
    Delivery,
    Enqueued,
    QueueStats,
    Settle,
    job_info_from_row,
)
from offload.brokers.sqlite_enqueue import Outcome, enqueue_calls_op, outcome_of
from offload.brokers.sqlite_schema import connect
from offload.brokers.sqlite_writer import GroupCommitWriter
from offload.brokers.wakeup import WakeListener, WakeSender
from offload.errors import ConfigurationError
from offload.job import JobInfo
from offload.message import Message

T = TypeVar("T")

DRAIN_WINDOW = 60
# A waiting fetch re-checks at least this often, in case a wake-up was lost (e.g. a producer
# whose socket listing was stale); normal wake-ups arrive at once.
SAFETY_POLL = 0.5

_JOB_COLUMNS = ", ".join(JOB_ROW_COLUMNS)

DURABILITY = {"strict": "FULL", "fast": "NORMAL"}


def parse_sqlite_url(url: str) -> tuple[str, str]:
    """`sqlite:///relative.db`, `sqlite:////abs/path.db`, `?durability=strict|fast`."""
    parts = urlsplit(url)
    if parts.scheme != "sqlite":
        raise ConfigurationError(f"not an SQLite URL: {url!r}")
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    if parts.netloc:
        raise ConfigurationError(
            f"SQLite URL {url!r} has a host; use sqlite:///relative.db or sqlite:////abs/path.db"
        )
    if not path or path == ":memory:":
        raise ConfigurationError(
            f"SQLite URL {url!r} names no file; use sqlite:///offload.db (an in-memory database "
            "cannot be shared between threads and processes: use memory:// for tests)"
        )
    query = parse_qs(parts.query)
    durability = query.pop("durability", ["strict"])[-1]
    if durability not in DURABILITY:
        raise ConfigurationError(
            f"durability={durability!r} in {url!r}: choose strict (synchronous=FULL) or fast"
        )
    if query:
        raise ConfigurationError(f"unknown SQLite URL option(s) {sorted(query)} in {url!r}")
    return path, durability


class SqliteBroker(Broker):
    def __init__(self, url: str = "sqlite:///offload.db") -> None:
        self.url = url
        self.path, self.durability = parse_sqlite_url(url)
        self.worker_name = f"{socket.gethostname()}:{os.getpid()}"
        self._writer: GroupCommitWriter | None = None
        self._reader: ThreadPoolExecutor | None = None
        self._read_conn: sqlite3.Connection | None = None
        self._sender: WakeSender | None = None
        self._listener: WakeListener | None = None

    # -- plumbing ------------------------------------------------------------------------------

    async def connect(self) -> None:
        if self._writer is not None:
            return
        sync = DURABILITY[self.durability]
        write_conn = await asyncio.to_thread(connect, self.path, sync)
        # The writer waits for other processes' locks itself (sqlite_writer.begin_immediate).
        write_conn.execute("PRAGMA busy_timeout=0")
        self._read_conn = await asyncio.to_thread(connect, self.path, sync)
        self._sender = WakeSender(self.path)
        self._writer = GroupCommitWriter(write_conn, self._after_commit, sync)
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="offload-sqlite-reader")

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._writer is not None:
            writer, self._writer = self._writer, None
            await asyncio.to_thread(writer.close)
        if self._reader is not None:
            reader, self._reader = self._reader, None
            conn, self._read_conn = self._read_conn, None
            if conn is not None:
                reader.submit(conn.close)
            reader.shutdown(wait=True)
        if self._sender is not None:
            self._sender.close()
            self._sender = None

    def _after_commit(self, woke: bool) -> None:
        if woke and self._sender is not None:
            self._sender.notify()

    async def _write(
        self, op: Callable[[sqlite3.Connection], T], wakes: bool = False, durable: bool = True
    ) -> T:
        """Run a write on the group-commit thread; `durable=False` only for lease bookkeeping."""
        if self._writer is None:
            await self.connect()
        assert self._writer is not None
        return await self._writer.run(op, wakes, durable)

    async def _read(self, op: Callable[[sqlite3.Connection], T]) -> T:
        if self._reader is None:
            await self.connect()
        assert self._reader is not None and self._read_conn is not None
        conn = self._read_conn
        return await asyncio.get_running_loop().run_in_executor(self._reader, op, conn)

    # -- enqueue -------------------------------------------------------------------------------

    async def declare_queue(self, name: str, max_depth: int | None) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO offload_queues (name, max_depth) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET max_depth = excluded.max_depth",
                (name, max_depth),
            )

        await self._write(op)

    batches_enqueue_calls = True  # one writer operation for many calls (sqlite_enqueue)

    async def enqueue(self, items: Sequence[tuple[Message, bytes]]) -> list[Enqueued]:
        return await self._enqueue_as_one_call(items)

    async def enqueue_calls(
        self, calls: Sequence[Sequence[tuple[Message, bytes]]]
    ) -> Sequence[list[Enqueued] | Exception]:
        outcomes: list[Outcome] = await self._write(enqueue_calls_op(calls, _drain_rate), wakes=True)
        return outcomes

    def enqueue_blocking(self, items: Sequence[tuple[Message, bytes]]) -> list[Enqueued]:
        """`enqueue` for a sync caller on any thread, straight to the writer thread.

        Going through an event loop would cost two more thread hand-offs per send; a blocking
        sender can instead run its transaction itself when the writer is idle (see
        GroupCommitWriter.call).
        """
        if self._writer is None:
            raise RuntimeError("connect() the broker before enqueue_blocking()")
        outcomes: list[Outcome] = self._writer.call(enqueue_calls_op([items], _drain_rate), wakes=True)
        return outcome_of(outcomes[0])

    # -- fetch ---------------------------------------------------------------------------------

    def _fetch_op(
        self, queues: Sequence[str], limit: int
    ) -> Callable[[sqlite3.Connection], tuple[list[Delivery], float | None]]:
        worker = self.worker_name

        def op(conn: sqlite3.Connection) -> tuple[list[Delivery], float | None]:
            now = time.time()
            _recover_expired_leases(conn, now)
            picked: list[tuple[str, int, float]] = []
            for name in queues:
                picked.extend(
                    conn.execute(
                        "SELECT id, priority, run_at FROM offload_jobs WHERE state = 'queued' "
                        "AND queue = ? AND run_at <= ? ORDER BY priority DESC, run_at, id LIMIT ?",
                        (name, now, limit),
                    ).fetchall()
                )
            if not picked:
                return [], _next_due(conn, queues, now)
            if len(queues) > 1:
                picked.sort(key=lambda r: (-r[1], r[2], r[0]))
                del picked[limit:]
            order = {row[0]: i for i, row in enumerate(picked)}
            marks = ",".join("?" * len(picked))
            rows = conn.execute(
                "UPDATE offload_jobs SET state = 'running', deliveries = deliveries + 1, "
                "token = random(), lease_expires_at = ? + lease_seconds, started_at = ?, "
                f"worker = ? WHERE id IN ({marks}) "
                "RETURNING id, queue, body, token, deliveries, attempts, lease_seconds",
                (now, now, worker, *order),
            ).fetchall()
            rows.sort(key=lambda r: order[r[0]])
            return [Delivery(*row) for row in rows], None

        return op

    async def fetch(self, queues: Sequence[str], limit: int, wait: float) -> list[Delivery]:
        if limit <= 0:
            return []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        op = self._fetch_op(queues, limit)
        while True:
            if wait > 0 and self._listener is None:
                self._listener = WakeListener(self.path, loop)
            if self._listener is not None:
                self._listener.event.clear()
            deliveries, next_due = await self._fetch_once(op)
            remaining = deadline - loop.time()
            if deliveries or remaining <= 0:
                return deliveries
            pause = min(remaining, SAFETY_POLL)
            if next_due is not None:
                pause = min(pause, max(0.0, next_due - time.time()) + 0.0005)
            assert self._listener is not None
            try:
                async with asyncio.timeout(pause):
                    await self._listener.event.wait()
            except TimeoutError:
                pass

    async def _fetch_once(
        self, op: Callable[[sqlite3.Connection], tuple[list[Delivery], float | None]]
    ) -> tuple[list[Delivery], float | None]:
        if self._writer is None:
            await self.connect()
        writer = self._writer
        assert writer is not None
        future = writer.submit(op, durable=False)  # leases: a lost one means a redelivery
        try:
            result: tuple[list[Delivery], float | None] = await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            # The caller gave up (e.g. a worker told to stop). If the fetch already ran on the
            # writer thread, nobody holds its leases: hand them back at once rather than leave
            # the jobs to wait out their leases with a delivery counted against them.
            future.add_done_callback(lambda done: self._hand_back(writer, done))
            raise
        return result

    def _hand_back(self, writer: GroupCommitWriter, future: Future[Any]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        deliveries: list[Delivery] = future.result()[0]
        if deliveries:
            writer.submit(self._settle_op([Settle(d, "release") for d in deliveries]), wakes=True)

    # -- settle --------------------------------------------------------------------------------

    async def settle(self, outcomes: Sequence[Settle]) -> list[bool]:
        wakes = any(o.kind in ("retry", "release") for o in outcomes)
        return await self._write(self._settle_op(outcomes), wakes=wakes)

    def _settle_op(self, outcomes: Sequence[Settle]) -> Callable[[sqlite3.Connection], list[bool]]:
        def op(conn: sqlite3.Connection) -> list[bool]:
            now = time.time()
            accepted: list[bool] = []
            finished: dict[str, int] = {}
            acked = _ack_all(conn, [o for o in outcomes if o.kind == "ack"], now)
            for outcome in outcomes:
                d = outcome.delivery
                fence = (d.job_id, d.token, now)
                if outcome.kind == "ack":
                    ok = (d.job_id, d.token) in acked
                    accepted.append(ok)
                    if ok:
                        finished[d.queue] = finished.get(d.queue, 0) + 1
                    continue
                if outcome.kind == "dead":
                    cursor = conn.execute(
                        "UPDATE offload_jobs SET state = 'dead', attempts = attempts + 1, "
                        "error = ?, finished_at = ?, lease_expires_at = NULL "
                        "WHERE id = ? AND token = ? AND state = 'running' AND lease_expires_at > ?",
                        (outcome.error, now, *fence),
                    )
                elif outcome.kind == "retry":
                    cursor = conn.execute(
                        "UPDATE offload_jobs SET attempts = attempts + 1, lease_expires_at = NULL, "
                        "state = CASE WHEN deliveries >= max_deliveries THEN 'dead' ELSE 'queued' END, "
                        "error = CASE WHEN deliveries >= max_deliveries THEN 'max_deliveries (' || "
                        "max_deliveries || ') reached; last error: ' || ? ELSE ? END, "
                        "finished_at = CASE WHEN deliveries >= max_deliveries THEN ? END, "
                        "run_at = ? "
                        "WHERE id = ? AND token = ? AND state = 'running' AND lease_expires_at > ?",
                        (outcome.error, outcome.error, now, now + outcome.delay, *fence),
                    )
                else:  # release: not run, so the delivery does not count
                    cursor = conn.execute(
                        "UPDATE offload_jobs SET state = 'queued', deliveries = deliveries - 1, "
                        "run_at = ?, lease_expires_at = NULL "
                        "WHERE id = ? AND token = ? AND state = 'running' AND lease_expires_at > ?",
                        (now, *fence),
                    )
                ok = cursor.rowcount == 1
                accepted.append(ok)
                if ok and outcome.kind == "dead":
                    finished[d.queue] = finished.get(d.queue, 0) + 1
            _count_finished(conn, finished, now)
            return accepted

        return op

    async def extend(self, deliveries: Sequence[Delivery]) -> list[bool]:
        def op(conn: sqlite3.Connection) -> list[bool]:
            now = time.time()
            return [
                conn.execute(
                    "UPDATE offload_jobs SET lease_expires_at = ? + lease_seconds "
                    "WHERE id = ? AND token = ? AND state = 'running' AND lease_expires_at > ?",
                    (now, d.job_id, d.token, now),
                ).rowcount
                == 1
                for d in deliveries
            ]

        return await self._write(op, durable=False)

    async def cancel(self, job_id: str) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            now = time.time()
            return (
                conn.execute(
                    "UPDATE offload_jobs SET state = 'cancelled', finished_at = ?, "
                    "expires_at = ? + result_ttl WHERE id = ? AND state = 'queued'",
                    (now, now, job_id),
                ).rowcount
                == 1
            )

        return await self._write(op)

    # -- reads ---------------------------------------------------------------------------------

    async def get_job(self, job_id: str) -> JobInfo | None:
        def op(conn: sqlite3.Connection) -> JobInfo | None:
            row = conn.execute(f"SELECT {_JOB_COLUMNS} FROM offload_jobs WHERE id = ?", (job_id,)).fetchone()
            return None if row is None else job_info_from_row(row)

        return await self._read(op)

    async def stats(self, queues: Sequence[str] | None = None) -> list[QueueStats]:
        def op(conn: sqlite3.Connection) -> list[QueueStats]:
            now = time.time()
            rows = {
                row[0]: row
                for row in conn.execute("SELECT name, max_depth, queued, running, dead FROM offload_queues")
            }
            delayed = dict(
                conn.execute(
                    "SELECT queue, count(*) FROM offload_jobs WHERE state = 'queued' "
                    "AND run_at > ? GROUP BY queue",
                    (now,),
                ).fetchall()
            )
            names = list(queues) if queues is not None else sorted(rows)
            out = []
            for name in names:
                _, max_depth, queued, running, dead = rows.get(name, (name, None, 0, 0, 0))
                late = delayed.get(name, 0)
                out.append(
                    QueueStats(
                        queue=name,
                        ready=queued - late,
                        delayed=late,
                        running=running,
                        dead=dead,
                        max_depth=max_depth,
                        drain_rate=_drain_rate(conn, name, now),
                    )
                )
            return out

        return await self._read(op)

    async def dead_jobs(self, queue: str | None = None, limit: int = 100) -> list[JobInfo]:
        def op(conn: sqlite3.Connection) -> list[JobInfo]:
            where, params = _dead_filter(None, queue)
            rows = conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM offload_jobs WHERE {where} ORDER BY finished_at DESC LIMIT ?",
                (*params, limit),
            ).fetchall()
            return [job_info_from_row(row) for row in rows]

        return await self._read(op)

    # -- operator verbs --------------------------------------------------------------------------

    async def replay_dead(self, job_ids: Sequence[str] | None = None, queue: str | None = None) -> int:
        where, params = _dead_filter(job_ids, queue)

        def op(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "UPDATE offload_jobs SET state = 'queued', deliveries = 0, attempts = 0, "
                f"run_at = ?, finished_at = NULL, expires_at = NULL WHERE {where}",
                (time.time(), *params),
            ).rowcount

        return await self._write(op, wakes=True)

    async def purge_dead(self, job_ids: Sequence[str] | None = None, queue: str | None = None) -> int:
        where, params = _dead_filter(job_ids, queue)
        return await self._write(
            lambda conn: conn.execute(f"DELETE FROM offload_jobs WHERE {where}", params).rowcount
        )

    async def purge(self, queue: str) -> int:
        return await self._write(
            lambda conn: (
                conn.execute(
                    "DELETE FROM offload_jobs WHERE state = 'queued' AND queue = ?", (queue,)
                ).rowcount
            )
        )

    async def prune(self) -> int:
        def op(conn: sqlite3.Connection) -> int:
            now = time.time()
            pruned = conn.execute(
                "DELETE FROM offload_jobs WHERE expires_at <= ? AND state IN ('succeeded', 'cancelled')",
                (now,),
            ).rowcount
            conn.execute("DELETE FROM offload_idempotency WHERE expires_at <= ?", (now,))
            conn.execute("DELETE FROM offload_throughput WHERE second < ?", (int(now) - 10 * DRAIN_WINDOW,))
            return pruned

        return await self._write(op)


# -- SQL helpers (run on the writer or reader thread) ------------------------------------------


ACK_CHUNK = 300  # rows per statement: 3 parameters each, far below SQLite's variable limit


def _ack_all(conn: sqlite3.Connection, acks: Sequence[Settle], now: float) -> set[tuple[str, int]]:
    """Mark every ack's job succeeded in one statement per chunk; return the (id, token) accepted.

    One UPDATE ... FROM (VALUES ...) instead of one statement per job: the fencing conditions are
    the same, checked row by row, and RETURNING says which leases were still current.
    """
    accepted: set[tuple[str, int]] = set()
    for start in range(0, len(acks), ACK_CHUNK):
        chunk = acks[start : start + ACK_CHUNK]
        params: list[Any] = [now, now]
        for outcome in chunk:
            params += (outcome.delivery.job_id, outcome.delivery.token, outcome.result)
        params.append(now)
        values = ",".join(["(?, ?, ?)"] * len(chunk))
        rows = conn.execute(
            "UPDATE offload_jobs SET state = 'succeeded', result = v.column3, error = NULL, "
            "finished_at = ?, expires_at = ? + result_ttl, lease_expires_at = NULL "
            f"FROM (VALUES {values}) AS v WHERE offload_jobs.id = v.column1 "
            "AND offload_jobs.token = v.column2 AND offload_jobs.state = 'running' "
            "AND offload_jobs.lease_expires_at > ? RETURNING offload_jobs.id, offload_jobs.token",
            params,
        ).fetchall()
        accepted.update((job_id, token) for job_id, token in rows)
    return accepted


def _recover_expired_leases(conn: sqlite3.Connection, now: float) -> None:
    """Dead-letter expired leases past max_deliveries; make the others deliverable again."""
    dead = conn.execute(
        "UPDATE offload_jobs SET state = 'dead', finished_at = ?, lease_expires_at = NULL, "
        "error = 'delivered ' || deliveries || ' times without being settled (max_deliveries=' "
        "|| max_deliveries || '); the worker crashed or lost its lease each time' "
        "WHERE state = 'running' AND lease_expires_at <= ? AND deliveries >= max_deliveries "
        "RETURNING queue",
        (now, now),
    ).fetchall()
    if dead:
        finished: dict[str, int] = {}
        for (queue,) in dead:
            finished[queue] = finished.get(queue, 0) + 1
        _count_finished(conn, finished, now)
    conn.execute(
        "UPDATE offload_jobs SET state = 'queued', run_at = ?, lease_expires_at = NULL "
        "WHERE state = 'running' AND lease_expires_at <= ?",
        (now, now),
    )


def _next_due(conn: sqlite3.Connection, queues: Sequence[str], now: float) -> float | None:
    """When the next delayed job of these queues becomes ready or the next lease expires, if any.

    Only future times count: a job already ready in a queue this fetch does not serve must not
    make the fetch re-check in a busy loop.
    """
    marks = ",".join("?" * len(queues))
    due = conn.execute(
        f"SELECT min(run_at) FROM offload_jobs WHERE state = 'queued' AND queue IN ({marks}) AND run_at > ?",
        (*queues, now),
    ).fetchone()[0]
    lease = conn.execute("SELECT min(lease_expires_at) FROM offload_jobs WHERE state = 'running'").fetchone()[
        0
    ]
    times = [t for t in (due, lease) if t is not None]
    return min(times) if times else None


def _count_finished(conn: sqlite3.Connection, finished: dict[str, int], now: float) -> None:
    if finished:
        conn.executemany(
            "INSERT INTO offload_throughput (queue, second, finished) VALUES (?, ?, ?) "
            "ON CONFLICT (queue, second) DO UPDATE SET finished = finished + excluded.finished",
            [(queue, int(now), n) for queue, n in finished.items()],
        )


def _drain_rate(conn: sqlite3.Connection, queue: str, now: float) -> float:
    total, first = conn.execute(
        "SELECT sum(finished), min(second) FROM offload_throughput WHERE queue = ? AND second > ?",
        (queue, int(now) - DRAIN_WINDOW),
    ).fetchone()
    if not total:
        return 0.0
    span = min(float(DRAIN_WINDOW), max(1.0, now - first))
    return float(total) / float(span)


def _dead_filter(job_ids: Sequence[str] | None, queue: str | None) -> tuple[str, tuple[Any, ...]]:
    clauses: list[str] = ["state = 'dead'"]
    params: list[Any] = []
    if job_ids is not None:
        clauses.append(f"id IN ({','.join('?' * len(job_ids))})" if job_ids else "0")
        params.extend(job_ids)
    if queue is not None:
        clauses.append("queue = ?")
        params.append(queue)
    return " AND ".join(clauses), tuple(params)
