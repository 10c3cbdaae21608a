"""Everything the sync and async clients share, with no I/O: requests to build, answers to parse,
the retry state of a call, and the two ways of waiting for a job (long-poll slices, event stream).

The shells in `_sync.py` and `_async.py` only send, read and sleep.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

import httpx
import msgspec

from offload.client._errors import (
    ApiError,
    Overloaded,
    ProtocolError,
    RateLimited,
    ServerError,
    error_from_response,
)
from offload.client._models import Job
from offload.client._retry import Attempts, RetryConfig
from offload.client._sse import SSEDecoder
from offload.errors import ConfigurationError, EncodeError

T = TypeVar("T")

# Transport failures worth another attempt. Others (a bad URL scheme, say) are raised at once.
RETRYABLE_TRANSPORT: tuple[type[Exception], ...] = (
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
)
MAX_WAIT = 60  # the contract's cap on `GET /v1/jobs/{id}?wait=N`
KEEPALIVE = 15.0  # the server sends `: keep-alive` on an event stream at least this often
USER_AGENT = "offload-client/0.1"


class Named(Protocol):
    """A `Task` (or anything with a `name`): `submit` takes it in place of the task name."""

    @property
    def name(self) -> str: ...


@dataclass(frozen=True)
class Req:
    """A request to (re)send: built afresh for each attempt."""

    method: str
    path: str
    params: Mapping[str, str | int] | None = None
    headers: Mapping[str, str] | None = None
    content: bytes | None = None
    read_timeout: float | None = None  # None: the client's timeout

    def build(self, http: httpx.Client | httpx.AsyncClient, timeout: float) -> httpx.Request:
        return http.build_request(
            self.method,
            self.path,
            params=dict(self.params) if self.params else None,
            headers=dict(self.headers) if self.headers else None,
            content=self.content,
            timeout=httpx.Timeout(timeout, read=self.read_timeout if self.read_timeout else timeout),
        )


class Call:
    """One logical API call: its request and its retry state."""

    def __init__(self, req: Req, attempts: Attempts) -> None:
        self.req = req
        self.attempts = attempts

    def request(self, http: httpx.Client | httpx.AsyncClient, timeout: float) -> httpx.Request:
        """The request for the next attempt."""
        return self.req.build(http, timeout)

    def answered(self, response: httpx.Response) -> float | None:
        """None for a 2xx; for a 429 or 5xx the seconds to wait before retrying; else raise.

        The body must have been read. Raises the ApiError for a 4xx, GiveUp when retries ran out.
        """
        if response.is_success:
            return None
        error = api_error(response)
        if isinstance(error, RateLimited | ServerError):
            retry_after = error.retry_after if isinstance(error, RateLimited | Overloaded) else None
            return self.attempts.failed(error, retry_after)
        raise error

    def failed(self, error: BaseException) -> float:
        """A retryable transport error: the seconds to wait, or raise GiveUp."""
        return self.attempts.failed(error)


def api_error(response: httpx.Response) -> ApiError:
    return error_from_response(
        response.status_code,
        response.headers.get("content-type"),
        response.content,
        response.headers.get("retry-after"),
    )


def decode(response: httpx.Response, type_: type[T]) -> T:
    try:
        return msgspec.json.decode(response.content, type=type_)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(
            f"{response.request.method} {response.request.url.path}: the answer is not a valid "
            f"{getattr(type_, '__name__', type_)}: {exc}"
        ) from None


def job_path(job_id: str, suffix: str = "") -> str:
    if not isinstance(job_id, str) or not job_id:
        raise ConfigurationError(f"job id must be a non-empty string, not {job_id!r}")
    return f"/v1/jobs/{quote(job_id, safe='')}{suffix}"


class BaseClient:
    """Configuration, request building and answer parsing shared by `Client` and `AsyncClient`."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        timeout: float,
        retry: RetryConfig | None,
        headers: Mapping[str, str] | None,
    ) -> None:
        if not (isinstance(timeout, int | float) and timeout > 0):
            raise ConfigurationError(f"timeout must be > 0 seconds, not {timeout!r}")
        self.base_url = str(base_url).rstrip("/")
        self.timeout = float(timeout)
        self.retry = retry if retry is not None else RetryConfig()
        key = api_key if api_key is not None else os.environ.get("OFFLOAD_API_KEY")
        self._headers = {"Accept": "application/json", "User-Agent": USER_AGENT, **(headers or {})}
        if key:
            self._headers["Authorization"] = f"Bearer {key}"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.base_url}>"

    def _call(self, req: Req, deadline: float | None = None) -> Call:
        return Call(req, Attempts(self.retry, deadline))

    # -- requests --------------------------------------------------------------------------

    @staticmethod
    def _submit_req(
        task: str | Named,
        args: Sequence[Any],
        kwargs: Mapping[str, Any] | None,
        queue: str | None,
        priority: int | None,
        delay: float | None,
        webhook: str | None,
        idempotency_key: str | None,
    ) -> Req:
        name = task if isinstance(task, str) else getattr(task, "name", None)
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"task must be a task name or a Task, not {task!r}")
        if isinstance(args, str | bytes) or not isinstance(args, Sequence):
            raise ConfigurationError(f"args must be a list or tuple, not {type(args).__name__}")
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise ConfigurationError(f"kwargs must be a dict, not {type(kwargs).__name__}")
        # One key per logical submit, sent unchanged on every retry: a retry never makes a second job.
        key = idempotency_key if idempotency_key is not None else str(uuid.uuid4())
        if not isinstance(key, str) or not 0 < len(key) <= 255:
            raise ConfigurationError("idempotency_key must be 1 to 255 characters")
        body: dict[str, Any] = {"task": name, "args": list(args), "kwargs": dict(kwargs or {})}
        options = {"queue": queue, "priority": priority, "delay": delay, "webhook": webhook}
        body.update({field: value for field, value in options.items() if value is not None})
        try:
            content = msgspec.json.encode(body)
        except (TypeError, msgspec.EncodeError) as exc:
            raise EncodeError(f"task {name!r}: the arguments cannot be encoded as JSON: {exc}") from None
        return Req(
            "POST",
            "/v1/jobs",
            headers={"Content-Type": "application/json", "Idempotency-Key": key},
            content=content,
        )

    @staticmethod
    def _get_req(job_id: str) -> Req:
        return Req("GET", job_path(job_id))

    @staticmethod
    def _cancel_req(job_id: str) -> Req:
        return Req("POST", job_path(job_id, "/cancel"))

    @staticmethod
    def _queues_req() -> Req:
        return Req("GET", "/v1/queues")

    @staticmethod
    def _dead_req(queue: str | None, limit: int | None) -> Req:
        params: dict[str, str | int] = {}
        if queue is not None:
            params["queue"] = queue
        if limit is not None:
            params["limit"] = limit
        return Req("GET", "/v1/dlq", params=params or None)

    @staticmethod
    def _dlq_req(action: str, ids: Sequence[str] | None, queue: str | None, all: bool) -> Req:
        chosen = [ids is not None, queue is not None, all]
        if sum(chosen) != 1:
            raise ConfigurationError(f"{action}: give exactly one of ids, queue or all=True")
        body: dict[str, Any]
        if ids is not None:
            if isinstance(ids, str):
                raise ConfigurationError(f"{action}: ids must be a list of job ids, not a string")
            body = {"ids": list(ids)}
        elif queue is not None:
            body = {"queue": queue}
        else:
            body = {"all": True}
        return Req(
            "POST",
            f"/v1/dlq/{action}",
            headers={"Content-Type": "application/json"},
            content=msgspec.json.encode(body),
        )

    # -- waiting ---------------------------------------------------------------------------

    def _long_poll(self, job_id: str, timeout: float | None) -> LongPoll:
        return LongPoll(self, job_id, timeout)

    def _event_stream(self, job_id: str, timeout: float | None) -> EventStream:
        return EventStream(self, job_id, timeout)


