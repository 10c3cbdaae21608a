"""Server-sent events: the `/v1/jobs/{id}/events` response, one `state` event per change."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from offload.api.problems import encode_json
from offload.api.schema import JobView
from offload.cancellation import stop_tasks
from offload.job import JobInfo

log = logging.getLogger("offload.api")


class EventStream(Response):
    """A text/event-stream response that stops (and stops polling) when the client disconnects."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[bytes, None]) -> None:
        self.events = events
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        try:
            await until_done_or_disconnected(asyncio.ensure_future(self._stream(send)), receive)
        finally:
            with contextlib.suppress(asyncio.CancelledError):
                await self.events.aclose()

    async def _stream(self, send: Send) -> None:
        try:
            async for chunk in self.events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except OSError:
            return  # the client went away
        except Exception:
            # Headers are out: the best left is to end the stream; the client may reconnect.
            log.exception("event stream failed")
        with contextlib.suppress(OSError):
            await send({"type": "http.response.body", "body": b"", "more_body": False})


async def disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_done_or_disconnected(work: asyncio.Future[Any], receive: Receive) -> None:
    """Wait for `work` or the client's disconnect, whichever comes first; then cancel and reap
    both (`work` is cancelled if the client left first: check `work.cancelled()`)."""
    watcher = asyncio.ensure_future(disconnected(receive))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        with contextlib.suppress(asyncio.CancelledError):
            await stop_tasks([work, watcher])  # cancelled again if a client swallowed the cancel


def change_key(info: JobInfo) -> tuple[str, int, int]:
    # deliveries/attempts catch a change that came and went between two polls (a retry).
    return info.state.value, info.deliveries, info.attempts


def sse_event(info: JobInfo) -> bytes:
    return b"event: state\ndata: " + encode_json(JobView.of(info)) + b"\n\n"
