"""problem+json answers become the right exception, with their members."""

from __future__ import annotations

import httpx
import pytest

from offload import OffloadError
from offload.client import (
    ApiError,
    ClientError,
    FieldError,
    GiveUp,
    InvalidArguments,
    NotFound,
    Overloaded,
    ProtocolError,
    RateLimited,
    ServerError,
    Unauthorized,
)
from offload.client._errors import error_from_response, parse_retry_after

from .conftest import FakeTime, MakeClient, Script, json_response, problem


def test_the_tree() -> None:
    assert issubclass(ClientError, OffloadError)
    assert issubclass(ApiError, ClientError) and issubclass(GiveUp, ClientError)
    assert issubclass(ProtocolError, ClientError)
    assert issubclass(NotFound, LookupError)
    assert issubclass(Overloaded, ServerError) and issubclass(ServerError, ApiError)
    assert issubclass(RateLimited, ApiError) and not issubclass(RateLimited, ServerError)


def test_422_carries_the_field_errors(make: MakeClient) -> None:
    errors = [
        {"field": "args[1]", "message": "expected int, got str"},
        {"field": "kwargs.width", "message": "missing"},
    ]
    script = Script(problem(422, "invalid-arguments", "arguments don't match resize(...)", errors=errors))
    with pytest.raises(InvalidArguments) as info:
        make(script).submit("resize", [1, "x"])
    error = info.value
    assert error.status == 422
    assert error.errors == [
        FieldError("args[1]", "expected int, got str"),
        FieldError("kwargs.width", "missing"),
    ]
    assert error.type == "https://offload.dev/problems/invalid-arguments"
    assert error.slug == "invalid-arguments"
    assert error.detail == "arguments don't match resize(...)"
    assert error.problem["errors"] == errors
    assert "422" in str(error) and "resize" in str(error)


def test_401_and_404_members(make: MakeClient) -> None:
    script = Script(
        problem(401, "unauthorized", "send Authorization: Bearer <key>"), problem(404, "job-not-found")
    )
    client = make(script)
    with pytest.raises(Unauthorized) as unauthorized:
        client.get("j1")
    assert unauthorized.value.detail == "send Authorization: Bearer <key>"
    assert unauthorized.value.title == "unauthorized"
    with pytest.raises(NotFound) as not_found:
        client.get("j1")
    assert not_found.value.slug == "job-not-found"


def test_503_queue_full_members_on_the_last_error(make: MakeClient, fake_time: FakeTime) -> None:
    script = Script(
        problem(
            503,
            "queue-full",
            "queue 'images' is full",
            {"retry-after": "12"},
            queue="images",
            depth=1000,
            max_depth=1000,
        )
    )
    with pytest.raises(GiveUp) as info:
        make(script, retry=fake_time.config(max_attempts=1)).submit("resize")
    error = info.value.last_error
    assert isinstance(error, Overloaded)
    assert (error.queue, error.depth, error.max_depth, error.retry_after) == ("images", 1000, 1000, 12)


def test_an_unreachable_broker_503_has_no_queue_members() -> None:
    error = error_from_response(503, "application/problem+json", b'{"title": "broker unreachable"}', None)
    assert isinstance(error, Overloaded)
    assert (error.queue, error.depth, error.max_depth, error.retry_after) == (None, None, None, None)


def test_429_retry_after() -> None:
    error = error_from_response(429, "application/problem+json", b"{}", "4")
    assert isinstance(error, RateLimited) and error.retry_after == 4
    assert error.title == "Too Many Requests"  # the reason phrase when the body has no title


def test_a_body_that_is_not_problem_json_still_maps_by_status() -> None:
    html = error_from_response(502, "text/html", b"<html><body>Bad gateway</body></html>", None)
    assert type(html) is ServerError and html.status == 502 and html.detail == ""
    text = error_from_response(404, "text/plain", b"no such thing", None)
    assert type(text) is NotFound and text.detail == "no such thing"
    empty = error_from_response(418, None, b"", None)
    assert type(empty) is ApiError and empty.type == "about:blank"
    array = error_from_response(500, "application/json", b"[1, 2]", None)
    assert type(array) is ServerError


def test_invalid_arguments_tolerates_a_malformed_errors_member() -> None:
    assert InvalidArguments(422, {"errors": "oops"}).errors == []
    assert InvalidArguments(422, {"errors": [{"field": "args[0]"}, 7]}).errors == [FieldError("args[0]", "")]


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("3", 3.0),
        (" 120 ", 120.0),
        ("1.5", 1.5),
        ("-4", 0.0),
        ("soon", None),
        (None, None),
        ("nan", None),
        ("inf", None),
    ],
)
def test_parse_retry_after(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value) == seconds


def test_parse_retry_after_http_date() -> None:
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now=1445412480.0) == 30.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480.0 + 60) == 0.0


def test_an_answer_off_the_contract_is_a_protocol_error(make: MakeClient) -> None:
    script = Script(
        json_response(200, {"id": "j1"}),
        httpx.Response(200, text="not json"),
        json_response(200, {"id": "j1", "task": "t", "queue": "q", "state": "exploded"}),
    )
    client = make(script)
    for _ in range(3):
        with pytest.raises(ProtocolError, match="Job"):
            client.get("j1")
