"""The routes of the HTTP API (docs/http-api.md is the contract), as a mountable ASGI app.

Built on Starlette rather than FastAPI: request validation is msgspec's job here (already the
envelope codec, and it decodes and checks a body in one pass in C), so FastAPI's pydantic layer and
dependency injection would only add per-request overhead. Each route is a plain async function;
there is no middleware on the hot path (auth and the body limit are function calls).

    app = App(...)
    api = create_api(app, keys=KeyStore.open("keys.json"), insecure_local=False)
    # serve it with uvicorn, or mount it: Starlette(routes=[Mount("/jobs", api)])

No request produces an unhandled error: every failure a route can meet is mapped to its status
(400, 401, 403, 404, 413, 415, 422, 429, 503); what is left is logged and answered with a
problem+json 500 as the last line of defence.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from offload.api.auth import KeyStore
from offload.api.backpressure import FullQueues, broker_unavailable_problem, queue_full_problem
from offload.api.problems import Problem, bad_request, encode_json, not_found
from offload.api.schema import JobView, openapi_document
from offload.api.sse import EventStream, change_key, sse_event, until_done_or_disconnected
from offload.api.validation import (
    MAX_JOB_ID,
    ArgumentValidator,
    decode_dlq_selection,
    decode_submit,
    plain_values,
)
from offload.app import App
from offload.brokers.base import Broker
from offload.errors import BrokerError, ConfigurationError, EncodeError, QueueFull
from offload.job import JobInfo
from offload.task import QUEUE_NAME, Task, check_webhook_url

log = logging.getLogger("offload.api")

T = TypeVar("T")
Handler = Callable[[Request], Awaitable[Response]]

DEFAULT_MAX_BODY_BYTES = 1024 * 1024
MAX_WAIT = 60.0
DLQ_LIMIT_MAX = 1000
READY_TIMEOUT = 2.0
SSE_MIN_POLL, SSE_MAX_POLL = 0.05, 0.5
# Errors that mean the broker did not answer: 503 rather than 500.
UNAVAILABLE: tuple[type[BaseException], ...] = (BrokerError, OSError, sqlite3.OperationalError)


class _ClientGone(Exception):
    """The client disconnected while we waited; nobody is left to answer."""


def create_api(
    app: App,
    *,
    keys: KeyStore | None,
    insecure_local: bool,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    allow_http_webhooks: bool | None = None,
    sse_keepalive: float = 15.0,
) -> Starlette:
    """The API for `app` as an ASGI app (Starlette), to serve with uvicorn or mount in another app.

    keys: the API keys (`KeyStore.open(path)`); None only with `insecure_local`, which turns
        authentication off (bind such a server to 127.0.0.1 only: the CLI does).
    max_body_bytes: request bodies over this are refused with 413 before they are buffered.
    allow_http_webhooks: accept plain http:// per-job webhook URLs (default: only when
        insecure_local; otherwise https:// only).
    """
    if keys is None and not insecure_local:
        raise ConfigurationError(
            "the API needs keys (create one with `offload keys create --scopes submit,read "
            "--keys-file offload-keys.json`) or insecure_local=True for a loopback-only server"
        )
    if not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise ConfigurationError(f"max_body_bytes must be an int >= 1, not {max_body_bytes!r}")
    api = _Api(
        app,
        None if insecure_local else keys,
        max_body_bytes,
        insecure_local if allow_http_webhooks is None else allow_http_webhooks,
        sse_keepalive,
    )
    r = api.route
    routes = [
        Route("/v1/jobs", r(api.submit, "submit"), methods=["POST"]),
        Route("/v1/jobs/{id}", r(api.get_job, "read"), methods=["GET"]),
        Route("/v1/jobs/{id}/events", r(api.events, "read"), methods=["GET"]),
        Route("/v1/jobs/{id}/cancel", r(api.cancel, "submit"), methods=["POST"]),
        Route("/v1/queues", r(api.queues, "read"), methods=["GET"]),
        Route("/v1/dlq", r(api.dlq, "admin"), methods=["GET"]),
        Route("/v1/dlq/replay", r(api.dlq_replay, "admin"), methods=["POST"]),
        Route("/v1/dlq/purge", r(api.dlq_purge, "admin"), methods=["POST"]),
        Route("/healthz", r(api.healthz, None), methods=["GET"]),
        Route("/readyz", r(api.readyz, None), methods=["GET"]),
        Route("/openapi.json", r(api.openapi, None), methods=["GET"]),
    ]
    starlette = Starlette(routes=routes, exception_handlers={HTTPException: _http_exception})
    starlette.state.offload_api = api
    return starlette


class _Endpoint:
    """One route as a plain ASGI app (Starlette routes to it as it is).

    Starlette would wrap a handler function in `request_response`, whose per-route exception
    layer and send wrapper cost every request about 15 µs (a third of what a submit costs the
    event loop besides HTTP parsing); `_Api.respond` already turns every failure into a
    response, so that layer has nothing left to do here.
    """

    def __init__(self, api: _Api, handler: Handler, scope: str | None) -> None:
        self.api, self.handler, self.scope = api, handler, scope
        self.__name__ = handler.__name__

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        response = await self.api.respond(request, self.handler, self.scope)
        await response(scope, receive, send)


async def _http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 (no such path) and 405 (wrong method), as problem+json."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        problem = Problem(405, "method-not-allowed", f"{request.method} is not allowed on {request.url.path}")
    elif exc.status_code == 404:
        problem = not_found(f"no such path {request.url.path}; see /openapi.json")
    else:
        problem = Problem(exc.status_code, "http-error", str(exc.detail))
    problem.headers.update(exc.headers or {})
    return problem.response()


def json_response(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(encode_json(value), status_code=status, headers=headers, media_type="application/json")


class _Api:
    def __init__(
        self,
        app: App,
        keys: KeyStore | None,
        max_body_bytes: int,
        allow_http_webhooks: bool,
        sse_keepalive: float,
    ) -> None:
        self.app = app
        self.keys = keys
        self.max_body_bytes = max_body_bytes
        self.allow_http_webhooks = allow_http_webhooks
        self.sse_keepalive = sse_keepalive
        self._validators: dict[str, tuple[Task[Any, Any], ArgumentValidator]] = {}
        self._openapi: tuple[frozenset[str], bytes] | None = None
        self.full_queues = FullQueues()

    # -- plumbing ------------------------------------------------------------------------------

    def route(self, handler: Handler, scope: str | None) -> _Endpoint:
        """A handler as an ASGI endpoint: authorize for `scope`, map every failure to problem+json."""
        return _Endpoint(self, handler, scope)

    async def respond(self, request: Request, handler: Handler, scope: str | None) -> Response:
        try:
            if scope is not None and self.keys is not None:
                self.authorize(request, scope)
            return await handler(request)
        except Problem as problem:
            return problem.response()
        except QueueFull as exc:
            return queue_full_problem(exc).response()
        except _ClientGone:
            return Response(status_code=499)  # nobody reads it; ends the ASGI call cleanly
        except ClientDisconnect:
            return bad_request("the client disconnected before the body was read").response()
        except UNAVAILABLE as exc:
            log.warning("%s %s: broker unavailable: %s", request.method, request.url.path, exc)
            return broker_unavailable_problem(exc).response()
        except Exception:
            log.exception("%s %s failed", request.method, request.url.path)
            return Problem(500, "internal-error", "an unexpected error; it has been logged").response()

    def authorize(self, request: Request, scope: str) -> None:
        assert self.keys is not None
        header = request.headers.get("authorization")
        challenge = {"WWW-Authenticate": 'Bearer realm="offload"'}
        if not header:
            raise Problem(
                401,
                "unauthorized",
                "no API key: send `Authorization: Bearer <key>` (create a key with `offload keys create`)",
                headers=challenge,
            )
        scheme, _, token = header.partition(" ")
        key = self.keys.authenticate(token.strip()) if scheme.lower() == "bearer" else None
        if key is None:
            raise Problem(
                401, "unauthorized", "unknown or revoked API key (use `Bearer <key>`)", headers=challenge
            )
        if not key.allows(scope):
            raise Problem(
                403,
                "forbidden",
                f"API key {key.id} lacks the {scope!r} scope (it has {', '.join(sorted(key.scopes))}); "
                f"create a key with --scopes {scope}",
            )
        wait = self.keys.retry_after(key)
        if wait is not None:
            raise Problem(
                429,
                "rate-limited",
                f"API key {key.id} is over its rate limit ({key.rate}); retry in {wait} s",
                headers={"Retry-After": str(wait)},
                retry_after=wait,
            )

    async def read_json(self, request: Request) -> bytes:
        """The body, refused with 415 if not JSON and 413 past the limit (before buffering it)."""
        content_type = request.headers.get("content-type", "")
        if content_type.partition(";")[0].strip().lower() != "application/json":
            raise Problem(
                415,
                "unsupported-media-type",
                f"the body must be JSON sent with Content-Type: application/json, not {content_type!r}",
            )
        limit = self.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None:
            if not (length.isascii() and length.isdigit()):
                raise bad_request(f"Content-Length {length!r} is not a number")
            if int(length) > limit:
                raise self._too_large(f"the body is {int(length):,} bytes")
        # Straight from the ASGI receive channel: Request.stream()'s async generator costs a
        # submit more than the copy it saves.
        chunks: list[bytes] = []
        total = 0
        receive = request.receive
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:
                raise self._too_large("the body is larger")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _too_large(self, what: str) -> Problem:
        return Problem(
            413,
            "payload-too-large",
            f"{what}, over the {self.max_body_bytes:,}-byte limit; store large data elsewhere and "
            "pass a reference",
            max_body_bytes=self.max_body_bytes,
        )

    def validator(self, task: Task[Any, Any]) -> ArgumentValidator:
        held = self._validators.get(task.name)
        if held is None or held[0] is not task:
            held = self._validators[task.name] = (task, ArgumentValidator(task))
        return held[1]

    async def until_disconnect(self, request: Request, work: Coroutine[Any, Any, T]) -> T:
        """Await `work`, giving up (raising _ClientGone) as soon as the client disconnects."""
        task = asyncio.ensure_future(work)
        await until_done_or_disconnected(task, request.receive)
        if task.cancelled():
            raise _ClientGone
        return task.result()

    # -- jobs ------------------------------------------------------------------------------------

    async def submit(self, request: Request) -> Response:
        body = await self.read_json(request)
        submitted = decode_submit(body)
        task = self.app.tasks.get(submitted.task)
        if task is None or not task.config.public:
            raise not_found(
                f"no public task {submitted.task!r}: only tasks declared with public=True can be "
                "submitted (see /openapi.json)"
            )
        self.validator(task).check(submitted.args, submitted.kwargs, body, self.app.max_message_bytes)
        args, kwargs = plain_values(submitted.args, submitted.kwargs)
        key = request.headers.get("idempotency-key")
        if key is not None and not 1 <= len(key) <= 255:
            raise bad_request("the Idempotency-Key header must be 1 to 255 characters")
        if submitted.webhook is not None:
            self.check_webhook(submitted.webhook)
        try:
            call = task.options(
                queue=submitted.queue,
                priority=submitted.priority,
                delay=submitted.delay,
                idempotency_key=key,
                webhook=submitted.webhook,
            )
            message = call.checked_message(args, kwargs)  # the validator checked the binding
        except ConfigurationError as exc:
            raise bad_request(str(exc)) from None
        except EncodeError as exc:
            raise Problem(422, "invalid-arguments", str(exc), errors=[]) from None
        if key is None:
            refusal = self.full_queues.refusal(message.queue)
            if refusal is not None:  # still full a moment ago: 503 without a broker round trip
                return queue_full_problem(refusal).response()  # returned, not raised: see FullQueues
        try:
            job = (await self.app.send_many_async([message]))[0]
        except QueueFull as exc:
            self.full_queues.remember(exc)
            raise
        except BaseException as exc:
            self.full_queues.forget(message.queue)  # a probe that failed: the next submit asks
            if isinstance(exc, EncodeError):
                raise Problem(
                    413, "payload-too-large", str(exc), max_body_bytes=self.max_body_bytes
                ) from None
            raise
        self.full_queues.forget(message.queue)  # it had room: stop refusing from the hold
        state = "queued"
        if not job.created:  # an idempotency key matched: say where that job is now
            info = await (await self.app.broker()).get_job(job.id)
            state = info.state.value if info is not None else state
        location = f"{request.scope.get('root_path', '')}/v1/jobs/{job.id}"
        return json_response(
            {"id": job.id, "state": state, "created": job.created, "location": location},
            202,
            {"Location": location},
        )

    def check_webhook(self, url: str) -> None:
        try:
            check_webhook_url(url)
            scheme = urlsplit(url).scheme
        except (ConfigurationError, ValueError) as exc:
            raise bad_request(str(exc), errors=[{"field": "webhook", "message": str(exc)}]) from None
        if scheme != "https" and not self.allow_http_webhooks:
            message = "webhook must be an https:// URL (this server does not allow plain http)"
            raise bad_request(message, errors=[{"field": "webhook", "message": message}])

    async def _job(self, broker: Broker, job_id: str) -> JobInfo:
        info = await broker.get_job(job_id) if len(job_id) <= MAX_JOB_ID else None
        if info is None:
            raise _no_job(job_id)
        return info

    async def get_job(self, request: Request) -> Response:
        job_id: str = request.path_params["id"]
        wait = _wait_param(request.query_params.get("wait"))
        broker = await self.app.broker()
        if wait > 0 and len(job_id) <= MAX_JOB_ID:
            info = await self.until_disconnect(request, broker.wait_job(job_id, wait))
            if info is None:
                raise _no_job(job_id)
        else:
            info = await self._job(broker, job_id)
        return json_response(JobView.of(info))

    async def events(self, request: Request) -> Response:
        job_id: str = request.path_params["id"]
        broker = await self.app.broker()
        first = await self._job(broker, job_id)
        if request.method == "HEAD":  # headers only: no stream to hold open
            return Response(status_code=200, media_type=EventStream.media_type)
        return EventStream(self._job_events(broker, first))

    async def _job_events(self, broker: Broker, info: JobInfo) -> AsyncGenerator[bytes, None]:
        """One `state` event per change (the first at once), until a finished state."""
        clock = asyncio.get_running_loop().time
        last = change_key(info)
        yield sse_event(info)
        sent = clock()
        pause = SSE_MIN_POLL
        while not info.state.finished:
            # wait_job returns early when the job finishes, so only running/retries wait a poll.
            latest = await broker.wait_job(info.id, pause)
            if latest is None:  # pruned while we watched
                return
            info = latest
            if change_key(info) != last:
                last = change_key(info)
                yield sse_event(info)
                sent, pause = clock(), SSE_MIN_POLL
            else:
                pause = min(pause * 2, SSE_MAX_POLL)
                if clock() - sent >= self.sse_keepalive:
                    yield b": keep-alive\n\n"
                    sent = clock()

    async def cancel(self, request: Request) -> Response:
        job_id: str = request.path_params["id"]
        broker = await self.app.broker()
        cancelled = await broker.cancel(job_id) if len(job_id) <= MAX_JOB_ID else False
        info = await self._job(broker, job_id)
        return json_response({"id": info.id, "cancelled": cancelled, "state": info.state.value})

    # -- queues and the dead-letter queue ----------------------------------------------------------

    async def queues(self, request: Request) -> Response:
        stats = await (await self.app.broker()).stats()
        return json_response(
            [
                {
                    "queue": s.queue,
                    "ready": s.ready,
                    "delayed": s.delayed,
                    "running": s.running,
                    "dead": s.dead,
                    "max_depth": s.max_depth,
                    "drain_rate": s.drain_rate,
                    "depth": s.depth,
                }
                for s in stats
            ]
        )

    async def dlq(self, request: Request) -> Response:
        queue = request.query_params.get("queue")
        if queue is not None and not QUEUE_NAME.match(queue):
            raise bad_request(f"queue {queue!r} is not a valid queue name")
        limit_text = request.query_params.get("limit", "100")
        if not (limit_text.isascii() and limit_text.isdigit() and 1 <= int(limit_text) <= DLQ_LIMIT_MAX):
            raise bad_request(f"limit must be an integer from 1 to {DLQ_LIMIT_MAX}, not {limit_text!r}")
        jobs = await (await self.app.broker()).dead_jobs(queue, int(limit_text))
        return json_response([JobView.of(info) for info in jobs])

    async def dlq_replay(self, request: Request) -> Response:
        ids, queue = decode_dlq_selection(await self.read_json(request))
        return json_response({"count": await (await self.app.broker()).replay_dead(ids, queue)})

    async def dlq_purge(self, request: Request) -> Response:
        ids, queue = decode_dlq_selection(await self.read_json(request))
        return json_response({"count": await (await self.app.broker()).purge_dead(ids, queue)})

    # -- operations ------------------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        return json_response({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        async def ping() -> None:
            await (await self.app.broker()).stats([])

        try:
            await asyncio.wait_for(ping(), READY_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - any failure to answer means not ready
            raise broker_unavailable_problem(exc) from None
        return json_response({"status": "ready"})

    async def openapi(self, request: Request) -> Response:
        public = frozenset(name for name, t in self.app.tasks.items() if t.config.public)
        if self._openapi is None or self._openapi[0] != public:
            validators = {name: self.validator(self.app.tasks[name]) for name in sorted(public)}
            document = openapi_document(
                self.app, validators, auth=self.keys is not None, https_only=not self.allow_http_webhooks
            )
            self._openapi = (public, encode_json(document))
        return Response(self._openapi[1], media_type="application/json")


def _no_job(job_id: str) -> Problem:
    shown = job_id if len(job_id) <= 64 else job_id[:64] + "..."
    return not_found(
        f"no job {shown!r}: it never existed, or it finished and was pruned after its result TTL"
    )


def _wait_param(text: str | None) -> float:
    if text is None:
        return 0.0
    try:
        wait = float(text)
    except ValueError:
        wait = math.nan
    if not 0 <= wait <= MAX_WAIT:  # also NaN
        raise bad_request(f"wait must be a number of seconds from 0 to {MAX_WAIT:.0f}, not {text!r}")
    return wait
