"""Errors as `application/problem+json` (RFC 9457), raised as `Problem` and rendered once.

Every error body is `{"type": "https://offload.dev/problems/<slug>", "title", "status", "detail",
...extra members}`; `detail` says what was wrong and what to do about it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import msgspec
from starlette.responses import Response

PROBLEM_BASE = "https://offload.dev/problems/"
PROBLEM_MEDIA_TYPE = "application/problem+json"

_encoder = msgspec.json.Encoder()

TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    413: "Content too large",
    415: "Unsupported media type",
    422: "Invalid arguments",
    429: "Too many requests",
    500: "Internal server error",
    503: "Service unavailable",
}


class Problem(Exception):
    """An HTTP error response; raise it anywhere under a route and the route renders it."""

    def __init__(
        self,
        status: int,
        slug: str,
        detail: str,
        *,
        title: str | None = None,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.detail = detail
        self.title = title or TITLES.get(status, "Error")
        self.headers = dict(headers or {})
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {
            "type": PROBLEM_BASE + self.slug,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            **self.extra,
        }

    def response(self) -> Response:
        return Response(
            encode_json(self.body()),
            status_code=self.status,
            headers=self.headers,
            media_type=PROBLEM_MEDIA_TYPE,
        )


def encode_json(value: Any) -> bytes:
    """msgspec's encoder, falling back to the stdlib for anything it refuses (never raises)."""
    try:
        return _encoder.encode(value)
    except (TypeError, ValueError, OverflowError):
        return json.dumps(value, default=repr, ensure_ascii=True).encode()


def bad_request(detail: str, **extra: Any) -> Problem:
    return Problem(400, "bad-request", detail, **extra)


def not_found(detail: str) -> Problem:
    return Problem(404, "not-found", detail)
