"""huey with SqliteHuey or RedisHuey, run by its own consumer (`huey_consumer`)."""

from __future__ import annotations

from bench.systems.base import Producer, Settings, System, remove_sqlite, venv_script

INSTANCE_PATH = "bench.apps.huey_app.huey"


class HueyProducer(Producer):
    def __init__(self) -> None:
        from bench.apps import huey_app

        self.huey = huey_app.huey
        self.job = huey_app.job

    def connect(self) -> None:
        self.huey.pending_count()  # opens the connection (and the SQLite schema)

    def send_one(self, kind: str, enqueued: float) -> None:
        self.job(kind, enqueued)

    def send_bulk(self, kind: str, count: int) -> None:
        # huey has no batch enqueue: `map` is its many-jobs API and enqueues one by one.
        self.job.map([(kind, 0.0)] * count)

    def close(self) -> None:
        pool = getattr(self.huey.storage, "pool", None)
        if pool is not None:
            pool.disconnect()


class HueySystem(System):
    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.name = f"huey-{backend}"
        self.group = backend
        self.servers = ("redis",) if backend == "redis" else ()
        storage = "RedisHuey (blocking dequeue)" if backend == "redis" else "SqliteHuey (WAL, fsync default)"
        self.notes = (
            f"{storage}; enqueue-bulk uses task.map (a loop: huey has no batch enqueue); "
            "worker: N huey_consumer processes x T threads (-k thread, -q, default polling backoff)"
        )

    def env(self, settings: Settings) -> dict[str, str]:
        return {"BENCH_HUEY_BACKEND": self.backend}

    def reset(self, settings: Settings, env: dict[str, str]) -> None:
        if self.backend == "sqlite":
            remove_sqlite(settings.work_dir / "huey.db")

    def worker_commands(self, settings: Settings, processes: int) -> list[list[str]]:
        command = [
            venv_script("huey_consumer"),
            INSTANCE_PATH,
            "-k",
            "thread",
            "-w",
            str(settings.threads),
            "-q",
        ]
        return [list(command) for _ in range(processes)]

    def producer(self) -> Producer:
        return HueyProducer()
