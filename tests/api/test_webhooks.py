"""Webhook notifications: signed, retried like any job, and each delivered exactly once."""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from offload import App, ConfigurationError, RetryPolicy
from offload.api.app import create_api
from offload.api.notify import (
    SIGNATURE_HEADER,
    WEBHOOK_QUEUE,
    WEBHOOK_TASK,
    DeadLetterScan,
    sign,
    verify_signature,
)
from offload.brokers.base import Settle
from offload.message import Message, new_job_id

from .support import SECRET, client_for, make_app, poll, running_worker, serving


class Receiver:
    """A webhook endpoint that fails (500) the first `failures` attempts for each job id."""

    def __init__(self, failures: int = 2) -> None:
        self.failures = failures
        self.attempts: Counter[str] = Counter()
        self.accepted: list[dict[str, Any]] = []
        self.unverified = 0
        self.app = Starlette(routes=[Route("/hook", self.hook, methods=["POST"])])

    async def hook(self, request: Request) -> Response:
        body = await request.body()
        if not verify_signature(SECRET, request.headers.get(SIGNATURE_HEADER), body):
            self.unverified += 1
            return Response(status_code=401)
        notification = json.loads(body)
        self.attempts[notification["id"]] += 1
        if self.attempts[notification["id"]] <= self.failures:
            return Response(status_code=500)
        self.accepted.append(notification)
        return Response(status_code=204)


def fast_retries(app: App) -> None:
    task = app.tasks[WEBHOOK_TASK]
    task.config = dataclasses.replace(
        task.config, retry=RetryPolicy(retries=5, backoff=0.01, backoff_max=0.05)
    )


async def notifications_settled(app: App) -> bool:
    (stats,) = await (await app.broker()).stats([WEBHOOK_QUEUE])
    return stats.depth == 0 and stats.running == 0


async def test_each_notification_arrives_once_verified_despite_two_failures(app: App) -> None:
    fast_retries(app)
    receiver = Receiver(failures=2)
    async with (
        serving(receiver.app) as url,
        client_for(create_api(app, keys=None, insecure_local=True)) as api,
    ):
        hook = f"{url}/hook"
        ids = []
        for i in range(5):
            response = await api.post("/v1/jobs", json={"task": "t.add", "args": [i, 1], "webhook": hook})
            ids.append(response.json()["id"])
        dead = (
            await api.post("/v1/jobs", json={"task": "t.fail", "args": ["nope"], "webhook": hook})
        ).json()["id"]
        plain = (await api.post("/v1/jobs", json={"task": "t.add", "args": [0, 0]})).json()["id"]
        async with running_worker(app, ("default",)):
            await poll(lambda: len(receiver.accepted) == 6, timeout=30, what="six notifications")
            await poll(lambda: notifications_settled(app), what="the notification jobs to finish")
            await poll(lambda: _succeeded(app, plain), what="the job without a webhook")
    by_id = {n["id"]: n for n in receiver.accepted}
    assert len(receiver.accepted) == len(by_id) == 6  # exactly once each
    assert set(by_id) == {*ids, dead} and plain not in receiver.attempts
    assert all(receiver.attempts[i] == 3 for i in by_id)  # two 500s, then accepted
    assert receiver.unverified == 0
    first = by_id[ids[1]]
    assert set(first) == {"id", "task", "state", "result", "error", "finished_at"}
    assert (first["task"], first["state"], first["result"], first["error"]) == ("t.add", "succeeded", 2, None)
    assert by_id[dead]["state"] == "dead" and "nope" in by_id[dead]["error"] and by_id[dead]["result"] is None
    assert abs(first["finished_at"] - time.time()) < 60


async def test_a_task_level_webhook_and_a_per_send_override(app: App) -> None:
    receiver = Receiver(failures=0)
    async with serving(receiver.app) as url:

        @app.task(name="t.hooked", webhook=f"{url}/hook")
        def hooked(x: int) -> int:
            return x * 2

        default = await hooked.send_async(21)
        override = await hooked.options(webhook=f"{url}/hook?override=1").send_async(1)
        async with running_worker(app):
            await poll(lambda: len(receiver.accepted) == 2, timeout=30, what="two notifications")
    assert {n["id"]: n["result"] for n in receiver.accepted} == {default.id: 42, override.id: 2}


async def test_a_rerun_job_is_notified_once(app: App) -> None:
    """The hook runs before the settle, so a crash between them runs it again: one job, not two."""
    message = Message(
        id=new_job_id(), task="t.add", args=(1, 2), options={"webhook": "https://example.com/h"}
    )
    (hook,) = app.completion_hooks
    outcome = Settle(delivery=None, kind="ack", result=b"3")  # type: ignore[arg-type]
    await hook(message, outcome)
    await hook(message, outcome)
    (stats,) = await (await app.broker()).stats([WEBHOOK_QUEUE])
    assert stats.depth == 1


