"""The acceptance harness: the real `offload` CLI in subprocesses, against an SQLite store in tmp_path.

Tasks (tests/acceptance/apps/acceptance_app.py) append "start|end <task> <key> <pid>" lines to one
file per process, so what ran survives even a SIGKILL of the process that ran it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil

APPS = Path(__file__).resolve().parent / "apps"
TESTS = Path(__file__).resolve().parents[1]  # for the contract suite's store helpers
for _path in (APPS, TESTS):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from contract.rabbitmq_store import delete_rabbitmq_names  # noqa: E402, F401 - for the fault tests
from offload import App, BrokerError  # noqa: E402

APP = "acceptance_app:app"
_SCRIPT = Path(sys.executable).parent / "offload"
OFFLOAD = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "offload"]


@dataclass(frozen=True)
class Record:
    event: str  # "start" or "end"
    task: str
    key: int
    pid: int


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class ServerProcess:
    """A server a fault test runs itself on a spare loopback port, logging to `log`; by pid only.

    Subclasses set `process` in their `start()`.
    """

    def __init__(self, log: Path) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self._log = open(log, "ab")  # noqa: SIM115 - open for the server's whole life

    def crash(self) -> None:
        """SIGKILL: no shutdown; only what the server had already written to disk survives."""
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


class Harness:
    def __init__(self, tmp_path: Path, url: str | None = None) -> None:
        """`url`: the broker (default: an SQLite file in tmp_path)."""
        self.tmp_path = tmp_path
        self.db = tmp_path / "offload.db"
        self.url = url or f"sqlite:///{self.db}"  # an absolute path: sqlite:////tmp/...
        self.records_dir = tmp_path / "records"
        self.records_dir.mkdir()
        self.logs_dir = tmp_path / "logs"
        self.logs_dir.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("OFFLOAD_")}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(APPS), env.get("PYTHONPATH")) if p)
        env["OFFLOAD_BROKER_URL"] = self.url
        env["OFFLOAD_ACCEPTANCE_RECORDS"] = str(self.records_dir)
        self.env = env
        self._processes: list[subprocess.Popen[bytes]] = []
        self._files: list[Any] = []
        self._stderr: dict[int, Path] = {}
        self._count = 0

    # -- processes ---------------------------------------------------------------------------

    def spawn(self, *args: str, url: str | None = None) -> subprocess.Popen[bytes]:
        """Start `offload ARGS...` in the background; its output goes to files under logs/.

        `url`: another broker URL for this process only (e.g. the same server through a proxy).
        """
        self._count += 1
        out = open(self.logs_dir / f"{self._count}-{args[0]}.out", "wb")  # noqa: SIM115
        err = open(self.logs_dir / f"{self._count}-{args[0]}.err", "wb")  # noqa: SIM115
        self._files += [out, err]
        env = self.env if url is None else {**self.env, "OFFLOAD_BROKER_URL": url}
        process = subprocess.Popen([*OFFLOAD, *args], env=env, stdout=out, stderr=err, cwd=self.tmp_path)
        self._stderr[process.pid] = Path(err.name)
        self._processes.append(process)
        return process

    def run(self, *args: str, timeout: float = 60.0) -> Result:
        """Run `offload ARGS...` to completion (killed, and the test failed, past `timeout`)."""
        process = subprocess.Popen(
            [*OFFLOAD, *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=self.tmp_path,
        )
        self._processes.append(process)
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill_tree(process)
            raise AssertionError(f"`offload {' '.join(args)}` did not finish within {timeout}s") from None
        return Result(process.returncode, out.decode(), err.decode())

    def wait_exit(self, process: subprocess.Popen[bytes], timeout: float) -> int:
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # What is it doing? A worker (a supervisor passes it on) dumps its threads' and asyncio
            # tasks' stacks on SIGUSR1 (offload.worker.stackdump).
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGUSR1)
            time.sleep(3)
            tail = self.stderr_of(process)[-30000:]
            raise AssertionError(
                f"pid {process.pid} still running after {timeout:.0f}s; stderr (with a stack dump):\n{tail}"
            ) from None

    def stderr_of(self, process: subprocess.Popen[bytes]) -> str:
        """What a spawned process (and its children) wrote to stderr so far."""
        return self._stderr[process.pid].read_text(errors="replace")

    def _kill_tree(self, process: subprocess.Popen[bytes]) -> None:
        if process.poll() is not None:
            return
        try:
            children = psutil.Process(process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGKILL)
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)

    def dump_running(self) -> str:
        """Each spawned process still running, asked for its stacks (SIGUSR1: workers dump them,
        a supervisor passes it on), with the end of its stderr."""
        running = [p for p in self._processes if p.poll() is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGUSR1)
        if running:
            time.sleep(3)  # a supervisor passes it on to one worker a second
        return "\n".join(
            f"--- pid {p.pid} ({' '.join(map(str, p.args[1:3]))}) still running; stderr:\n"
            f"{self.stderr_of(p)[-20000:]}"
            for p in running
        )

    def close(self) -> None:
        for process in self._processes:
            self._kill_tree(process)
        for f in self._files:
            f.close()

    # -- the store, through the public API and the CLI ------------------------------------------

    def send(self, task: Any, keys: Iterable[int]) -> list[str]:
        """Enqueue task(key) for every key from this process; returns the job ids in key order."""
        sender = App(self.url)
        try:
            jobs = sender.send_many([task.message(k) for k in keys])
        finally:
            sender.close()
        return [job.id for job in jobs]

    def jobs(self, ids: list[str]) -> list[Any]:
        reader = App(self.url)
        try:
            return reader.run_sync(lambda b: asyncio.gather(*(b.get_job(i) for i in ids)))
        finally:
            reader.close()

    def stats(self, queue: str = "default") -> dict[str, Any]:
        result = self.run("queues", "--json")
        assert result.code == 0, result.err
        for row in json.loads(result.out):
            if row["queue"] == queue:
                return dict(row)
        return {"queue": queue, "ready": 0, "delayed": 0, "running": 0, "dead": 0}

    def inspect(self, job_id: str) -> dict[str, Any]:
        result = self.run("inspect", job_id)
        assert result.code == 0, result.err
        return dict(json.loads(result.out))

    # -- what the tasks recorded -------------------------------------------------------------

    def records(self, strict: bool = True) -> list[Record]:
        out = []
        for path in sorted(self.records_dir.glob("*.log")):
            for line in path.read_text().splitlines():
                parts = line.split()
                if len(parts) != 4 or parts[0] not in ("start", "end"):
                    if strict:
                        raise AssertionError(f"malformed record {line!r} in {path.name}")
                    continue  # a line being written while we read
                out.append(Record(parts[0], parts[1], int(parts[2]), int(parts[3])))
        return out

    def count(self, event: str, task: str) -> int:
        return sum(1 for r in self.records(strict=False) if r.event == event and r.task == task)

    def tally(self, event: str, task: str, pid: int | None = None) -> Counter[int]:
        return Counter(
            r.key
            for r in self.records()
            if r.event == event and r.task == task and (pid is None or r.pid == pid)
        )


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


def sigkill_a_worker_mid_run(harness: Harness, n: int, broker: str) -> None:
    """The shared SIGKILL scenario: `n` quick jobs, 2 supervised workers, one child SIGKILLed.

    Then: nothing lost, every job cut off by the kill ran again, and every duplicate is a job the
    killed worker had taken (also one that ended there but whose ack had not reached the store).
    """
    import acceptance_app  # the apps folder is on sys.path (above)

    ids = harness.send(acceptance_app.quick, range(n))
    supervisor = harness.spawn("worker", APP, "--processes", "2", "--concurrency", "16", "--burst")

    wait_until(lambda: harness.count("end", "quick") >= 300, 120, "300 jobs to complete")
    children = wait_until(
        lambda: [c.pid for c in psutil.Process(supervisor.pid).children() if c.is_running()],
        30,
        "the supervisor's worker processes",
    )
    running = {r.pid for r in harness.records(strict=False)}
    victim = next((pid for pid in children if pid in running), children[0])
    os.kill(victim, signal.SIGKILL)
    completed_at_kill = harness.count("end", "quick")
    assert completed_at_kill < n, "every job finished before the kill: the test proved nothing"

    assert harness.wait_exit(supervisor, 150) == 0
    log = harness.stderr_of(supervisor)
    assert f"(pid {victim}) died (signal SIGKILL); restarting" in log, log

    starts = harness.tally("start", "quick")
    ends = harness.tally("end", "quick")
    victim_starts = harness.tally("start", "quick", pid=victim)
    victim_ends = harness.tally("end", "quick", pid=victim)
    cut_off = set(victim_starts) - set(victim_ends)  # running in the victim when it was killed
    lost = [k for k in range(n) if ends[k] == 0]
    duplicated = {k for k, c in starts.items() if c > 1}
    print(
        f"\nSIGKILL of pid {victim} after {completed_at_kill} of {n} jobs ({broker}): lost={len(lost)} "
        f"duplicated={len(duplicated)} (cut off mid-run={len(cut_off)}, ended but not yet "
        f"acknowledged={len(duplicated - cut_off)})"
    )
    assert lost == []
    assert set(starts) == set(range(n))
    assert cut_off <= duplicated, "a job cut off by the kill was not run again"
    assert duplicated <= set(victim_starts), "a job ran twice that the killed worker never had"
    assert max(starts.values()) <= 2
    assert all(victim_starts[k] == 1 for k in duplicated)
    stats = harness.stats()
    assert (stats["ready"], stats["delayed"], stats["running"], stats["dead"]) == (0, 0, 0, 0), stats
    infos = harness.jobs(ids)
    assert [i.state.value for i in infos] == ["succeeded"] * n
    for key, info in enumerate(infos):
        assert starts[key] <= info.deliveries, f"job {key} ran more often than it was delivered"


# -- shared pieces of the broker fault tests ------------------------------------------------------


FAULT_APP = "redis_fault_app:app"  # the acceptance app plus `stale` (about 1 s, returns its pid)


def unavailable(message: str, tests: str) -> None:
    """Skip a test whose server or tool is missing; fail it instead where CI=true requires it."""
    import pytest

    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message}; CI=true requires it for {tests}", pytrace=False)
    pytest.skip(message)


def free_port(start: int, stop: int) -> int:
    """A loopback port in [start, stop) that nothing listens on now."""
    for port in range(start, stop):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {start}-{stop - 1} for a test server")


class TcpProxy:
    """A TCP relay in the test process, from a spare loopback port to a server's port.

    `stall()` cuts every link through it, both ways, as a network partition does: the bytes sent
    meanwhile are held (in the kernel's buffers and the relay's), nothing is closed, and new
    connections get no further than the relay. `resume()` heals it: TCP delivers the held bytes
    late, as it does when a partition ends before the connection times out. Threads, so it keeps
    relaying while the test sleeps or waits on subprocesses.
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        self.links = 0  # connections accepted so far
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, name=f"proxy-{self.port}", daemon=True).start()

    def stall(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sockets, self._sockets = [self._server, *self._sockets], []
        self._flowing.set()
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept or recv
            s.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()  # the server is down: so is the link
                continue
            with self._lock:
                if self._closed:
                    client.close()
                    upstream.close()
                    return
                self._sockets += [client, upstream]
                self.links += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                self._flowing.wait()
                data = src.recv(65536)
                if not data:
                    break
                self._flowing.wait()  # received just as the stall began: held until it ends
                if self._closed:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):  # one side ended the connection: end it on the other side too
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def through(url: str, proxy: TcpProxy) -> str:
    """`url` with its host and port replaced by the proxy's (user, path and query kept)."""
    parts = urlsplit(url)
    user = parts.netloc.rpartition("@")[0]
    return parts._replace(
        netloc=f"{user}@127.0.0.1:{proxy.port}" if user else f"127.0.0.1:{proxy.port}"
    ).geturl()


