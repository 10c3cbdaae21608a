"""The HTTP tier: `create_api(app, keys=..., insecure_local=...)` returns a mountable ASGI app.

    app.py           routes (the contract in docs/http-api.md)
    problems.py      RFC 9457 problem+json errors
    backpressure.py  QueueFull -> 503 with a Retry-After computed from depth and drain rate
    auth.py          API keys (hashed, scoped, rate-limited) and their JSON keys file
    validation.py    request bodies and task arguments checked against type hints
    schema.py        the OpenAPI 3.1 document
    notify.py        signed webhook notifications (imported by every App; no web framework)

Importing this package stays cheap: Starlette is only imported with `create_api`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from offload.api.app import create_api
    from offload.api.auth import KeyStore

__all__ = ["KeyStore", "create_api"]


def __getattr__(name: str) -> Any:
    if name == "create_api":
        from offload.api.app import create_api

        return create_api
    if name == "KeyStore":
        from offload.api.auth import KeyStore

        return KeyStore
    raise AttributeError(f"module 'offload.api' has no attribute {name!r}")
