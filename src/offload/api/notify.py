"""Webhook notifications: a signed POST when a job with a webhook succeeds or is dead-lettered.

A job gets a webhook from its task (`@app.task(webhook="https://...")`), from a send
(`task.options(webhook=...)`) or from the HTTP API (`"webhook"` in the submit body, stored in
`Message.options["webhook"]`). When it finishes, the worker's completion hook enqueues a job of the
built-in task `offload.webhook` (queue `offload.webhooks`, which every worker serves besides its
own) with the idempotency key `webhook:<job id>`, so a re-run of the job never notifies twice.
A job that dies without a worker seeing it finish (its every delivery crashed, so the broker
dead-lettered it when the last lease expired) is found by a scan of the dead-letter queue that
every worker runs now and then (`DeadLetterScan`); the same key makes that one notification too.
That job POSTs, with retries, backoff and the dead-letter queue like any task:

    POST <url>
    Content-Type: application/json
    Offload-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of f"{t}.{body}" under the secret>

    {"id": ..., "task": ..., "state": "succeeded" | "dead", "result": ..., "error": ...,
     "finished_at": <epoch seconds>}

The secret is `App(webhook_secret=...)` or `OFFLOAD_WEBHOOK_SECRET` on the workers. Without one
the notification is not sent unsigned: its job is dead-lettered with an error saying so (set a
secret and replay it). 2xx is success; 408, 425, 429 and 5xx are retried (honouring a Retry-After
in seconds); any other answer is final. A receiver checks each request with
`verify_signature(secret, request.headers["Offload-Signature"], raw_body)` and deduplicates on
`id` (delivery is at-least-once: a receiver that answers too late may get a notification again).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from offload.brokers.base import Broker, Settle
from offload.errors import ConfigurationError, NonRetryable, Retry
from offload.message import Message
from offload.task import check_webhook_url

if TYPE_CHECKING:
    from offload.app import App

from offload.maintenance import Maintenance

log = logging.getLogger("offload.webhooks")

WEBHOOK_TASK = "offload.webhook"
WEBHOOK_QUEUE = "offload.webhooks"
SIGNATURE_HEADER = "Offload-Signature"
SECRET_ENV = "OFFLOAD_WEBHOOK_SECRET"
DELIVERY_TIMEOUT = 10.0  # seconds for one POST, connect to last byte
MAX_RETRY_AFTER = 3600.0
RETRIED_STATUSES = frozenset({408, 425, 429})
NOTIFY_RETRY_PAUSES = (0.1, 0.5, 2.0, 5.0)  # seconds between tries to queue a notification
DLQ_SCAN_EVERY = 10.0  # seconds between a worker's looks at the dead-letter queue
DLQ_SCAN_LIMIT = 500  # newest dead jobs looked at each time
LOOKBACK = 3600.0  # a worker's first look covers jobs that died this long before it started
CLOCK_SKEW = 60.0  # each look overlaps the previous by this much

_encoder = msgspec.json.Encoder()


class WebhookFailed(Exception):
    """The receiver answered with a status that is worth retrying (5xx, 408, 425, 429)."""


def sign(secret: str | bytes, body: bytes, timestamp: int | None = None) -> str:
    """The `Offload-Signature` header value for `body` at `timestamp` (default: now)."""
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},v1={_digest(secret, t, body)}"


def verify_signature(
    secret: str | bytes, header: str | None, body: bytes | str, tolerance: float = 300
) -> bool:
    """True if `header` (the `Offload-Signature` value) signs `body` under `secret`, recently.

    For receivers: pass the raw request body, not a re-encoded one. The timestamp must be within
    `tolerance` seconds of this machine's clock (either way), which bounds replays of a captured
    request; the comparison is constant-time. Several `v1=` entries are accepted (any may match).
    """
    if not header:
        return False
    timestamp: str | None = None
    signatures: list[str] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if sep and key == "t":
            timestamp = value
        elif sep and key == "v1":
            signatures.append(value)
    if timestamp is None or not signatures or not timestamp.isascii() or not timestamp.isdigit():
        return False
    t = int(timestamp)
    if abs(time.time() - t) > tolerance:
        return False
    data = body.encode() if isinstance(body, str) else body
    expected = _digest(secret, t, data).encode()
    return any(hmac.compare_digest(expected, s.encode("utf-8", "replace")) for s in signatures)


def _digest(secret: str | bytes, timestamp: int, body: bytes) -> str:
    key = secret.encode() if isinstance(secret, str) else secret
    return hmac.new(key, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def install_webhooks(app: App) -> None:
    """Register the notification task, its queue, the completion hook and the DLQ scan on `app`."""
    if WEBHOOK_TASK in app.tasks:
        return

    async def deliver(url: str, notification: dict[str, Any]) -> int:
        """POST one signed notification; returns the receiver's status code."""
        return await _post(app, url, notification)

    deliver.__qualname__ = deliver.__name__ = "deliver_webhook"
    app.task(
        name=WEBHOOK_TASK,
        queue=WEBHOOK_QUEUE,
        retries=10,
        backoff=1.0,
        backoff_max=600.0,
        timeout=DELIVERY_TIMEOUT + 5.0,
    )(deliver)
    app.system_queues.append(WEBHOOK_QUEUE)

    async def on_completion(message: Message, outcome: Settle) -> None:
        url = webhook_for(app, message.task, message.options)
        if url is None:
            return
        succeeded = outcome.kind == "ack"
        await queue_notification(
            app,
            url,
            {
                "id": message.id,
                "task": message.task,
                "state": "succeeded" if succeeded else "dead",
                # The encoded result goes in as it is (no decode and re-encode).
                "result": msgspec.Raw(outcome.result) if succeeded and outcome.result is not None else None,
                "error": None if succeeded else outcome.error,
                "finished_at": time.time(),
            },
        )

    app.completion_hooks.append(on_completion)
    app.maintenance.append(
        Maintenance("webhooks for the dead-letter queue", DLQ_SCAN_EVERY, DeadLetterScan(app))
    )


