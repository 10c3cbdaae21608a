"""`kill -USR1 <worker pid>`: what a worker is doing, written to its stderr (as Celery's workers do).

First every thread's stack, written by faulthandler from inside the signal handler, so it comes
even when the event loop is stuck in a blocking call; then, as soon as the loop is free to run,
every asyncio task's stack (where each job, fetch and helper is awaiting). A supervisor passes
the signal on to its worker processes.
"""

from __future__ import annotations

import asyncio
import faulthandler
import os
import signal
import sys
from typing import Any, TextIO

SIGNAL = signal.SIGUSR1
MAX_FRAMES = 30  # per task: deep enough to see through the broker's layers to the awaited call


def install(loop: asyncio.AbstractEventLoop) -> None:
    """Dump stacks to stderr on SIGUSR1 (the loop's own signal handling, then faulthandler's)."""
    loop.add_signal_handler(SIGNAL, dump_tasks)
    # chain: after the thread dump, faulthandler re-raises the signal to the handler above.
    faulthandler.register(SIGNAL, file=sys.stderr, all_threads=True, chain=True)


def dump_tasks(out: TextIO | None = None) -> None:
    """Every task of the running loop, with the chain of coroutines it is suspended in."""
    out = out or sys.stderr
    tasks = sorted(asyncio.all_tasks(), key=lambda t: t.get_name())
    print(f"--- offload worker {os.getpid()}: {len(tasks)} asyncio task(s) (its threads are above)", file=out)
    for task in tasks:
        print(f"Task {task.get_name()!r}:", file=out)
        for line in awaiting(task.get_coro()):
            print(line, file=out)
        # The future the task is suspended on (the chain above ends in an opaque iterator of it).
        waiter = getattr(task, "_fut_waiter", None)
        if waiter is not None:
            print(f"  waiting on {waiter!r}", file=out)
    print("--- end of tasks", file=out, flush=True)


def awaiting(coro: object) -> list[str]:
    """Where a suspended coroutine waits, outermost first: each coroutine it awaits, down to the
    future (or other awaitable) at the bottom. (Task.print_stack shows only the outermost frame.)"""
    lines: list[str] = []
    current: object = coro
    for _ in range(MAX_FRAMES):
        frame = _first(current, "cr_frame", "gi_frame", "ag_frame")
        if frame is None:  # a future, or a coroutine that finished
            if current is not coro:
                lines.append(f"  awaiting {current!r}")
            break
        lines.append(f'  File "{frame.f_code.co_filename}", line {frame.f_lineno}, in {frame.f_code.co_name}')
        current = _first(current, "cr_await", "gi_yieldfrom", "ag_await")
        if current is None:
            break
    return lines


def _first(obj: object, *names: str) -> Any:
    for name in names:
        value = getattr(obj, name, None)
        if value is not None:
            return value
    return None
