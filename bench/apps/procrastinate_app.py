"""procrastinate's benchmark app: the psycopg (v3) connector on the bench's database."""

from __future__ import annotations

import os

from procrastinate import App, PsycopgConnector

from bench import jobs

app = App(
    connector=PsycopgConnector(
        conninfo=os.environ.get("BENCH_POSTGRES_URL", "postgresql://root@127.0.0.1:5432/offload_bench")
    )
)


@app.task(name="bench.job", queue="default")
def job(kind: str, enqueued: float) -> None:
    jobs.run(kind, enqueued)
