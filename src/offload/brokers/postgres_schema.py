"""The PostgreSQL store: its tables, server-side functions, and versioned migrations.

Everything lives in one schema (default `offload`, `?schema=` in the URL); the SQL of each
version is in postgres_sql/vN.sql. The broker's hot paths are SQL functions, so that each port
call is one statement and one round trip, and so that `enqueue_in_transaction` runs the very
same code on a caller's own connection:

    enqueue(...)   idempotency keys, the atomic bound check, the INSERT and the NOTIFY (one
                   keyless job in scalar statements, anything else by enqueue_batch, see v2.sql)
    fetch(...)     expired leases recovered, then up to n ready jobs leased (FOR UPDATE SKIP LOCKED)
    settle(...)    every outcome of a batch in one UPDATE ... FROM unnest(...)
    extend(...)    a batch of lease renewals

Queue depth (what `max_depth` bounds) is kept by statement-level triggers in `queue_counts`,
sharded by backend so that concurrent writers do not queue up behind one counter row; an enqueue
into a bounded queue locks that queue's row in `queues`, which makes the check exact.

Migrations: `schema_version` records each applied version; `ensure_schema` applies the missing
ones in order, in one transaction, while holding an advisory lock on the schema's name, so
processes starting together do not race; it refuses a schema written by a newer offload.
"""

from __future__ import annotations

import re
import zlib
from importlib import resources
from typing import Any

from offload.errors import BrokerError, ConfigurationError

SHARDS = 16  # rows per queue in queue_counts and per second in throughput

_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,47}$")


def check_schema_name(schema: str) -> str:
    if not _NAME.match(schema):
        raise ConfigurationError(
            f"schema={schema!r}: use 1-48 lowercase letters, digits or underscores, not starting "
            "with a digit (e.g. schema=offload)"
        )
    return schema


def channel(schema: str) -> str:
    """The LISTEN/NOTIFY channel of a schema's broker; the payload is the queue's name."""
    return f"offload_{schema}"


def _sql(name: str) -> str:
    return (resources.files("offload.brokers") / "postgres_sql" / name).read_text(encoding="utf-8")


# (version, description, SQL). Append new versions; never edit one that has shipped.
MIGRATIONS: list[tuple[int, str, str]] = [
    (1, "jobs, queues, counters, idempotency keys, throughput; enqueue/fetch/settle/extend", _sql("v1.sql")),
    (2, "enqueue answers a single job without an idempotency key in scalar statements", _sql("v2.sql")),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


def render(sql: str, schema: str) -> str:
    return (
        sql.replace("{s}", f'"{schema}"')
        .replace("{channel}", channel(schema))
        .replace("{shards}", str(SHARDS))
    )


def _lock_key(schema: str) -> int:
    """A stable advisory lock id for this schema's migrations (63-bit, from the name)."""
    return zlib.crc32(f"offload-migrations:{schema}".encode()) | (0x0FF1_0AD0 << 32)


async def ensure_schema(conn: Any, schema: str) -> int:
    """Create or migrate the schema on an asyncpg connection; returns the version now in place."""
    current = await _version(conn, schema)
    if current == SCHEMA_VERSION:
        return current  # the common case: no lock, one query
    # A session lock taken before the transaction starts, so that the transaction's view of the
    # catalog includes whatever the process that held the lock before us created.
    await conn.execute("SELECT pg_advisory_lock($1)", _lock_key(schema))
    try:
        return await _migrate(conn, schema)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _lock_key(schema))


async def _migrate(conn: Any, schema: str) -> int:
    async with conn.transaction():
        current = await _version(conn, schema)  # another process may have migrated meanwhile
        if current is None:
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            foreign = await conn.fetch(
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = $1 AND c.relkind IN ('r', 'v', 'p') ORDER BY 1 LIMIT 5",
                schema,
            )
            if foreign:
                names = ", ".join(row[0] for row in foreign)
                raise BrokerError(
                    f"schema {schema!r} holds tables offload did not create ({names}); "
                    "choose another with ?schema=NAME in the broker URL"
                )
            await conn.execute(
                f'CREATE TABLE "{schema}".schema_version (version integer PRIMARY KEY, '
                "description text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            current = 0
        if current > SCHEMA_VERSION:
            raise BrokerError(
                f"PostgreSQL schema {schema!r} was migrated by a newer offload (version {current}; "
                f"this one knows up to {SCHEMA_VERSION}); upgrade offload"
            )
        for version, description, sql in MIGRATIONS:
            if version > current:
                await conn.execute(render(sql, schema))
                await conn.execute(
                    f'INSERT INTO "{schema}".schema_version (version, description) VALUES ($1, $2)',
                    version,
                    description,
                )
                current = version
    return current


async def _version(conn: Any, schema: str) -> int | None:
    exists = await conn.fetchval("SELECT to_regclass($1)", f'"{schema}".schema_version')
    if exists is None:
        return None
    version = await conn.fetchval(f'SELECT max(version) FROM "{schema}".schema_version')
    if version is None:
        return 0
    if version > SCHEMA_VERSION:
        raise BrokerError(
            f"PostgreSQL schema {schema!r} was migrated by a newer offload (version {version}; "
            f"this one knows up to {SCHEMA_VERSION}); upgrade offload"
        )
    return int(version)
