"""The RabbitMQ broker under faults, with the real CLI in subprocesses.

(a) A worker process is SIGKILLed mid-run with 5,000 jobs (on the shared test server, under a
    prefix of its own): no job is lost, and only jobs the killed worker had taken run twice.
(b) A RabbitMQ node of our own (its own node name, ports, data and log directories under
    tmp_path; the shared server is never touched) is SIGKILLed and started again during a burst
    of enqueues and processing: every acknowledged enqueue survives, the producer and the worker
    reconnect by themselves, and every job completes. Just before the SIGKILL, Ra's directory of
    queue members is synced to disk (RabbitMQ 3.10's Ra never syncs it, and a node killed seconds
    after declaring a queue may come back with that queue leaderless for good: see
    RabbitNode.sync_ra_directory); the queues' own logs are left as they are.
(c) A producer dies between writing a job's record and publishing its message: a worker's
    sweeper publishes it, and the job runs once.
(d) A worker's connections (to RabbitMQ and to the Redis state store) are cut (relays in the test
    process stall them both ways, as a network partition does) for longer than its lease: another
    worker runs the job meanwhile, and the cut-off worker's late ack is refused when the links
    heal; it then goes on consuming.
Each needs RabbitMQ and Redis (OFFLOAD_TEST_AMQP_URL, OFFLOAD_TEST_REDIS_URL) and (b) the
rabbitmq-server scripts; they are skipped where those are missing, unless CI=true, where they fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import psutil
import pytest
from acceptance_harness import (
    APP,
    Harness,
    TcpProxy,
    delete_rabbitmq_names,
    free_port,
    late_ack_of_a_cut_off_worker,
    restart_during_a_burst,
    sigkill_a_worker_mid_run,
    through,
    unavailable,
    wait_until,
)

from offload.brokers import base

SHARED_AMQP = os.environ.get("OFFLOAD_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS = os.environ.get("OFFLOAD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
_TESTS = "the RabbitMQ fault tests"


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or default_port), timeout=2):
            return True
    except OSError:
        return False


def _url(amqp: str, prefix: str, **options: str) -> str:
    return f"{amqp}?{urlencode({'state': REDIS, 'prefix': prefix, **options})}"


def _cleanup(amqp: str, prefix: str) -> None:
    """Delete the test's queues and exchanges (named in its state store), then its Redis keys."""
    import redis

    from offload.brokers.rabbitmq import AMQP_NAMES
    from offload.brokers.redis_keys import keyspace

    client = redis.Redis.from_url(REDIS)
    try:
        names = [n.decode() for n in client.smembers(keyspace(f"{prefix}:") + AMQP_NAMES)]  # type: ignore[union-attr]
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
    finally:
        client.close()

    asyncio.run(delete_rabbitmq_names(amqp, prefix, names))


@pytest.fixture
def shared_prefix() -> Iterator[str]:
    """A prefix of its own on the shared RabbitMQ and Redis, deleted afterwards."""
    if not _reachable(SHARED_AMQP, 5672) or not _reachable(REDIS, 6379):
        unavailable(f"RabbitMQ at {SHARED_AMQP} or Redis at {REDIS} is not reachable", _TESTS)
    prefix = f"offload-faults-{uuid.uuid4().hex[:12]}"
    yield prefix
    _cleanup(SHARED_AMQP, prefix)


# -- a RabbitMQ node of our own --------------------------------------------------------------------


