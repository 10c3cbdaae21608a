"""Compare psycopg 3 (async) and asyncpg on the PostgreSQL broker's hot path.

    .venv/bin/python scripts/pg_driver_compare.py [postgresql://postgres@127.0.0.1:5432/test]

Workload, per driver, in a scratch schema (dropped afterwards):
  insert   10,000 rows in one INSERT ... SELECT FROM unnest(...) (the broker's bulk enqueue)
  fetch    lease batches of 64 with UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED)
  ack      each fetched batch acknowledged with one UPDATE ... FROM unnest(...)
  cycle    1,000 one-job round trips (insert 1, fetch 1, ack 1): the per-statement overhead
Best of 3 runs is reported. The numbers are recorded in docs/brokers/postgres.md.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import psycopg

URL = sys.argv[1] if len(sys.argv) > 1 else "postgresql://postgres@127.0.0.1:5432/test"
N = 10_000
BATCH = 64
CYCLES = 1_000
SCHEMA = f"drivercmp_{os.getpid()}"

DDL = f"""
CREATE SCHEMA {SCHEMA};
CREATE TABLE {SCHEMA}.jobs (
    id text PRIMARY KEY, queue text NOT NULL, state text NOT NULL, priority int NOT NULL,
    run_at timestamptz NOT NULL, lease_seconds float8 NOT NULL, deliveries int NOT NULL DEFAULT 0,
    token bigint NOT NULL DEFAULT 0, lease_expires_at timestamptz, body bytea NOT NULL,
    result bytea, finished_at timestamptz);
