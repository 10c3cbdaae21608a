"""dramatiq with its Redis broker, run by its own CLI (`dramatiq module -p N -t T`)."""

from __future__ import annotations

from bench.systems.base import Producer, Settings, System, venv_script

MODULE = "bench.apps.dramatiq_app"


class DramatiqProducer(Producer):
    def __init__(self) -> None:
        from bench.apps import dramatiq_app

        self.broker = dramatiq_app.broker
        self.job = dramatiq_app.job

    def connect(self) -> None:
        self.broker.client.ping()

    def send_one(self, kind: str, enqueued: float) -> None:
        self.job.send(kind, enqueued)

    def send_bulk(self, kind: str, count: int) -> None:
        # dramatiq has no batch enqueue (a group enqueues its messages one by one): a loop.
        for _ in range(count):
            self.job.send(kind, 0.0)

    def close(self) -> None:
        self.broker.close()


class DramatiqSystem(System):
    name = "dramatiq-redis"
    uses_redis = True
    notes = (
        "RedisBroker, default middleware, no result backend; enqueue-bulk is a loop of send "
        "(no batch API); worker: one `dramatiq -p N -t T` (a parent process forking N workers)"
    )

    def reset(self, settings: Settings) -> None:
        pass  # everything lives in the Redis DB, which the runner flushes

    def worker_commands(self, settings: Settings, processes: int) -> list[list[str]]:
        return [
            [
                venv_script("dramatiq"),
                MODULE,
                "-p",
                str(processes),
                "-t",
                str(settings.threads),
                "--queues",
                "default",
            ]
        ]

    def producer(self) -> Producer:
        return DramatiqProducer()
