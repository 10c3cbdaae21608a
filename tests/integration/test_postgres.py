"""The PostgreSQL broker against a real server: transactional enqueue, migrations, URLs, errors,
wake-ups that survive a lost LISTEN connection, and the SQL the docs promise works.

Uses the shared test server (OFFLOAD_TEST_POSTGRES_URL, default 127.0.0.1:5432/test; skipped if
unreachable unless CI=true), one fresh schema per test, dropped afterwards.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from contract import postgres_store
from offload import App, BrokerError, ConfigurationError, JobState, MissingExtraError, QueueFull
from offload.brokers import Settle, broker_from_url
from offload.brokers.postgres import (
    PostgresBroker,
    enqueue_in_transaction,
    enqueue_in_transaction_sync,
    parse_postgres_url,
)
from offload.brokers.postgres_schema import SCHEMA_VERSION
from offload.message import Message, encode, encode_value, new_job_id
from offload.worker import Worker

pytestmark = pytest.mark.timeout(60)


def item(**fields: Any) -> tuple[Message, bytes]:
    m = Message(id=new_job_id(), task="t", created_at=time.time(), **fields)
    return m, encode(m)


def schema_of(url: str) -> str:
    return parse_postgres_url(url).schema


@pytest.fixture
def url(tmp_path: Path) -> Iterator[str]:
    made = postgres_store.postgres_url(tmp_path)
    yield made
    postgres_store.drop_schema(made)


@pytest.fixture
async def broker(url: str) -> AsyncIterator[PostgresBroker]:
    b = broker_from_url(url)
    assert isinstance(b, PostgresBroker)
    await b.connect()
    try:
        yield b
    finally:
        await b.close()


@pytest.fixture
async def app(url: str) -> AsyncIterator[App]:
    a = App(url, name="pg")
    try:
        yield a
    finally:
        await a.close_async()


@pytest.fixture
async def conn() -> AsyncIterator[Any]:
    c = await asyncpg.connect(postgres_store.require_postgres())
    try:
        yield c
    finally:
        await c.close()


async def burst(app: App, queues: list[str] | None = None) -> None:
    await asyncio.wait_for(Worker(app, queues or ["default"], concurrency=4, burst=True).run(), 30)


# -- transactional enqueue ------------------------------------------------------------------------


async def test_transactional_enqueue_on_asyncpg_exists_only_if_the_transaction_commits(
    app: App, conn: Any
) -> None:
    @app.task
    def ship(order: int) -> str:
        return f"shipped {order}"

    broker = await app.broker()
    await conn.execute("CREATE TEMP TABLE orders (id integer PRIMARY KEY)")

    tx = conn.transaction()
    await tx.start()
    await conn.execute("INSERT INTO orders VALUES (1)")
    [rolled_back] = await enqueue_in_transaction(conn, app, [ship.message(1)])
    assert rolled_back.created
    assert await broker.get_job(rolled_back.id) is None, "visible before its transaction committed"
    await tx.rollback()
    assert await broker.get_job(rolled_back.id) is None
    [stats] = await broker.stats(["default"])
    assert stats.depth == 0

    # Committed: the job exists, and the NOTIFY sent inside the transaction wakes a waiting
    # worker at commit (not before).
    waiting = asyncio.create_task(broker.fetch(["default"], 1, 10))
    await asyncio.sleep(0.2)
    async with conn.transaction():
        await conn.execute("INSERT INTO orders VALUES (2)")
        [job] = await enqueue_in_transaction(conn, app, [ship.message(2)])
        await asyncio.sleep(0.3)
        assert not waiting.done(), "a worker was woken before the transaction committed"
    committed_at = time.monotonic()
    [delivery] = await asyncio.wait_for(waiting, 10)
    assert delivery.job_id == job.id
    assert time.monotonic() - committed_at < 0.5
    assert await broker.settle([Settle(delivery, "release")]) == [True]
    await burst(app)
    assert await job.wait(1) == "shipped 2"


async def test_transactional_enqueue_on_psycopg_connections(app: App, url: str) -> None:
    psycopg = pytest.importorskip("psycopg")

    @app.task
    def double(n: int) -> int:
        return 2 * n

    base = postgres_store.require_postgres()
    async with await psycopg.AsyncConnection.connect(base) as aconn:
        with pytest.raises(BrokerError, match="connect the App's broker once"):
            await enqueue_in_transaction(aconn, app, [double.message(0)])
        await aconn.rollback()
        broker = await app.broker()  # creates the schema
        async with aconn.transaction():
            [kept] = await enqueue_in_transaction(aconn, app, [double.message(1)])
        with pytest.raises(RuntimeError):
            async with aconn.transaction():
                [dropped] = await enqueue_in_transaction(aconn, app, [double.message(2)])
                raise RuntimeError("the caller's transaction fails")

    def sync_side() -> tuple[str, str]:
        with psycopg.connect(base) as sconn:  # Django's connection.connection is one of these
            with sconn.transaction():
                [ok] = enqueue_in_transaction_sync(sconn, app, [double.message(3)])
            with pytest.raises(RuntimeError), sconn.transaction():
                [gone] = enqueue_in_transaction_sync(sconn, app, [double.message(4)])
                raise RuntimeError("rolled back")
        return ok.id, gone.id

    sync_kept, sync_dropped = await asyncio.to_thread(sync_side)
    assert await broker.get_job(dropped.id) is None
    assert await broker.get_job(sync_dropped) is None
    await burst(app)
    assert await kept.wait(1) == 2
    assert await app.job(sync_kept).wait(1) == 6


async def test_queue_full_inside_a_transaction_writes_nothing_and_leaves_it_usable(
    app: App, conn: Any
) -> None:
    app.queue("small", max_depth=2)

    @app.task(queue="small")
    def work(n: int) -> int:
        return n

    broker = await app.broker()
    async with conn.transaction():
        first = await enqueue_in_transaction(conn, app, [work.message(1)])
        with pytest.raises(QueueFull) as caught:
            await enqueue_in_transaction(conn, app, [work.message(2), work.message(3)])
        assert (caught.value.queue, caught.value.depth, caught.value.max_depth) == ("small", 1, 2)
        assert await conn.fetchval("SELECT 41 + 1") == 42  # the transaction was not aborted
        # An idempotent duplicate is answered, and the batch that fits is accepted.
        [again] = await enqueue_in_transaction(conn, app, [work.options(idempotency_key="k").message(4)])
        [dup] = await enqueue_in_transaction(conn, app, [work.options(idempotency_key="k").message(5)])
        assert again.created and not dup.created and dup.id == again.id
    [stats] = await broker.stats(["small"])
    assert stats.depth == 2
    assert (await broker.get_job(first[0].id)) is not None


async def test_enqueue_with_on_the_brokers_own_connection_type(broker: PostgresBroker, conn: Any) -> None:
    async with conn.transaction():
        [made] = await broker.enqueue_with(conn, [item()])
    record = await broker.get_job(made.job_id)
    assert record is not None and record.state is JobState.QUEUED


async def test_transactional_enqueue_needs_a_postgres_app(conn: Any) -> None:
    other = App("memory://pg-tx")
    with pytest.raises(ConfigurationError, match="postgresql://"):
        await enqueue_in_transaction(conn, other, [])


# -- schema, migrations ---------------------------------------------------------------------------


async def test_processes_starting_together_migrate_once(url: str, conn: Any) -> None:
    brokers = [broker_from_url(url) for _ in range(8)]
    await asyncio.gather(*(b.connect() for b in brokers))
    try:
        rows = await conn.fetch(f'SELECT version FROM "{schema_of(url)}".schema_version')
        assert [r[0] for r in rows] == list(range(1, SCHEMA_VERSION + 1))
        [made] = await brokers[3].enqueue([item()])
        assert (await brokers[5].get_job(made.job_id)) is not None
    finally:
        await asyncio.gather(*(b.close() for b in brokers))


async def test_a_schema_of_an_older_version_is_migrated_and_keeps_its_jobs(
    url: str, conn: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from offload.brokers import postgres_schema

    with monkeypatch.context() as older:  # an offload that knew only version 1
        older.setattr(postgres_schema, "MIGRATIONS", postgres_schema.MIGRATIONS[:1])
        older.setattr(postgres_schema, "SCHEMA_VERSION", 1)
        old = broker_from_url(url)
        await old.connect()
        [kept] = await old.enqueue([item()])
        await old.close()

    new = broker_from_url(url)
    await new.connect()
    try:
        rows = await conn.fetch(f'SELECT version FROM "{schema_of(url)}".schema_version ORDER BY 1')
        assert [r[0] for r in rows] == list(range(1, SCHEMA_VERSION + 1))
        [single] = await new.enqueue([item()])
        batch = await new.enqueue([item(), item(idempotency_key="k")])
        assert all(e.created for e in [single, *batch])
        fetched = await new.fetch(["default"], 10, 0)
        assert [d.job_id for d in fetched] == [kept.job_id, single.job_id, *(e.job_id for e in batch)]
    finally:
        await new.close()


async def test_schema_of_a_newer_offload_is_refused(broker: PostgresBroker, conn: Any, url: str) -> None:
    await conn.execute(
        f"INSERT INTO \"{schema_of(url)}\".schema_version (version, description) VALUES (999, 'future')"
    )
    newer = broker_from_url(url)
    with pytest.raises(BrokerError, match=r"newer offload.*upgrade offload"):
        await newer.connect()


async def test_a_schema_holding_other_tables_is_left_alone(url: str, conn: Any) -> None:
    schema = schema_of(url)
    await conn.execute(f'CREATE SCHEMA "{schema}"; CREATE TABLE "{schema}".customers (id int)')
    with pytest.raises(BrokerError, match=r"customers.*\?schema="):
        await broker_from_url(url).connect()
    assert await conn.fetchval(f'SELECT count(*) FROM "{schema}".customers') == 0


async def test_schemas_are_separate_stores(url: str) -> None:
    other_url = url.rsplit("=", 1)[0] + "=" + schema_of(url) + "_b"
    a, b = broker_from_url(url), broker_from_url(other_url)
    await a.connect()
    await b.connect()
    try:
        [made] = await a.enqueue([item()])
        assert await b.get_job(made.job_id) is None
        assert await b.fetch(["default"], 5, 0) == []
        assert [d.job_id for d in await a.fetch(["default"], 5, 0)] == [made.job_id]
    finally:
        await a.close()
        await b.close()
        postgres_store.drop_schema(other_url)


# -- URLs and errors --------------------------------------------------------------------------------


def test_url_options() -> None:
    o = parse_postgres_url(
        "postgres://u:secret@db.example:6543/jobs?schema=billing&pool_size=4&reconnect_timeout=2.5"
        "&sslmode=require&application_name=billing-worker&statement_cache_size=0"
    )
    assert (o.schema, o.pool_size, o.reconnect_timeout, o.statement_cache_size) == ("billing", 4, 2.5, 0)
    assert o.where == "db.example:6543/jobs" and "secret" not in o.where
    assert "sslmode=require" in o.dsn and "schema" not in o.dsn
    assert o.server_settings == {"application_name": "billing-worker"}
    for bad in ("?schema=Robert'); DROP", "?schema=9lives", "?pool_size=0", "?reconnect_timeout=soon"):
        with pytest.raises(ConfigurationError):
            broker_from_url(f"postgresql://localhost/db{bad}")


async def test_unknown_url_options_are_session_settings(url: str) -> None:
    b = broker_from_url(url + "&application_name=offload-billing&statement_timeout=12345")
    assert isinstance(b, PostgresBroker)
    await b.connect()
    try:
        settings = await b._call(
            lambda c: c.fetchrow(
                "SELECT current_setting('application_name'), current_setting('statement_timeout')"
            )
        )
        assert tuple(settings) == ("offload-billing", "12345ms")
    finally:
        await b.close()


async def test_unreachable_server_and_missing_database_say_what_to_do() -> None:
    with pytest.raises(
        BrokerError, match=r"cannot reach PostgreSQL at 127\.0\.0\.1:1/test .*start the server"
    ):
        await broker_from_url("postgresql://postgres@127.0.0.1:1/test?connect_timeout=2").connect()
    base = postgres_store.require_postgres().rsplit("/", 1)[0]
    with pytest.raises(BrokerError, match=r"'no_such_db' does not exist.*createdb no_such_db") as caught:
        await broker_from_url(f"{base}/no_such_db").connect()
    assert "\n" not in str(caught.value)


async def test_tls_asked_of_a_server_without_it_names_the_tls_options(url: str, conn: Any) -> None:
    if await conn.fetchval("SHOW ssl") == "on":
        pytest.skip("the test server has TLS on: sslmode=require would succeed")
    with pytest.raises(BrokerError, match=r"TLS failed .*check sslmode, sslrootcert"):
        await broker_from_url(url + "&sslmode=require").connect()


def test_missing_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "asyncpg", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'offload\[postgres\]'"):
        broker_from_url("postgresql://localhost/db")


# -- connections lost and found ---------------------------------------------------------------------


async def test_waiting_fetch_survives_its_listen_connection_being_killed(
    broker: PostgresBroker, url: str, conn: Any
) -> None:
    waiting = asyncio.create_task(broker.fetch(["default"], 1, 15))
    await asyncio.sleep(0.2)
    assert broker._listener is not None
    killed = await conn.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE application_name = 'offload-listen' AND pid = $1",
        broker._listener.get_server_pid(),
    )
    assert killed == 1
    await asyncio.sleep(0.3)  # the broker notices, reconnects and listens again
    producer = broker_from_url(url)
    await producer.connect()
    try:
        started = time.monotonic()
        [made] = await producer.enqueue([item()])
        [delivery] = await asyncio.wait_for(waiting, 10)
        assert delivery.job_id == made.job_id
        assert time.monotonic() - started < 1.0, "the wake-up was lost with the listening connection"
    finally:
        await producer.close()


async def test_operations_ride_out_killed_pool_connections(broker: PostgresBroker, conn: Any) -> None:
    [made] = await broker.enqueue([item()])
    killed = await conn.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE application_name = 'offload' AND pid <> pg_backend_pid()"
    )
    assert killed >= 1
    [delivery] = await broker.fetch(["default"], 1, 1)
    assert delivery.job_id == made.job_id
    assert await broker.settle([Settle(delivery, "ack", result=encode_value(1))]) == [True]


# -- the SQL the docs show ----------------------------------------------------------------------------

DOC_QUERIES = [
    # jobs per queue and state
    "SELECT queue, state, count(*) FROM {s}.jobs GROUP BY queue, state ORDER BY queue, state",
    # the dead-letter queue, newest first, with the reason
    "SELECT id, task, error, finished_at FROM {s}.jobs "
    "WHERE state = 'dead' ORDER BY finished_at DESC LIMIT 20",
    # results and arguments as JSON
    "SELECT id, task, args, result FROM {s}.job_records WHERE state = 'succeeded' "
    "ORDER BY finished_at DESC LIMIT 20",
    # jobs stuck past their lease (a dead worker's, before they are redelivered)
    "SELECT id, worker, lease_expires_at FROM {s}.jobs WHERE state = 'running' AND lease_expires_at < now()",
    # throughput per queue over the last minute
    "SELECT queue, sum(finished) FROM {s}.throughput "
    "WHERE second > extract(epoch FROM now()) - 60 GROUP BY queue",
    # depth against the bound
    "SELECT q.name, q.max_depth, coalesce(sum(c.queued), 0) AS depth FROM {s}.queues q "
    "LEFT JOIN {s}.queue_counts c ON c.queue = q.name GROUP BY q.name, q.max_depth",
]


async def test_documented_queries_run(app: App, conn: Any, url: str) -> None:
    @app.task(retries=0)
    def maybe(n: int) -> dict[str, int]:
        if n == 2:
            raise ValueError("two is right out")
        return {"n": n}

    for n in range(3):
        await maybe.send_async(n)
    await burst(app)
    schema = f'"{schema_of(url)}"'
    results = [await conn.fetch(q.replace("{s}", schema)) for q in DOC_QUERIES]
    assert {(r[0], r[1], r[2]) for r in results[0]} == {("default", "dead", 1), ("default", "succeeded", 2)}
    assert "two is right out" in results[1][0]["error"]
    assert sorted(r["args"] for r in results[2]) == ["[0]", "[1]"]
    assert sorted(r["result"] for r in results[2]) == ['{"n": 0}', '{"n": 1}']
    assert results[4][0][1] == 3
