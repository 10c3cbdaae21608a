"""The NATS JetStream broker under faults, with the real CLI in subprocesses.

(a) A worker process is SIGKILLed mid-run with 5,000 jobs (on the shared test server, in buckets of
    its own): no job is lost, and only jobs the killed worker had taken run twice.
(b) A nats-server of our own (`-js`, its own spare port and store directory under tmp_path; the
    shared server is never touched) is SIGKILLed and started again on the same port and store
    during a burst of enqueues and processing: every acknowledged enqueue survives, the producer
    and the worker reconnect by themselves, and every job completes.
(c) A worker's connection is cut (a relay in the test process stalls it both ways, as a network
    partition does) for longer than its lease: another worker runs the job meanwhile, and the cut-off
    worker's late ack is refused when the link heals; it then goes on consuming.
The shared server is OFFLOAD_TEST_NATS_URL (default nats://127.0.0.1:4222), (b) needs the
nats-server binary; they are skipped where those are missing, unless CI=true, where they fail.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from acceptance_harness import (
    Harness,
    ServerProcess,
    TcpProxy,
    free_port,
    late_ack_of_a_cut_off_worker,
    restart_during_a_burst,
    sigkill_a_worker_mid_run,
    through,
    wait_until,
)

from offload.brokers import base
from offload.brokers.nats import delete_bucket

SHARED = os.environ.get("OFFLOAD_TEST_NATS_URL", "nats://127.0.0.1:4222")
# The harness runs the CLI without the OFFLOAD_* environment, so the transport under test
# (OFFLOAD_NATS_TRANSPORT, else the broker's default) is named in every URL.
TRANSPORT = os.environ.get("OFFLOAD_NATS_TRANSPORT", "")


def _app_url(server: str, bucket: str) -> str:
    query = f"bucket={bucket}" + (f"&transport={TRANSPORT}" if TRANSPORT else "")
    return f"{server}?{query}"


def _unavailable(message: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message}; CI=true requires it for the NATS fault tests", pytrace=False)
    pytest.skip(message)


async def _quiet(exc: Exception) -> None:
    pass


def _jetstream_answers(url: str) -> bool:
    async def ping() -> None:
        import nats

        # max_reconnect_attempts=1: with 0 (or -1) nats-py retries an unreachable server forever
        nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=1, error_cb=_quiet)
        try:
            await nc.jetstream().account_info()  # JetStream must be up too
        finally:
            await nc.close()

    try:
        asyncio.run(ping())
    except Exception:  # any failure means "not (yet) reachable"
        return False
    return True


def _drop_buckets(url: str) -> None:
    """The contract tests' reset (tests/contract/nats_store.cleanup): buckets and ready stream."""
    asyncio.run(delete_bucket(url))


@pytest.fixture
def shared_bucket() -> Iterator[str]:
    """Buckets of its own on the shared server, deleted afterwards."""
    if not _jetstream_answers(SHARED):
        _unavailable(f"NATS JetStream at {SHARED} is not reachable")
    bucket = f"offload-faults-{uuid.uuid4().hex[:12]}"
    yield bucket
    _drop_buckets(_app_url(SHARED, bucket))


# -- a nats-server of our own ----------------------------------------------------------------------


def _server_binary() -> str | None:
    for candidate in (os.environ.get("OFFLOAD_TEST_NATS_SERVER"), "/usr/sbin/nats-server"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("nats-server")


class NatsServer(ServerProcess):
    """nats-server -js on a spare loopback port with its store under `directory`; stopped by pid."""

    def __init__(self, directory: Path, binary: str) -> None:
        super().__init__(directory / "server.log")
        self.dir = directory
        self.binary = binary
        self.port = free_port(4300, 4400)
        self.url = _app_url(f"nats://127.0.0.1:{self.port}", "faults")

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.dir / "js")],
            stdout=self._log,
            stderr=self._log,
        )
        wait_until(self._answers, 30, f"nats-server on port {self.port} to serve JetStream", interval=0.2)

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"nats-server exited: {(self.dir / 'server.log').read_text()[-3000:]}")
        return _jetstream_answers(f"nats://127.0.0.1:{self.port}")


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    binary = _server_binary()
    if binary is None:
        _unavailable("nats-server is not installed")
    assert binary is not None
    directory = tmp_path / "nats"
    directory.mkdir()
    server = NatsServer(directory, binary)
    try:
        server.start()
        yield server
    finally:
        server.stop()


# -- the tests ---------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_sigkill_of_a_worker_mid_run_loses_no_job(tmp_path: Path, shared_bucket: str) -> None:
    harness = Harness(tmp_path, _app_url(SHARED, shared_bucket))
    try:
        sigkill_a_worker_mid_run(harness, 5000, "NATS")
    finally:
        harness.close()


@pytest.mark.timeout(300)
def test_nats_restart_during_a_burst_loses_no_acknowledged_job(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    harness = Harness(tmp_path, nats_server.url)
    try:
        # 2,000 jobs, not 4,000: a NATS fetch lists every waiting key of its queue (see
        # docs/brokers/nats.md, "Fetch cost grows with queue depth"), so the run time grows with n².
        # The client may answer a fetch pending during the outage once it is back, so the worker
        # need not log a failed fetch: its log of the dropped link is the evidence.
        outage_logs = ("NATS connection lost", "fetching failed; retrying in 1s")
        restart_during_a_burst(
            harness, nats_server.crash, nats_server.start, "NATS", n=2000, outage_logs=outage_logs
        )
    finally:
        harness.close()


@pytest.mark.timeout(120)
def test_late_ack_of_a_cut_off_worker_is_refused(
    tmp_path: Path, shared_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The lease is sized when the job is enqueued (here, in this process): 2 s for `stale`.
    monkeypatch.setattr(base, "DEFAULT_LEASE", 2.0)
    url = _app_url(SHARED, shared_bucket)
    parts = urlsplit(SHARED)
    proxy = TcpProxy(parts.port or 4222, parts.hostname or "127.0.0.1")
    harness = Harness(tmp_path, url)
    try:
        late_ack_of_a_cut_off_worker(harness, [proxy], through(url, proxy), "NATS", 2.0)
    finally:
        harness.close()
        proxy.close()
