"""Round trips per job and throughput of the PostgreSQL broker, through the port and a Worker.

    .venv/bin/python scripts/pg_round_trips.py [postgresql://postgres@127.0.0.1:5432/test] [jobs]

Counts every statement the broker sends (each port call is one) while (1) N jobs are enqueued in
batches of 500, then (2) an in-process Worker (concurrency 64, async no-op task) runs them all.
Uses a scratch schema, dropped afterwards. Numbers are recorded in docs/brokers/postgres.md.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections import Counter
from typing import Any

import asyncpg

from offload import App
from offload.brokers.postgres import PostgresBroker
from offload.worker import Worker

BASE = sys.argv[1] if len(sys.argv) > 1 else "postgresql://postgres@127.0.0.1:5432/test"
N = int(sys.argv[2]) if len(sys.argv) > 2 else 20_000


async def main() -> None:
    schema = f"offload_rt_{uuid.uuid4().hex[:8]}"
    url = f"{BASE}?schema={schema}"
    app = App(url, name="round-trips")

    @app.task(name="noop", timeout=30)
    async def noop(i: int) -> int:
        return i

    calls: Counter[str] = Counter()
    broker = await app.broker()
    assert isinstance(broker, PostgresBroker)
    for name in ("enqueue", "fetch", "settle", "extend", "stats", "get_job"):
        original = getattr(broker, name)

        def counted(*args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
            calls[_name] += 1
            return _original(*args, **kwargs)

        setattr(broker, name, counted)
    fetch_once = broker._fetch_once

    async def counted_fetch_once(*args: Any) -> Any:
        calls["fetch statements"] += 1
        return await fetch_once(*args)

    broker._fetch_once = counted_fetch_once  # type: ignore[method-assign]

    try:
        started = time.perf_counter()
        messages = [noop.message(i) for i in range(N)]
        for start in range(0, N, 500):
            await app.send_many_async(messages[start : start + 500])
        enqueue_s = time.perf_counter() - started
        started = time.perf_counter()
        await Worker(app, ["default"], concurrency=64, burst=True).run()
        run_s = time.perf_counter() - started
        [stats] = await broker.stats(["default"])
        assert stats.depth == 0 and stats.running == 0, stats
    finally:
        await app.close_async()
        conn = await asyncpg.connect(BASE)
        await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await conn.close()

    statements = calls["enqueue"] + calls["fetch statements"] + calls["settle"] + calls["extend"]
    print(f"{N:,} jobs: enqueue {N / enqueue_s:,.0f} jobs/s (batches of 500), worker {N / run_s:,.0f} jobs/s")
    print(f"statements: {dict(calls)}")
    print(f"round trips per job (enqueue + fetch + settle + extend): {statements / N:.3f}")


if __name__ == "__main__":
    asyncio.run(main())
