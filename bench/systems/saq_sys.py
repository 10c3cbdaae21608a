"""saq (simple async queue) on Redis, run by its own CLI (`saq module.settings --workers N`)."""

from __future__ import annotations

from bench.systems.base import REDIS, AsyncProducer, Producer, Settings, System, venv_script


class SaqProducer(AsyncProducer):
    def __init__(self) -> None:
        super().__init__()
        from bench.apps import saq_app

        self.queue = saq_app.queue

    def connect(self) -> None:
        self.run(self.queue.connect())
        self.run(self.queue.count("queued"))

    async def asend_one(self, kind: str, enqueued: float) -> None:
        await self.queue.enqueue("bench.job", kind=kind, enqueued=enqueued)

    def send_bulk(self, kind: str, count: int) -> None:
        async def send() -> None:
            for _ in range(count):  # saq has no batch enqueue: a loop
                await self.queue.enqueue("bench.job", kind=kind, enqueued=0.0)

        self.run(send())

    async def aclose(self) -> None:
        await self.queue.disconnect()


class SaqSystem(System):
    name = "saq"
    group = REDIS
    servers = (REDIS,)
    requires = ("saq",)
    notes = (
        "saq defaults on Redis (job records kept 600 s after completion, heartbeats, sweeps); the "
        "sync job runs in saq's thread pool (Python's default size); enqueue-bulk is a loop of "
        "enqueue (no batch API); worker: `saq --workers N` "
        "(a parent and N children), concurrency C each"
    )

    def env(self, settings: Settings) -> dict[str, str]:
        return {"BENCH_ASYNC_CONCURRENCY": str(settings.offload_concurrency)}

    def worker_commands(self, settings: Settings, processes: int) -> list[list[str]]:
        return [[venv_script("saq"), "bench.apps.saq_app.settings", "--workers", str(processes), "--quiet"]]

    def producer(self) -> Producer:
        return SaqProducer()
