"""Worker processes: start them, watch their memory, and always stop them (by pid)."""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

from bench.jobs import RECORD_BYTES

STOP_GRACE = 15.0  # seconds a worker gets to exit after SIGTERM before SIGKILL

_live: set[Workers] = set()  # stopped at exit too, whatever happened


@atexit.register
def _stop_all() -> None:
    for workers in list(_live):
        workers.stop()


class Workers:
    """Worker processes (each maybe with children) started for one measurement.

    A context manager: leaving it stops every process, by pid.
    """

    def __init__(self, commands: Sequence[Sequence[str]], env: dict[str, str], log_dir: Path) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        self.peak_rss: dict[int, int] = {}  # pid -> bytes
        self._sampling = threading.Event()
        self._sampler: threading.Thread | None = None
        log_dir.mkdir(parents=True, exist_ok=True)
        _live.add(self)
        try:
            self._spawn(commands, env, log_dir)
        except BaseException:
            self.stop()
            raise

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, commands: Sequence[Sequence[str]], env: dict[str, str], log_dir: Path) -> None:
        for i, command in enumerate(commands):
            log = log_dir / f"worker-{i}.log"
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    list(command),
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self.procs.append(proc)
            self.logs.append(log)

    def tree(self) -> list[psutil.Process]:
        """Every live process started here, children included."""
        out: list[psutil.Process] = []
        for proc in self.procs:
            try:
                root = psutil.Process(proc.pid)
                out.append(root)
                out.extend(root.children(recursive=True))
            except psutil.Error:
                continue
        return out

    def cpu_seconds(self) -> float:
        """User + system CPU time used so far by every live process started here."""
        total = 0.0
        for process in self.tree():
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue
            total += times.user + times.system
        return total

    def check_alive(self) -> None:
        for proc, log in zip(self.procs, self.logs, strict=True):
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"worker {proc.args} exited with {proc.returncode}:\n{tail}")

    # -- memory ----------------------------------------------------------------------------

    def start_sampling(self, every: float = 0.1) -> None:
        self._sampler = threading.Thread(target=self._sample, args=(every,), daemon=True)
        self._sampler.start()

    def stop_sampling(self) -> None:
        self._sampling.set()
        if self._sampler is not None:
            self._sampler.join(timeout=5)

    def _sample(self, every: float) -> None:
        while not self._sampling.is_set():
            for process in self.tree():
                try:
                    rss = process.memory_info().rss
                except psutil.Error:
                    continue
                if rss > self.peak_rss.get(process.pid, 0):
                    self.peak_rss[process.pid] = rss
            self._sampling.wait(every)

    # -- stopping ----------------------------------------------------------------------------

    def stop(self) -> None:
        """SIGTERM each started process, wait, then SIGKILL whatever of its tree is left."""
        self.stop_sampling()
        tree = self.tree()
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for process in tree:
            with contextlib.suppress(psutil.Error):
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    process.kill()
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        _live.discard(self)


# -- job records (written by bench.jobs inside the workers) ------------------------------------


def count_records(directory: Path) -> int:
    total = 0
    for entry in os.scandir(directory):
        if entry.name.endswith(".rec"):
            with contextlib.suppress(FileNotFoundError):
                total += entry.stat().st_size
    return total // RECORD_BYTES


def read_records(directory: Path) -> list[tuple[float, float, float]]:
    """(enqueued, started, finished) of every job recorded in `directory`."""
    records = []
    for path in sorted(directory.glob("*.rec")):
        for line in path.read_text().splitlines():
            enqueued, started, finished = line.split()
            records.append((float(enqueued), float(started), float(finished)))
    return records


def wait_for_records(directory: Path, count: int, timeout: float, workers: Workers) -> float:
    """Poll until `count` jobs are recorded; returns when (time.time()). Raises on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if count_records(directory) >= count:
            return time.time()
        workers.check_alive()
        time.sleep(0.02)
    raise TimeoutError(f"only {count_records(directory)} of {count} jobs done after {timeout:.0f}s")