CREATE INDEX ON {SCHEMA}.jobs (queue, priority DESC, run_at, id) WHERE state = 'queued';
"""

INSERT = (
    f"INSERT INTO {SCHEMA}.jobs (id, queue, state, priority, run_at, lease_seconds, body) "
    "SELECT i, 'default', 'queued', 0, now(), 30, b FROM unnest({ids}::text[], {bodies}::bytea[]) AS u(i, b)"
)
FETCH = (
    f"UPDATE {SCHEMA}.jobs SET state = 'running', deliveries = deliveries + 1, "
    "token = (random() * 9e18)::bigint, lease_expires_at = now() + lease_seconds * interval '1 second' "
    f"WHERE id IN (SELECT id FROM {SCHEMA}.jobs WHERE state = 'queued' AND queue = {{q}} "
    "AND run_at <= now() ORDER BY priority DESC, run_at, id LIMIT {n} FOR UPDATE SKIP LOCKED) "
    "RETURNING id, body, token, deliveries"
)
ACK = (
    f"UPDATE {SCHEMA}.jobs j SET state = 'succeeded', result = v.r, finished_at = now(), "
    "lease_expires_at = NULL FROM unnest({ids}::text[], {tokens}::int8[], {results}::bytea[]) AS v(i, t, r) "
    "WHERE j.id = v.i AND j.token = v.t AND j.state = 'running' AND j.lease_expires_at > now() "
    "RETURNING j.id"
)


def rows(n: int, start: int) -> tuple[list[str], list[bytes]]:
    ids = [f"{start + i:032x}" for i in range(n)]
    body = b'{"id":"x","task":"bench.noop","args":[1,2,3],"created_at":1.0}'
    return ids, [body] * n


class Asyncpg:
    name = "asyncpg"

    async def open(self) -> None:
        self.conn: asyncpg.Connection = await asyncpg.connect(URL)
        self.insert = INSERT.format(ids="$1", bodies="$2")
        self.fetch_sql = FETCH.format(q="$1", n="$2")
        self.ack_sql = ACK.format(ids="$1", tokens="$2", results="$3")

    async def close(self) -> None:
        await self.conn.close()

    async def run(self, sql: str) -> None:
        await self.conn.execute(sql)

    async def enqueue(self, ids: list[str], bodies: list[bytes]) -> None:
        await self.conn.execute(self.insert, ids, bodies)

    async def fetch(self, n: int) -> list[tuple[str, int]]:
        return [(r[0], r[2]) for r in await self.conn.fetch(self.fetch_sql, "default", n)]

    async def ack(self, leased: list[tuple[str, int]]) -> int:
        ids = [i for i, _ in leased]
        tokens = [t for _, t in leased]
        return len(await self.conn.fetch(self.ack_sql, ids, tokens, [b"null"] * len(ids)))


class Psycopg:
    def __init__(self, binary: bool) -> None:
        self.binary = binary
        self.name = "psycopg (binary)" if binary else "psycopg (text)"

    async def open(self) -> None:
        self.conn = await psycopg.AsyncConnection.connect(URL, autocommit=True, prepare_threshold=0)
        self.insert = INSERT.format(ids="%s", bodies="%s")
        self.fetch_sql = FETCH.format(q="%s", n="%s")
        self.ack_sql = ACK.format(ids="%s", tokens="%s", results="%s")

    async def close(self) -> None:
        await self.conn.close()

    async def run(self, sql: str) -> None:
        await self.conn.execute(sql)

    async def enqueue(self, ids: list[str], bodies: list[bytes]) -> None:
        await self.conn.execute(self.insert, (ids, bodies), binary=self.binary)

    async def fetch(self, n: int) -> list[tuple[str, int]]:
        cur = await self.conn.execute(self.fetch_sql, ("default", n), binary=self.binary)
        return [(r[0], r[2]) for r in await cur.fetchall()]

    async def ack(self, leased: list[tuple[str, int]]) -> int:
        ids = [i for i, _ in leased]
        tokens = [t for _, t in leased]
        cur = await self.conn.execute(self.ack_sql, (ids, tokens, [b"null"] * len(ids)), binary=self.binary)
        return len(await cur.fetchall())


async def timed(fn: Callable[[], Awaitable[Any]]) -> float:
    started = time.perf_counter()
    await fn()
    return time.perf_counter() - started


async def one_run(driver: Any, offset: int) -> dict[str, float]:
    await driver.run(f"TRUNCATE {SCHEMA}.jobs")
    ids, bodies = rows(N, offset)
    insert = await timed(lambda: driver.enqueue(ids, bodies))
    batches: list[list[tuple[str, int]]] = []

    async def fetch_all() -> None:
        while batch := await driver.fetch(BATCH):
            batches.append(batch)

    fetch = await timed(fetch_all)
    assert sum(len(b) for b in batches) == N, "not every row was leased"

    async def ack_all() -> None:
        for batch in batches:
            assert await driver.ack(batch) == len(batch)

    ack = await timed(ack_all)

    async def cycles() -> None:
        for i in range(CYCLES):
            one_ids, one_bodies = rows(1, offset + N + i)
            await driver.enqueue(one_ids, one_bodies)
            leased = await driver.fetch(1)
            assert await driver.ack(leased) == 1

    cycle = await timed(cycles)
    return {"insert": insert, "fetch": fetch, "ack": ack, "cycle": cycle}


async def main() -> None:
    setup = await asyncpg.connect(URL)
    await setup.execute(DDL)
    try:
        results: dict[str, dict[str, float]] = {}
        drivers: list[Any] = [Asyncpg(), Psycopg(binary=False), Psycopg(binary=True)]
        for d in drivers:
            await d.open()
            await one_run(d, 0)  # warm-up: prepared statements, caches
        runs: dict[str, list[dict[str, float]]] = {d.name: [] for d in drivers}
        for r in range(3):
            for d in drivers:  # interleaved, so drift on the machine hits every driver alike
                runs[d.name].append(await one_run(d, (r + 1) * 10 * N))
        for d in drivers:
            await d.close()
            results[d.name] = {k: min(run[k] for run in runs[d.name]) for k in runs[d.name][0]}
            results[d.name]["cycle_median"] = statistics.median(run["cycle"] for run in runs[d.name])
    finally:
        await setup.execute(f"DROP SCHEMA {SCHEMA} CASCADE")
        await setup.close()

    print(f"{N:,} jobs, fetch/ack batches of {BATCH}, {CYCLES:,} one-job cycles; best of 3")
    print(
        f"{'driver':<18} {'insert 10k':>11} {'fetch 10k':>10} {'ack 10k':>9} {'total':>8} {'jobs/s':>8} "
        f"{'1-job cycle':>12}"
    )
    for name, r in results.items():
        total = r["insert"] + r["fetch"] + r["ack"]
        print(
            f"{name:<18} {r['insert'] * 1000:>9.1f}ms {r['fetch'] * 1000:>8.1f}ms {r['ack'] * 1000:>7.1f}ms "
            f"{total * 1000:>6.0f}ms {N / total:>8,.0f} {r['cycle'] / CYCLES * 1e6:>9.0f}µs"
        )


if __name__ == "__main__":
    asyncio.run(main())
