"""Helpers for the HTTP API tests: the test App, clients, a worker in the test's loop, a real
uvicorn server on a free loopback port, polling with a deadline, problem+json checks."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import msgspec
from starlette.applications import Starlette

from offload import App
from offload.api.server import bind, make_server, url_of
from offload.worker import Worker

SECRET = "test-webhook-secret"
GATES: dict[str, asyncio.Event] = {}  # t.gate jobs wait for their event: tests control running time


class Size(msgspec.Struct):
    width: int
    height: int


def make_app(url: str, **options: Any) -> App:
    app = App(url, name="apitest", webhook_secret=options.pop("webhook_secret", SECRET), **options)

    @app.task(name="t.add", public=True)
    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    @app.task(name="t.resize", public=True)
    def resize(image_id: int, size: Size, *, fmt: str = "webp") -> dict[str, Any]:
        return {"image": image_id, "width": size.width, "height": size.height, "fmt": fmt}

    @app.task(name="t.echo", public=True)
    async def echo(*values: Any, **extra: Any) -> list[Any]:
        return [list(values), extra]

    @app.task(name="t.only_positional", public=True)
    def only_positional(x: int, /, y: int = 0) -> int:
        return x + y

    @app.task(name="t.fail", public=True, retries=0)
    def fail(reason: str) -> None:
        raise ValueError(reason)

    @app.task(name="t.gate", public=True, timeout=30)
    async def gate(name: str) -> str:
        await GATES.setdefault(name, asyncio.Event()).wait()
        return name

    @app.task(name="t.private")
    def private(x: int) -> int:
        return x

    return app


def client_for(asgi: Starlette, token: str | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://api", headers=headers)


@contextlib.asynccontextmanager
async def running_worker(
    app: App, queues: tuple[str, ...] = ("default",), **options: Any
) -> AsyncIterator[Worker]:
    worker = Worker(app, queues, fetch_wait=0.2, grace=2.0, **options)
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 15)


@contextlib.asynccontextmanager
async def serving(asgi: Any) -> AsyncIterator[str]:
    """A real uvicorn server for `asgi` on a free loopback port, in this event loop; yields its URL."""
    sock = bind("127.0.0.1", 0)
    server = make_server(asgi)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    await poll(lambda: server.started, what="uvicorn to start")
    try:
        yield url_of(sock)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


async def poll(
    check: Callable[[], Any | Awaitable[Any]], timeout: float = 15.0, what: str = "the condition"
) -> Any:
    """Wait until `check()` is truthy (polling, never a fixed sleep) and return its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value) or isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def release(name: str) -> None:
    GATES.setdefault(name, asyncio.Event()).set()


def problem(response: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    """Assert a problem+json response and return its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json", response.headers
    body: dict[str, Any] = response.json()
    assert body["type"] == f"https://offload.dev/problems/{slug}", body
    assert body["status"] == status and body["title"] and body["detail"], body
    return body
