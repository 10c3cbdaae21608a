"""The PostgreSQL broker under faults, with the real CLI in subprocesses.

(a) A PostgreSQL server of our own (initdb into a temporary directory, a spare port) is stopped
    with `pg_ctl -m immediate` (no checkpoint: a crash, recovered from the WAL at start) and
    started again during a burst of enqueues and processing: every acknowledged enqueue survives,
    the producer and the worker reconnect by themselves, and every job completes.
(b) A worker process is SIGKILLed mid-run with 3,000 jobs (on the shared test server, in a schema
    of its own): no job is lost.
(c) A worker's connections are cut (a relay in the test process stalls them both ways, as a network
    partition does) for longer than its lease: another worker runs the job meanwhile, and the
    cut-off worker's late ack is refused when the links heal; it then goes on consuming.
Skipped where PostgreSQL is not installed or not reachable, unless CI=true, where they fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from acceptance_harness import (
    Harness,
    TcpProxy,
    free_port,
    late_ack_of_a_cut_off_worker,
    restart_during_a_burst,
    sigkill_a_worker_mid_run,
    through,
    unavailable,
)

from offload import App
from offload.brokers import base

SHARED = os.environ.get("OFFLOAD_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
_TESTS = "the PostgreSQL fault tests"


def _sql(url: str, statement: str) -> None:
    async def run() -> None:
        import asyncpg

        conn = await asyncpg.connect(url, timeout=5)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, run()).result()


def _bindir() -> Path | None:
    found = shutil.which("pg_ctl")
    candidates = [found] if found else []
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)
    for candidate in candidates:
        path = Path(candidate).resolve().parent
        if (path / "initdb").exists():
            return path
    return None


class PostgresServer:
    """A PostgreSQL cluster of our own, run as the `postgres` user when we are root."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.port = free_port(5440, 5540)
        self.dir = Path(tempfile.mkdtemp(prefix="offload-pg-"))
        self.data = self.dir / "data"
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres?schema=faults"
        self._as: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str, timeout: float = 60) -> None:
        subprocess.run(
            [*self._as, str(self.bindir / args[0]), *args[1:]],
            check=True,
            timeout=timeout,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=on"
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.dir / "server.log"), "-o", options, "-w", "start"
        )

    def crash(self) -> None:
        """Immediate stop: every backend aborted, no checkpoint; recovery replays the WAL."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def stop(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError):
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop", timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def pg_server() -> Iterator[PostgresServer]:
    bindir = _bindir()
    if bindir is None:
        unavailable("PostgreSQL server binaries (initdb, pg_ctl) are not installed", _TESTS)
    assert bindir is not None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            unavailable("running as root and there is no `postgres` user to run a test server as", _TESTS)
    server = PostgresServer(bindir)
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.stop()


@pytest.mark.timeout(300)
def test_postgres_restart_during_a_burst_loses_no_acknowledged_job(
    tmp_path: Path, pg_server: PostgresServer
) -> None:
    harness = Harness(tmp_path, pg_server.url)
    creator = App(harness.url)
    try:
        try:
            creator.run_sync(lambda broker: broker.stats())  # the schema, before the worker starts
        finally:
            creator.close()
        # The broker retries a lost connection inside a call (for its reconnect_timeout): a send
        # may ride out the outage instead of failing, and the worker may log either line.
        restart_during_a_burst(
            harness,
            pg_server.crash,
            pg_server.start,
            "PostgreSQL",
            outage_logs=("PostgreSQL connection problem", "fetching failed"),
        )
    finally:
        harness.close()


@pytest.fixture
def shared_url() -> Iterator[str]:
    try:
        _sql(SHARED, "SELECT 1")
    except Exception as exc:
        unavailable(f"PostgreSQL at {SHARED} is not reachable ({type(exc).__name__}: {exc})", _TESTS)
    schema = f"offload_faults_{uuid.uuid4().hex[:12]}"
    yield f"{SHARED}?schema={schema}"
    _sql(SHARED, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.mark.timeout(180)
def test_sigkill_of_a_worker_mid_run_loses_no_job(tmp_path: Path, shared_url: str) -> None:
    harness = Harness(tmp_path, shared_url)
    try:
        sigkill_a_worker_mid_run(harness, 3000, "PostgreSQL")
    finally:
        harness.close()


@pytest.mark.timeout(120)
def test_late_ack_of_a_cut_off_worker_is_refused(
    tmp_path: Path, shared_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The lease is sized when the job is enqueued (here, in this process): 2 s for `stale`.
    monkeypatch.setattr(base, "DEFAULT_LEASE", 2.0)
    server = urlsplit(shared_url)
    proxy = TcpProxy(server.port or 5432, server.hostname or "127.0.0.1")
    harness = Harness(tmp_path, shared_url)
    creator = App(shared_url)
    try:
        try:
            creator.run_sync(lambda broker: broker.stats())  # the schema, before the workers start
        finally:
            creator.close()
        # The same server, database and schema, through the relay: every connection the cut-off
        # worker opens (its pool and its LISTEN connection) goes through it.
        late_ack_of_a_cut_off_worker(harness, [proxy], through(shared_url, proxy), "PostgreSQL", 2.0)
    finally:
        harness.close()
        proxy.close()