def _check_timeout(timeout: float | None) -> None:
    if timeout is not None and not (isinstance(timeout, int | float) and timeout >= 0):
        raise ConfigurationError(f"timeout must be >= 0 seconds or None, not {timeout!r}")


class _Waiter:
    """Shared by both ways of waiting: the caller's timeout, and the latest Job seen."""

    def __init__(self, client: BaseClient, job_id: str, timeout: float | None) -> None:
        _check_timeout(timeout)
        job_path(job_id)
        self.client = client
        self.job_id = job_id
        self.clock = client.retry.clock
        self.until = None if timeout is None else self.clock() + timeout
        self.job: Job | None = None

    def remaining(self) -> float | None:
        return None if self.until is None else self.until - self.clock()

    def expired(self) -> bool:
        remaining = self.remaining()
        return remaining is not None and remaining <= 0

    def done(self) -> bool:
        return self.job is not None and (self.job.finished or self.expired())

    def result(self) -> Job:
        assert self.job is not None
        return self.job


class LongPoll(_Waiter):
    """`GET /v1/jobs/{id}?wait=N` in slices of at most `slice` seconds until finished or timed out.

    Each slice is one call with its own retries, bounded by the time left of the wait. N is whole
    seconds, rounded up, so the wait can end up to a second after `timeout`.
    """

    slice = 30  # under the contract's 60 s cap, and under the idle timeout of most proxies

    def next_call(self) -> Call | None:
        if self.done():
            return None
        return _PollCall(self, Attempts(self.client.retry, self.remaining()))

    def slice_req(self) -> Req:
        """The next slice: N is recomputed for every attempt, so retries don't outlast the timeout."""
        remaining = self.remaining()
        wait = self.slice if remaining is None else max(0, math.ceil(remaining))
        wait = min(wait, self.slice, MAX_WAIT)
        return Req(
            "GET", job_path(self.job_id), params={"wait": wait}, read_timeout=wait + self.client.timeout
        )

    def feed(self, response: httpx.Response) -> None:
        self.job = decode(response, Job)


