"""offload on each of its brokers: SQLite (strict or fast durability), Redis, PostgreSQL,
RabbitMQ (with Redis state) and NATS. One app module; the adapter sets the broker URL."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from bench.systems.base import (
    NATS,
    POSTGRES,
    RABBITMQ,
    REDIS,
    SQLITE,
    Producer,
    Settings,
    System,
    remove_sqlite,
    split,
    venv_script,
)

APP_PATH = "bench.apps.offload_app:app"
PREFIX = "offload_bench"  # RabbitMQ queue names and the NATS bucket
WORKER = "`offload worker --processes N --concurrency C` (N > 1: a supervisor and N children)"


class OffloadProducer(Producer):
    def __init__(self) -> None:
        from bench.apps import offload_app

        self.app = offload_app.app
        self.job = offload_app.job

    def connect(self) -> None:
        async def touch(broker: object) -> None:
            return None

        self.app.run_sync(touch)  # starts the portal thread, connects (creates schemas)

    def send_one(self, kind: str, enqueued: float) -> None:
        self.job.send(kind, enqueued)

    def send_bulk(self, kind: str, count: int) -> None:
        self.app.send_many([self.job.message(kind, 0.0) for _ in range(count)])

    def send_concurrent(self, kind: str, count: int, senders: int) -> None:
        # offload's async API, as an async web app calls it: tasks on one loop (the portal's),
        # each awaiting its own `send_async`.
        async def sender(n: int) -> None:
            for _ in range(n):
                await self.job.send_async(kind, 0.0)

        async def all_senders(broker: object) -> None:
            await asyncio.gather(*(sender(n) for n in split(count, senders)))

        self.app.run_sync(all_senders)

    def close(self) -> None:
        self.app.close()


class OffloadSystem(System):
    """broker: "sqlite" (with durability "strict" or "fast"), "redis", "postgres", "rabbitmq",
    "nats"."""

    def __init__(self, broker: str, durability: str = "", async_task: bool = False) -> None:
        """async_task: the job is an `async def` task (run on the worker's event loop) instead of
        a sync one (run on a thread), to show what the hand-off to a thread costs."""
        self.broker = broker
        self.durability = durability
        self.async_task = async_task
        self.name = f"offload-{broker}-{durability}" if durability else f"offload-{broker}"
        if async_task:
            self.name += "-async"
        self.group = broker
        send = "enqueue-bulk uses app.send_many (one call per 5,000 jobs)"
        tasks = "an async def task (on the event loop)" if async_task else "tasks on the thread executor"
        if broker == SQLITE:
            self.notes = f"SQLite WAL, durability={durability}; {send}; worker: {WORKER}, {tasks}"
        elif broker == REDIS:
            self.servers = (REDIS,)
            self.notes = f"Redis broker (Lua scripts); {send}; worker: {WORKER}, {tasks}"
        elif broker == POSTGRES:
            self.servers = (POSTGRES,)
            self.requires = ("asyncpg",)
            self.notes = (
                f"PostgreSQL broker (asyncpg, FOR UPDATE SKIP LOCKED, LISTEN/NOTIFY, server's "
                f"synchronous_commit); {send}; worker: {WORKER}, {tasks}"
            )
        elif broker == RABBITMQ:
            self.servers = (RABBITMQ, REDIS)
            self.requires = ("aio_pika",)
            self.amqp_queues = (
                *(f"{PREFIX}.default.p{p}" for p in range(10)),
                f"{PREFIX}.poison",
            )  # and the delay buckets its state store lists (found by the runner)
            self.amqp_exchanges = (f"{PREFIX}.work", f"{PREFIX}.delay")
            self.notes = (
                "RabbitMQ broker (new): quorum queues with publisher confirms, job state "
                f"in Redis (the bench's Redis DB); {send}; worker: {WORKER}, {tasks}; server CPU "
                "is RabbitMQ's + Redis's"
            )
        elif broker == NATS:
            self.servers = (NATS,)
            self.requires = ("nats",)
            self.drain_cap = 5_000
            self.notes = (
                "drains of at most 5,000 jobs; NATS JetStream KV broker (experimental), replicas=1; "
                f"{send}; worker: {WORKER}, {tasks}"
            )
        else:
            raise ValueError(broker)

    def url(self, settings: Settings) -> str | None:
        if self.broker == REDIS:
            return settings.redis_url
        if self.broker == POSTGRES:
            return f"{settings.postgres_url}?schema=offload"
        if self.broker == RABBITMQ:
            return f"{settings.amqp_url}?state={settings.redis_url}&prefix={PREFIX}"
        if self.broker == NATS:
            return f"{settings.nats_url}?bucket={PREFIX}"
        return None

    def env(self, settings: Settings) -> dict[str, str]:
        task = {"BENCH_OFFLOAD_ASYNC_TASK": "1" if self.async_task else "0"}
        if self.broker == SQLITE:
            return {"BENCH_OFFLOAD_DURABILITY": self.durability, **task}
        return {"BENCH_OFFLOAD_URL": self.url(settings) or "", **task}

    def unavailable(self, settings: Settings, env: dict[str, str]) -> str | None:
        missing = super().unavailable(settings, env)
        if missing:
            return missing
        # Can the measured offload make the broker from its URL? (In a subprocess with the
        # workers' environment, so the snapshot is what answers.)
        done = subprocess.run(
            [sys.executable, "-c", "import bench.apps.offload_app"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["?"])[-1]
            return f"offload cannot construct this broker: {last}"
        return None

    def reset(self, settings: Settings, env: dict[str, str]) -> None:
        if self.broker == SQLITE:
            remove_sqlite(settings.work_dir / f"offload-{self.durability}.db")
        elif self.broker == NATS:
            from bench.servers import reset_nats

            reset_nats(settings.nats_url, (PREFIX, f"{PREFIX}_drain"))

    def worker_commands(self, settings: Settings, processes: int) -> list[list[str]]:
        concurrency = str(settings.offload_concurrency)
        if settings.offload_launcher == "cli":
            return [
                [
                    venv_script("offload"),
                    "worker",
                    APP_PATH,
                    "--queues",
                    "default",
                    "--concurrency",
                    concurrency,
                    "--processes",
                    str(processes),
                ]
            ]
        runner = [sys.executable, "-m", "bench.offload_worker", "--concurrency", concurrency]
        return [list(runner) for _ in range(processes)]

    def producer(self) -> Producer:
        return OffloadProducer()
