"""The PostgreSQL broker: durable jobs in ordinary tables, for many hosts sharing one database.

    postgresql://user:password@host:5432/dbname?schema=offload&pool_size=10

Each port call is one statement (one round trip) to a server-side function created by
postgres_schema: bulk enqueue, fetch with `FOR UPDATE SKIP LOCKED`, batched settle and extend.
A waiting fetch LISTENs on a dedicated connection and is woken by the NOTIFY that an enqueue sends
in its own transaction (so a job is announced only once it is committed), or when the next
delayed job becomes ready or the next lease expires.

Durability: an enqueue or outcome that returned has been committed, so it survives a crash under
the server's `synchronous_commit` (`on` by default: flushed to the WAL; with a synchronous
standby, replicated too). Lease bookkeeping (fetch, extend) commits with `synchronous_commit=off`:
losing it to a crash only means a job is delivered again.

`enqueue_in_transaction(conn, app, messages)` enqueues on the caller's own connection, inside the
caller's transaction: the jobs exist only if that transaction commits (see postgres_tx).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import asyncpg  # type: ignore[import-untyped]

from offload.brokers.base import Broker, Delivery, Enqueued, QueueStats, Settle, job_info_from_row
from offload.brokers.postgres_schema import channel, ensure_schema, render
from offload.brokers.postgres_tx import (
    ENQUEUE_SQL,
    enqueue_args,
    enqueue_in_transaction,
    enqueue_in_transaction_sync,
    enqueued,
)
from offload.brokers.postgres_url import PostgresOptions, explain, is_transient, parse_postgres_url
from offload.errors import BrokerError, QueueFull
from offload.job import JobInfo
from offload.message import Message

__all__ = ["PostgresBroker", "enqueue_in_transaction", "enqueue_in_transaction_sync", "parse_postgres_url"]

T = TypeVar("T")
log = logging.getLogger("offload.broker.postgres")

# A waiting fetch re-checks at least this often, in case a notification was lost while the
# listening connection was being re-established; wake-ups normally arrive at once.
SAFETY_CAP = 5.0

_EPOCH = "extract(epoch FROM {0})::float8"
_JOB_COLUMNS = (
    "id, queue, task, state, priority, "
    + ", ".join(_EPOCH.format(c) for c in ("run_at", "created_at"))
    + ", deliveries, attempts, max_deliveries, "
    + ", ".join(_EPOCH.format(c) for c in ("started_at", "finished_at"))
    + ", worker, idempotency_key, body, result, error"
)
_DEAD = "state = 'dead' AND ($1::text[] IS NULL OR id = ANY($1)) AND ($2::text IS NULL OR queue = $2)"


class PostgresBroker(Broker):
    def __init__(self, url: str = "postgresql://localhost/postgres") -> None:
        self.url = url
        self.options: PostgresOptions = parse_postgres_url(url)
        self.schema = self.options.schema
        self.channel = channel(self.schema)
        self.worker_name = f"{socket.gethostname()}:{os.getpid()}"
        self._pool: Any = None
        self._listener: Any = None
        self._connect_lock: asyncio.Lock | None = None
        self._listen_lock: asyncio.Lock | None = None
        self._waiters: dict[asyncio.Event, frozenset[str]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        sql = {
            "enqueue": ENQUEUE_SQL,
            "fetch": "SELECT * FROM {s}.fetch($1, $2, $3)",
            "settle": "SELECT * FROM {s}.settle($1, $2, $3, $4, $5, $6)",
            "extend": "SELECT * FROM {s}.extend($1, $2)",
        }
        self._sql = {name: render(text, self.schema) for name, text in sql.items()}

    def _q(self, text: str) -> str:
        return render(text, self.schema)

    # -- connections ---------------------------------------------------------------------------

    async def connect(self) -> None:
        if self._pool is not None:
            return
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            if self._pool is None:
                await self._open()

    async def _open(self) -> None:
        o = self.options
        try:
            pool = await asyncpg.create_pool(
                o.dsn,
                min_size=1,
                max_size=o.pool_size,
                statement_cache_size=o.statement_cache_size,
                server_settings={"application_name": "offload", **o.server_settings},
                timeout=o.connect_timeout,
                reset=_keep_session,
            )
        except Exception as exc:
            raise BrokerError(explain(exc, o)) from exc
        try:
            async with pool.acquire() as conn:
                await ensure_schema(conn, self.schema)
        except BaseException as exc:
            await pool.close()
            if isinstance(exc, BrokerError) or not isinstance(exc, Exception):
                raise
            raise BrokerError(explain(exc, o)) from exc
        self._pool = pool

    async def close(self) -> None:
        for task in list(self._background):
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(task, 5)
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(listener.close(), 2)
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 5)
            except Exception:  # noqa: BLE001 - a timeout or a dead server: close it anyway
                pool.terminate()

    async def _call(self, op: Callable[[Any], Awaitable[T]]) -> T:
        """Run `op` on a pooled connection, riding out a server restart (see `_retry`)."""
        if self._pool is None:
            await self.connect()

        async def on_pooled() -> T:
            async with self._pool.acquire() as conn:
                try:
                    return await op(conn)
                except Exception as exc:
                    if is_transient(exc) and not isinstance(exc, asyncpg.PostgresError):
                        conn.terminate()  # a broken connection must not go back to the pool
                    raise

        return await self._retry(on_pooled)

    async def _retry(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Repeat `attempt` through lost connections for up to reconnect_timeout, then BrokerError.

        Every operation is safe to repeat: enqueue is idempotent by job id, and a settle or
        extend whose first attempt was applied only reports its lease as gone.
        """
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        pause = 0.05
        while True:
            try:
                return await attempt()
            except Exception as exc:
                if not is_transient(exc):
                    if isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError):
                        raise BrokerError(explain(exc, self.options)) from exc
                    raise
                if deadline is None:
                    deadline = loop.time() + self.options.reconnect_timeout
                    log.warning("PostgreSQL connection problem (%s); retrying", exc)
                if loop.time() >= deadline:
                    raise BrokerError(explain(exc, self.options)) from exc
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.5)

    # -- LISTEN/NOTIFY -------------------------------------------------------------------------

    async def _listen(self) -> None:
        """Make sure the dedicated listening connection is up (reconnecting if it was lost)."""
        if self._listener is not None and not self._listener.is_closed():
            return
        if self._listen_lock is None:
            self._listen_lock = asyncio.Lock()
        async with self._listen_lock:
            if self._listener is not None and not self._listener.is_closed():
                return
            o = self.options

            async def open_listener() -> Any:
                conn = await asyncpg.connect(
                    o.dsn,
                    timeout=o.connect_timeout,
                    server_settings={"application_name": "offload-listen", **o.server_settings},
                )
                try:
                    await conn.add_listener(self.channel, self._on_notify)
                except BaseException:
                    await conn.close()
                    raise
                conn.add_termination_listener(self._on_listener_lost)
                return conn

            self._listener = await self._retry(open_listener)

    def _on_notify(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        for event, queues in self._waiters.items():
            if payload in queues:
                event.set()

    def _on_listener_lost(self, conn: Any) -> None:
        if self._listener is conn:
            self._listener = None
        for event in self._waiters:  # wake everyone: they re-listen, then look again
            event.set()

    # -- the port: enqueue -----------------------------------------------------------------------

    async def declare_queue(self, name: str, max_depth: int | None) -> None:
        sql = self._q(
            "INSERT INTO {s}.queues AS q (name, max_depth) VALUES ($1, $2) ON CONFLICT (name) "
            "DO UPDATE SET max_depth = excluded.max_depth "
            "WHERE q.max_depth IS DISTINCT FROM excluded.max_depth"
        )
        await self._call(lambda conn: conn.execute(sql, name, max_depth))

    async def enqueue(self, items: Sequence[tuple[Message, bytes]]) -> list[Enqueued]:
        if not items:
            return []
        args = enqueue_args(items)
        rows = await self._call(lambda conn: conn.fetch(self._sql["enqueue"], *args))
        return enqueued(rows)

    batches_enqueue_calls = True

    async def enqueue_calls(
        self, calls: Sequence[Sequence[tuple[Message, bytes]]]
    ) -> Sequence[list[Enqueued] | Exception]:
        """Several sends in one transaction: one commit (one WAL flush, one NOTIFY) for all.

        Each call's rows come from its own run of the enqueue function, in order, so a call
        refused by a bound (QueueFull, which writes nothing) sees the calls before it and leaves
        the others alone. Any other error aborts the transaction; then the calls run one by one,
        each to its own outcome.
        """
        if len(calls) < 2:
            return await super().enqueue_calls(calls)
        statement = self._sql["enqueue"]
        arguments = [enqueue_args(items) if items else None for items in calls]

        async def in_one_transaction(conn: Any) -> list[list[Any]]:
            async with conn.transaction():
                return [[] if args is None else await conn.fetch(statement, *args) for args in arguments]

        try:
            row_sets = await self._call(in_one_transaction)
        except BrokerError as exc:
            if isinstance(exc.__cause__, asyncpg.PostgresError) and not is_transient(exc.__cause__):
                return await super().enqueue_calls(calls)  # one call's fault: find whose
            return [exc] * len(calls)
        outcomes: list[list[Enqueued] | Exception] = []
        for rows in row_sets:
            try:
                outcomes.append(enqueued(rows))
            except QueueFull as exc:
                outcomes.append(exc)
        return outcomes

    async def enqueue_with(self, conn: Any, items: Sequence[tuple[Message, bytes]]) -> list[Enqueued]:
        """Enqueue on the caller's connection (asyncpg or psycopg), inside its transaction."""
        from offload.brokers.postgres_tx import enqueue_on

        return await enqueue_on(conn, self.schema, items)

    # -- the port: fetch -----------------------------------------------------------------------

    async def fetch(self, queues: Sequence[str], limit: int, wait: float) -> list[Delivery]:
        if limit <= 0:
            return []
        names = list(dict.fromkeys(queues))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        event: asyncio.Event | None = None
        try:
            while True:
                if wait > 0 and event is None:
                    event = asyncio.Event()
                    self._waiters[event] = frozenset(names)
                if event is not None:
                    await self._listen()  # before looking, so no notification falls in between
                    event.clear()
                deliveries, next_due = await self._fetch_once(names, limit)
                if deliveries:
                    return deliveries
                if next_due == 0.0:
                    continue  # expired leases were just recovered: look again at once
                remaining = deadline - loop.time()
                if remaining <= 0 or event is None:
                    return []
                pause = min(remaining, SAFETY_CAP)
                if next_due is not None:
                    pause = min(pause, max(0.0, next_due) + 0.001)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(pause):
                        await event.wait()
        finally:
            if event is not None:
                self._waiters.pop(event, None)

    async def _fetch_once(self, names: list[str], limit: int) -> tuple[list[Delivery], float | None]:
        sql = self._sql["fetch"]
        task = asyncio.ensure_future(self._call(lambda conn: conn.fetch(sql, names, limit, self.worker_name)))
        try:
            rows = await asyncio.shield(task)
        except asyncio.CancelledError:
            # The caller gave up (a worker told to stop). If the statement ran anyway, nobody
            # holds its leases: hand them back at once rather than leave them to expire.
            self._background.add(task)
            task.add_done_callback(self._hand_back)
            raise
        return _deliveries(rows)

    def _hand_back(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if task.cancelled() or task.exception() is not None:
            return
        deliveries, _ = _deliveries(task.result())
        if deliveries:
            release = asyncio.ensure_future(self.settle([Settle(d, "release") for d in deliveries]))
            self._background.add(release)
            release.add_done_callback(self._background.discard)

    # -- the port: settle and extend -----------------------------------------------------------

    async def settle(self, outcomes: Sequence[Settle]) -> list[bool]:
        if not outcomes:
            return []
        args = (
            [o.delivery.job_id for o in outcomes],
            [o.delivery.token for o in outcomes],
            [o.kind for o in outcomes],
            [o.result for o in outcomes],
            [o.error for o in outcomes],
            [float(o.delay) for o in outcomes],
        )
        rows = await self._call(lambda conn: conn.fetch(self._sql["settle"], *args))
        accepted = {(row[0], row[1]) for row in rows}
        return [(o.delivery.job_id, o.delivery.token) in accepted for o in outcomes]

    async def extend(self, deliveries: Sequence[Delivery]) -> list[bool]:
        if not deliveries:
            return []
        ids, tokens = [d.job_id for d in deliveries], [d.token for d in deliveries]
        rows = await self._call(lambda conn: conn.fetch(self._sql["extend"], ids, tokens))
        alive = {(row[0], row[1]) for row in rows}
        return [(d.job_id, d.token) in alive for d in deliveries]

    async def cancel(self, job_id: str) -> bool:
        sql = self._q(
            "UPDATE {s}.jobs SET state = 'cancelled', finished_at = now(), "
            "expires_at = now() + result_ttl * interval '1 second' WHERE id = $1 AND state = 'queued'"
        )
        status: str = await self._call(lambda conn: conn.execute(sql, job_id))
        return status == "UPDATE 1"

    # -- reads -----------------------------------------------------------------------------------

    async def get_job(self, job_id: str) -> JobInfo | None:
        sql = self._q(f"SELECT {_JOB_COLUMNS} FROM {{s}}.jobs WHERE id = $1")
        row = await self._call(lambda conn: conn.fetchrow(sql, job_id))
        return None if row is None else job_info_from_row(row)

    async def stats(self, queues: Sequence[str] | None = None) -> list[QueueStats]:
        names = "unnest($1::text[]) WITH ORDINALITY AS n(name, i)" if queues is not None else None
        source = names or "(SELECT name, row_number() OVER (ORDER BY name) AS i FROM {s}.queues) AS n"
        sql = self._q(
            "SELECT n.name, q.max_depth, "
            "coalesce((SELECT sum(c.queued) FROM {s}.queue_counts c WHERE c.queue = n.name), 0)::bigint, "
            "(SELECT count(*) FROM {s}.jobs j WHERE j.state = 'queued' AND j.queue = n.name "
            "AND j.run_at > now()), "
            "(SELECT count(*) FROM {s}.jobs j WHERE j.state = 'running' AND j.queue = n.name), "
            "(SELECT count(*) FROM {s}.jobs j WHERE j.state = 'dead' AND j.queue = n.name), "
            f"{{s}}.drain_rate(n.name) FROM {source} LEFT JOIN {{s}}.queues q ON q.name = n.name ORDER BY n.i"
        )
        params = [list(queues)] if queues is not None else []
        rows = await self._call(lambda conn: conn.fetch(sql, *params))
        return [
            QueueStats(
                queue=name,
                ready=max(0, queued - delayed),
                delayed=delayed,
                running=running,
                dead=dead,
                max_depth=max_depth,
                drain_rate=float(rate),
            )
            for name, max_depth, queued, delayed, running, dead, rate in rows
        ]

    async def dead_jobs(self, queue: str | None = None, limit: int = 100) -> list[JobInfo]:
        sql = self._q(
            f"SELECT {_JOB_COLUMNS} FROM {{s}}.jobs WHERE {_DEAD} ORDER BY finished_at DESC LIMIT $3"
        )
        rows = await self._call(lambda conn: conn.fetch(sql, None, queue, limit))
        return [job_info_from_row(row) for row in rows]

    # -- operator verbs ----------------------------------------------------------------------------

    async def replay_dead(self, job_ids: Sequence[str] | None = None, queue: str | None = None) -> int:
        sql = self._q(
            "UPDATE {s}.jobs SET state = 'queued', deliveries = 0, attempts = 0, run_at = now(), "
            f"finished_at = NULL, expires_at = NULL WHERE {_DEAD} RETURNING queue"
        )
        ids = list(job_ids) if job_ids is not None else None

        async def op(conn: Any) -> int:
            async with conn.transaction():
                rows = await conn.fetch(sql, ids, queue)
                await conn.execute(
                    "SELECT pg_notify($1, q) FROM unnest($2::text[]) AS q",
                    self.channel,
                    sorted({row[0] for row in rows}),
                )
            return len(rows)

        return await self._call(op)

    async def purge_dead(self, job_ids: Sequence[str] | None = None, queue: str | None = None) -> int:
        sql = self._q(f"DELETE FROM {{s}}.jobs WHERE {_DEAD}")
        ids = list(job_ids) if job_ids is not None else None
        return _count(await self._call(lambda conn: conn.execute(sql, ids, queue)))

    async def purge(self, queue: str) -> int:
        sql = self._q("DELETE FROM {s}.jobs WHERE state = 'queued' AND queue = $1")
        return _count(await self._call(lambda conn: conn.execute(sql, queue)))

    async def prune(self) -> int:
        sql = self._q(
            "WITH jobs AS (DELETE FROM {s}.jobs WHERE expires_at <= now() "
            "AND state IN ('succeeded', 'cancelled') RETURNING 1), "
            "keys AS (DELETE FROM {s}.idempotency WHERE expires_at <= now()), "
            "rates AS (DELETE FROM {s}.throughput "
            "WHERE second < floor(extract(epoch FROM now()))::bigint - 600) "
            "SELECT count(*) FROM jobs"
        )
        pruned: int = await self._call(lambda conn: conn.fetchval(sql))
        return pruned


async def _keep_session(conn: Any) -> None:
    """The pool's reset: nothing to undo, so a connection goes back without a round trip.

    asyncpg's default resets every released connection with one more statement (advisory
    unlocks, CLOSE ALL, UNLISTEN *, RESET ALL), the second round trip of every call. Pooled
    connections here keep no session state: settings are transaction-local (set_config(..., true)),
    LISTEN has a connection of its own, and the one session-level advisory lock (migrations, in
    ensure_schema) is released before its connection goes back, or the pool is closed. asyncpg
    still rolls back a transaction left open before calling this.
    """


# -- rows to records -----------------------------------------------------------------------------


def _deliveries(rows: Sequence[Any]) -> tuple[list[Delivery], float | None]:
    if not rows or rows[0][0] is None:
        return [], (rows[0][7] if rows else None)
    return [Delivery(r[0], r[1], r[2], r[3], r[4], r[5], r[6]) for r in rows], None


def _count(status: str) -> int:
    return int(status.rsplit(" ", 1)[-1])
