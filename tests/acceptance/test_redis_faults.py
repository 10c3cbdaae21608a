"""The Redis broker under faults: its own redis-server (AOF, appendfsync always) on a spare port.

(a) Redis is SIGKILLed and restarted during a burst of enqueues and processing: every acknowledged
    enqueue survives, the worker reconnects by itself and completes every job.
(b) A worker process is SIGKILLed mid-run: no job is lost.
(c) A worker paused (SIGSTOP) past its lease: another worker runs the job; the paused one's late
    ack is refused when it resumes, so the stored outcome is the newer run's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import acceptance_app
import pytest
import redis_fault_app
from acceptance_harness import APP, Harness, sigkill_a_worker_mid_run, wait_until

from offload import App, BrokerError
from offload.brokers import base

FAULT_APP = "redis_fault_app:app"


def _free_port() -> int:
    for port in range(6390, 6500):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 6390-6499 for a test redis-server")


class RedisServer:
    """A redis-server of our own: AOF with fsync on every write, stopped by pid at the end."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0?prefix=faults:"
        self.process: subprocess.Popen[bytes] | None = None
        self._log = open(directory / "redis.log", "ab")  # noqa: SIM115

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                str(self.dir),
                "--maxmemory-policy",
                "noeviction",
            ],
            stdout=self._log,
            stderr=self._log,
        )
        wait_until(self._answers, 15, f"redis-server on port {self.port} to answer PING")

    def _answers(self) -> bool:
        import redis

        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def crash(self) -> None:
        """SIGKILL: no shutdown hook, no final fsync; only what the AOF already holds survives."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.send_signal(signal.SIGKILL)
                self.process.wait(10)
        self._log.close()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        message = "redis-server is not installed"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message}; CI=true requires it for the Redis fault tests", pytrace=False)
        pytest.skip(message)
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def harness(tmp_path: Path, redis_server: RedisServer) -> Iterator[Harness]:
    h = Harness(tmp_path, redis_server.url)
    try:
        yield h
    finally:
        h.close()


def _send_until_accepted(sender: App, messages: list[object]) -> tuple[list[str], int]:
    """Send one batch, re-sending the same messages (same ids) while Redis is unreachable."""
    failures = 0
    deadline = time.monotonic() + 60
    while True:
        try:
            jobs = sender.send_many(messages)  # type: ignore[arg-type]
        except BrokerError:
            failures += 1
            assert time.monotonic() < deadline, "Redis did not come back within 60s"
            time.sleep(0.2)
            continue
        return [job.id for job in jobs], failures


@pytest.mark.timeout(240)
def test_redis_restart_during_a_burst_loses_no_acknowledged_job(
    harness: Harness, redis_server: RedisServer
) -> None:
    n, batch = 4000, 100
    worker = harness.spawn("worker", APP, "--concurrency", "16")
    sender = App(harness.url)
    ids: list[str] = []
    failed_sends = 0
    restarter: threading.Thread | None = None
    acknowledged_before_crash: list[str] = []
    try:
        for start in range(0, n, batch):
            if start == 2 * n // 5:
                wait_until(lambda: harness.count("end", "quick") >= 200, 60, "200 jobs to complete")
                acknowledged_before_crash = list(ids)
                redis_server.crash()
                # Back after 1.5s, while the producer keeps trying and the worker keeps fetching.
                restarter = threading.Thread(target=lambda: (time.sleep(1.5), redis_server.start()))
                restarter.start()
            messages = [acceptance_app.quick.message(k) for k in range(start, start + batch)]
            sent, failures = _send_until_accepted(sender, messages)
            assert sent == [m.id for m in messages]
            ids += sent
            failed_sends += failures
    finally:
        if restarter is not None:
            restarter.join()
        sender.close()
    assert failed_sends > 0, "no enqueue met the outage: the test proved nothing"
    infos = harness.jobs(acknowledged_before_crash)
    assert all(info is not None for info in infos), "an enqueue acknowledged before the crash is gone"

    wait_until(lambda: len(harness.tally("end", "quick")) == n, 120, "every job to complete")
    wait_until(
        lambda: all(i.state.value == "succeeded" for i in harness.jobs(ids)), 60, "every job to be acked"
    )
    worker.send_signal(signal.SIGTERM)
    assert harness.wait_exit(worker, 30) == 0
    log = harness.stderr_of(worker)
    assert "fetching failed; retrying in 1s" in log, "the worker never saw the outage"

    starts = harness.tally("start", "quick")
    ends = harness.tally("end", "quick")
    lost = [k for k in range(n) if ends[k] == 0]
    duplicated = sorted(k for k, c in starts.items() if c > 1)
    print(
        f"\nRedis SIGKILLed and restarted after {len(acknowledged_before_crash)} of {n} enqueues "
        f"({failed_sends} send attempts refused while it was down): lost={len(lost)} "
        f"duplicated={len(duplicated)} (leased or unacked when Redis died, run again)"
    )
    assert lost == []
    stats = harness.stats()
    assert (stats["ready"], stats["delayed"], stats["running"], stats["dead"]) == (0, 0, 0, 0), stats


@pytest.mark.timeout(180)
def test_sigkill_of_a_worker_mid_run_loses_no_job(harness: Harness) -> None:
    sigkill_a_worker_mid_run(harness, 3000, "Redis")


@pytest.mark.timeout(120)
def test_late_ack_of_a_paused_worker_is_refused(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    # The lease is sized when the job is enqueued, here: 2s for a task without a timeout.
    monkeypatch.setattr(base, "DEFAULT_LEASE", 2.0)
    [job_id] = harness.send(redis_fault_app.stale, [1])
    stale_worker = harness.spawn("worker", FAULT_APP, "--concurrency", "1")
    wait_until(lambda: harness.count("start", "stale") == 1, 60, "the job to start")
    stale_worker.send_signal(signal.SIGSTOP)  # mid-job: no lease renewal, no ack
    paused_at = time.monotonic()
    try:
        [first] = harness.records(strict=False)
        assert first.pid == stale_worker.pid
        time.sleep(max(0.0, 2.0 + 1.0 - (time.monotonic() - paused_at)))  # past the 2s lease

        # Another worker finds the lease expired, runs the job and acks it.
        fresh = harness.spawn("worker", FAULT_APP, "--concurrency", "1", "--burst")
        assert harness.wait_exit(fresh, 60) == 0
        info = harness.inspect(job_id)
        assert (info["state"], info["result"], info["deliveries"]) == ("succeeded", fresh.pid, 2), info
    finally:
        stale_worker.send_signal(signal.SIGCONT)

    # The paused worker resumes, finishes its run and tries to ack it: refused (fencing).
    wait_until(lambda: harness.tally("end", "stale", pid=stale_worker.pid)[1] == 1, 30, "the stale run")
    wait_until(
        lambda: "ack refused, its lease had expired" in harness.stderr_of(stale_worker),
        30,
        "the stale worker's ack to be refused",
    )
    with contextlib.suppress(ProcessLookupError):
        stale_worker.send_signal(signal.SIGTERM)
    assert harness.wait_exit(stale_worker, 30) == 0

    starts = harness.tally("start", "stale")
    info = harness.inspect(job_id)
    print(
        f"\nworker {stale_worker.pid} paused past its lease; worker {fresh.pid} ran the job again: "
        f"runs={starts[1]}, stored result from pid {info['result']}, late ack refused"
    )
    assert starts[1] == 2
    assert (info["state"], info["result"], info["deliveries"]) == ("succeeded", fresh.pid, 2), info
