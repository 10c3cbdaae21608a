"""Ten times more submits than a bounded queue can take: every refusal is a 503 with Retry-After,
every accepted job completes, and the API's memory stays flat."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

from offload import App
from offload.api.app import create_api

from .support import client_for, make_app, poll, running_worker

MAX_DEPTH = 20
JOB_SECONDS = 0.02
CONCURRENCY = 2  # the worker drains at most ~100 jobs/s
ROUNDS, PER_ROUND, CLIENTS = 5, 1000, 32
MIB = 1024 * 1024


@dataclass
class Tally:
    accepted: list[str] = field(default_factory=list)
    refused: int = 0
    problems: Counter[str] = field(default_factory=Counter)  # anything but a proper 503


async def drive(client: httpx.AsyncClient, total: int, tally: Tally) -> None:
    body = json.dumps({"task": "t.sleep", "args": [JOB_SECONDS], "queue": "bounded"}).encode()
    remaining = iter(range(total))

    async def one_client() -> None:
        for _ in remaining:
            response = await client.post(
                "/v1/jobs", content=body, headers={"content-type": "application/json"}
            )
            if response.status_code == 202:
                tally.accepted.append(response.json()["id"])
                continue
            tally.refused += 1
            seconds = response.headers.get("retry-after", "")
            ok = (
                response.status_code == 503
                and seconds.isdigit()
                and int(seconds) >= 1
                and response.json().get("max_depth") == MAX_DEPTH
            )
            if not ok:
                tally.problems[f"{response.status_code} retry-after={seconds!r}"] += 1

    await asyncio.gather(*(one_client() for _ in range(CLIENTS)))


def add_sleep_task(app: App) -> None:
    @app.task(name="t.sleep", queue="bounded", public=True)
    async def sleep(seconds: float) -> float:
        await asyncio.sleep(seconds)
        return seconds


async def test_overload_is_refused_cleanly_and_memory_stays_flat(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The test's own HTTP client logs every request at INFO; captured, those records would be
    # the memory growth measured here, not the API's.
    caplog.set_level(logging.WARNING, logger="httpx")
    app = make_app(f"sqlite:///{tmp_path / 'overload.db'}")
    add_sleep_task(app)
    app.queue("bounded", max_depth=MAX_DEPTH)
    process = psutil.Process(os.getpid())
    tally = Tally()
    rss: list[int] = []
    async with (
        client_for(create_api(app, keys=None, insecure_local=True)) as client,
        running_worker(app, ("bounded",), concurrency=CONCURRENCY),
    ):
        started = time.monotonic()
        for _ in range(ROUNDS):
            await drive(client, PER_ROUND, tally)
            gc.collect()
            rss.append(process.memory_info().rss)
        elapsed = time.monotonic() - started
        for job_id in tally.accepted:  # every accepted job completes
            await poll(lambda job_id=job_id: _succeeded(app, job_id), timeout=60, what=f"job {job_id}")
    await app.close_async()

    assert len(tally.accepted) + tally.refused == ROUNDS * PER_ROUND
    assert tally.refused > 5 * len(tally.accepted), (len(tally.accepted), tally.refused)  # really overloaded
    assert not tally.problems, tally.problems  # every refusal: 503 + integer Retry-After >= 1
    # Round 1 warms caches and allocator arenas; after it, serving more must not cost more memory.
    growth = rss[-1] - rss[1]
    assert growth < 5 * MIB, f"RSS grew {growth / MIB:.1f} MiB over {(ROUNDS - 2) * PER_ROUND} requests"
    print(
        f"accepted {len(tally.accepted)} ({len(tally.accepted) / elapsed:.0f}/s), refused {tally.refused}, "
        f"RSS by round (MiB): {[round(r / MIB, 1) for r in rss]}"
    )


async def _succeeded(app: App, job_id: str) -> bool:
    return (await app.job(job_id).info_async()).state.value == "succeeded"
