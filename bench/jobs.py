"""The job body every system runs, and the record it leaves behind.

Each job appends one fixed-width line "enqueued started finished" (epoch seconds) to a file of
its own process under BENCH_RECORD_DIR. The runner counts jobs done from the files' sizes and
reads the timestamps afterwards (with BENCH_RECORD_BY_PARENT, for rq's forked work horses, the file
is their parent's), so completion is detected the same way for every system and the
measurement costs each job one small unbuffered write (atomic with O_APPEND).
"""

from __future__ import annotations

import os
import threading
import time

RECORD_BYTES = 54  # "%17.6f %17.6f %17.6f\n"
CPU_SECONDS = 0.001

_lock = threading.Lock()
_fd: tuple[int, int] | None = None  # (pid, fd): re-opened after a fork


def _record_fd() -> int | None:
    global _fd
    pid = os.getpid()
    if _fd is not None and _fd[0] == pid:
        return _fd[1]
    directory = os.environ.get("BENCH_RECORD_DIR")
    if not directory:
        return None
    with _lock:
        if _fd is None or _fd[0] != pid:
            # rq forks a process per job: its records go to one file per worker (the parent)
            owner = os.getppid() if os.environ.get("BENCH_RECORD_BY_PARENT") else pid
            path = os.path.join(directory, f"{owner}.rec")
            _fd = (pid, os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
        return _fd[1]


def run(kind: str, enqueued: float) -> None:
    """Run one benchmark job: "noop" does nothing, "cpu" spins for about 1 ms."""
    started = time.time()
    if kind == "cpu":
        until = time.perf_counter() + CPU_SECONDS
        while time.perf_counter() < until:
            pass
    finished = time.time()
    fd = _record_fd()
    if fd is not None:
        os.write(fd, b"%17.6f %17.6f %17.6f\n" % (enqueued, started, finished))
