"""The client's exception tree, and the parsing of `application/problem+json` answers into it.

OffloadError
└── ClientError                 anything the HTTP client raises on its own account
    ├── ProtocolError           the server's answer does not match the HTTP contract
    ├── GiveUp                  retries ran out (deadline or max attempts); `.last_error`
    └── ApiError                the server answered with an error status; `.status`, `.problem`
        ├── BadRequest          400 malformed JSON or bad field types
        ├── Unauthorized        401 missing or unknown API key
        ├── Forbidden           403 the key lacks the scope
        ├── NotFound            404 unknown job, or unknown / non-public task
        ├── PayloadTooLarge     413
        ├── UnsupportedMediaType 415
        ├── InvalidArguments    422 arguments don't match the task's type hints; `.errors`
        ├── RateLimited         429 per-key rate limit; `.retry_after`          (retried)
        └── ServerError         5xx                                             (retried)
            └── Overloaded      503 queue full or broker unreachable; `.retry_after`, `.queue`,
                                    `.depth`, `.max_depth`
"""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Mapping
from typing import Any

import msgspec

from offload.errors import OffloadError

PROBLEM_TYPE_PREFIX = "https://offload.dev/problems/"


class ClientError(OffloadError):
    """Base class of every error raised by `offload.client`."""


class ProtocolError(ClientError):
    """The server's answer does not match the HTTP contract (not JSON, missing fields, ...)."""


class FieldError(msgspec.Struct, frozen=True):
    """One argument that does not match the task's type hints: `field` is `args[1]` or `kwargs.width`."""

    field: str
    message: str


class ApiError(ClientError):
    """The server answered with an error status; `problem` is its RFC 9457 problem+json body."""

    status: int
    problem: dict[str, Any]
    retry_after: float | None

    def __init__(
        self, status: int, problem: Mapping[str, Any] | None = None, *, retry_after: float | None = None
    ) -> None:
        self.status = status
        self.problem = dict(problem or {})
        self.retry_after = retry_after
        detail = f": {self.detail}" if self.detail else ""
        super().__init__(f"{status} {self.title}{detail}")

    @property
    def type(self) -> str:
        """The problem type URI, e.g. `https://offload.dev/problems/queue-full` (or `about:blank`)."""
        value = self.problem.get("type")
        return value if isinstance(value, str) else "about:blank"

    @property
    def slug(self) -> str:
        """The last part of `type`: `queue-full`, `invalid-arguments`, ..."""
        return self.type.rsplit("/", 1)[-1]

    @property
    def title(self) -> str:
        value = self.problem.get("title")
        return value if isinstance(value, str) and value else _REASONS.get(self.status, "Error")

    @property
    def detail(self) -> str:
        value = self.problem.get("detail")
        return value if isinstance(value, str) else ""


class BadRequest(ApiError):
    """400: the body is not valid JSON, or a field has the wrong type."""


class Unauthorized(ApiError):
    """401: no API key, or an unknown one."""


class Forbidden(ApiError):
    """403: the API key does not have the scope this call needs."""


class NotFound(ApiError, LookupError):
    """404: no such job, or no such public task."""


class PayloadTooLarge(ApiError):
    """413: the request body is over the server's limit."""


class UnsupportedMediaType(ApiError):
    """415: the request body was not `application/json`."""


class InvalidArguments(ApiError):
    """422: the arguments do not match the task's type hints; `errors` says which and why."""

    @property
    def errors(self) -> list[FieldError]:
        raw = self.problem.get("errors")
        if not isinstance(raw, list):
            return []
        return [
            FieldError(str(item.get("field", "")), str(item.get("message", "")))
            for item in raw
            if isinstance(item, dict)
        ]


class RateLimited(ApiError):
    """429: this key is over its rate limit; retried after `retry_after` seconds."""


class ServerError(ApiError):
    """A 5xx answer; retried with backoff."""


class Overloaded(ServerError):
    """503: the queue is full (`queue`, `depth`, `max_depth` are set) or the broker is unreachable."""

    @property
    def queue(self) -> str | None:
        value = self.problem.get("queue")
        return value if isinstance(value, str) else None

    @property
    def depth(self) -> int | None:
        return _int_member(self.problem, "depth")

    @property
    def max_depth(self) -> int | None:
        return _int_member(self.problem, "max_depth")


class GiveUp(ClientError):
    """Retries ran out: the total deadline passed or `max_attempts` were made.

    `last_error` is what the last attempt got: an `ApiError` (429, 5xx), or an `httpx`
    transport error (connection refused, timeout, ...). It is also `__cause__`.
    """

    def __init__(self, last_error: BaseException, attempts: int, elapsed: float, reason: str) -> None:
        self.last_error = last_error
        self.attempts = attempts
        self.elapsed = elapsed
        self.reason = reason
        super().__init__(
            f"gave up after {attempts} attempt{'s' if attempts != 1 else ''} in {elapsed:.1f}s "
            f"({reason}); last error: {type(last_error).__name__}: {last_error}"
        )


_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    422: InvalidArguments,
    429: RateLimited,
    503: Overloaded,
}

_REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def error_class(status: int) -> type[ApiError]:
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    return ServerError if status >= 500 else ApiError


def error_from_response(
    status: int, content_type: str | None, body: bytes, retry_after: str | None = None
) -> ApiError:
    """The exception for an error answer: problem+json members if the body has them.

    A body that is not a JSON object (a proxy's HTML error page, say) becomes a problem with
    just `status`, `title` and its text as `detail`, so the error is still raised by status.
    """
    problem: dict[str, Any] | None = None
    if body:
        try:
            decoded = msgspec.json.decode(body)
        except msgspec.DecodeError:
            decoded = None
        if isinstance(decoded, dict):
            problem = decoded
    if problem is None:
        text = body[:500].decode("utf-8", "replace").strip()
        if content_type and "html" in content_type:
            text = ""
        problem = {"status": status, "title": _REASONS.get(status, "Error"), "detail": text}
    return error_class(status)(status, problem, retry_after=parse_retry_after(retry_after))


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """`Retry-After` in seconds: the contract's integer seconds, or an HTTP date (RFC 9110)."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if math.isnan(seconds) or math.isinf(seconds):
        return None
    return max(0.0, seconds)


def _int_member(problem: Mapping[str, Any], name: str) -> int | None:
    value = problem.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None
