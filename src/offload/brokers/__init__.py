"""Brokers, chosen by URL scheme. Each distributed broker's client is an optional extra."""

from __future__ import annotations

import importlib
from typing import NamedTuple
from urllib.parse import urlsplit

from offload.brokers.base import Broker, Delivery, Enqueued, QueueStats, Settle
from offload.errors import ConfigurationError, MissingExtraError

__all__ = ["Broker", "Delivery", "Enqueued", "QueueStats", "Settle", "broker_from_url"]


class _Kind(NamedTuple):
    module: str
    cls: str
    clients: tuple[str, ...]  # the client libraries its optional extra installs
    extra: str | None


# amqp:// is RabbitMQ carrying the jobs with a Redis state store keeping their records
# (docs/brokers/rabbitmq.md): the rabbitmq extra installs both clients, aio-pika and redis-py.
SCHEMES: dict[str, _Kind] = {
    "memory": _Kind("offload.brokers.memory", "MemoryBroker", (), None),
    "sqlite": _Kind("offload.brokers.sqlite", "SqliteBroker", (), None),
    "redis": _Kind("offload.brokers.redis", "RedisBroker", ("redis",), "redis"),
    "rediss": _Kind("offload.brokers.redis", "RedisBroker", ("redis",), "redis"),
    "redis+sentinel": _Kind("offload.brokers.redis", "RedisBroker", ("redis",), "redis"),
    "rediss+sentinel": _Kind("offload.brokers.redis", "RedisBroker", ("redis",), "redis"),
    "postgresql": _Kind("offload.brokers.postgres", "PostgresBroker", ("asyncpg",), "postgres"),
    "postgres": _Kind("offload.brokers.postgres", "PostgresBroker", ("asyncpg",), "postgres"),
    "nats": _Kind("offload.brokers.nats", "NatsBroker", ("nats",), "nats"),
    "amqp": _Kind("offload.brokers.rabbitmq", "RabbitMQBroker", ("aio_pika", "redis"), "rabbitmq"),
    "amqps": _Kind("offload.brokers.rabbitmq", "RabbitMQBroker", ("aio_pika", "redis"), "rabbitmq"),
}


def broker_from_url(url: str) -> Broker:
    """Make an (unconnected) broker for `url`: sqlite:///path.db, redis://, postgresql://, memory://."""
    scheme = urlsplit(url).scheme
    kind = SCHEMES.get(scheme)
    if kind is None:
        raise ConfigurationError(
            f"unknown broker URL {url!r}: use sqlite:///offload.db (the embedded default), "
            "redis://host:6379/0, postgresql://user@host/db, nats://host:4222, or memory:// (tests)"
        )
    for client in kind.clients:
        try:
            importlib.import_module(client)
        except ImportError:
            raise MissingExtraError(scheme, kind.extra or scheme) from None
    broker: Broker = getattr(importlib.import_module(kind.module), kind.cls)(url)
    return broker
