"""celery with Redis or RabbitMQ as its broker, run by `celery worker` with the threads pool."""

from __future__ import annotations

from bench.systems.base import RABBITMQ, REDIS, Producer, Settings, System, venv_script

APP = "bench.apps.celery_app"


class CeleryProducer(Producer):
    def __init__(self) -> None:
        from bench.apps import celery_app

        self.app = celery_app.app
        self.job = celery_app.job

    def connect(self) -> None:
        self.connection = self.app.connection_for_write()
        self.connection.ensure_connection(max_retries=3)
        self.producer = self.app.producer_pool.acquire(block=True)
        queue = self.app.amqp.queues[self.app.conf.task_default_queue]
        queue.bind(self.connection.default_channel).declare()

    def send_one(self, kind: str, enqueued: float) -> None:
        self.job.delay(kind, enqueued)

    def send_bulk(self, kind: str, count: int) -> None:
        # celery has no batch publish (a group publishes its tasks one by one and adds group
        # bookkeeping; measured slower): the fastest public way is apply_async on one held
        # producer. `chunks` would be faster, but it sends many calls as one job.
        for _ in range(count):
            self.job.apply_async((kind, 0.0), producer=self.producer)

    def close(self) -> None:
        self.producer.release()
        self.connection.release()
        self.app.close()


class CelerySystem(System):
    def __init__(self, broker: str) -> None:
        self.broker = broker
        self.name = f"celery-{broker}"
        self.group = broker
        self.servers = (broker,)
        self.requires = ("celery",)
        common = (
            "no result backend, acks early (celery's default task_acks_late=False: a job is "
            "acknowledged before it runs), prefetch multiplier 4; enqueue-bulk is a loop of "
            "apply_async on one producer (no batch publish; a group measured slower; `chunks` "
            "is not used: it sends many calls as one job); worker: N `celery worker -P threads "
            "-c T` processes (celery's default pool is prefork with one process per job slot)"
        )
        if broker == REDIS:
            self.notes = f"kombu Redis transport (lists, visibility timeout 1 h); {common}"
        elif broker == RABBITMQ:
            self.amqp_queues = ("default",)
            self.notes = f"py-amqp transport, classic durable queue, no publisher confirms; {common}"
        else:
            raise ValueError(broker)

    def env(self, settings: Settings) -> dict[str, str]:
        return {"BENCH_CELERY_BROKER": self.broker}

    def worker_commands(self, settings: Settings, processes: int) -> list[list[str]]:
        return [
            [
                venv_script("celery"),
                "-A",
                APP,
                "worker",
                "-P",
                "threads",
                "-c",
                str(settings.threads),
                "-Q",
                "default",
                "-n",
                f"bench{i}@%h",
                "--loglevel",
                "WARNING",
            ]
            for i in range(processes)
        ]

    def producer(self) -> Producer:
        return CeleryProducer()
