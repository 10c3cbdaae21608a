"""Retries through the real clients (sync and async) on a scripted server, with a fake clock."""

from __future__ import annotations

import uuid

import httpx
import pytest

from offload.client import (
    ApiError,
    BadRequest,
    Forbidden,
    GiveUp,
    InvalidArguments,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    ServerError,
    Unauthorized,
    UnsupportedMediaType,
)

from .conftest import FakeTime, MakeClient, Script, accepted, job_body, json_response, problem


def full(**queue_members: object) -> httpx.Response:
    return problem(503, "queue-full", "queue 'default' is full", {"retry-after": "3"}, **queue_members)


def test_503_honours_retry_after_and_resends_the_same_idempotency_key(
    make: MakeClient, fake_time: FakeTime
) -> None:
    script = Script(
        full(), full(), problem(503, "broker-unreachable", headers={"retry-after": "7"}), accepted()
    )
    result = make(script).submit("resize", [42], {"width": 640})
    assert result.id == "j1" and result.created
    assert fake_time.sleeps == [3, 3, 7]
    keys = script.keys()
    assert len(keys) == 4 and len(set(keys)) == 1
    assert uuid.UUID(str(keys[0])).version == 4
    bodies = {r.content for r in script.requests}
    assert len(bodies) == 1  # the very same request every time


def test_429_honours_retry_after(make: MakeClient, fake_time: FakeTime) -> None:
    script = Script(problem(429, "rate-limited", headers={"retry-after": "5"}), accepted())
    make(script).submit("resize")
    assert fake_time.sleeps == [5]
    assert script.keys()[0] == script.keys()[1]


def test_retry_after_is_cut_to_what_is_left_of_the_deadline(make: MakeClient, fake_time: FakeTime) -> None:
    slow = problem(503, "queue-full", headers={"retry-after": "45"})
    script = Script(slow, slow, slow)
    client = make(script, retry=fake_time.config(deadline=60))
    with pytest.raises(GiveUp) as info:
        client.submit("resize")
    assert fake_time.sleeps == [45, 15]  # then the last try at the deadline fails too
    assert len(script.requests) == 3
    assert isinstance(info.value.last_error, Overloaded)
    assert info.value.last_error.retry_after == 45


def test_503_without_retry_after_backs_off(make: MakeClient, fake_time: FakeTime) -> None:
    script = Script(problem(503, "broker-unreachable"), problem(503, "broker-unreachable"), accepted())
    make(script).submit("resize")
    assert fake_time.sleeps == [1, 2]


@pytest.mark.parametrize("status", [500, 502, 504])
def test_other_5xx_back_off_with_full_jitter_ceilings(
    make: MakeClient, fake_time: FakeTime, status: int
) -> None:
    script = Script(*[httpx.Response(status, text="boom")] * 6, accepted())
    make(script).submit("resize")
    assert fake_time.sleeps == [1, 2, 4, 8, 16, 16]
    assert fake_time.randoms == [(0, 1), (0, 2), (0, 4), (0, 8), (0, 16), (0, 16)]
    assert len(set(script.keys())) == 1


def test_5xx_with_a_retry_after_still_backs_off(make: MakeClient, fake_time: FakeTime) -> None:
    """Only 429 and 503 carry a meaningful Retry-After in the contract."""
    script = Script(httpx.Response(500, headers={"retry-after": "30"}), accepted())
    make(script).submit("resize")
    assert fake_time.sleeps == [1]


def test_jitter_uses_the_injected_random(make: MakeClient) -> None:
    half = FakeTime(fraction=0.5)
    script = Script(httpx.Response(502), httpx.Response(502), httpx.Response(502), accepted())
    make(script, retry=half.config()).submit("resize")
    assert half.sleeps == [0.5, 1.0, 2.0]


@pytest.mark.parametrize(
    "error",
    [
        httpx.ConnectError("refused"),
        httpx.ReadTimeout("slow"),
        httpx.RemoteProtocolError("dropped"),
        httpx.ReadError("reset"),
    ],
)
def test_transport_errors_are_retried_with_backoff(
    make: MakeClient, fake_time: FakeTime, error: Exception
) -> None:
    script = Script(error, error, accepted())
    assert make(script).submit("resize").id == "j1"
    assert fake_time.sleeps == [1, 2]
    assert len(set(script.keys())) == 1