class _PollCall(Call):
    def __init__(self, poll: LongPoll, attempts: Attempts) -> None:
        super().__init__(poll.slice_req(), attempts)
        self.poll = poll

    def request(self, http: httpx.Client | httpx.AsyncClient, timeout: float) -> httpx.Request:
        self.req = self.poll.slice_req()
        return self.req.build(http, timeout)


class EventStream(_Waiter):
    """`GET /v1/jobs/{id}/events`: one `state` event per change, read until a finished state.

    A dropped stream reconnects under the retry schedule, which starts afresh after every event.
    The timeout is checked at every event and keep-alive, so the wait can end up to one keep-alive
    interval (15 s) after it; long-polling (the default) keeps closer to it.
    """

    def __init__(self, client: BaseClient, job_id: str, timeout: float | None) -> None:
        super().__init__(client, job_id, timeout)
        self.decoder = SSEDecoder()
        self.attempts = Attempts(client.retry, self.remaining())

    def next_call(self) -> Call | None:
        if self.done():
            return None
        remaining = self.remaining()
        read = KEEPALIVE + self.client.timeout
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if self.decoder.last_event_id is not None:
            headers["Last-Event-ID"] = self.decoder.last_event_id
        req = Req(
            "GET",
            job_path(self.job_id, "/events"),
            headers=headers,
            read_timeout=read if remaining is None else max(0.001, min(read, remaining)),
        )
        return Call(req, self.attempts)

    def feed(self, line: str) -> bool:
        """One line of the stream; True when reading should stop (finished, or timed out)."""
        event = self.decoder.feed(line)
        if event is not None and event.event == "state":
            try:
                self.job = msgspec.json.decode(event.data, type=Job)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise ProtocolError(f"event stream of job {self.job_id}: bad state event: {exc}") from None
            self.attempts = Attempts(self.client.retry, self.remaining())  # progress: a fresh schedule
        return self.done()

    def ended(self) -> float:
        """Reading stopped: 0 if the wait is over, else the wait before reconnecting (or GiveUp)."""
        if self.done():
            return 0.0
        return self.attempts.failed(ProtocolError("the event stream ended before the job finished"))

    def failed(self, error: BaseException) -> float:
        """A transport error: at the end of the wait a read timeout just ends it; else retry."""
        if self.done():
            return 0.0
        return self.attempts.failed(error)
