"""The SQLite store's schema, its version, and opening a file safely.

Queue counters (`offload_queues.queued/running/dead`) are kept by triggers in the same transaction
as every state change, so the bound check at enqueue reads one row instead of counting the queue.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from offload.errors import BrokerError

SCHEMA_VERSION = 1

_DDL = """
CREATE TABLE offload_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;

CREATE TABLE offload_queues (
    name TEXT PRIMARY KEY,
    max_depth INTEGER,
    queued INTEGER NOT NULL DEFAULT 0,
    running INTEGER NOT NULL DEFAULT 0,
    dead INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

CREATE TABLE offload_jobs (
    id TEXT PRIMARY KEY,             -- time-sortable, so inserts append to the b-tree
    queue TEXT NOT NULL,
    task TEXT NOT NULL,
    state TEXT NOT NULL,             -- queued | running | succeeded | dead | cancelled
    priority INTEGER NOT NULL,
    run_at REAL NOT NULL,            -- not delivered before (epoch seconds)
    created_at REAL NOT NULL,
    lease_seconds REAL NOT NULL,
    max_deliveries INTEGER NOT NULL,
    result_ttl REAL NOT NULL,
    deliveries INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    token INTEGER NOT NULL DEFAULT 0, -- fencing token of the current lease
    lease_expires_at REAL,
    started_at REAL,
    finished_at REAL,
    expires_at REAL,                 -- finished jobs are pruned after this
    worker TEXT,
    idempotency_key TEXT,
    body BLOB NOT NULL,
    result BLOB,
    error TEXT
) WITHOUT ROWID;

CREATE INDEX offload_jobs_ready ON offload_jobs (queue, priority DESC, run_at)
    WHERE state = 'queued';
CREATE INDEX offload_jobs_due ON offload_jobs (run_at) WHERE state = 'queued';
CREATE INDEX offload_jobs_leases ON offload_jobs (lease_expires_at) WHERE state = 'running';
CREATE INDEX offload_jobs_expiry ON offload_jobs (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX offload_jobs_dead ON offload_jobs (queue, finished_at) WHERE state = 'dead';

CREATE TABLE offload_idempotency (
    key TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    expires_at REAL NOT NULL
) WITHOUT ROWID;

-- jobs finished per queue per second, for the drain rate
CREATE TABLE offload_throughput (
    queue TEXT NOT NULL,
    second INTEGER NOT NULL,
    finished INTEGER NOT NULL,
    PRIMARY KEY (queue, second)
) WITHOUT ROWID;

CREATE TRIGGER offload_jobs_insert AFTER INSERT ON offload_jobs BEGIN
    INSERT OR IGNORE INTO offload_queues (name) VALUES (NEW.queue);
    UPDATE offload_queues SET queued = queued + (NEW.state = 'queued') WHERE name = NEW.queue;
END;

CREATE TRIGGER offload_jobs_state AFTER UPDATE OF state ON offload_jobs
WHEN OLD.state <> NEW.state BEGIN
    UPDATE offload_queues SET
        queued = queued + (NEW.state = 'queued') - (OLD.state = 'queued'),
        running = running + (NEW.state = 'running') - (OLD.state = 'running'),
        dead = dead + (NEW.state = 'dead') - (OLD.state = 'dead')
    WHERE name = NEW.queue;
END;

CREATE TRIGGER offload_jobs_delete AFTER DELETE ON offload_jobs BEGIN
    UPDATE offload_queues SET
        queued = queued - (OLD.state = 'queued'),
        running = running - (OLD.state = 'running'),
        dead = dead - (OLD.state = 'dead')
    WHERE name = OLD.queue;
END;
"""


def connect(path: str, synchronous: str, busy_timeout: float = 30.0) -> sqlite3.Connection:
    """Open (creating if needed) an offload store, or explain why this file cannot be one."""
    directory = Path(path).resolve().parent
    if not directory.is_dir():
        raise BrokerError(
            f"cannot open SQLite broker {path!r}: directory {str(directory)!r} does not exist; "
            "create it or point OFFLOAD_BROKER_URL elsewhere"
        )
    try:
        conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
        # Look before changing anything: a file that is not an offload store must be left as it
        # was, so the WAL switch (which rewrites the header) comes after this check.
        _refuse_foreign(conn, path)
        conn.execute("PRAGMA journal_mode=WAL")
    except sqlite3.DatabaseError as exc:
        raise BrokerError(_unusable(path, exc)) from exc
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA foreign_keys=OFF")
    conn.execute("PRAGMA temp_store=MEMORY")
    # 4 MB page cache per connection: the hot pages (ready index, recent rows) fit, and a worker
    # process stays small (two connections each).
    conn.execute("PRAGMA cache_size=-4000")
    try:
        _ensure_schema(conn, path)
    except BaseException:
        conn.close()
        raise
    return conn


def _refuse_foreign(conn: sqlite3.Connection, path: str) -> None:
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if tables and "offload_meta" not in tables:
        conn.close()
        raise BrokerError(
            f"{path!r} is an SQLite database that offload did not create "
            f"(it holds tables {', '.join(sorted(tables)[:5])}); use a separate file for "
            "the offload broker"
        )


def _unusable(path: str, exc: Exception) -> str:
    if not os.access(path, os.R_OK) and os.path.exists(path):
        return f"cannot read SQLite broker file {path!r} (permission denied); fix its permissions"
    if "not a database" in str(exc) or "file is encrypted" in str(exc):
        return (
            f"{path!r} is not an SQLite database, so it cannot be an offload store; "
            "point OFFLOAD_BROKER_URL at a new file"
        )
    return f"cannot open SQLite broker {path!r}: {exc}"


def _ensure_schema(conn: sqlite3.Connection, path: str) -> None:
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.DatabaseError as exc:
        raise BrokerError(_unusable(path, exc)) from exc
    try:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            for statement in _split(_DDL):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO offload_meta (key, value) VALUES ('schema', 'offload'), ('version', ?)",
                (str(SCHEMA_VERSION),),
            )
        elif "offload_meta" not in tables:
            raise BrokerError(
                f"{path!r} is an SQLite database that offload did not create "
                f"(it holds tables {', '.join(sorted(tables)[:5])}); use a separate file for "
                "the offload broker"
            )
        else:
            row = conn.execute("SELECT value FROM offload_meta WHERE key = 'version'").fetchone()
            version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                raise BrokerError(
                    f"{path!r} was written by a newer offload (schema {version}, this one reads "
                    f"{SCHEMA_VERSION}); upgrade offload"
                )
            # Future migrations go here, each `if version < N: ...` in order.
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _split(script: str) -> list[str]:
    """Split the DDL into statements; triggers contain ';' inside BEGIN ... END."""
    statements: list[str] = []
    current: list[str] = []
    for line in script.splitlines():
        if line.strip().startswith("--") or not line.strip():
            continue
        current.append(line)
        text = "\n".join(current)
        if sqlite3.complete_statement(text):
            statements.append(text)
            current = []
    return statements
