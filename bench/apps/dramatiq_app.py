"""dramatiq's benchmark app: the Redis or RabbitMQ broker (BENCH_DRAMATIQ_BROKER) with its
default middleware, no result backend. BENCH_DRAMATIQ_CONFIRMS=1: RabbitMQ publisher confirms
(each send waits for RabbitMQ to have the message, the promise offload's sends keep)."""

from __future__ import annotations

import os

import dramatiq

from bench import jobs

if os.environ.get("BENCH_DRAMATIQ_BROKER", "redis") == "rabbitmq":
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    broker = RabbitmqBroker(
        url=os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"),
        confirm_delivery=os.environ.get("BENCH_DRAMATIQ_CONFIRMS") == "1",
    )
else:
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(url=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/5"))
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name="default", max_retries=0)
def job(kind: str, enqueued: float) -> None:
    jobs.run(kind, enqueued)
