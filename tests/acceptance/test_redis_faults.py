"""The Redis broker under faults: its own redis-server (AOF, appendfsync always) on a spare port.

(a) Redis is SIGKILLed and restarted during a burst of enqueues and processing: every acknowledged
    enqueue survives, the worker reconnects by itself and completes every job.
(b) A worker process is SIGKILLed mid-run: no job is lost.
(c) A worker's connections are cut (a relay in the test process stalls them both ways, as a network
    partition does) for longer than its lease: another worker runs the job meanwhile, and the
    cut-off worker's late ack is refused when the links heal, so the stored outcome is the newer
    run's; it then goes on consuming.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

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
    unavailable,
    wait_until,
)

from offload.brokers import base


class RedisServer(ServerProcess):
    """A redis-server of our own: AOF with fsync on every write, stopped by pid at the end."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory / "redis.log")
        self.dir = directory
        self.port = free_port(6390, 6500)
        self.url = f"redis://127.0.0.1:{self.port}/0?prefix=faults:"

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


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        unavailable("redis-server is not installed", "the Redis fault tests")
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


@pytest.mark.timeout(240)
def test_redis_restart_during_a_burst_loses_no_acknowledged_job(
    harness: Harness, redis_server: RedisServer
) -> None:
    restart_during_a_burst(harness, redis_server.crash, redis_server.start, "Redis")


@pytest.mark.timeout(180)
def test_sigkill_of_a_worker_mid_run_loses_no_job(harness: Harness) -> None:
    sigkill_a_worker_mid_run(harness, 3000, "Redis")


@pytest.mark.timeout(120)
def test_late_ack_of_a_cut_off_worker_is_refused(
    harness: Harness, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The lease is sized when the job is enqueued (here, in this process): 2 s for `stale`.
    monkeypatch.setattr(base, "DEFAULT_LEASE", 2.0)
    proxy = TcpProxy(redis_server.port)
    try:
        # The same server and prefix, through the relay: every connection the cut-off worker
        # opens goes through it.
        late_ack_of_a_cut_off_worker(harness, [proxy], through(redis_server.url, proxy), "Redis", 2.0)
    finally:
        proxy.close()
