"""What each call sends and how its answer is typed."""

from __future__ import annotations

import asyncio
import json

import httpx
import msgspec
import pytest

from offload import App, ConfigurationError, EncodeError
from offload.client import AsyncClient, Client, Job, JobAccepted, JobState, QueueStats

from .conftest import BASE, FakeTime, MakeClient, Script, accepted, job_body, json_response


def body(request: httpx.Request) -> object:
    return json.loads(request.content)


def test_submit_sends_the_contracts_body(make: MakeClient) -> None:
    script = Script(accepted("j9"))
    result = make(script, api_key="sekret").submit(
        "resize",
        (42, "x"),
        {"width": 640},
        queue="images",
        priority=9,
        delay=2.5,
        webhook="https://hook.test/x",
    )
    assert result == JobAccepted(id="j9", state=JobState.QUEUED, created=True, location="/v1/jobs/j9")
    request = script.requests[0]
    assert (request.method, str(request.url)) == ("POST", f"{BASE}/v1/jobs")
    assert request.headers["authorization"] == "Bearer sekret"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["accept"] == "application/json"
    assert body(request) == {
        "task": "resize",
        "args": [42, "x"],
        "kwargs": {"width": 640},
        "queue": "images",
        "priority": 9,
        "delay": 2.5,
        "webhook": "https://hook.test/x",
    }


def test_submit_leaves_out_options_not_given(make: MakeClient) -> None:
    script = Script(accepted())
    make(script).submit("ping")
    assert body(script.requests[0]) == {"task": "ping", "args": [], "kwargs": {}}
    assert "authorization" not in script.requests[0].headers


def test_task_kwargs_never_clash_with_options(make: MakeClient) -> None:
    script = Script(accepted())
    make(script).submit("send_mail", [], {"queue": "theirs", "priority": "high", "task": "x"}, queue="mail")
    assert body(script.requests[0]) == {
        "task": "send_mail",
        "args": [],
        "kwargs": {"queue": "theirs", "priority": "high", "task": "x"},
        "queue": "mail",
    }


def test_submit_takes_a_task_object(make: MakeClient) -> None:
    app = App("memory://client-test-task-object")

    @app.task(public=True)
    def resize(image_id: int, width: int) -> str:
        return f"{image_id}@{width}"

    script = Script(accepted())
    make(script).submit(resize, [1], {"width": 2})
    assert body(script.requests[0])["task"] == resize.name  # type: ignore[index]


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda c: c.submit("t", "abc"), ConfigurationError),
        (lambda c: c.submit("t", 5), ConfigurationError),
        (lambda c: c.submit("t", [], [1]), ConfigurationError),
        (lambda c: c.submit(""), ConfigurationError),
        (lambda c: c.submit(42), ConfigurationError),
        (lambda c: c.submit("t", idempotency_key=""), ConfigurationError),
        (lambda c: c.submit("t", idempotency_key="k" * 256), ConfigurationError),
        (lambda c: c.submit("t", [object()]), EncodeError),
        (lambda c: c.get(""), ConfigurationError),
        (lambda c: c.wait("j1", timeout=-1), ConfigurationError),
        (lambda c: c.replay(), ConfigurationError),
        (lambda c: c.replay(["a"], queue="q"), ConfigurationError),
        (lambda c: c.purge_dead("abc"), ConfigurationError),
    ],
)
def test_bad_arguments_are_refused_before_sending(
    make: MakeClient, call: object, error: type[Exception]
) -> None:
    script = Script()
    with pytest.raises(error):
        call(make(script))  # type: ignore[operator]
    assert script.requests == []


def test_get_types_the_job(make: MakeClient) -> None:
    script = Script(
        json_response(200, job_body(state="succeeded", result={"url": "x"}, finished_at=5.0, extra="ignored"))
    )
    job = make(script).get("j1")
    assert isinstance(job, Job)
    assert job.state is JobState.SUCCEEDED and job.finished
    assert job.result == {"url": "x"} and job.finished_at == 5.0
    assert str(script.requests[0].url) == f"{BASE}/v1/jobs/j1"


def test_job_ids_are_quoted_in_paths(make: MakeClient) -> None:
    script = Script(json_response(200, job_body(job_id="a/b c")))
    make(script).get("a/b c")
    assert script.requests[0].url.raw_path == b"/v1/jobs/a%2Fb%20c"


@pytest.mark.parametrize("cancelled", [True, False])
def test_cancel(make: MakeClient, cancelled: bool) -> None:
    state = "cancelled" if cancelled else "running"
    script = Script(json_response(200, {"id": "j1", "cancelled": cancelled, "state": state}))
    assert make(script).cancel("j1") is cancelled
    request = script.requests[0]
    assert (request.method, request.url.path) == ("POST", "/v1/jobs/j1/cancel")


