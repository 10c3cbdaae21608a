"""dramatiq with its Redis or RabbitMQ broker, run by its own CLI (`dramatiq module -p N -t T`)."""

from __future__ import annotations

from bench.systems.base import RABBITMQ, REDIS, Producer, Settings, System, venv_script

MODULE = "bench.apps.dramatiq_app"


class DramatiqProducer(Producer):
    def __init__(self) -> None:
        from bench.apps import dramatiq_app

        self.broker = dramatiq_app.broker
        self.job = dramatiq_app.job

    def connect(self) -> None:
        client = getattr(self.broker, "client", None)
        if client is not None:
            client.ping()  # Redis
        else:
            self.broker.declare_queue("default", ensure=True)  # RabbitMQ: connects, declares

    def send_one(self, kind: str, enqueued: float) -> None:
        self.job.send(kind, enqueued)

    def send_bulk(self, kind: str, count: int) -> None:
        # dramatiq has no batch enqueue (a group enqueues its messages one by one): a loop.
        for _ in range(count):
            self.job.send(kind, 0.0)

    def close(self) -> None:
        self.broker.close()


class DramatiqSystem(System):
    def __init__(self, broker: str, confirms: bool = False) -> None:
        """confirms (RabbitMQ only): publisher confirms, so that a send returns once RabbitMQ has
        the message, as offload's do; the comparison on the same promise."""
        self.broker = broker
        self.confirms = confirms
        self.name = f"dramatiq-{broker}-confirms" if confirms else f"dramatiq-{broker}"
        self.group = broker
        self.servers = (broker,)
        worker = "worker: one `dramatiq -p N -t T` (a parent process forking N workers)"
        if confirms and broker != RABBITMQ:
            raise ValueError("publisher confirms are RabbitMQ's")
        if broker == REDIS:
            self.notes = (
                "RedisBroker, default middleware, no result backend; enqueue-bulk is a loop of send "
                f"(no batch API); {worker}"
            )
        elif broker == RABBITMQ:
            self.requires = ("pika",)
            self.amqp_queues = ("default", "default.DQ", "default.XQ")
            if confirms:
                sends = "publisher confirms (confirm_delivery=True: a send waits for RabbitMQ's confirm)"
            else:
                sends = (
                    "no publisher confirms (the default, confirm_delivery=False: a send returns "
                    "before RabbitMQ has the message)"
                )
            self.notes = (
                f"RabbitmqBroker: classic durable queues, persistent messages, {sends}, "
                f"prefetch 2 x threads; enqueue-bulk is a loop of send; {worker}"
            )
        else:
            raise ValueError(broker)

    def env(self, settings: Settings) -> dict[str, str]:
        return {
            "BENCH_DRAMATIQ_BROKER": self.broker,
            "BENCH_DRAMATIQ_CONFIRMS": "1" if self.confirms else "0",
        }

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