def _server_script() -> str | None:
    # The Debian wrapper in /usr/sbin switches to the rabbitmq user, who cannot write to
    # tmp_path; the script it runs starts a node as whoever calls it.
    for candidate in (
        os.environ.get("OFFLOAD_TEST_RABBITMQ_SERVER"),
        "/usr/lib/rabbitmq/bin/rabbitmq-server",
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("rabbitmq-server")


class RabbitNode:
    """rabbitmq-server in the foreground with its own node name, ports and directories."""

    def __init__(self, directory: Path, script: str) -> None:
        self.dir = directory
        self.script = script
        self.port = free_port(5690, 5790)
        dist = free_port(25690, 25790)
        self.node = f"offload-test-{self.port}@localhost"
        self.amqp = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        self.url = ""  # the broker URL, set by the fixture
        (directory / "enabled_plugins").write_text("[].\n")  # no management listener to clash
        (directory / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\nloopback_users = none\n"
        )
        (directory / "rabbitmq-env.conf").write_text("")  # not the system's (it names the shared node)
        self.env = {
            **os.environ,
            "HOME": str(directory),  # the Erlang cookie goes here
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(dist),
            "RABBITMQ_MNESIA_BASE": str(directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(directory / "log"),
            "RABBITMQ_CONFIG_FILE": str(directory / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(directory / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(directory / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(directory / "rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": str(directory / "pid"),
        }
        self.process: subprocess.Popen[bytes] | None = None
        self._log = open(directory / "server.out", "ab")  # noqa: SIM115

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.script],
            env=self.env,
            cwd=self.dir,
            stdout=self._log,
            stderr=self._log,
            start_new_session=True,
        )
        wait_until(self._answers, 90, f"RabbitMQ node {self.node} to accept AMQP connections", interval=0.3)

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(
                f"RabbitMQ node {self.node} exited: {(self.dir / 'server.out').read_text()[-3000:]}"
            )
        return _reachable(self.amqp, self.port)

    def _tree(self) -> list[psutil.Process]:
        assert self.process is not None
        try:
            root = psutil.Process(self.process.pid)
            return [root, *(p for p in root.children(recursive=True) if p.name() != "epmd")]
        except psutil.NoSuchProcess:
            return []

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """rabbitmqctl against this node, with its environment (the Erlang cookie under HOME)."""
        done = subprocess.run(
            [str(Path(self.script).parent / "rabbitmqctl"), "-n", self.node, *args],
            env=self.env,
            cwd=self.dir,
            capture_output=True,
            timeout=timeout,
        )
        out = done.stdout.decode(errors="replace").strip()
        assert done.returncode == 0, f"rabbitmqctl {' '.join(args)}: {out} {done.stderr.decode()[-2000:]}"
        return out

    def sync_ra_directory(self) -> None:
        """Write Ra's directory of quorum queue members (names.dets) to disk now.

        The Ra in RabbitMQ 3.10 (2.2) only inserts a new member's entry (queue -> its data
        directory) into that dets table and never syncs it (dets saves it after 500 ms without
        access to the table). A node SIGKILLed seconds after declaring a queue often comes back
        with the table repaired but without the entry; RabbitMQ then starts the queue as a
        brand-new empty member, which never elects a leader ("leader call - leader not known" for
        good), and the queue's messages stay behind in the old member's directory. Later Ra
        versions sync the table on every change (rabbitmq/ra#443); this does the same.
        """
        script = "#{names := #{directory_rev := Names}} = ra_system:fetch(quorum_queues), dets:sync(Names)."
        out = self.ctl("eval", script)
        assert out == "ok", f"syncing Ra's directory on {self.node}: {out}"

    def crash(self) -> None:
        """SIGKILL the node: no shutdown; only what its quorum queues' logs hold survives.

        Ra's directory of queue members is synced first (see sync_ra_directory): the crash
        tests the queues' logs, not a RabbitMQ 3.10 bug that loses recently declared queues.
        """
        assert self.process is not None
        self.sync_ra_directory()
        for p in self._tree():
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            tree = self._tree()
            for p in tree:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.terminate()
            _, alive = psutil.wait_procs(tree, timeout=30)
            for p in alive:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
            self.process.wait(10)
        self._log.close()


@pytest.fixture
def rabbit_node(tmp_path: Path) -> Iterator[RabbitNode]:
    script = _server_script()
    if script is None:
        unavailable("rabbitmq-server is not installed", _TESTS)
    if not _reachable(REDIS, 6379):
        unavailable(f"Redis at {REDIS} is not reachable", _TESTS)
    assert script is not None
    directory = tmp_path / "rabbitmq"
    directory.mkdir()
    node = RabbitNode(directory, script)
    node.start()
    prefix = f"offload-faults-{uuid.uuid4().hex[:12]}"
    node.url = _url(node.amqp, prefix)
    try:
        yield node
    finally:
        node.stop()
        _cleanup_redis(prefix)


def _cleanup_redis(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
    finally:
        client.close()


# -- the tests ---------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_sigkill_of_a_worker_mid_run_loses_no_job(tmp_path: Path, shared_prefix: str) -> None:
    harness = Harness(tmp_path, _url(SHARED_AMQP, shared_prefix))
    try:
        sigkill_a_worker_mid_run(harness, 5000, "RabbitMQ")
    finally:
        harness.close()


@pytest.mark.timeout(400)
def test_rabbitmq_restart_during_a_burst_loses_no_acknowledged_job(
    tmp_path: Path, rabbit_node: RabbitNode
) -> None:
    harness = Harness(tmp_path, rabbit_node.url)
    try:
        # Sends may be refused for up to 120 s: the node boots (several seconds, more on a loaded
        # machine) before it accepts connections, and its queues elect their leaders after that.
        restart_during_a_burst(harness, rabbit_node.crash, rabbit_node.start, "RabbitMQ", outage=120.0)
    finally:
        harness.close()


_DIE_BETWEEN_WRITES = """
import os, sys
from offload.brokers import rabbitmq_link

async def die(*args, **kwargs):
    os._exit(9)  # after the record write, before the message is published

rabbitmq_link.AmqpLink.publish = die
import acceptance_app
acceptance_app.quick.send(int(sys.argv[1]))
"""


@pytest.mark.timeout(120)
def test_producer_dying_between_record_and_publish_strands_no_job(tmp_path: Path, shared_prefix: str) -> None:
    harness = Harness(tmp_path, _url(SHARED_AMQP, shared_prefix, republish_after="1"))
    try:
        producer = subprocess.run(
            [sys.executable, "-c", _DIE_BETWEEN_WRITES, "7"],
            env=harness.env,
            cwd=tmp_path,
            capture_output=True,
        )
        assert producer.returncode == 9, producer.stderr.decode()
        stats = harness.stats()
        assert (stats["ready"], stats["running"]) == (1, 0), stats  # a record, and no message

        time.sleep(1.2)  # past republish_after: the worker's first fetch sweeps it
        worker = harness.spawn("worker", APP, "--concurrency", "4", "--burst")
        assert harness.wait_exit(worker, 60) == 0
        log = harness.stderr_of(worker)
        assert "its publish was never confirmed; publishing it now" in log, log
        assert harness.tally("start", "quick") == {7: 1}
        stats = harness.stats()
        assert (stats["ready"], stats["delayed"], stats["running"], stats["dead"]) == (0, 0, 0, 0), stats
        print("\nproducer killed between its record write and its publish: the sweeper published the job")
    finally:
        harness.close()


@pytest.mark.timeout(120)
def test_late_ack_of_a_cut_off_worker_is_refused(
    tmp_path: Path, shared_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The lease is sized when the job is enqueued (here, in this process): 2 s for `stale`.
    monkeypatch.setattr(base, "DEFAULT_LEASE", 2.0)
    amqp, state = urlsplit(SHARED_AMQP), urlsplit(REDIS)
    proxies = [TcpProxy(amqp.port or 5672, amqp.hostname or "127.0.0.1")]
    proxies.append(TcpProxy(state.port or 6379, state.hostname or "127.0.0.1"))
    # Both of the cut-off worker's links go through a relay: a partitioned host loses both.
    options = {"state": through(REDIS, proxies[1]), "prefix": shared_prefix}
    stale_url = f"{through(SHARED_AMQP, proxies[0])}?{urlencode(options)}"
    harness = Harness(tmp_path, _url(SHARED_AMQP, shared_prefix))
    try:
        late_ack_of_a_cut_off_worker(harness, proxies, stale_url, "RabbitMQ", 2.0)
    finally:
        harness.close()
        for proxy in proxies:
            proxy.close()
