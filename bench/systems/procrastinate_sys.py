"""procrastinate on PostgreSQL, run by N `procrastinate worker` processes."""

from __future__ import annotations

import subprocess

from bench.systems.base import POSTGRES, AsyncProducer, Producer, Settings, System, venv_script

APP = "bench.apps.procrastinate_app.app"


class ProcrastinateProducer(AsyncProducer):
    def __init__(self) -> None:
        super().__init__()
        from bench.apps import procrastinate_app

        self.app = procrastinate_app.app
        self.job = procrastinate_app.job

    def connect(self) -> None:
        self.run(self.app.open_async())

    async def asend_one(self, kind: str, enqueued: float) -> None:
        await self.job.defer_async(kind=kind, enqueued=enqueued)

    def send_bulk(self, kind: str, count: int) -> None:
        async def send() -> None:
            for start in range(0, count, 5_000):  # batch_defer: one INSERT per call
                n = min(5_000, count - start)
                await self.job.batch_defer_async(*({"kind": kind, "enqueued": 0.0} for _ in range(n)))

        self.run(send())

    async def aclose(self) -> None:
        await self.app.close_async()


class ProcrastinateSystem(System):
    name = "procrastinate"
    group = POSTGRES
    servers = (POSTGRES,)
    requires = ("procrastinate", "psycopg")
    drain_cap = 5_000
    notes = (
        "drains of at most 5,000 jobs; procrastinate defaults (psycopg 3 pool, LISTEN/NOTIFY, "
        "finished jobs kept in the table: --delete-jobs never); the sync task runs in a thread "
        "(sync_to_async, asyncio's default executor); enqueue-bulk uses Task.batch_defer_async, "
        "5,000 jobs per call (like send_many); worker: N `procrastinate worker --concurrency C` "
        "processes"
    )

    def reset(self, settings: Settings, env: dict[str, str]) -> None:
        command = [venv_script("procrastinate"), "--app", APP, "schema", "--apply"]
        subprocess.run(command, env=env, capture_output=True, timeout=120, check=True)

    def worker_commands(self, settings: Settings, processes: int) -> list[list[str]]:
        command = [
            venv_script("procrastinate"),
            "--app",
            APP,
            "worker",
            "--queues",
            "default",
            "--concurrency",
            str(settings.offload_concurrency),
        ]
        return [list(command) for _ in range(processes)]

    def producer(self) -> Producer:
        return ProcrastinateProducer()
