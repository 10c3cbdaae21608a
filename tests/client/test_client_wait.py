"""wait(): long-poll slicing, and the event stream (SSE) with its decoder."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import msgspec
import pytest

from offload.client import GiveUp, JobState, NotFound, ProtocolError, ServerSentEvent, SSEDecoder

from .conftest import FakeTime, MakeClient, Script, job_body, json_response, problem

# -- long-poll ---------------------------------------------------------------------------


def polled(fake_time: FakeTime, state: str = "running") -> Callable[[httpx.Request], httpx.Response]:
    """An answer that takes the whole ?wait=N it was given (the job did not finish meanwhile)."""

    def answer(request: httpx.Request) -> httpx.Response:
        fake_time.now += int(request.url.params["wait"])
        return json_response(200, job_body(state=state))

    return answer


def waits(script: Script) -> list[int]:
    return [int(r.url.params["wait"]) for r in script.requests]


def test_long_poll_slices_until_the_timeout(make: MakeClient, fake_time: FakeTime) -> None:
    script = Script(*[polled(fake_time)] * 3)
    job = make(script).wait("j1", timeout=75)
    assert waits(script) == [30, 30, 15]
    assert job.state is JobState.RUNNING and not job.finished  # timed out: the latest state
    assert all(r.url.path == "/v1/jobs/j1" for r in script.requests)
    assert fake_time.sleeps == []


def test_long_poll_stops_at_a_finished_state(make: MakeClient, fake_time: FakeTime) -> None:
    done = json_response(200, job_body(state="succeeded", result=42))
    script = Script(polled(fake_time), polled(fake_time, "queued"), done)
    job = make(script).wait("j1")
    assert waits(script) == [30, 30, 30]  # no timeout: full slices
    assert job.state is JobState.SUCCEEDED and job.result == 42


@pytest.mark.parametrize("state", ["dead", "cancelled"])
def test_long_poll_stops_at_any_finished_state(make: MakeClient, state: str) -> None:
    script = Script(json_response(200, job_body(state=state)))
    assert make(script).wait("j1", timeout=100).state == state


def test_long_poll_rounds_a_fraction_up_and_zero_asks_once(make: MakeClient, fake_time: FakeTime) -> None:
    script = Script(polled(fake_time), polled(fake_time))
    client = make(script)
    client.wait("j1", timeout=2.5)
    client.wait("j1", timeout=0)
    assert waits(script) == [3, 0]


def test_long_poll_read_timeout_covers_the_wait(make: MakeClient) -> None:
    script = Script(json_response(200, job_body(state="succeeded")))
    make(script, timeout=5).wait("j1", timeout=20)
    timeouts = script.requests[0].extensions["timeout"]
    assert timeouts["read"] == 25 and timeouts["connect"] == 5


def test_a_long_poll_slice_is_retried(make: MakeClient, fake_time: FakeTime) -> None:
    script = Script(
        problem(503, "broker-unreachable", headers={"retry-after": "2"}),
        httpx.ConnectError("refused"),
        json_response(200, job_body(state="succeeded")),
    )
    assert make(script).wait("j1", timeout=20).finished
    assert fake_time.sleeps == [2, 2]  # Retry-After 2, then the backoff ceiling of the 2nd retry
    assert waits(script) == [20, 18, 16]  # each attempt asks only for the time left


def test_a_failing_slice_gives_up_when_the_wait_times_out(make: MakeClient, fake_time: FakeTime) -> None:
    script = Script(*[httpx.ConnectError("refused")] * 10)
    with pytest.raises(GiveUp) as info:
        make(script).wait("j1", timeout=5)
    assert fake_time.sleeps == [1, 2, 2]  # the retry deadline is the wait's 5 s
    assert isinstance(info.value.last_error, httpx.ConnectError)


def test_waiting_for_an_unknown_job(make: MakeClient) -> None:
    with pytest.raises(NotFound):
        make(Script(problem(404, "job-not-found"))).wait("nope", timeout=10)


# -- the event stream ----------------------------------------------------------------------


def state_event(state: str, event_id: str | None = None, **extra: Any) -> str:
    lines = ["event: state"]
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines.append("data: " + msgspec.json.encode(job_body(state=state, **extra)).decode())
    return "\n".join(lines) + "\n\n"


class Chunks(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A streamed body for both clients; `on_chunk` runs before each chunk is handed out."""

    def __init__(self, chunks: list[str], on_chunk: object = None) -> None:
        self.chunks = chunks
        self.on_chunk = on_chunk
        self.sent = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.chunks:
            if callable(self.on_chunk):
                self.on_chunk()
            self.sent += 1
            yield chunk.encode()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.__iter__():
            yield chunk


def sse(*chunks: str, on_chunk: object = None) -> httpx.Response:
    return httpx.Response(
        200, headers={"content-type": "text/event-stream"}, stream=Chunks(list(chunks), on_chunk)
    )


def test_stream_reads_state_events_until_finished(make: MakeClient, fake_time: FakeTime) -> None:
    script = Script(
        sse(
            state_event("queued"),
            ": keep-alive\n\n",
            state_event("running", started_at=2.0),
            'event: progress\ndata: {"done": 5}\n\n',  # other events are ignored
            state_event("succeeded", result={"url": "u"}, finished_at=3.0),
            state_event("queued"),  # never read: the stream is left at the finished state
        )
    )
    job = make(script).wait("j1", stream=True)
    assert job.state is JobState.SUCCEEDED and job.result == {"url": "u"} and job.finished_at == 3.0
    assert len(script.requests) == 1
    request = script.requests[0]
    assert request.url.path == "/v1/jobs/j1/events"
    assert request.headers["accept"] == "text/event-stream"
    assert "last-event-id" not in request.headers
    assert fake_time.sleeps == []


