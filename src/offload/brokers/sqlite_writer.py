"""Group commit: one thread owns the write connection and runs queued operations in batches.

Every write (enqueue, fetch, settle, ...) is a function of the connection. Callers put it on a
queue and await its future; the thread takes everything waiting, runs it in one `BEGIN IMMEDIATE`
transaction (a savepoint per operation, so one failing operation undoes only itself), commits
once, and then answers every caller. With `synchronous=FULL` that is one fsync for the whole
batch: durability without a commit per job.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from offload.errors import BrokerError

T = TypeVar("T")
Operation = Callable[[sqlite3.Connection], Any]

MAX_BATCH = 256


class _Stop:
    pass


class GroupCommitWriter:
    def __init__(
        self,
        conn: sqlite3.Connection,
        after_commit: Callable[[bool], None],
        name: str = "offload-sqlite-writer",
    ) -> None:
        self._conn = conn
        self._after_commit = after_commit  # called with "did this batch make jobs ready?"
        self._queue: queue.SimpleQueue[tuple[Operation, Future[Any], bool] | _Stop] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, op: Operation, wakes: bool = False) -> Future[Any]:
        """Queue `op`; `wakes` marks operations that make jobs ready (producers notify workers)."""
        future: Future[Any] = Future()
        self._queue.put((op, future, wakes))
        return future

    async def run(self, op: Callable[[sqlite3.Connection], T], wakes: bool = False) -> T:
        result: T = await asyncio.wrap_future(self.submit(op, wakes))
        return result

    def close(self) -> None:
        self._queue.put(_Stop())
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if isinstance(first, _Stop):
                break
            batch = [first]
            stop = False
            while len(batch) < MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, _Stop):
                    stop = True
                    break
                batch.append(item)
            self._run_batch(batch)
            if stop:
                break
        self._conn.close()

    def _run_batch(self, batch: list[tuple[Operation, Future[Any], bool]]) -> None:
        # Skip operations whose caller gave up (cancelled) before they started; the others can no
        # longer be cancelled, so answering them below cannot fail and kill this thread.
        batch = [entry for entry in batch if entry[1].set_running_or_notify_cancel()]
        if not batch:
            return
        conn = self._conn
        outcomes: list[tuple[bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            error = BrokerError(f"SQLite broker cannot start a write transaction: {exc}")
            for _, future, _ in batch:
                future.set_exception(error)
            return
        for op, _, _ in batch:
            conn.execute("SAVEPOINT op")
            try:
                outcomes.append((True, op(conn)))
                conn.execute("RELEASE op")
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
                outcomes.append((False, exc))
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            error = BrokerError(f"SQLite broker commit failed (nothing was written): {exc}")
            for _, future, _ in batch:
                future.set_exception(error)
            return
        woke = any(wakes for (_, _, wakes), (ok, _) in zip(batch, outcomes, strict=True) if ok)
        try:
            self._after_commit(woke)
        finally:
            for (_, future, _), (ok, value) in zip(batch, outcomes, strict=True):
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)