def webhook_for(app: App, task_name: str, options: dict[str, Any] | None) -> str | None:
    """The URL to notify when a job finishes: its send's, else its task's, else none."""
    if task_name == WEBHOOK_TASK:
        return None
    url = options.get("webhook") if options else None
    if url is None:
        task = app.tasks.get(task_name)
        url = task.config.webhook if task is not None else None
    return url if isinstance(url, str) else None


async def queue_notification(app: App, url: str, notification: dict[str, Any]) -> bool:
    """Enqueue the job that POSTs `notification`, at most once per finished job.

    The idempotency key `webhook:<job id>` makes a second call for the same job (a re-run, or
    the DLQ scan finding a job the hook already notified) return the first notification job.
    A broker that fails is asked again a few times before giving up (logged): the job has
    finished either way, and the DLQ scan is a second chance for jobs that died.
    """
    try:
        check_webhook_url(url)
    except ConfigurationError as exc:
        log.warning("job %s: not notified: %s", notification["id"], exc)
        return False
    call = app.tasks[WEBHOOK_TASK].options(idempotency_key=f"webhook:{notification['id']}")
    for pause in (*NOTIFY_RETRY_PAUSES, None):
        try:
            await call.send_async(url, notification)
            return True
        except Exception:
            if pause is None:
                log.exception(
                    "job %s: its webhook notification to %s could not be queued", notification["id"], url
                )
                return False
            log.warning(
                "job %s: queueing its webhook notification failed; retrying in %.1fs",
                notification["id"],
                pause,
            )
            await asyncio.sleep(pause)
    return False  # not reached


class DeadLetterScan:
    """Notifies jobs that died without a worker's completion hook seeing them.

    A job whose worker crashes on every delivery is dead-lettered by the broker when its last
    lease expires, so no hook runs for it. Every worker looks at the newest dead jobs now and
    then and queues a notification for each that finished since its last look (and, on its
    first, within LOOKBACK); the idempotency key makes the hook's notification and the scans
    of several workers one notification.
    """

    def __init__(self, app: App, clock: Callable[[], float] = time.time) -> None:
        self.app = app
        self.clock = clock
        self.since = clock() - LOOKBACK

    async def __call__(self, broker: Broker) -> None:
        started = self.clock()
        for info in await broker.dead_jobs(limit=DLQ_SCAN_LIMIT):
            if info.finished_at is None or info.finished_at < self.since:
                continue
            url = webhook_for(self.app, info.task, info.options)
            if url is None:
                continue
            notification = {
                "id": info.id,
                "task": info.task,
                "state": "dead",
                "result": None,
                "error": info.error,
                "finished_at": info.finished_at,
            }
            await queue_notification(self.app, url, notification)
        self.since = started - CLOCK_SKEW  # workers' clocks differ a little; the key dedupes


async def _post(app: App, url: str, notification: dict[str, Any]) -> int:
    secret = app.webhook_secret or os.environ.get(SECRET_ENV)
    if not secret:
        raise NonRetryable(
            f"webhook to {url} not sent: no signing secret (set App(webhook_secret=...) or "
            f"{SECRET_ENV} for the workers, then replay this job from the dead-letter queue)"
        )
    import httpx  # here, so that importing offload does not import an HTTP client

    body = _encoder.encode(notification)
    headers = {
        "content-type": "application/json",
        "user-agent": "offload-webhook/1",
        SIGNATURE_HEADER: sign(secret, body),
    }
    async with httpx.AsyncClient(timeout=DELIVERY_TIMEOUT, follow_redirects=False) as client:
        response = await client.post(url, content=body, headers=headers)
    status = response.status_code
    if 200 <= status < 300:
        return status
    if status >= 500 or status in RETRIED_STATUSES:
        delay = _retry_after(response.headers.get("retry-after"))
        reason = f"webhook {url} answered {status}"
        if delay is not None:
            raise Retry(delay=delay, reason=reason)
        raise WebhookFailed(reason)
    raise NonRetryable(f"webhook {url} answered {status}; only 408, 425, 429 and 5xx are retried")


def _retry_after(value: str | None) -> float | None:
    if value is None or not value.strip().isdigit():
        return None  # absent, or an HTTP date: fall back to the task's backoff
    return min(float(value.strip()), MAX_RETRY_AFTER)
