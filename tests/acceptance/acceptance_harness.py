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
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

APPS = Path(__file__).resolve().parent / "apps"
if str(APPS) not in sys.path:
    sys.path.insert(0, str(APPS))

from offload import App  # noqa: E402

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

    def spawn(self, *args: str) -> subprocess.Popen[bytes]:
        """Start `offload ARGS...` in the background; its output goes to files under logs/."""
        self._count += 1
        out = open(self.logs_dir / f"{self._count}-{args[0]}.out", "wb")  # noqa: SIM115
        err = open(self.logs_dir / f"{self._count}-{args[0]}.err", "wb")  # noqa: SIM115
        self._files += [out, err]
        process = subprocess.Popen([*OFFLOAD, *args], env=self.env, stdout=out, stderr=err, cwd=self.tmp_path)
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
            tail = self.stderr_of(process)[-4000:]
            raise AssertionError(
                f"pid {process.pid} still running after {timeout:.0f}s; stderr:\n{tail}"
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
