"""A sync sender that exits without `app.close()` still finishes its broker's background work.

The RabbitMQ broker marks each record "publish not confirmed" before publishing and removes the
mark in the background after the confirm; a mark left behind makes a sweeper publish the job
again (a duplicate, dropped at claim, but work for every worker). A script that sends and exits
(a cron job, a CLI command) must not leave them. Uses the shared test servers (skipped if either is
unreachable unless CI=true).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from contract import rabbitmq_store
from offload.brokers.rabbitmq import RabbitMQBroker
from offload.brokers.rabbitmq_url import UNPUBLISHED

pytestmark = pytest.mark.timeout(60)

SENDER = textwrap.dedent(
    """
    import sys
    from offload import App

    app = App(sys.argv[1])

    @app.task
    def noop(i: int) -> None:
        return None

    for i in range(5):
        noop.send(i)
    print("sent", flush=True)
    # no app.close(): the interpreter's exit must finish the background unmark
    """
)


@pytest.fixture
async def url(tmp_path: Path) -> AsyncIterator[str]:
    made = rabbitmq_store.rabbitmq_url(tmp_path)
    yield made
    await asyncio.to_thread(rabbitmq_store.cleanup, made)


async def test_a_sender_that_exits_without_close_leaves_no_job_marked_unpublished(
    url: str, tmp_path: Path
) -> None:
    script = tmp_path / "sender.py"
    script.write_text(SENDER)
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(script), url],
        capture_output=True,
        text=True,
        timeout=45,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "sent"
    broker = RabbitMQBroker(url)
    await broker.connect()
    try:
        [stats] = await broker.stats(["default"])
        assert stats.ready == 5
        client = await broker._redis()
        assert await client.zcard(broker.namespace + UNPUBLISHED) == 0
    finally:
        await broker.close()