def test_a_non_network_transport_error_is_not_retried(make: MakeClient, fake_time: FakeTime) -> None:
    script = Script(httpx.UnsupportedProtocol("ftp?"))
    with pytest.raises(httpx.UnsupportedProtocol):
        make(script).submit("resize")
    assert fake_time.sleeps == []


def test_deadline_gives_up_with_the_last_error(make: MakeClient, fake_time: FakeTime) -> None:
    refused = httpx.ConnectError("refused")
    script = Script(*[refused] * 10)
    client = make(script, retry=fake_time.config(deadline=10, max_attempts=100))
    with pytest.raises(GiveUp) as info:
        client.submit("resize")
    assert fake_time.sleeps == [1, 2, 4, 3]  # 1 + 2 + 4 = 7 s gone: the 8 s wait is cut to 3
    assert info.value.last_error is refused and info.value.__cause__ is refused
    assert info.value.attempts == 5 and info.value.elapsed == 10
    assert len(script.requests) == 5


def test_max_attempts_gives_up(make: MakeClient, fake_time: FakeTime) -> None:
    script = Script(*[httpx.Response(500)] * 3)
    with pytest.raises(GiveUp) as info:
        make(script, retry=fake_time.config(max_attempts=3)).get("j1")
    assert isinstance(info.value.last_error, ServerError) and info.value.last_error.status == 500
    assert len(script.requests) == 3 and fake_time.sleeps == [1, 2]


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (400, BadRequest),
        (401, Unauthorized),
        (403, Forbidden),
        (404, NotFound),
        (413, PayloadTooLarge),
        (415, UnsupportedMediaType),
        (422, InvalidArguments),
        (409, ApiError),
    ],
)
def test_4xx_other_than_429_are_not_retried(
    make: MakeClient, fake_time: FakeTime, status: int, error_type: type[ApiError]
) -> None:
    script = Script(problem(status, "nope", "what went wrong", headers={"retry-after": "1"}))
    with pytest.raises(error_type) as info:
        make(script).submit("resize")
    assert type(info.value) is error_type and info.value.status == status
    assert len(script.requests) == 1 and fake_time.sleeps == []


def test_different_submits_get_different_keys(make: MakeClient) -> None:
    script = Script(accepted("a"), accepted("b"), accepted("c"))
    client = make(script)
    for _ in range(3):
        client.submit("resize", [1])
    keys = script.keys()
    assert len(set(keys)) == 3 and None not in keys


def test_a_callers_idempotency_key_is_sent_on_every_retry(make: MakeClient) -> None:
    script = Script(httpx.ConnectError("refused"), accepted(created=False))
    result = make(script).submit("resize", idempotency_key="order-7")
    assert script.keys() == ["order-7", "order-7"]
    assert result.created is False


def test_get_and_cancel_are_retried(make: MakeClient, fake_time: FakeTime) -> None:
    script = Script(
        httpx.Response(502),
        json_response(200, job_body()),
        httpx.ReadTimeout("slow"),
        json_response(200, {"id": "j1", "cancelled": True, "state": "cancelled"}),
    )
    client = make(script)
    assert client.get("j1").id == "j1"
    assert client.cancel("j1") is True
    assert fake_time.sleeps == [1, 1]  # each call has its own schedule
    assert [r.method for r in script.requests] == ["GET", "GET", "POST", "POST"]


def test_every_call_has_its_own_deadline(make: MakeClient, fake_time: FakeTime) -> None:
    script = Script(
        httpx.Response(502),
        json_response(200, job_body()),
        httpx.Response(502),
        json_response(200, job_body()),
    )
    client = make(script, retry=fake_time.config(deadline=1.5))
    client.get("j1")
    fake_time.now += 3600  # a long time later: the next call starts a fresh deadline
    client.get("j1")
    assert fake_time.sleeps == [1, 1]
