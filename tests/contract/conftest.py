"""The contract suite runs every test once per broker.

To add a broker, add one entry to BROKERS: a factory that, given the test's tmp_path, returns a
URL to a fresh, empty store (and skips the test if the service is not reachable).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from offload import App
from offload.brokers import Broker, broker_from_url

from . import nats_store, postgres_store, rabbitmq_store, redis_store


def _memory(tmp_path: Path) -> str:
    return f"memory://test-{uuid.uuid4().hex}"


def _sqlite(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'offload.db'}"  # durability=strict is the default


BROKERS: dict[str, Callable[[Path], str]] = {
    "memory": _memory,
    "sqlite": _sqlite,
    "redis": redis_store.redis_url,
    "postgres": postgres_store.postgres_url,
    "nats": nats_store.nats_url,
    "rabbitmq": rabbitmq_store.rabbitmq_url,
}

# Optional teardown per broker, given the URL its factory made (e.g. delete the test's keys).
CLEANUPS: dict[str, Callable[[str], None]] = {
    "redis": redis_store.cleanup,
    "postgres": postgres_store.cleanup,
    "nats": nats_store.cleanup,
    "rabbitmq": rabbitmq_store.cleanup,
}


@pytest.fixture(params=list(BROKERS))
def broker_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    url = BROKERS[request.param](tmp_path)
    yield url
    cleanup = CLEANUPS.get(request.param)
    if cleanup is not None:
        cleanup(url)


@pytest.fixture
async def broker(broker_url: str) -> AsyncIterator[Broker]:
    """A connected broker on the test's store, closed afterwards."""
    b = broker_from_url(broker_url)
    await b.connect()
    try:
        yield b
    finally:
        await b.close()


@pytest.fixture
async def app(broker_url: str) -> AsyncIterator[App]:
    """An App on the test's store. Its broker connection is closed afterwards."""
    a = App(broker_url, name="contract")
    try:
        yield a
    finally:
        await a.close_async()
        a.close()
