"""GET /v1/jobs/{id} (and ?wait=), its event stream, and cancel."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from typing import Any

import httpx
import pytest

from offload import App
from offload.api.app import create_api
from offload.brokers.base import Broker

from .support import poll, problem, release, running_worker, serving

JOB_FIELDS = {
    "id", "task", "queue", "state", "attempts", "deliveries", "max_deliveries", "priority",
    "created_at", "run_at", "started_at", "finished_at", "result", "error", "progress",
}  # fmt: skip


async def submit(client: httpx.AsyncClient, task: str, *args: Any) -> str:
    response = await client.post("/v1/jobs", json={"task": task, "args": list(args)})
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


def gate_name() -> str:
    return f"gate-{uuid.uuid4().hex}"


async def test_a_job_shows_exactly_the_contract_fields(client: httpx.AsyncClient) -> None:
    job_id = await submit(client, "t.add", 1, 2)
    response = await client.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    job = response.json()
    assert set(job) == JOB_FIELDS
    assert job["id"] == job_id and job["task"] == "t.add" and job["state"] == "queued"
    assert job["result"] is None and job["error"] is None and job["progress"] is None
    assert isinstance(job["created_at"], float) and job["started_at"] is None


async def test_result_and_error_once_finished(client: httpx.AsyncClient, app: App) -> None:
    good = await submit(client, "t.add", 2, 3)
    bad = await submit(client, "t.fail", "boom")
    async with running_worker(app):
        done = (await client.get(f"/v1/jobs/{good}", params={"wait": 10})).json()
        dead = (await client.get(f"/v1/jobs/{bad}", params={"wait": 10})).json()
    assert (done["state"], done["result"], done["deliveries"]) == ("succeeded", 5, 1)
    assert isinstance(done["finished_at"], float)
    assert dead["state"] == "dead" and "boom" in dead["error"]


@pytest.mark.parametrize("job_id", ["nope", "0" * 32, "x" * 500])
async def test_unknown_job_is_404(client: httpx.AsyncClient, job_id: str) -> None:
    problem(await client.get(f"/v1/jobs/{job_id}"), 404, "not-found")
    problem(await client.get(f"/v1/jobs/{job_id}", params={"wait": 5}), 404, "not-found")
    problem(await client.get(f"/v1/jobs/{job_id}/events"), 404, "not-found")
    problem(await client.post(f"/v1/jobs/{job_id}/cancel"), 404, "not-found")


@pytest.mark.parametrize("wait", ["-1", "61", "abc", "nan", "inf", ""])
async def test_wait_must_be_0_to_60_seconds(client: httpx.AsyncClient, wait: str) -> None:
    job_id = await submit(client, "t.add", 1, 2)
    problem(await client.get(f"/v1/jobs/{job_id}", params={"wait": wait}), 400, "bad-request")


async def test_long_poll_returns_when_the_job_finishes(client: httpx.AsyncClient, app: App) -> None:
    gate = gate_name()
    job_id = await submit(client, "t.gate", gate)
    async with running_worker(app):
        started = time.monotonic()
        waiting = asyncio.create_task(client.get(f"/v1/jobs/{job_id}", params={"wait": 30}))
        await poll(lambda: _state(app, job_id, "running"), what="the job to start")
        assert not waiting.done()
        release(gate)
        job = (await waiting).json()
        assert job["state"] == "succeeded" and job["result"] == gate
        assert time.monotonic() - started < 10


async def test_long_poll_answers_the_current_state_after_the_wait(client: httpx.AsyncClient) -> None:
    job_id = await submit(client, "t.add", 1, 2)  # no worker: stays queued
    started = time.monotonic()
    response = await client.get(f"/v1/jobs/{job_id}", params={"wait": "0.3"})
    assert response.status_code == 200 and response.json()["state"] == "queued"
    assert time.monotonic() - started >= 0.25


async def _state(app: App, job_id: str, state: str) -> bool:
    return (await app.job(job_id).info_async()).state.value == state


def parse_events(text: str) -> tuple[list[dict[str, Any]], int]:
    events, keepalives = [], 0
    for block in text.split("\n\n"):
        if block.startswith(": keep-alive"):
            keepalives += 1
        elif block:
            kind, data = block.split("\n")
            assert kind == "event: state" and data.startswith("data: ")
            events.append(json.loads(data.removeprefix("data: ")))
    return events, keepalives


async def test_events_stream_each_state_change_then_end(app: App) -> None:
    gate = gate_name()
    asgi = create_api(app, keys=None, insecure_local=True, sse_keepalive=0.2)
    text, started = "", False
    async with (
        asyncio.timeout(30),
        serving(asgi) as url,
        httpx.AsyncClient(base_url=url) as client,
        contextlib.AsyncExitStack() as worker,
    ):
        job_id = await submit(client, "t.gate", gate)
        async with client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            async for chunk in stream.aiter_text():
                text += chunk
                events, keepalives = parse_events(text)
                states = [e["state"] for e in events]
                if states == ["queued"] and not started:
                    await worker.enter_async_context(running_worker(app))  # first event seen: start
                    started = True
                if states == ["queued", "running"] and keepalives:
                    release(gate)  # running long enough for a keep-alive: let it finish
    events, keepalives = parse_events(text)
    assert [e["state"] for e in events] == ["queued", "running", "succeeded"]
    assert keepalives >= 1
    assert events[-1]["result"] == gate and set(events[-1]) == {*JOB_FIELDS}


async def test_head_of_an_event_stream_does_not_hold_it_open(client: httpx.AsyncClient) -> None:
    job_id = await submit(client, "t.add", 1, 2)  # stays queued
    response = await asyncio.wait_for(client.head(f"/v1/jobs/{job_id}/events"), 5)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")


async def test_events_of_a_finished_job_are_one_event(client: httpx.AsyncClient, app: App) -> None:
    job_id = await submit(client, "t.add", 1, 2)
    async with running_worker(app):
        await client.get(f"/v1/jobs/{job_id}", params={"wait": 10})
    response = await client.get(f"/v1/jobs/{job_id}/events")
    events, _ = parse_events(response.text)
    assert [e["state"] for e in events] == ["succeeded"]


class CountingBroker:
    """Counts the broker calls still in flight, to see a server stop work for a gone client."""

    def __init__(self, broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
        self.active = 0
        self.calls = 0
        for name in ("wait_job", "get_job"):
            original = getattr(broker, name)
            monkeypatch.setattr(broker, name, self._wrap(original))

    def _wrap(self, fn: Any) -> Any:
        async def call(*args: Any) -> Any:
            self.active += 1
            self.calls += 1
            try:
                return await fn(*args)
            finally:
                self.active -= 1

        return call


async def test_a_disconnected_long_poll_stops_waiting(app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    counter = CountingBroker(await app.broker(), monkeypatch)
    async with serving(create_api(app, keys=None, insecure_local=True)) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            job_id = await submit(client, "t.add", 1, 2)  # no worker: never finishes
            waiting = asyncio.create_task(client.get(f"/v1/jobs/{job_id}", params={"wait": 60}))
            await poll(lambda: counter.active == 1, what="the server to wait on the job")
            waiting.cancel()  # the client goes away
        await poll(lambda: counter.active == 0, timeout=5, what="the server to stop waiting")


async def test_a_disconnected_event_stream_stops_polling(app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    counter = CountingBroker(await app.broker(), monkeypatch)
    async with serving(create_api(app, keys=None, insecure_local=True)) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            job_id = await submit(client, "t.add", 1, 2)
            async with client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
                async for _ in stream.aiter_text():
                    break  # the first event arrived; now hang up
        await poll(lambda: counter.active == 0, timeout=5, what="the stream to stop")
        calls = counter.calls
        await asyncio.sleep(0.3)  # would be several polls, were the stream still running
        assert counter.calls == calls


async def test_cancel_a_queued_job(client: httpx.AsyncClient, app: App) -> None:
    job_id = await submit(client, "t.add", 1, 2)
    response = await client.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 200
    assert response.json() == {"id": job_id, "cancelled": True, "state": "cancelled"}
    again = await client.post(f"/v1/jobs/{job_id}/cancel")
    assert again.json() == {"id": job_id, "cancelled": False, "state": "cancelled"}


async def test_a_running_or_finished_job_is_not_cancelled(client: httpx.AsyncClient, app: App) -> None:
    gate = gate_name()
    job_id = await submit(client, "t.gate", gate)
    async with running_worker(app):
        await poll(lambda: _state(app, job_id, "running"), what="the job to start")
        response = await client.post(f"/v1/jobs/{job_id}/cancel")
        assert response.json() == {"id": job_id, "cancelled": False, "state": "running"}
        release(gate)
        await client.get(f"/v1/jobs/{job_id}", params={"wait": 10})
    assert (await client.post(f"/v1/jobs/{job_id}/cancel")).json()["state"] == "succeeded"