def send_until_accepted(
    sender: App, messages: list[Any], broker: str, within: float = 60.0
) -> tuple[list[str], int]:
    """Send one batch, re-sending the same messages (same ids) while the broker refuses it."""
    failures = 0
    deadline = time.monotonic() + within
    while True:
        try:
            jobs = sender.send_many(messages)
        except BrokerError:
            failures += 1
            assert time.monotonic() < deadline, f"{broker} did not come back within {within:.0f}s"
            time.sleep(0.2)
            continue
        return [job.id for job in jobs], failures


def restart_during_a_burst(
    harness: Harness,
    crash: Callable[[], None],
    start: Callable[[], None],
    broker: str,
    n: int = 4000,
    batch: int = 100,
    outage: float = 60.0,
    outage_logs: tuple[str, ...] = ("fetching failed; retrying in 1s",),
) -> None:
    """The shared server-restart scenario: a worker processes while a producer sends `n` jobs in
    batches; at 2/5 of them the server is `crash`ed and `start`ed again 1.5 s later.

    Then: every enqueue acknowledged before the crash is still there, the producer re-sent its
    refused batch by itself (same job ids), the worker rode out the outage without a restart and
    completed every job (its log shows it met the outage: one of `outage_logs`), and no job was
    lost. `outage`: how long a batch may go on being refused (the server's boot included).
    """
    import acceptance_app

    worker = harness.spawn("worker", APP, "--concurrency", "16")
    sender = App(harness.url)
    ids: list[str] = []
    failed_sends = 0
    longest_send = 0.0
    restarter: threading.Thread | None = None
    acknowledged_before_crash: list[str] = []
    try:
        for first in range(0, n, batch):
            if first == 2 * n // 5:
                wait_until(lambda: harness.count("end", "quick") >= 200, 60, "200 jobs to complete")
                acknowledged_before_crash = list(ids)
                crash()
                # Back after 1.5 s, while the producer keeps sending and the worker keeps fetching.
                restarter = threading.Thread(target=lambda: (time.sleep(1.5), start()))
                restarter.start()
            messages = [acceptance_app.quick.message(k) for k in range(first, first + batch)]
            began = time.monotonic()
            sent, failures = send_until_accepted(sender, messages, broker, outage)
            longest_send = max(longest_send, time.monotonic() - began)
            assert sent == [m.id for m in messages]
            ids += sent
            failed_sends += failures
    finally:
        if restarter is not None:
            restarter.join()
        sender.close()
    assert longest_send >= 1.0 or failed_sends > 0, "no enqueue met the outage: the test proved nothing"
    infos = harness.jobs(acknowledged_before_crash)
    assert all(info is not None for info in infos), "an enqueue acknowledged before the crash is gone"

    wait_until(lambda: len(harness.tally("end", "quick")) == n, 150, "every job to complete")
    wait_until(
        lambda: all(i is not None and i.state.value == "succeeded" for i in harness.jobs(ids)),
        60,
        "every job to be acked",
    )
    assert worker.poll() is None, f"the worker exited: {harness.stderr_of(worker)[-3000:]}"
    worker.send_signal(signal.SIGTERM)
    assert harness.wait_exit(worker, 30) == 0
    log = harness.stderr_of(worker)
    assert any(line in log for line in outage_logs), "the worker never saw the outage"

    starts = harness.tally("start", "quick")
    ends = harness.tally("end", "quick")
    lost = [k for k in range(n) if ends[k] == 0]
    duplicated = sorted(k for k, c in starts.items() if c > 1)
    print(
        f"\n{broker} server killed and restarted after {len(acknowledged_before_crash)} of {n} enqueues; "
        f"longest send {longest_send:.1f}s, {failed_sends} send attempt(s) refused: lost={len(lost)} "
        f"duplicated={len(duplicated)} (leased or unacked when the server died, run again)"
    )
    assert lost == []
    assert set(starts) == set(range(n))
    stats = harness.stats()
    assert (stats["ready"], stats["delayed"], stats["running"], stats["dead"]) == (0, 0, 0, 0), stats


