"""POST /v1/jobs: 202 and where the job is, or exactly the error the contract names."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from offload import App, BrokerError
from offload.api.app import create_api
from offload.api.validation import MAX_DEPTH
from offload.brokers.base import Broker

from .support import client_for, problem

JSON = {"content-type": "application/json"}


async def submit(client: httpx.AsyncClient, body: Any, **headers: str) -> httpx.Response:
    return await client.post("/v1/jobs", content=json.dumps(body), headers={**JSON, **headers})


async def test_accepted_with_location_and_the_job_is_queued(client: httpx.AsyncClient, app: App) -> None:
    response = await submit(client, {"task": "t.add", "args": [1, 2]})
    assert response.status_code == 202
    body = response.json()
    assert body == {
        "id": body["id"],
        "state": "queued",
        "created": True,
        "location": f"/v1/jobs/{body['id']}",
    }
    assert response.headers["location"] == body["location"]
    info = await app.job(body["id"]).info_async()
    assert (info.task, info.args, info.state.value) == ("t.add", (1, 2), "queued")


async def test_kwargs_queue_priority_delay_and_webhook_reach_the_envelope(
    client: httpx.AsyncClient, app: App
) -> None:
    before = time.time()
    response = await submit(
        client,
        {
            "task": "t.resize",
            "args": [7],
            "kwargs": {"size": {"width": 640, "height": 480}, "fmt": "png"},
            "queue": "images",
            "priority": 9,
            "delay": 60,
            "webhook": "http://127.0.0.1:9/hook",
        },
    )
    assert response.status_code == 202, response.text
    info = await app.job(response.json()["id"]).info_async()
    assert info.queue == "images" and info.priority == 9
    assert info.run_at >= before + 60
    assert info.kwargs == {"size": {"width": 640, "height": 480}, "fmt": "png"}
    broker = await app.broker()
    stored = broker._s.jobs[info.id].message  # type: ignore[attr-defined]
    assert stored.options == {"webhook": "http://127.0.0.1:9/hook"}


async def test_idempotency_key_returns_the_same_job(client: httpx.AsyncClient) -> None:
    first = await submit(client, {"task": "t.add", "args": [1, 2]}, **{"Idempotency-Key": "order-1"})
    again = await submit(client, {"task": "t.add", "args": [1, 2]}, **{"Idempotency-Key": "order-1"})
    assert first.status_code == again.status_code == 202
    assert first.json()["created"] is True and again.json()["created"] is False
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["location"] == first.headers["location"]
    other = await submit(client, {"task": "t.add", "args": [1, 2]}, **{"Idempotency-Key": "order-2"})
    assert other.json()["id"] != first.json()["id"]


@pytest.mark.parametrize("key", ["", "k" * 256])
async def test_idempotency_key_length_is_checked(client: httpx.AsyncClient, key: str) -> None:
    problem(
        await submit(client, {"task": "t.add", "args": [1, 2]}, **{"Idempotency-Key": key}),
        400,
        "bad-request",
    )


@pytest.mark.parametrize("task", ["t.nope", "t.private", "offload.webhook"])
async def test_unknown_or_private_task_is_404(client: httpx.AsyncClient, task: str) -> None:
    body = problem(await submit(client, {"task": task, "args": [1]}), 404, "not-found")
    assert task in body["detail"] and "public=True" in body["detail"]


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded", "json"])
async def test_content_type_must_be_json(client: httpx.AsyncClient, content_type: str | None) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = await client.post("/v1/jobs", content=b'{"task":"t.add","args":[1,2]}', headers=headers)
    problem(response, 415, "unsupported-media-type")


async def test_json_with_a_charset_is_json(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/jobs",
        content=b'{"task":"t.add","args":[1,2]}',
        headers={"content-type": "Application/JSON; charset=utf-8"},
    )
    assert response.status_code == 202


@pytest.mark.parametrize("body", [b"", b"{", b"{'task': 1}", b"\xff\xfe", b"[" * 5000 + b"]" * 5000, b"nan"])
async def test_malformed_json_is_400(client: httpx.AsyncClient, body: bytes) -> None:
    response = await client.post("/v1/jobs", content=body, headers=JSON)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ([], "$"),
        ({}, "$"),
        ({"task": 5}, "task"),
        ({"task": ""}, "task"),
        ({"task": "t.add", "args": {"a": 1}}, "args"),
        ({"task": "t.add", "kwargs": [1]}, "kwargs"),
        ({"task": "t.add", "priority": 10}, "priority"),
        ({"task": "t.add", "priority": "9"}, "priority"),
        ({"task": "t.add", "priority": True}, "priority"),
        ({"task": "t.add", "delay": -1}, "delay"),
        ({"task": "t.add", "queue": "no spaces"}, "queue"),
        ({"task": "t.add", "queue": "q" * 101}, "queue"),
        ({"task": "t.add", "webhook": 7}, "webhook"),
        ({"task": "t.add", "surprise": 1}, "$"),
    ],
)
async def test_bad_field_types_are_400_with_the_field(
    client: httpx.AsyncClient, body: Any, field: str
) -> None:
    result = problem(await submit(client, body), 400, "bad-request")
    assert result["errors"][0]["field"] == field, result


@pytest.mark.parametrize(
    "webhook",
    ["ftp://example.com/x", "not a url", "https://", "http://[::1", "https://h:99999/x", "x" * 3000],
)
async def test_webhook_must_be_an_http_url(client: httpx.AsyncClient, webhook: str) -> None:
    result = problem(
        await submit(client, {"task": "t.add", "args": [1, 2], "webhook": webhook}), 400, "bad-request"
    )
    assert result["errors"][0]["field"] == "webhook"


async def test_plain_http_webhooks_need_permission(app: App, keys: Any) -> None:
    store, made = keys
    async with client_for(create_api(app, keys=store, insecure_local=False), made["submit"]) as secure:
        body = {"task": "t.add", "args": [1, 2], "webhook": "http://example.com/hook"}
        result = problem(await submit(secure, body), 400, "bad-request")
        assert "https" in result["detail"]
        assert (await submit(secure, {**body, "webhook": "https://example.com/hook"})).status_code == 202


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({"task": "t.add", "args": [1, "2"]}, ["args[1]"]),
        ({"task": "t.add", "args": [1.5, 2]}, ["args[0]"]),
        ({"task": "t.add", "args": [True, 2]}, ["args[0]"]),
        ({"task": "t.add", "args": [1], "kwargs": {"b": None}}, ["kwargs.b"]),
        ({"task": "t.add", "args": [1]}, ["args[1]"]),
        ({"task": "t.add", "args": [1, 2, 3]}, ["args[2]"]),
        ({"task": "t.add", "args": [1, 2], "kwargs": {"c": 3}}, ["kwargs.c"]),
        ({"task": "t.add", "args": [1, 2], "kwargs": {"a": 3}}, ["kwargs.a"]),
        ({"task": "t.add", "args": ["x", "y"]}, ["args[0]", "args[1]"]),
        ({"task": "t.resize", "args": [1, {"width": 1, "height": "2"}]}, ["args[1].height"]),
        ({"task": "t.resize", "args": [1], "kwargs": {"size": {"width": 1}}}, ["kwargs.size"]),
        ({"task": "t.resize", "args": [1, {"width": 1, "height": 2}, "png"]}, ["args[2]"]),
        ({"task": "t.resize", "args": [1, {"width": 1, "height": 2}], "kwargs": {"fmt": 1}}, ["kwargs.fmt"]),
        ({"task": "t.resize", "args": [1]}, ["args[1]"]),
        ({"task": "t.only_positional", "kwargs": {"x": 1}}, ["kwargs.x", "args[0]"]),
    ],
)
async def test_arguments_are_checked_against_the_type_hints(
    client: httpx.AsyncClient, app: App, body: Any, fields: list[str]
) -> None:
    result = problem(await submit(client, body), 422, "invalid-arguments")
    assert [e["field"] for e in result["errors"]] == fields, result
    assert all(e["message"] for e in result["errors"])
    assert (await (await app.broker()).stats(["default"]))[0].depth == 0  # nothing enqueued


async def test_var_args_and_kwargs_take_any_json(client: httpx.AsyncClient) -> None:
    body = {"task": "t.echo", "args": [1, "a", [None, {"x": 1.5}]], "kwargs": {"any": {"thing": [1]}}}
    assert (await submit(client, body)).status_code == 202
    assert (
        await submit(client, {"task": "t.only_positional", "args": [1], "kwargs": {"y": 2}})
    ).status_code == 202


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


async def test_nesting_is_bounded(client: httpx.AsyncClient) -> None:
    assert (await submit(client, {"task": "t.echo", "args": [nested(MAX_DEPTH)]})).status_code == 202
    result = problem(
        await submit(client, {"task": "t.echo", "args": [1, nested(MAX_DEPTH + 1)]}), 422, "invalid-arguments"
    )
    assert result["errors"][0]["field"].startswith("args[1]")
    assert "nested deeper" in result["errors"][0]["message"]
    deep = {"task": "t.echo", "kwargs": {"k": {"a": nested(MAX_DEPTH + 5)}}}
    assert problem(await submit(client, deep), 422, "invalid-arguments")["errors"][0]["field"].startswith(
        "kwargs.k.a"
    )
    # Deeper than msgspec itself will go: still a clean 4xx.
    very = b'{"task":"t.echo","args":[' + b"[" * 3000 + b"]" * 3000 + b"]}"
    response = await client.post("/v1/jobs", content=very, headers=JSON)
    assert response.status_code in (400, 422), response.text


async def test_big_integers_round_trip(client: httpx.AsyncClient, app: App) -> None:
    body = {"task": "t.echo", "args": [2**63 - 1, -(2**63), 2**70, "123456789012345678901234567890"]}
    response = await submit(client, body)
    assert response.status_code == 202
    assert (await app.job(response.json()["id"]).info_async()).args == (
        2**63 - 1,
        -(2**63),
        2**70,
        body["args"][3],
    )


async def test_body_over_the_limit_is_refused_from_content_length_without_reading_it(app: App) -> None:
    asgi = create_api(app, keys=None, insecure_local=True, max_body_bytes=1000)
    received: list[dict[str, Any]] = []
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        received.append({})
        return {"type": "http.request", "body": b"{}" * 5000, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/jobs",
        "raw_path": b"/v1/jobs",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"10000")],
        "server": ("api", 80),
    }
    await asgi(scope, receive, send)
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["max_body_bytes"] == 1000
    assert received == []  # not a byte of the body was read


async def test_body_over_the_limit_is_refused_by_counting_when_streamed(app: App) -> None:
    async with client_for(create_api(app, keys=None, insecure_local=True, max_body_bytes=1000)) as c:

        async def chunks() -> AsyncIterator[bytes]:
            yield b'{"task":"t.echo","args":["'
            for _ in range(100):
                yield b"x" * 100
            yield b'"]}'

        response = await c.post("/v1/jobs", content=chunks(), headers=JSON)
        assert "content-length" not in response.request.headers
        problem(response, 413, "payload-too-large")
        small = await c.post("/v1/jobs", content=b'{"task":"t.add","args":[1,2]}', headers=JSON)
        assert small.status_code == 202


async def test_an_argument_or_a_job_over_the_message_limit(broker_url: str) -> None:
    from .support import make_app

    app = make_app(broker_url, max_message_bytes=2000)
    async with client_for(create_api(app, keys=None, insecure_local=True)) as c:
        one = problem(
            await submit(c, {"task": "t.echo", "kwargs": {"blob": "x" * 5000}}), 422, "invalid-arguments"
        )
        assert (
            one["errors"][0]["field"] == "kwargs.blob" and "2,000-byte limit" in one["errors"][0]["message"]
        )
        both = problem(
            await submit(c, {"task": "t.echo", "args": ["x" * 1500, "y" * 1500]}), 413, "payload-too-large"
        )
        assert "2,000-byte limit" in both["detail"]
    await app.close_async()


async def test_full_queue_is_503_with_retry_after_from_depth_and_drain_rate(
    client: httpx.AsyncClient, app: App
) -> None:
    app.queue("tiny", max_depth=2)
    for _ in range(2):
        assert (await submit(client, {"task": "t.add", "args": [1, 2], "queue": "tiny"})).status_code == 202
    response = await submit(client, {"task": "t.add", "args": [1, 2], "queue": "tiny"})
    result = problem(response, 503, "queue-full")
    assert (result["queue"], result["depth"], result["max_depth"]) == ("tiny", 2, 2)
    retry_after = response.headers["retry-after"]
    assert retry_after.isdigit() and int(retry_after) >= 1
    assert result["retry_after"] == int(retry_after)


async def test_broker_unreachable_is_503(
    client: httpx.AsyncClient, app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker: Broker = await app.broker()

    async def down(*args: Any, **kwargs: Any) -> Any:
        raise BrokerError("connection refused")

    monkeypatch.setattr(broker, "enqueue", down)
    monkeypatch.setattr(broker, "get_job", down)
    response = await submit(client, {"task": "t.add", "args": [1, 2]})
    assert problem(response, 503, "broker-unavailable")
    assert response.headers["retry-after"] == "1"
    problem(await client.get("/v1/jobs/abc"), 503, "broker-unavailable")


async def test_an_unexpected_error_is_a_logged_problem_500_not_a_crash(
    client: httpx.AsyncClient, app: App, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    broker: Broker = await app.broker()

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(broker, "stats", broken)
    problem(await client.get("/v1/queues"), 500, "internal-error")
    assert "a bug" in caplog.text
    assert (await client.get("/healthz")).status_code == 200