def test_queues(make: MakeClient) -> None:
    stats = [
        {
            "queue": "default",
            "ready": 3,
            "delayed": 1,
            "running": 2,
            "dead": 0,
            "max_depth": None,
            "drain_rate": 1.5,
        },
        {
            "queue": "images",
            "ready": 0,
            "delayed": 0,
            "running": 0,
            "dead": 4,
            "max_depth": 100,
            "drain_rate": 0.0,
        },
    ]
    script = Script(json_response(200, stats))
    result = make(script).queues()
    assert result == [msgspec.convert(s, QueueStats) for s in stats]
    assert result[1].max_depth == 100 and result[0].drain_rate == 1.5
    assert script.requests[0].url.path == "/v1/queues"


def test_dead_letter_calls(make: MakeClient) -> None:
    script = Script(
        json_response(200, [job_body(state="dead", error="boom")]),
        json_response(200, {"count": 2}),
        json_response(200, {"count": 1}),
        json_response(200, {"count": 7}),
    )
    client = make(script)
    dead = client.dead(queue="images", limit=10)
    assert dead[0].state is JobState.DEAD and dead[0].error == "boom"
    assert client.replay(["a", "b"]) == 2
    assert client.purge_dead(queue="images") == 1
    assert client.replay(all=True) == 7
    first, replay, purge, replay_all = script.requests
    assert dict(first.url.params) == {"queue": "images", "limit": "10"}
    assert (replay.url.path, body(replay)) == ("/v1/dlq/replay", {"ids": ["a", "b"]})
    assert (purge.url.path, body(purge)) == ("/v1/dlq/purge", {"queue": "images"})
    assert body(replay_all) == {"all": True}


def test_api_key_from_the_environment(make: MakeClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OFFLOAD_API_KEY", "from-env")
    script = Script(json_response(200, job_body()), json_response(200, job_body()))
    make(script).get("j1")
    make(script, api_key="explicit").get("j1")
    assert [r.headers["authorization"] for r in script.requests] == ["Bearer from-env", "Bearer explicit"]


def test_a_base_url_with_a_path_prefix(fake_time: FakeTime) -> None:
    script = Script(json_response(200, job_body()))
    with Client(
        "http://gw.test/offload/", transport=httpx.MockTransport(script), retry=fake_time.config()
    ) as client:
        client.get("j1")
    assert str(script.requests[0].url) == "http://gw.test/offload/v1/jobs/j1"


def test_ready(make: MakeClient) -> None:
    script = Script(json_response(200, {"status": "ok"}), httpx.Response(503), httpx.ConnectError("refused"))
    client = make(script)
    assert [client.ready(), client.ready(), client.ready()] == [True, False, False]
    assert script.requests[0].url.path == "/readyz"


def test_sync_context_manager_closes(fake_time: FakeTime) -> None:
    with Client(BASE, transport=httpx.MockTransport(Script(accepted())), retry=fake_time.config()) as client:
        client.submit("t")
    assert client._http.is_closed


async def test_async_context_manager_closes(fake_time: FakeTime) -> None:
    script = Script(accepted(), json_response(200, job_body()))
    async with AsyncClient(BASE, transport=httpx.MockTransport(script), retry=fake_time.config()) as client:
        accepted_job = await client.submit("t")
        job = await client.get(accepted_job.id)
    assert job.id == "j1" and client._http.is_closed


async def test_async_client_sleeps_with_the_injected_async_sleep(fake_time: FakeTime) -> None:
    script = Script(httpx.Response(502), accepted())
    async with AsyncClient(BASE, transport=httpx.MockTransport(script), retry=fake_time.config()) as client:
        await client.submit("t")
    assert fake_time.sleeps == [1]


async def test_async_concurrent_submits_keep_their_own_keys(fake_time: FakeTime) -> None:
    script = Script(httpx.Response(502), httpx.Response(502), accepted("a"), accepted("b"))
    async with AsyncClient(BASE, transport=httpx.MockTransport(script), retry=fake_time.config()) as client:
        await asyncio.gather(client.submit("t", [1]), client.submit("t", [2]))
    by_arg: dict[int, set[str | None]] = {}
    for request in script.requests:
        by_arg.setdefault(body(request)["args"][0], set()).add(request.headers.get("idempotency-key"))  # type: ignore[index]
    assert len(by_arg[1]) == 1 and len(by_arg[2]) == 1 and by_arg[1] != by_arg[2]


def test_repr_and_defaults() -> None:
    client = Client("http://h.test:8000/")
    assert repr(client) == "<Client http://h.test:8000>"
    assert client.timeout == 10.0 and client.retry.deadline == 60.0 and client.retry.max_attempts == 10
    client.close()
    with pytest.raises(ConfigurationError):
        Client(BASE, timeout=0)
