"""offload on its embedded SQLite broker, in `strict` (synchronous=FULL) or `fast` durability."""

from __future__ import annotations

import sys

from bench.systems.base import Producer, Settings, System, remove_sqlite, venv_script

APP_PATH = "bench.apps.offload_app:app"


class OffloadProducer(Producer):
    def __init__(self) -> None:
        from bench.apps import offload_app

        self.app = offload_app.app
        self.job = offload_app.job

    def connect(self) -> None:
        async def touch(broker: object) -> None:
            return None

        self.app.run_sync(touch)  # starts the portal thread and opens the database

    def send_one(self, kind: str, enqueued: float) -> None:
        self.job.send(kind, enqueued)

    def send_bulk(self, kind: str, count: int) -> None:
        self.app.send_many([self.job.message(kind, 0.0) for _ in range(count)])

    def close(self) -> None:
        self.app.close()


class OffloadSystem(System):
    def __init__(self, durability: str) -> None:
        self.durability = durability
        self.name = f"offload-sqlite-{durability}"
        self.notes = (
            f"SQLite WAL, durability={durability}; enqueue-bulk uses app.send_many "
            "(one transaction per 5,000); worker: `offload worker --processes N --concurrency C` "
            "(N > 1: a supervisor and N children), tasks on the thread executor"
        )

    def env(self, settings: Settings) -> dict[str, str]:
        return {"BENCH_OFFLOAD_DURABILITY": self.durability}

    def reset(self, settings: Settings) -> None:
        remove_sqlite(settings.work_dir / f"offload-{self.durability}.db")

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
