"""celery's benchmark app: the Redis or RabbitMQ broker (BENCH_CELERY_BROKER), no result
backend, otherwise celery's defaults."""

from __future__ import annotations

import os

from celery import Celery

from bench import jobs

if os.environ.get("BENCH_CELERY_BROKER", "redis") == "rabbitmq":
    BROKER = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
else:
    BROKER = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/5")

app = Celery("bench", broker=BROKER)
app.conf.task_default_queue = "default"
app.conf.task_ignore_result = True
app.conf.broker_connection_retry_on_startup = True  # silences a deprecation warning only


@app.task(name="bench.job")
def job(kind: str, enqueued: float) -> None:
    jobs.run(kind, enqueued)
