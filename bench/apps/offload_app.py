"""offload's benchmark app: the broker URL comes from BENCH_OFFLOAD_URL (the adapter sets it);
without it, one SQLite file per durability mode under BENCH_WORK_DIR."""

from __future__ import annotations

import os

from bench import jobs
from offload import App

URL = os.environ.get("BENCH_OFFLOAD_URL")
if URL is None:
    DURABILITY = os.environ.get("BENCH_OFFLOAD_DURABILITY", "strict")
    DB_PATH = os.path.join(os.path.abspath(os.environ.get("BENCH_WORK_DIR", ".")), f"offload-{DURABILITY}.db")
    URL = f"sqlite:///{DB_PATH}?durability={DURABILITY}"

if os.environ.get("BENCH_CALLS_DIR"):  # worker processes: count the broker calls (bench/calls.py)
    from bench import calls

    calls.install(URL, os.environ["BENCH_CALLS_DIR"])

app = App(URL)


if os.environ.get("BENCH_OFFLOAD_ASYNC_TASK") == "1":
    # The same body as an `async def` task: it runs on the worker's event loop, without the hand-off
    # to a thread a sync task takes (the body's work is one small file write, or 1 ms of CPU).

    @app.task(name="bench.job", retries=0)
    async def job(kind: str, enqueued: float) -> None:
        jobs.run(kind, enqueued)

else:

    @app.task(name="bench.job", retries=0)
    def job(kind: str, enqueued: float) -> None:
        jobs.run(kind, enqueued)
