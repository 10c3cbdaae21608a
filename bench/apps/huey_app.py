"""huey's benchmark app: SqliteHuey or RedisHuey, chosen by BENCH_HUEY_BACKEND."""

from __future__ import annotations

import os

from huey import RedisHuey, SqliteHuey

from bench import jobs

BACKEND = os.environ.get("BENCH_HUEY_BACKEND", "sqlite")
DB_PATH = os.path.join(os.path.abspath(os.environ.get("BENCH_WORK_DIR", ".")), "huey.db")

if BACKEND == "redis":
    huey = RedisHuey("bench", url=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/5"))
else:
    # Defaults otherwise: WAL, and SQLite's default synchronous=FULL (huey's fsync=None).
    huey = SqliteHuey("bench", filename=DB_PATH)


@huey.task(retries=0)
def job(kind: str, enqueued: float) -> None:
    jobs.run(kind, enqueued)
