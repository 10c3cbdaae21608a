"""Webhook notifications: a signed POST when a job with a webhook succeeds or is dead-lettered.

A job gets a webhook from its task (`@app.task(webhook="https://...")`), from a send
(`task.options(webhook=...)`) or from the HTTP API (`"webhook"` in the submit body, stored in
`Message.options["webhook"]`). When it finishes, the worker's completion hook enqueues a job of the
built-in task `offload.webhook` (queue `offload.webhooks`, which every worker serves besides its
own) with the idempotency key `webhook:<job id>`, so a re-run of the job never notifies twice.
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

import hashlib
import hmac
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import msgspec

from offload.brokers.base import Settle
from offload.errors import ConfigurationError, NonRetryable, Retry
from offload.message import Message
from offload.task import check_webhook_url

if TYPE_CHECKING:
    from offload.app import App

log = logging.getLogger("offload.webhooks")

WEBHOOK_TASK = "offload.webhook"
WEBHOOK_QUEUE = "offload.webhooks"
SIGNATURE_HEADER = "Offload-Signature"
SECRET_ENV = "OFFLOAD_WEBHOOK_SECRET"
DELIVERY_TIMEOUT = 10.0  # seconds for one POST, connect to last byte
MAX_RETRY_AFTER = 3600.0
RETRIED_STATUSES = frozenset({408, 425, 429})

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
    """Register the notification task, its queue and the completion hook on `app` (once)."""
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
        await _enqueue_notification(app, message, outcome)

    app.completion_hooks.append(on_completion)


def webhook_for(app: App, message: Message) -> str | None:
    """The URL to notify when `message`'s job finishes: the send's, else the task's, else none."""
    if message.task == WEBHOOK_TASK:
        return None
    url = message.options.get("webhook") if message.options else None
    if url is None:
        task = app.tasks.get(message.task)
        url = task.config.webhook if task is not None else None
    return url if isinstance(url, str) else None


async def _enqueue_notification(app: App, message: Message, outcome: Settle) -> None:
    url = webhook_for(app, message)
    if url is None:
        return
    try:
        check_webhook_url(url)
    except ConfigurationError as exc:
        log.warning("job %s: not notified: %s", message.id, exc)
        return
    succeeded = outcome.kind == "ack"
    notification = {
        "id": message.id,
        "task": message.task,
        "state": "succeeded" if succeeded else "dead",
        # The encoded result goes into the notification as it is (no decode and re-encode).
        "result": msgspec.Raw(outcome.result) if succeeded and outcome.result is not None else None,
        "error": None if succeeded else outcome.error,
        "finished_at": time.time(),
    }
    task = app.tasks[WEBHOOK_TASK]
    try:
        await task.options(idempotency_key=f"webhook:{message.id}").send_async(url, notification)
    except Exception:
        log.exception("job %s: its webhook notification to %s could not be queued", message.id, url)


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
