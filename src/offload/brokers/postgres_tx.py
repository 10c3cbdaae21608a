"""Transactional enqueue: jobs written by the caller's own transaction, on the caller's connection.

    async with pool.acquire() as conn, conn.transaction():         # asyncpg
        order_id = await conn.fetchval("INSERT INTO orders ... RETURNING id")
        [job] = await enqueue_in_transaction(conn, app, [ship.message(order_id)])
    # committed: the order and its job both exist; rolled back: neither does

The same server-side function as `PostgresBroker.enqueue` runs (idempotency keys, the atomic
bound check, the INSERT, and the NOTIFY that wakes workers, which PostgreSQL delivers only at
commit). Nothing is committed here. Accepts an asyncpg connection, or a psycopg 3 async
connection; `enqueue_in_transaction_sync` takes a psycopg 3 (sync) connection, e.g. Django's
`connection.connection`. On QueueFull nothing was written and the transaction is still usable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from offload.brokers.base import Enqueued, lease_seconds
from offload.brokers.postgres_schema import render
from offload.errors import BrokerError, ConfigurationError, QueueFull
from offload.message import Message, encode

if TYPE_CHECKING:
    from offload.app import App
    from offload.job_handle import Job

_TYPES = (
    "text[]",  # id
    "text[]",  # queue
    "text[]",  # task
    "int4[]",  # priority
    "float8[]",  # eta
    "float8[]",  # created_at
    "float8[]",  # lease seconds
    "int4[]",  # max_deliveries
    "float8[]",  # result_ttl
    "text[]",  # idempotency key
    "float8[]",  # idempotency window
    "bytea[]",  # body
)
_CALL = "SELECT * FROM {s}.enqueue(%s)"
ENQUEUE_SQL = _CALL % ", ".join(f"${n}::{t}" for n, t in enumerate(_TYPES, 1))
_ENQUEUE_PSYCOPG = _CALL % ", ".join(f"%s::{t}" for t in _TYPES)


def enqueue_args(items: Sequence[tuple[Message, bytes]]) -> tuple[list[Any], ...]:
    """The function's twelve arrays, one element per job."""
    messages = [m for m, _ in items]
    return (
        [m.id for m in messages],
        [m.queue for m in messages],
        [m.task for m in messages],
        [m.priority for m in messages],
        [m.eta for m in messages],
        [m.created_at for m in messages],
        [lease_seconds(m.timeout) for m in messages],
        [m.max_deliveries for m in messages],
        [float(m.result_ttl) for m in messages],
        [m.idempotency_key for m in messages],
        [float(m.idempotency_window) for m in messages],
        [body for _, body in items],
    )


def enqueued(rows: Sequence[Any]) -> list[Enqueued]:
    """The function's rows as the port's results, or QueueFull."""
    if rows and rows[0][2] is not None:
        _, _, queue, depth, max_depth, drain_rate = rows[0]
        raise QueueFull(queue, int(depth), int(max_depth), float(drain_rate or 0.0))
    return [Enqueued(row[0], bool(row[1])) for row in rows]


async def enqueue_on(conn: Any, schema: str, items: Sequence[tuple[Message, bytes]]) -> list[Enqueued]:
    """Run the enqueue function on an asyncpg or psycopg 3 async connection, without committing."""
    if not items:
        return []
    args = enqueue_args(items)
    module = type(conn).__module__
    try:
        if module.startswith("asyncpg"):
            rows = await conn.fetch(render(ENQUEUE_SQL, schema), *args)
        elif module.startswith("psycopg"):
            cursor = await conn.execute(render(_ENQUEUE_PSYCOPG, schema), args)
            rows = await cursor.fetchall()
        else:
            raise ConfigurationError(
                f"enqueue_in_transaction needs an asyncpg or psycopg 3 async connection, not "
                f"{type(conn).__name__}; for a sync psycopg connection use enqueue_in_transaction_sync"
            )
    except Exception as exc:
        _missing_schema(exc, schema)
        raise
    return enqueued(rows)


def enqueue_on_sync(conn: Any, schema: str, items: Sequence[tuple[Message, bytes]]) -> list[Enqueued]:
    if not items:
        return []
    if not type(conn).__module__.startswith("psycopg") or not hasattr(conn, "execute"):
        raise ConfigurationError(
            f"enqueue_in_transaction_sync needs a psycopg 3 connection, not {type(conn).__name__}"
        )
    try:
        rows = conn.execute(render(_ENQUEUE_PSYCOPG, schema), enqueue_args(items)).fetchall()
    except Exception as exc:
        _missing_schema(exc, schema)
        raise
    return enqueued(rows)


def _missing_schema(exc: Exception, schema: str) -> None:
    """Explain an offload schema that was never created (no broker has connected to it yet)."""
    if getattr(exc, "sqlstate", None) in ("3F000", "42883"):  # no such schema, no such function
        raise BrokerError(
            f"the offload schema {schema!r} is not in this database yet: connect the App's broker once "
            "(await app.broker(), or start a worker), which creates it, then enqueue"
        ) from exc


def _prepare(app: App, messages: Sequence[Message]) -> tuple[str, list[tuple[Message, bytes]]]:
    from offload.brokers.postgres_url import parse_postgres_url

    if not app.broker_url.startswith(("postgresql:", "postgres:")):
        raise ConfigurationError(
            f"enqueue_in_transaction needs an App on a postgresql:// broker, not {app.broker_url!r}"
        )
    schema = parse_postgres_url(app.broker_url).schema
    return schema, [(m, encode(m, app.max_message_bytes)) for m in messages]


def _jobs(app: App, items: Sequence[tuple[Message, bytes]], results: list[Enqueued]) -> list[Job[Any]]:
    from offload.job_handle import Job

    jobs: list[Job[Any]] = []
    for (message, _), result in zip(items, results, strict=True):
        task = app.tasks.get(message.task)
        jobs.append(Job(app, result.job_id, result.created, task.return_type if task else None))
    return jobs


async def enqueue_in_transaction(conn: Any, app: App, messages: Sequence[Message]) -> list[Job[Any]]:
    """Enqueue `messages` (from `task.message(...)`) in the transaction open on `conn`.

    The jobs become visible, and workers are woken, only when the caller commits; a rollback
    leaves no trace. The App supplies the schema (from its broker URL) and the size limit.
    """
    schema, items = _prepare(app, messages)
    return _jobs(app, items, await enqueue_on(conn, schema, items))


def enqueue_in_transaction_sync(conn: Any, app: App, messages: Sequence[Message]) -> list[Job[Any]]:
    """`enqueue_in_transaction` for a sync psycopg 3 connection (e.g. Django's)."""
    schema, items = _prepare(app, messages)
    return _jobs(app, items, enqueue_on_sync(conn, schema, items))
