"""pgqueuer's benchmark app: a factory for `pgq run` (asyncpg driver). pgqueuer entrypoints must be
coroutines; the job body is handed to a thread (asyncio.to_thread, as pgqueuer's docs say for
blocking code), like offload's sync task."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator

import asyncpg
from pgqueuer import Job, PgQueuer
from pgqueuer.db import AsyncpgDriver

from bench import jobs

DSN = os.environ.get("BENCH_POSTGRES_URL", "postgresql://root@127.0.0.1:5432/offload_bench")
ENTRYPOINT = "bench.job"


def payload(kind: str, enqueued: float) -> bytes:
    return json.dumps({"kind": kind, "enqueued": enqueued}).encode()


@contextlib.asynccontextmanager
async def main() -> AsyncIterator[PgQueuer]:
    connection = await asyncpg.connect(DSN)
    pgq = PgQueuer(AsyncpgDriver(connection))

    @pgq.entrypoint(ENTRYPOINT)
    async def job(job: Job) -> None:
        args = json.loads(job.payload or b"{}")
        await asyncio.to_thread(jobs.run, args["kind"], args["enqueued"])

    try:
        yield pgq
    finally:
        await connection.close()


if __name__ == "__main__":
    # `pgq run bench.apps.pgqueuer_app:main --max-concurrent-tasks C`, without the CLI: pgqueuer
    # 1.6's `pgq run` fails before starting (its --log-level option reaches the logging setup as a
    # str). pgqueuer.run is its documented equivalent, SIGTERM/SIGINT stop it.
    import argparse

    import pgqueuer

    parser = argparse.ArgumentParser()
    parser.add_argument("--max-concurrent-tasks", type=int, default=None)
    args = parser.parse_args()
    asyncio.run(pgqueuer.run(main, max_concurrent_tasks=args.max_concurrent_tasks))
