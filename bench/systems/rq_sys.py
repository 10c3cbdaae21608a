"""rq: N `rq worker` processes (rq's default Worker forks a work horse for every job)."""

from __future__ import annotations

from bench.systems.base import REDIS, Producer, Settings, System, redis_url, venv_script


class RqProducer(Producer):
    def __init__(self) -> None:
        import redis
        from rq import Queue

        from bench.apps.rq_app import job

        self.connection = redis.Redis.from_url(redis_url())
        self.queue = Queue("default", connection=self.connection)
        self.job = job

    def connect(self) -> None:
        self.connection.ping()

    def send_one(self, kind: str, enqueued: float) -> None:
        self.queue.enqueue(self.job, kind, enqueued)

    def send_bulk(self, kind: str, count: int) -> None:
        from rq import Queue

        # enqueue_many: one pipeline for all the jobs
        self.queue.enqueue_many([Queue.prepare_data(self.job, (kind, 0.0)) for _ in range(count)])

    def close(self) -> None:
        self.connection.close()


class RqSystem(System):
    name = "rq"
    group = REDIS
    servers = (REDIS,)
    requires = ("rq",)
    drain_cap = 2_000
    notes = (
        "drains of at most 2,000 jobs (a fork per job: ~70 jobs/s); rq defaults: a worker runs "
        "one job at a time and forks a work horse process for each (no threads: concurrency 1 per "
        "process, against 8 threads or 32 slots elsewhere); job results kept 500 s (rq's default "
        "result_ttl); enqueue-bulk uses Queue.enqueue_many (one pipeline); worker: N `rq worker` "
        "processes"
    )

    def env(self, settings: Settings) -> dict[str, str]:
        return {"BENCH_RECORD_BY_PARENT": "1"}

    def worker_commands(self, settings: Settings, processes: int) -> list[list[str]]:
        command = [venv_script("rq"), "worker", "default", "--url", settings.redis_url, "--quiet"]
        return [list(command) for _ in range(processes)]

    def producer(self) -> Producer:
        return RqProducer()
