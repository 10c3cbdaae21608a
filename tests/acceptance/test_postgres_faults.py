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
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import acceptance_app
import pytest
from acceptance_harness import (
    APP,
    Harness,
    TcpProxy,
    late_ack_of_a_cut_off_worker,
    sigkill_a_worker_mid_run,
    through,
    wait_until,
)

from offload import App, BrokerError
from offload.brokers import base

SHARED = os.environ.get("OFFLOAD_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def _unavailable(message: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message}; CI=true requires it for the PostgreSQL fault tests", pytrace=False)
    pytest.skip(message)


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


def _free_port() -> int:
    for port in range(5440, 5540):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 5440-5539 for a test PostgreSQL server")


class PostgresServer:
    """A PostgreSQL cluster of our own, run as the `postgres` user when we are root."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.port = _free_port()
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
        _unavailable("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    assert bindir is not None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            _unavailable("running as root and there is no `postgres` user to run a test server as")
    server = PostgresServer(bindir)
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.stop()


def _send_until_accepted(sender: App, messages: list[object]) -> tuple[list[str], int]:
    """Send one batch; re-send the same messages (same ids) if the broker gives up meanwhile."""
    failures = 0
    deadline = time.monotonic() + 60
    while True:
        try:
            jobs = sender.send_many(messages)  # type: ignore[arg-type]
        except BrokerError:
            failures += 1
            assert time.monotonic() < deadline, "PostgreSQL did not come back within 60s"
            time.sleep(0.2)
            continue
        return [job.id for job in jobs], failures


@pytest.mark.timeout(300)
def test_postgres_restart_during_a_burst_loses_no_acknowledged_job(
    tmp_path: Path, pg_server: PostgresServer
) -> None:
    harness = Harness(tmp_path, pg_server.url)
    try:
        _restart_during_a_burst(harness, pg_server)
    finally:
        harness.close()


def _restart_during_a_burst(harness: Harness, pg_server: PostgresServer) -> None:
    n, batch = 4000, 100
    App(harness.url).run_sync(lambda broker: broker.stats())  # create the schema before the worker starts
    worker = harness.spawn("worker", APP, "--concurrency", "16")
    sender = App(harness.url)
    ids: list[str] = []
    failed_sends = 0
    longest_send = 0.0
    restarter: threading.Thread | None = None
    acknowledged_before_crash: list[str] = []
    try:
        for start in range(0, n, batch):
            if start == 2 * n // 5:
                wait_until(lambda: harness.count("end", "quick") >= 200, 60, "200 jobs to complete")
                acknowledged_before_crash = list(ids)
                pg_server.crash()
                # Back after 1.5s, while the producer keeps sending and the worker keeps fetching.
                restarter = threading.Thread(target=lambda: (time.sleep(1.5), pg_server.start()))
                restarter.start()
            messages = [acceptance_app.quick.message(k) for k in range(start, start + batch)]
            began = time.monotonic()
            sent, failures = _send_until_accepted(sender, messages)
            longest_send = max(longest_send, time.monotonic() - began)
            assert sent == [m.id for m in messages]
            ids += sent
            failed_sends += failures
    finally:
        if restarter is not None:
            restarter.join()
        sender.close()
    # The producer rode out the outage inside send (the broker retries for reconnect_timeout).
    assert longest_send >= 1.0 or failed_sends > 0, "no enqueue met the outage: the test proved nothing"
    infos = harness.jobs(acknowledged_before_crash)
    assert all(info is not None for info in infos), "an enqueue acknowledged before the crash is gone"

    wait_until(lambda: len(harness.tally("end", "quick")) == n, 150, "every job to complete")
    wait_until(
        lambda: all(i is not None and i.state.value == "succeeded" for i in harness.jobs(ids)),
        60,
        "every job to be acked",
    )
    worker.send_signal(signal.SIGTERM)
    assert harness.wait_exit(worker, 30) == 0
    log = harness.stderr_of(worker)
    assert "PostgreSQL connection problem" in log or "fetching failed" in log, (
        "the worker never saw the outage"
    )

    starts = harness.tally("start", "quick")
    ends = harness.tally("end", "quick")
    lost = [k for k in range(n) if ends[k] == 0]
    duplicated = sorted(k for k, c in starts.items() if c > 1)
    print(
        f"\nPostgreSQL crashed (immediate stop) and restarted after {len(acknowledged_before_crash)} of "
        f"{n} enqueues; longest send {longest_send:.1f}s, {failed_sends} send(s) gave up: "
        f"lost={len(lost)} duplicated={len(duplicated)} (leased or unacked when the server died, run again)"
    )
    assert lost == []
    stats = harness.stats()
    assert (stats["ready"], stats["delayed"], stats["running"], stats["dead"]) == (0, 0, 0, 0), stats


@pytest.fixture
def shared_url() -> Iterator[str]:
    try:
        _sql(SHARED, "SELECT 1")
    except Exception as exc:
        _unavailable(f"PostgreSQL at {SHARED} is not reachable ({type(exc).__name__}: {exc})")
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
