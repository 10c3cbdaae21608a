"""Fixtures for the client tests: a fake clock, a scripted server, and each test run on both clients.

`client` tests take the `make` fixture, parametrized "sync" / "async": it builds a Client or an
AsyncClient on an httpx.MockTransport and returns a driver whose methods are plain calls either
way (the async ones run with asyncio.run), so one test body checks both variants.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import msgspec
import pytest

from offload.client import AsyncClient, Client, RetryConfig

BASE = "http://api.test"


class FakeTime:
    """A clock that moves only when something sleeps (or a test moves it); records every sleep."""

    def __init__(self, fraction: float = 1.0) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.randoms: list[tuple[float, float]] = []
        self.fraction = fraction  # random(lo, hi) returns lo + fraction * (hi - lo)

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds

    async def async_sleep(self, seconds: float) -> None:
        self.sleep(seconds)

    def random(self, low: float, high: float) -> float:
        self.randoms.append((low, high))
        return low + self.fraction * (high - low)

    def config(self, **overrides: Any) -> RetryConfig:
        options: dict[str, Any] = {
            "clock": self.clock,
            "sleep": self.sleep,
            "async_sleep": self.async_sleep,
            "random": self.random,
        }
        options.update(overrides)
        return RetryConfig(**options)


Answer = httpx.Response | Exception | Callable[[httpx.Request], httpx.Response]


class Script:
    """A fake server: answers requests from a list, in order, and records them."""

    def __init__(self, *answers: Answer) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        assert self.answers, f"unexpected request {request.method} {request.url}"
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        if callable(answer):
            return answer(request)
        return answer

    def keys(self) -> list[str | None]:
        return [r.headers.get("idempotency-key") for r in self.requests]


class Driver:
    """A Client or an AsyncClient whose methods are called the same way (async ones via asyncio.run)."""

    def __init__(self, kind: str, client: Client | AsyncClient) -> None:
        self.kind = kind
        self.client = client

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.client, name)
        if self.kind == "sync":
            return method

        def run(*args: Any, **kwargs: Any) -> Any:
            return asyncio.run(method(*args, **kwargs))

        return run


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(
        status,
        content=msgspec.json.encode(body),
        headers={"content-type": "application/json", **(headers or {})},
    )


def problem(
    status: int, slug: str, detail: str = "", headers: dict[str, str] | None = None, **extra: Any
) -> httpx.Response:
    body = {"type": f"https://offload.dev/problems/{slug}", "title": slug.replace("-", " "), "status": status}
    if detail:
        body["detail"] = detail
    body.update(extra)
    return httpx.Response(
        status,
        content=msgspec.json.encode(body),
        headers={"content-type": "application/problem+json", **(headers or {})},
    )


def job_body(job_id: str = "j1", state: str = "queued", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": job_id,
        "task": "resize",
        "queue": "default",
        "state": state,
        "attempts": 0,
        "deliveries": 0,
        "max_deliveries": 6,
        "priority": 0,
        "created_at": 1.0,
        "run_at": 1.0,
        "started_at": None,
        "finished_at": None,
        "result": None,
        "error": None,
        "progress": None,
    }
    body.update(extra)
    return body


def accepted(job_id: str = "j1", created: bool = True) -> httpx.Response:
    return json_response(
        202,
        {"id": job_id, "state": "queued", "created": created, "location": f"/v1/jobs/{job_id}"},
        {"location": f"/v1/jobs/{job_id}"},
    )


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


@pytest.fixture(params=["sync", "async"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


MakeClient = Callable[..., Driver]


@pytest.fixture
def make(kind: str, fake_time: FakeTime) -> Iterator[MakeClient]:
    """make(script, retry=..., **client options) -> Driver over the scripted server."""
    made: list[Driver] = []

    def factory(script: Callable[[httpx.Request], httpx.Response], **options: Any) -> Driver:
        options.setdefault("retry", fake_time.config())
        transport = httpx.MockTransport(script)
        client: Client | AsyncClient
        if kind == "sync":
            client = Client(BASE, transport=transport, **options)
        else:
            client = AsyncClient(BASE, transport=transport, **options)
        driver = Driver(kind, client)
        made.append(driver)
        return driver

    yield factory
    for driver in made:
        if isinstance(driver.client, Client):
            driver.client.close()
        else:
            asyncio.run(driver.client.aclose())
