"""pgqueuer on PostgreSQL, run by N `pgq run` processes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

from bench.systems.base import POSTGRES, AsyncProducer, Producer, Settings, System, split, venv_script


class PgqueuerProducer(AsyncProducer):
    def __init__(self) -> None:
        super().__init__()
        from bench.apps import pgqueuer_app

        self.app = pgqueuer_app

    def connect(self) -> None:
        import asyncpg
        from pgqueuer.db import AsyncpgDriver
        from pgqueuer.queries import Queries

        self.connection = self.run(asyncpg.connect(self.app.DSN))
        self.queries = Queries(AsyncpgDriver(self.connection))

    async def asend_one(self, kind: str, enqueued: float) -> None:
        await self.queries.enqueue(self.app.ENTRYPOINT, self.app.payload(kind, enqueued))

    def prepare_concurrent(self, senders: int) -> None:
        # An asyncpg connection runs one query at a time: a connection (and Queries) per sender.
        import asyncpg
        from pgqueuer.db import AsyncpgDriver
        from pgqueuer.queries import Queries

        self.sender_connections = [self.run(asyncpg.connect(self.app.DSN)) for _ in range(senders)]
        self.sender_queries = [Queries(AsyncpgDriver(c)) for c in self.sender_connections]

    def send_concurrent(self, kind: str, count: int, senders: int) -> None:
        async def sender(queries: Any, n: int) -> None:
            for _ in range(n):
                await queries.enqueue(self.app.ENTRYPOINT, self.app.payload(kind, 0.0))

        async def all_senders() -> None:
            shares = split(count, senders)
            await asyncio.gather(*(sender(q, n) for q, n in zip(self.sender_queries, shares, strict=True)))

        self.run(all_senders())

    def send_bulk(self, kind: str, count: int) -> None:
        async def send() -> None:
            for start in range(0, count, 5_000):  # enqueue with lists: one statement per call
                n = min(5_000, count - start)
                body = self.app.payload(kind, 0.0)
                await self.queries.enqueue([self.app.ENTRYPOINT] * n, [body] * n, [0] * n)

        self.run(send())

    async def aclose(self) -> None:
        for c in [self.connection, *getattr(self, "sender_connections", [])]:
            await c.close()


class PgqueuerSystem(System):
    name = "pgqueuer"
    group = POSTGRES
    servers = (POSTGRES,)
    requires = ("pgqueuer", "asyncpg")
    notes = (
        "pgqueuer defaults (asyncpg, LISTEN/NOTIFY, batch size 10, finished jobs moved to a log "
        "table); the job body runs in asyncio.to_thread (pgqueuer entrypoints must be coroutines); "
        "enqueue-bulk uses Queries.enqueue with lists, 5,000 jobs per call; worker: N processes "
        "each running pgqueuer.run(factory, max_concurrent_tasks=C), the documented equivalent of "
        "`pgq run` (whose CLI fails in pgqueuer 1.6)"
    )

    def env(self, settings: Settings) -> dict[str, str]:
        return {"PGDSN": settings.postgres_url}

    def reset(self, settings: Settings, env: dict[str, str]) -> None:
        command = [venv_script("pgq"), "install"]
        subprocess.run(command, env=env, capture_output=True, timeout=120, check=True)

    def worker_commands(self, settings: Settings, processes: int) -> list[list[str]]:
        # pgqueuer.run(...), what `pgq run` does (its CLI fails in pgqueuer 1.6: see the app)
        command = [
            sys.executable,
            "-m",
            "bench.apps.pgqueuer_app",
            "--max-concurrent-tasks",
            str(settings.offload_concurrency),
        ]
        return [list(command) for _ in range(processes)]

    def producer(self) -> Producer:
        return PgqueuerProducer()
