"""Tasks for the acceptance tests. Each run appends "start <task> <key> <pid>" and
"end <task> <key> <pid>" lines to <OFFLOAD_ACCEPTANCE_RECORDS>/<pid>.log, one os.write per line on an
O_APPEND descriptor: the kernel keeps each line even if the process is SIGKILLed right after.
"""

from __future__ import annotations

import asyncio
import os
import random
import time

from offload import App

app = App()

_fd: int | None = None
_fd_pid: int | None = None


def _record(event: str, task: str, key: int) -> None:
    global _fd, _fd_pid
    pid = os.getpid()
    if _fd is None or _fd_pid != pid:
        directory = os.environ["OFFLOAD_ACCEPTANCE_RECORDS"]
        _fd = os.open(os.path.join(directory, f"{pid}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        _fd_pid = pid
    os.write(_fd, f"{event} {task} {key} {pid}\n".encode())


@app.task(name="quick", timeout=2.0)
def quick(i: int) -> int:
    """1-3 ms of work; a 2 s timeout makes the lease 4 s, so a killed worker's jobs return soon."""
    _record("start", "quick", i)
    time.sleep(random.uniform(0.001, 0.003))
    _record("end", "quick", i)
    return i


@app.task(name="steady", timeout=10.0)
def steady(i: int) -> int:
    """About 50 ms of work."""
    _record("start", "steady", i)
    time.sleep(0.05)
    _record("end", "steady", i)
    return i


@app.task(name="poison", timeout=1.0, max_deliveries=3)
def poison(i: int) -> None:
    """Takes the whole worker process down on every run."""
    _record("start", "poison", i)
    os._exit(1)


@app.task(name="sleepy", timeout=120.0)
async def sleepy(i: int) -> int:
    """Runs far past any grace period."""
    _record("start", "sleepy", i)
    await asyncio.sleep(30)
    _record("end", "sleepy", i)
    return i
