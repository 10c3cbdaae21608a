"""Brokers, chosen by URL scheme. Each distributed broker's client is an optional extra."""

from __future__ import annotations

from urllib.parse import urlsplit

from offload.brokers.base import Broker, Delivery, Enqueued, QueueStats, Settle
from offload.errors import ConfigurationError

SCHEMES = {
    "memory": "offload.brokers.memory:MemoryBroker",
    "sqlite": "offload.brokers.sqlite:SqliteBroker",
}

__all__ = ["Broker", "Delivery", "Enqueued", "QueueStats", "Settle", "broker_from_url"]


def broker_from_url(url: str) -> Broker:
    """Make an (unconnected) broker for `url`: memory://, sqlite:///path.db, ..."""
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        from offload.brokers.memory import MemoryBroker

        return MemoryBroker(url)
    if scheme == "sqlite":
        from offload.brokers.sqlite import SqliteBroker

        return SqliteBroker(url)
    raise ConfigurationError(
        f"unknown broker URL {url!r}: use sqlite:///offload.db (the embedded default) or memory:// (tests)"
    )