async def test_without_a_secret_nothing_is_sent_unsigned(
    broker_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OFFLOAD_WEBHOOK_SECRET", raising=False)
    app = make_app(broker_url, webhook_secret=None)
    receiver = Receiver(failures=0)
    async with serving(receiver.app) as url:
        job = await app.tasks["t.add"].options(webhook=f"{url}/hook").send_async(1, 2)
        async with running_worker(app):
            await poll(lambda: _dead_notifications(app), what="the notification to be dead-lettered")
    (notification,) = await _dead_notifications(app)
    assert "no signing secret" in (notification.error or "") and "OFFLOAD_WEBHOOK_SECRET" in (
        notification.error or ""
    )
    assert receiver.attempts == Counter() and (await job.info_async()).state.value == "succeeded"
    await app.close_async()


async def _succeeded(app: App, job_id: str) -> bool:
    return (await app.job(job_id).info_async()).state.value == "succeeded"


async def _dead_notifications(app: App) -> list[Any]:
    return await (await app.broker()).dead_jobs(WEBHOOK_QUEUE)


async def test_the_secret_can_come_from_the_environment(
    broker_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OFFLOAD_WEBHOOK_SECRET", SECRET)
    app = make_app(broker_url, webhook_secret=None)
    receiver = Receiver(failures=0)
    async with serving(receiver.app) as url:
        await app.tasks["t.add"].options(webhook=f"{url}/hook").send_async(1, 2)
        async with running_worker(app):
            await poll(lambda: receiver.accepted, what="a notification")
    assert receiver.unverified == 0
    await app.close_async()


async def test_a_4xx_answer_is_final(app: App) -> None:
    calls = Counter[str]()

    async def gone(request: Request) -> Response:
        calls["gone"] += 1
        return Response(status_code=410)

    async with serving(Starlette(routes=[Route("/hook", gone, methods=["POST"])])) as url:
        await app.tasks["t.add"].options(webhook=f"{url}/hook").send_async(1, 2)
        async with running_worker(app):
            (dead,) = await poll(lambda: _dead_notifications(app), what="the notification to die")
    assert calls["gone"] == 1 and "410" in (dead.error or "")


async def test_a_job_dead_lettered_by_expired_leases_is_notified_once(app: App) -> None:
    """No worker's hook sees a job whose every delivery crashed: the DLQ scan notifies it."""
    receiver = Receiver(failures=0)
    broker = await app.broker()

    @app.task(name="t.crashes", timeout=0.1, max_deliveries=1)
    def crashes() -> None:
        raise AssertionError("never runs: its only delivery is taken by a 'crashed' worker")

    async with serving(receiver.app) as url:
        job = await crashes.options(webhook=f"{url}/hook").send_async()
        [taken] = await broker.fetch(["default"], 1, wait=1.0)  # ...and never settled
        assert taken.job_id == job.id
        await poll(lambda: _recovered_dead(app), what="the lease to expire into the DLQ")
        scan = DeadLetterScan(app)
        async with running_worker(app):
            await scan(broker)
            await poll(lambda: receiver.accepted, what="the notification")
            await scan(broker)  # a second look (or another worker's) sends nothing more
            await poll(lambda: notifications_settled(app), what="the notification jobs to finish")
    [notification] = receiver.accepted
    assert notification["id"] == job.id and notification["state"] == "dead"
    assert "without being settled" in notification["error"] or "lease" in notification["error"]


async def test_the_dlq_scan_skips_jobs_that_died_before_its_window(app: App) -> None:
    job = await app.tasks["t.fail"].options(webhook="https://example.com/hook").send_async("x")
    async with running_worker(app):
        await poll(lambda: _dead_jobs(app, "default"), what="the job to die")
    broker = await app.broker()
    await broker.purge(WEBHOOK_QUEUE)  # drop the hook's own notification, to see the scan's
    later = DeadLetterScan(app, clock=lambda: time.time() + 7200)  # started two hours on
    await later(broker)
    (stats,) = await broker.stats([WEBHOOK_QUEUE])
    assert stats.depth == 0, job.id


async def _recovered_dead(app: App) -> list[Any]:
    """The default queue's dead jobs, after a fetch (brokers recover expired leases when fetching)."""
    broker = await app.broker()
    assert await broker.fetch(["default"], 1, wait=0) == []
    return await broker.dead_jobs("default")


async def _dead_jobs(app: App, queue: str) -> list[Any]:
    return await (await app.broker()).dead_jobs(queue)


def test_signatures_verify() -> None:
    body = b'{"id":"1","state":"succeeded"}'
    header = sign(SECRET, body)
    assert verify_signature(SECRET, header, body)
    assert verify_signature(SECRET, header, body.decode())
    assert verify_signature(SECRET.encode(), header, body)
    assert not verify_signature(SECRET, header, body + b" ")
    assert not verify_signature("other secret", header, body)
    stale = sign(SECRET, body, int(time.time()) - 301)
    assert not verify_signature(SECRET, stale, body)
    assert verify_signature(SECRET, stale, body, tolerance=600)
    assert not verify_signature(SECRET, sign(SECRET, body, int(time.time()) + 3600), body)
    t, v1 = header.split(",")
    assert verify_signature(SECRET, f"{t},v1=deadbeef,{v1}", body)  # any v1 may match (key rotation)
    for bad in (None, "", "garbage", t, v1, "t=abc," + v1, "t=,v1=", f"{t},v1=é"):
        assert not verify_signature(SECRET, bad, body), bad


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    import hashlib
    import hmac

    header = sign("k", b"{}", 1700000000)
    assert header == "t=1700000000,v1=" + hmac.new(b"k", b"1700000000.{}", hashlib.sha256).hexdigest()


def test_webhook_option_is_checked_at_decoration_and_send(app: App) -> None:
    with pytest.raises(ConfigurationError, match="webhook"):

        @app.task(name="t.badhook", webhook="ftp://x")
        def bad() -> None:
            return None

    with pytest.raises(ConfigurationError, match="webhook"):
        app.tasks["t.add"].options(webhook="not a url")
    message = app.tasks["t.add"].options(webhook="https://example.com/h").message(1, 2)
    assert message.options == {"webhook": "https://example.com/h"}
