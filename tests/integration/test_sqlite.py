"""The SQLite broker with real files: several processes, foreign files, durability modes."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from offload import App, BrokerError, JobState
from offload.brokers import Settle, broker_from_url
from offload.brokers.sqlite import SqliteBroker
from offload.message import Message, encode, encode_value, new_job_id

pytestmark = pytest.mark.timeout(60)

PRODUCER = textwrap.dedent(
    """
    import asyncio, sys, time
    from offload.brokers import broker_from_url
    from offload.message import Message, encode, new_job_id

    async def main(url, tag, count):
        broker = broker_from_url(url)
        await broker.connect()
        ids = []
        for n in range(count):  # one transaction each, interleaving with the other producers
            m = Message(id=new_job_id(), task="t", args=(tag, n), created_at=time.time())
            [e] = await broker.enqueue([(m, encode(m))])
            ids.append(e.job_id)
        batch = [Message(id=new_job_id(), task="t", args=(tag, -n), created_at=time.time())
                 for n in range(1, count + 1)]
        ids += [e.job_id for e in await broker.enqueue([(m, encode(m)) for m in batch])]
        await broker.close()
        print("\\n".join(ids))

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
    """
)


def url_for(path: Path, **query: str) -> str:
    options = "&".join(f"{k}={v}" for k, v in query.items())
    return f"sqlite:///{path}" + (f"?{options}" if options else "")


async def test_several_processes_enqueueing_into_one_file_lose_nothing(tmp_path: Path) -> None:
    url = url_for(tmp_path / "shared.db")
    broker = broker_from_url(url)
    await broker.connect()  # create the schema first, as a deployment would
    try:
        producers = [
            subprocess.Popen(
                [sys.executable, "-c", PRODUCER, url, f"p{n}", "60"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for n in range(4)
        ]
        acknowledged: set[str] = set()
        for producer in producers:
            out, err = await asyncio.to_thread(producer.communicate, timeout=50)
            assert producer.returncode == 0, err
            acknowledged.update(out.split())
        assert len(acknowledged) == 4 * 120

        [stats] = await broker.stats(["default"])
        assert stats.ready == len(acknowledged)
        delivered: set[str] = set()
        while deliveries := await broker.fetch(["default"], 100, 0):
            delivered.update(d.job_id for d in deliveries)
        assert delivered == acknowledged
    finally:
        await broker.close()


KILLED_AFTER_ACK = textwrap.dedent(
    """
    import asyncio, os, signal, sys, time
    from offload.brokers import broker_from_url
    from offload.message import Message, encode, new_job_id

    async def main(url):
        broker = broker_from_url(url)
        await broker.connect()
        m = Message(id=new_job_id(), task="t", args=("precious",), created_at=time.time())
        [e] = await broker.enqueue([(m, encode(m))])
        print(e.job_id, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # no close, no checkpoint, no cleanup

    asyncio.run(main(sys.argv[1]))
    """
)


async def test_acknowledged_enqueue_survives_the_producer_being_killed(tmp_path: Path) -> None:
    url = url_for(tmp_path / "offload.db")
    producer = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", KILLED_AFTER_ACK, url],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert producer.returncode == -9, producer.stderr
    job_id = producer.stdout.strip()
    broker = broker_from_url(url)
    await broker.connect()
    try:
        record = await broker.get_job(job_id)
        assert record is not None and record.state is JobState.QUEUED and record.args == ("precious",)
    finally:
        await broker.close()


async def test_sqlite_file_of_another_application_is_refused_with_a_helpful_message(
    tmp_path: Path,
) -> None:
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    broker = broker_from_url(url_for(path))
    with pytest.raises(BrokerError, match="offload did not create") as caught:
        await broker.connect()
    assert "users" in str(caught.value) and "separate file" in str(caught.value)
    await broker.close()
    with sqlite3.connect(path) as conn:  # and it was left alone
        tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    assert tables == ["users"]


async def test_file_that_is_not_sqlite_is_refused_with_a_helpful_message(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    original = b"these are my notes, not a database\n" * 200
    path.write_bytes(original)
    broker = broker_from_url(url_for(path))
    with pytest.raises(BrokerError, match="not an SQLite database"):
        await broker.connect()
    await broker.close()
    assert path.read_bytes() == original


async def test_missing_directory_is_refused_with_a_helpful_message(tmp_path: Path) -> None:
    broker = broker_from_url(url_for(tmp_path / "no" / "such" / "dir.db"))
    with pytest.raises(BrokerError, match="does not exist"):
        await broker.connect()
    await broker.close()


async def test_store_from_a_newer_offload_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "offload.db"
    broker = broker_from_url(url_for(path))
    await broker.connect()
    await broker.close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE offload_meta SET value = '99' WHERE key = 'version'")
    newer = broker_from_url(url_for(path))
    with pytest.raises(BrokerError, match="newer offload"):
        await newer.connect()
    await newer.close()


@pytest.mark.parametrize(("durability", "synchronous"), [("strict", 2), ("fast", 1)])
async def test_durability_modes(tmp_path: Path, durability: str, synchronous: int) -> None:
    url = url_for(tmp_path / "offload.db", durability=durability)
    broker = broker_from_url(url)
    assert isinstance(broker, SqliteBroker) and broker.durability == durability
    await broker.connect()
    try:
        assert broker._read_conn is not None
        assert broker._read_conn.execute("PRAGMA synchronous").fetchone()[0] == synchronous
        m = Message(id=new_job_id(), task="t", created_at=1.0)
        [enqueued] = await broker.enqueue([(m, encode(m))])
        [d] = await broker.fetch(["default"], 1, 0)
        assert await broker.settle([Settle(d, "ack", result=encode_value("ok"))]) == [True]
        record = await broker.get_job(enqueued.job_id)
        assert record is not None and record.state is JobState.SUCCEEDED and record.result == "ok"
    finally:
        await broker.close()


async def test_default_url_is_strict(tmp_path: Path) -> None:
    broker = broker_from_url(url_for(tmp_path / "offload.db"))
    assert isinstance(broker, SqliteBroker) and broker.durability == "strict"


async def test_app_on_a_fast_store_runs_jobs(tmp_path: Path) -> None:
    from offload.worker import Worker

    app = App(url_for(tmp_path / "offload.db", durability="fast"))

    @app.task
    def double(n: int) -> int:
        return 2 * n

    jobs = await app.send_many_async([double.message(n) for n in range(50)])
    await asyncio.wait_for(Worker(app, concurrency=4, burst=True).run(), 30)
    assert [await j.wait(1) for j in jobs] == [2 * n for n in range(50)]
    await app.close_async()