def late_ack_of_a_cut_off_worker(
    harness: Harness, proxies: list[TcpProxy], stale_url: str, broker: str, lease: float
) -> None:
    """The shared cut-connection scenario: a worker that reaches the broker only through `proxies`
    takes a job (`stale`, about 1 s; the caller made its lease `lease` seconds), and the proxies
    stall every link of that worker at once, before it can ack or renew the lease.

    Then: a second worker, connected directly, takes the job once the lease has expired, runs it
    and acks it, all while the first one is still cut off; when the links heal, the first
    worker's late ack (and lease renewal) reaches the broker and is refused; and it did not stop
    consuming: with the second worker gone, a new job runs on it.
    """
    import redis_fault_app

    [job_id] = harness.send(redis_fault_app.stale, [1])
    stale_worker = harness.spawn("worker", FAULT_APP, "--concurrency", "1", url=stale_url)
    wait_until(lambda: harness.count("start", "stale") == 1, 60, "the job to start")
    for proxy in proxies:
        proxy.stall()
    cut_at = time.monotonic()
    try:
        [first] = harness.records(strict=False)
        assert first.pid == stale_worker.pid
        fresh = harness.spawn("worker", FAULT_APP, "--concurrency", "1", "--burst")

        def ran_elsewhere() -> bool:
            [info] = harness.jobs([job_id])
            return info is not None and info.state.value == "succeeded"

        wait_until(ran_elsewhere, 90, "the job to run on the other worker while the first is cut off")
        cut_for = time.monotonic() - cut_at
    finally:
        for proxy in proxies:
            proxy.resume()
    assert cut_for > lease, f"the links were cut for {cut_for:.1f}s only, not past the {lease}s lease"
    assert all(proxy.links for proxy in proxies), "the cut-off worker did not connect through every relay"
    assert harness.wait_exit(fresh, 60) == 0
    assert harness.tally("start", "stale", pid=fresh.pid)[1] == 1

    # Healed: the cut-off worker finishes its run and its ack arrives late: refused (fencing).
    wait_until(lambda: harness.tally("end", "stale", pid=stale_worker.pid)[1] == 1, 30, "the stale run")
    wait_until(
        lambda: f"job {job_id}: ack refused, its lease had expired" in harness.stderr_of(stale_worker),
        60,
        "the cut-off worker's late ack to be refused",
    )
    # Still consuming: with the other worker gone, a new job must run on the one that was cut off.
    [second_id] = harness.send(redis_fault_app.stale, [2])
    wait_until(lambda: harness.tally("end", "stale", pid=stale_worker.pid)[2] == 1, 60, "a job after the cut")
    wait_until(
        lambda: harness.jobs([second_id])[0].state.value == "succeeded",
        30,
        "the job after the cut to be acked",
    )
    stale_worker.send_signal(signal.SIGTERM)
    assert harness.wait_exit(stale_worker, 30) == 0

    starts = harness.tally("start", "stale")
    info = harness.inspect(job_id)
    print(
        f"\n{broker}: worker {stale_worker.pid} cut off for {cut_for:.1f}s (lease {lease}s); worker "
        f"{fresh.pid} ran the job again: runs={starts[1]}, stored result from pid {info['result']}, "
        "late ack refused, the cut-off worker ran the next job"
    )
    assert (starts[1], starts[2]) == (2, 1)
    assert (info["state"], info["result"], info["deliveries"]) == ("succeeded", fresh.pid, 2), info
    assert harness.inspect(second_id)["result"] == stale_worker.pid