def test_stream_events_split_across_chunks(make: MakeClient) -> None:
    text = state_event("running") + state_event("dead", error="boom")
    pieces = [text[i : i + 7] for i in range(0, len(text), 7)]
    job = make(Script(sse(*pieces))).wait("j1", stream=True)
    assert job.state is JobState.DEAD and job.error == "boom"


def test_a_dropped_stream_reconnects_with_last_event_id(make: MakeClient, fake_time: FakeTime) -> None:
    script = Script(
        sse(state_event("queued", "1"), state_event("running", "2")),  # ends before a finished state
        httpx.ConnectError("refused"),
        sse(state_event("running", "2"), state_event("succeeded", "3")),
    )
    job = make(script).wait("j1", stream=True)
    assert job.state is JobState.SUCCEEDED
    assert fake_time.sleeps == [1, 2]  # the early end, then the refused connection
    assert [r.headers.get("last-event-id") for r in script.requests] == [None, "2", "2"]


def test_the_retry_schedule_restarts_after_progress(make: MakeClient, fake_time: FakeTime) -> None:
    script = Script(
        httpx.Response(502),
        sse(state_event("queued")),
        httpx.Response(502),
        sse(state_event("succeeded")),
    )
    make(script).wait("j1", stream=True)
    assert fake_time.sleeps == [1, 1, 2]  # 502; early end (fresh schedule after the event); 502


def test_stream_timeout_returns_the_latest_state(make: MakeClient, fake_time: FakeTime) -> None:
    def tick() -> None:
        fake_time.now += 4

    chunks = Chunks([state_event("queued"), *[": keep-alive\n\n"] * 3], on_chunk=tick)
    script = Script(httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=chunks))
    job = make(script).wait("j1", timeout=10, stream=True)
    assert job.state is JobState.QUEUED
    assert chunks.sent == 3  # stopped at the keep-alive read past 10 s
    assert script.requests[0].extensions["timeout"]["read"] == 10  # min(15 + timeout, time left)


def test_a_read_timeout_at_the_end_of_the_wait_ends_it(make: MakeClient, fake_time: FakeTime) -> None:
    def silent_then_timeout() -> Iterator[str]:
        yield state_event("running")
        fake_time.now += 30
        raise httpx.ReadTimeout("no keep-alive")

    class Failing(Chunks):
        def __iter__(self) -> Iterator[bytes]:
            for chunk in silent_then_timeout():
                yield chunk.encode()

    response = httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=Failing([]))
    job = make(Script(response)).wait("j1", timeout=20, stream=True)
    assert job.state is JobState.RUNNING
    assert fake_time.sleeps == []


def test_stream_errors(make: MakeClient, fake_time: FakeTime) -> None:
    script = Script(
        problem(503, "broker-unreachable", headers={"retry-after": "4"}),
        problem(404, "job-not-found"),
        sse("event: state\ndata: {not json}\n\n"),
    )
    client = make(script)
    with pytest.raises(NotFound):
        client.wait("j1", stream=True)
    assert fake_time.sleeps == [4]
    with pytest.raises(ProtocolError):
        client.wait("j1", stream=True)


def test_a_stream_that_never_finishes_gives_up(make: MakeClient, fake_time: FakeTime) -> None:
    script = Script(*[sse(": keep-alive\n\n") for _ in range(10)])
    with pytest.raises(GiveUp) as info:
        make(script, retry=fake_time.config(max_attempts=3)).wait("j1", stream=True)
    assert isinstance(info.value.last_error, ProtocolError)
    assert len(script.requests) == 3


# -- the decoder ----------------------------------------------------------------------------


def feed(decoder: SSEDecoder, text: str) -> list[ServerSentEvent]:
    events = [decoder.feed(line) for line in text.splitlines()]
    return [e for e in events if e is not None]


def test_decoder_fields() -> None:
    decoder = SSEDecoder()
    events = feed(decoder, 'event: state\nid: 7\nretry: 3000\ndata: {"a":\ndata:1}\n\n')
    assert events == [ServerSentEvent(event="state", data='{"a":\n1}', id="7", retry=3000)]
    assert decoder.last_event_id == "7"


def test_decoder_defaults_comments_and_crlf() -> None:
    decoder = SSEDecoder()
    events = feed(decoder, ": hello\r\ndata: x\r\n\r\n:keep-alive\r\n\r\ndata\r\n\r\nunknown: y\r\n\r\n")
    assert events == [ServerSentEvent(data="x"), ServerSentEvent(data="")]


def test_decoder_keeps_the_id_and_drops_an_unfinished_event() -> None:
    decoder = SSEDecoder()
    assert feed(decoder, "id: 1\ndata: a\n\nevent: state\ndata: b\n\ndata: c") == [
        ServerSentEvent(data="a", id="1"),
        ServerSentEvent(event="state", data="b", id="1"),
    ]
    assert decoder.feed("event: state") is None  # an event with no data is not dispatched
    assert decoder.feed("") is not None  # ...but "data: c" from before is still buffered
    assert decoder.feed("id: bad\0id") is None and decoder.last_event_id == "1"
    assert feed(decoder, "event: x\n\n") == []
