"""The demo app that `offload run` starts when given no app: the classic uses, in miniature.

thumbnail      an upload returns at once while the image is resized (thread)
welcome_email  a notification sent from the event loop (async)
charge_card    an order's payment against a flaky gateway (retries with backoff)
publish_post   fan-out on write: one job per follower's timeline, sent in one batch
daily_rollup   a CPU-bound aggregate in a child process (hard timeout)
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from offload import App, Job

app = App()


class PaymentGatewayTimeout(Exception):
    """The (simulated) payment gateway did not answer in time."""


@app.task(name="demo.thumbnail", public=True, timeout=10)
def thumbnail(image_id: int, width: int) -> dict[str, Any]:
    time.sleep(random.uniform(0.02, 0.08))  # decoding and resizing, roughly
    return {"url": f"https://cdn.example/img/{image_id}-{width}w.webp", "width": width}


@app.task(name="demo.welcome_email", public=True, queue="emails", timeout=10)
async def welcome_email(user_id: int) -> str:
    await asyncio.sleep(0.01)  # an SMTP or provider API call
    return f"sent welcome email to user {user_id}"


@app.task(name="demo.charge_card", public=True, retries=5, backoff=0.2, backoff_max=2.0, timeout=10)
def charge_card(order_id: int, cents: int) -> dict[str, Any]:
    if random.random() < 0.4:
        raise PaymentGatewayTimeout(f"gateway timed out charging order {order_id}")
    return {"order": order_id, "charged_cents": cents, "status": "paid"}


@app.task(name="demo.deliver_to_timeline", queue="timelines", timeout=10)
def deliver_to_timeline(follower_id: int, post_id: int) -> None:
    return None


@app.task(name="demo.publish_post", public=True, timeout=30)
async def publish_post(post_id: int, followers: int) -> str:
    jobs = await app.send_many_async([deliver_to_timeline.message(f, post_id) for f in range(followers)])
    return f"post {post_id} fanned out to {len(jobs)} timelines"


@app.task(name="demo.daily_rollup", public=True, executor="process", timeout=20)
def daily_rollup(day: str) -> str:
    digest = hashlib.sha256(day.encode())
    for _ in range(200_000):  # stand-in for aggregating a day of events
        digest = hashlib.sha256(digest.digest())
    return f"rollup for {day}: {digest.hexdigest()[:12]}"


SCENARIOS: list[tuple[str, Callable[[int], Awaitable[Job[Any]]]]] = [
    ("upload", lambda i: thumbnail.send_async(i, 640)),
    ("signup", lambda i: welcome_email.send_async(i)),
    ("order", lambda i: charge_card.send_async(i, 1999 + i)),
    ("post", lambda i: publish_post.send_async(i, 250)),
    ("rollup", lambda i: daily_rollup.send_async(f"2026-11-{1 + i % 28:02d}")),
]


async def produce(stop: asyncio.Event, say: Any = print) -> dict[str, int]:
    """Send a demo job every half second and report each outcome as it arrives."""
    counts = {"sent": 0, "succeeded": 0, "failed": 0}
    watchers: set[asyncio.Task[None]] = set()
    i = 0

    async def watch(kind: str, job: Job[Any], sent_at: float) -> None:
        try:
            result = await job.wait(timeout=60)
        except Exception as exc:  # noqa: BLE001 - the demo reports every outcome
            counts["failed"] += 1
            say(f"  x {kind:<7} job {job.id[:12]} failed: {exc}")
            return
        counts["succeeded"] += 1
        info = await job.info_async()
        retries = f" after {info.attempts} retried failure(s)" if info.attempts else ""
        took = (time.time() - sent_at) * 1000
        say(f"  + {kind:<7} job {job.id[:12]} done in {took:6.0f} ms{retries}: {result}")

    while not stop.is_set():
        kind, send = SCENARIOS[i % len(SCENARIOS)]
        sent_at = time.time()
        job = await send(i)
        counts["sent"] += 1
        say(f"-> {kind:<7} sent job {job.id[:12]} ({kind} request answered at once)")
        watcher = asyncio.create_task(watch(kind, job, sent_at))
        watchers.add(watcher)
        watcher.add_done_callback(watchers.discard)
        i += 1
        try:
            async with asyncio.timeout(0.5):
                await stop.wait()
        except TimeoutError:
            pass
    if watchers:
        await asyncio.wait(watchers, timeout=15)
    return counts
