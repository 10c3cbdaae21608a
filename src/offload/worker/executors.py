"""Where task code runs: the event loop (async), a thread pool (sync), or child processes.

Process tasks run in a small pool of spawned children, each importing the app by its import
path. A child that passes its task's timeout is killed and replaced: a hard limit, unlike threads,
which Python cannot stop. The child applies the task's retry rules itself and sends back only the
decision, so no exception object ever crosses the pipe (no pickle).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import queue
import signal
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any

import msgspec

from offload.errors import ConfigurationError, TaskTimeout
from offload.message import encode_value
from offload.retry import RetryDecision
from offload.task import Task


class ProcessTaskError(Exception):
    """A process task raised; `decision` is what its retry policy said in the child."""

    def __init__(self, description: str, decision: RetryDecision) -> None:
        super().__init__(description)
        self.decision = decision


@dataclass
class _Child:
    process: BaseProcess
    conn: multiprocessing.connection.Connection
    ready: bool = False  # has imported the app (its start-up is not charged to a task's timeout)


def _child_main(import_path: str, conn: multiprocessing.connection.Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when children stop
    from offload.loader import load_app

    app = load_app(import_path)
    conn.send_bytes(msgspec.json.encode(["ready"]))
    while True:
        try:
            request = conn.recv_bytes()
        except (EOFError, OSError):
            return
        name, args, kwargs, attempt, created_at = msgspec.json.decode(request)
        task = app.get_task(name)
        try:
            args, kwargs = task.convert_arguments(args, kwargs)
            result = encode_value(task.fn(*args, **kwargs))
            reply: list[Any] = ["ok", msgspec.Raw(result)]
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            d = task.config.retry.decide(exc, attempt, time.time() - created_at)
            description = "".join(traceback.format_exception_only(exc)).strip()
            reply = ["err", description, d.retry, d.delay, d.reason]
        conn.send_bytes(msgspec.json.encode(reply))


class ProcessPool:
    def __init__(self, import_path: str | None, size: int) -> None:
        self._import_path = import_path
        self._size = size
        self._idle: asyncio.Queue[_Child] | None = None
        self._children: list[_Child] = []
        self._context = multiprocessing.get_context("spawn")

    def _spawn(self) -> _Child:
        assert self._import_path is not None
        parent, child = self._context.Pipe()
        process = self._context.Process(
            target=_child_main,
            args=(self._import_path, child),
            daemon=True,
            name="offload-process-task",
        )
        process.start()
        child.close()
        spawned = _Child(process, parent)
        self._children.append(spawned)
        return spawned

    async def run(
        self,
        task: Task[Any, Any],
        args: Any,
        kwargs: Any,
        attempt: int,
        created_at: float,
        timeout: float | None,
    ) -> bytes:
        if self._import_path is None:
            raise ConfigurationError(
                f"task {task.name!r} uses executor='process', which needs the app's import path: "
                "start the worker as `offload worker module:app`"
            )
        if self._idle is None:
            self._idle = asyncio.Queue()
            for _ in range(self._size):
                self._idle.put_nowait(await asyncio.to_thread(self._spawn))
        child = await self._idle.get()
        try:
            if not child.ready:
                await self._receive(child)  # its ["ready"]: wait for the import, outside the timeout
                child.ready = True
            child.conn.send_bytes(msgspec.json.encode([task.name, args, kwargs, attempt, created_at]))
            reply = await asyncio.wait_for(self._receive(child), timeout)
        except BaseException:
            # Timeout, cancellation or a dead child: the child's state is unknown, replace it.
            self._kill(child)
            self._idle.put_nowait(await asyncio.to_thread(self._spawn))
            raise
        self._idle.put_nowait(child)
        if reply[0] == "ok":
            return msgspec.json.encode(reply[1])
        _, description, retry, delay, reason = reply
        raise ProcessTaskError(description, RetryDecision(retry, delay, reason))

    async def _receive(self, child: _Child) -> list[Any]:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        fd = child.conn.fileno()

        def readable() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(fd, readable)
        try:
            await ready
        finally:
            loop.remove_reader(fd)
        try:
            data = child.conn.recv_bytes()
        except (EOFError, OSError):
            raise ProcessTaskError(
                f"the task's child process died (exit code {child.process.exitcode})",
                RetryDecision(True, 0.0),
            ) from None
        reply: list[Any] = msgspec.json.decode(data)
        return reply

    def _kill(self, child: _Child) -> None:
        with contextlib.suppress(Exception):
            child.process.kill()
            child.process.join(5)
        with contextlib.suppress(Exception):
            child.conn.close()
        if child in self._children:
            self._children.remove(child)

    def close(self) -> None:
        for child in list(self._children):
            self._kill(child)


class ThreadRunner:
    """A fixed set of threads for sync tasks that wakes the event loop once per burst of results.

    `run_in_executor` costs a self-pipe write and a loop wake-up for every job; here finished
    jobs are queued and one scheduled callback hands all of them back, which matters when jobs
    are short.
    """

    def __init__(self, size: int, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._size = size
        self._work: queue.SimpleQueue[tuple[Callable[[], Any], asyncio.Future[Any]] | None] = (
            queue.SimpleQueue()
        )
        self._done: deque[tuple[asyncio.Future[Any], bool, Any]] = deque()
        self._lock = threading.Lock()
        self._wake_pending = False
        self._threads: list[threading.Thread] = []

    def run(self, fn: Callable[[], Any]) -> asyncio.Future[Any]:
        if not self._threads:
            for n in range(self._size):
                thread = threading.Thread(target=self._serve, name=f"offload-task-{n}", daemon=True)
                thread.start()
                self._threads.append(thread)
        future: asyncio.Future[Any] = self._loop.create_future()
        self._work.put((fn, future))
        return future

    def _serve(self) -> None:
        while (item := self._work.get()) is not None:
            fn, future = item
            try:
                outcome: tuple[asyncio.Future[Any], bool, Any] = (future, True, fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting job
                outcome = (future, False, exc)
            with self._lock:
                self._done.append(outcome)
                if self._wake_pending:
                    continue
                self._wake_pending = True
            try:
                self._loop.call_soon_threadsafe(self._hand_back)
            except RuntimeError:  # the loop closed while this job ran
                return

    def _hand_back(self) -> None:
        with self._lock:
            done = list(self._done)
            self._done.clear()
            self._wake_pending = False
        for future, ok, value in done:
            if future.cancelled():
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    def close(self) -> None:
        for _ in self._threads:
            self._work.put(None)


class _Deadline:
    """Cancels the current task when its timeout passes: one timer, cheaper than asyncio.timeout."""

    __slots__ = ("_handle", "_task", "expired")

    def __init__(self, timeout: float | None) -> None:
        self.expired = False
        self._handle: asyncio.TimerHandle | None = None
        task = asyncio.current_task()
        if timeout is not None and task is not None:
            loop = asyncio.get_running_loop()
            self._task = task
            self._handle = loop.call_at(loop.time() + timeout, self._expire)

    def _expire(self) -> None:
        self.expired = True
        self._task.cancel()

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()

    def timed_out(self) -> bool:
        """After a CancelledError: was it this deadline (and nothing else) that cancelled us?"""
        return self.expired and self._task.uncancel() == 0


class Executors:
    """Runs one task invocation with its timeout, wherever its executor says."""

    def __init__(self, threads: int, processes: int, import_path: str | None) -> None:
        self.threads = ThreadRunner(threads, asyncio.get_running_loop())
        self.processes = ProcessPool(import_path, processes)

    async def run(
        self,
        task: Task[Any, Any],
        args: list[Any],
        kwargs: dict[str, Any],
        timeout: float | None,
        attempt: int,
        created_at: float,
    ) -> bytes:
        executor = task.config.executor
        if executor == "process":
            try:
                # The pool times only the run itself (not a new child's start-up), and kills
                # the child when the wait ends early: a hard limit.
                return await self.processes.run(task, args, kwargs, attempt, created_at, timeout)
            except TimeoutError:
                raise TaskTimeout(
                    f"task {task.name!r} ran past its {timeout}s timeout; its process was killed"
                ) from None
        deadline = _Deadline(timeout)
        try:
            converted_args, converted_kwargs = task.convert_arguments(args, kwargs)
            if executor == "async":
                result = await task.fn(*converted_args, **converted_kwargs)
            else:
                # A thread cannot be stopped: past the timeout the job is failed (and may be
                # retried) while the thread finishes in the background.
                result = await self.threads.run(lambda: task.fn(*converted_args, **converted_kwargs))
        except asyncio.CancelledError:
            if deadline.timed_out():
                raise TaskTimeout(f"task {task.name!r} ran past its {timeout}s timeout") from None
            raise
        finally:
            deadline.cancel()
        return encode_value(result)

    def close(self) -> None:
        self.threads.close()
        self.processes.close()
