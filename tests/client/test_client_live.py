"""The client against the real API, in-process: a memory:// App, a burst Worker, submit -> wait -> result.

AsyncClient talks to the ASGI app through httpx.ASGITransport; the sync Client to a uvicorn server
on a free loopback port, with the worker in another thread. Skipped when the API (or its web
framework) is not installed.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from offload import App
from offload.client import (
    AsyncClient,
    Client,
    Forbidden,
    InvalidArguments,
    JobState,
    NotFound,
    RetryConfig,
    Unauthorized,
)
from offload.worker import Worker

pytest.importorskip("offload.api")
api_app = pytest.importorskip("offload.api.app")  # needs the web framework too

BASE = "http://offload.test"


@pytest.fixture
def live_app() -> Iterator[App]:
    app = App(f"memory://client-live-{uuid.uuid4().hex}", name="client-live")

    @app.task(name="add", public=True, executor="async")
    async def add(a: int, b: int) -> int:
        return a + b

    @app.task(name="fail", public=True, executor="async", retries=0)
    async def fail(reason: str) -> None:
        raise RuntimeError(reason)

    @app.task(name="private", executor="async")
    async def private() -> None:
        return None

    yield app
    app.close()


def asgi_client(app: App, api_key: str | None = None, **api_options: object) -> AsyncClient:
    options: dict[str, object] = {"keys": None, "insecure_local": True, **api_options}
    asgi = api_app.create_api(app, **options)
    no_retry = RetryConfig(max_attempts=1)
    return AsyncClient(BASE, api_key, transport=httpx.ASGITransport(app=asgi), retry=no_retry)


async def test_async_submit_wait_result(live_app: App) -> None:
    async with asgi_client(live_app) as client:
        accepted = await client.submit("add", [2], {"b": 3})
        assert accepted.created and accepted.state is JobState.QUEUED
        assert accepted.location == f"/v1/jobs/{accepted.id}"
        first = await client.submit("add", [1, 1], idempotency_key="once")
        again = await client.submit("add", [1, 1], idempotency_key="once")
        assert again.id == first.id and first.created and not again.created

        assert (await client.get(accepted.id)).state is JobState.QUEUED
        stats = {q.queue: q for q in await client.queues()}
        assert stats["default"].ready == 2

        await Worker(live_app, burst=True).run()

        job = await client.wait(accepted.id, timeout=10)
        assert job.state is JobState.SUCCEEDED and job.result == 5 and job.finished_at
        streamed = await client.wait(first.id, timeout=10, stream=True)
        assert streamed.state is JobState.SUCCEEDED and streamed.result == 2


async def test_async_errors_from_the_real_api(live_app: App) -> None:
    async with asgi_client(live_app) as client:
        with pytest.raises(InvalidArguments) as info:
            await client.submit("add", ["two"], {"b": 3})
        assert [e.field for e in info.value.errors] == ["args[0]"]
        with pytest.raises(NotFound):
            await client.submit("private")
        with pytest.raises(NotFound):
            await client.get("no-such-job")
        with pytest.raises(NotFound):
            await client.wait("no-such-job", timeout=1, stream=True)


async def test_async_cancel(live_app: App) -> None:
    async with asgi_client(live_app) as client:
        accepted = await client.submit("add", [1, 2], delay=60)
        assert await client.cancel(accepted.id) is True
        assert await client.cancel(accepted.id) is False
        job = await client.wait(accepted.id, timeout=1)
        assert job.state is JobState.CANCELLED and job.finished


async def test_async_scopes(live_app: App, tmp_path: Path) -> None:
    from offload.api.auth import KeyStore

    keys = KeyStore.open(tmp_path / "keys.json", create=True)
    _, reader = keys.create("read")
    _, admin = keys.create("admin")
    asgi = api_app.create_api(live_app, keys=keys, insecure_local=False)
    transport = httpx.ASGITransport(app=asgi)
    async with AsyncClient(BASE, "not-a-key", transport=transport) as stranger:
        with pytest.raises(Unauthorized):
            await stranger.queues()
    async with AsyncClient(BASE, reader, transport=transport) as client:
        with pytest.raises(Forbidden):
            await client.submit("add", [1, 2])
        assert isinstance(await client.queues(), list)
    async with AsyncClient(BASE, admin, transport=transport) as client:
        accepted = await client.submit("fail", ["on purpose"])
        await Worker(live_app, burst=True).run()
        dead = await client.wait(accepted.id, timeout=10)
        assert dead.state is JobState.DEAD and "on purpose" in (dead.error or "")
        assert [j.id for j in await client.dead()] == [accepted.id]
        assert await client.purge_dead(all=True) == 1


def test_sync_client_against_uvicorn(live_app: App) -> None:
    server_module = pytest.importorskip("offload.api.server")
    asgi = api_app.create_api(live_app, keys=None, insecure_local=True)
    sock = server_module.bind("127.0.0.1", 0)
    server = server_module.make_server(asgi)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        with Client(server_module.url_of(sock)) as client:
            deadline = time.monotonic() + 10
            while not client.ready():
                assert time.monotonic() < deadline, "the API server did not start"
                time.sleep(0.02)
            accepted = client.submit("add", [20], {"b": 22})
            failing = client.submit("fail", ["on purpose"])
            assert client.get(accepted.id).state is JobState.QUEUED

            worker = threading.Thread(target=lambda: asyncio.run(Worker(live_app, burst=True).run()))
            worker.start()
            try:
                job = client.wait(accepted.id, timeout=15)
                assert job.state is JobState.SUCCEEDED and job.result == 42
                dead = client.wait(failing.id, timeout=15, stream=True)
                assert dead.state is JobState.DEAD and dead.error
            finally:
                worker.join(15)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
