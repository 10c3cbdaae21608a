"""taskiq with taskiq-redis's stream broker, run by `taskiq worker`."""

from __future__ import annotations

from bench.systems.base import REDIS, AsyncProducer, Producer, Settings, System, venv_script


class TaskiqProducer(AsyncProducer):
    def __init__(self) -> None:
        super().__init__()
        from bench.apps import taskiq_app

        self.broker = taskiq_app.broker
        self.job = taskiq_app.job

    def connect(self) -> None:
        self.run(self.broker.startup())  # connects and creates the consumer group

    async def asend_one(self, kind: str, enqueued: float) -> None:
        await self.job.kiq(kind, enqueued)

    def send_bulk(self, kind: str, count: int) -> None:
        async def send() -> None:
            for _ in range(count):  # no batch API: a loop of kiq
                await self.job.kiq(kind, 0.0)

        self.run(send())

    async def aclose(self) -> None:
        await self.broker.shutdown()


class TaskiqSystem(System):
    name = "taskiq-redis"
    group = REDIS
    servers = (REDIS,)
    requires = ("taskiq", "taskiq_redis")

    def __init__(self) -> None:
        self.notes = (
            "taskiq-redis RedisStreamBroker (XREADGROUP, ack after the result is saved: taskiq's "
            "default), no result backend; enqueue-bulk is a loop of kiq (no batch API); worker: "
            "`taskiq worker --workers N --max-async-tasks C` (a parent and N children), the sync "
            "task in taskiq's thread pool (Python's default size)"
        )

    def worker_commands(self, settings: Settings, processes: int) -> list[list[str]]:
        return [
            [
                venv_script("taskiq"),
                "worker",
                "bench.apps.taskiq_app:broker",
                "--workers",
                str(processes),
                "--max-async-tasks",
                str(settings.offload_concurrency),
                "--no-configure-logging",
            ]
        ]

    def producer(self) -> Producer:
        return TaskiqProducer()
