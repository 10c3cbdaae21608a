"""Group commit: one thread owns the write connection and runs queued operations in batches.

Every write (enqueue, fetch, settle, ...) is a function of the connection. Callers put it on a
queue and await its future; the thread takes everything waiting, runs it in one `BEGIN IMMEDIATE`
transaction (a savepoint per operation, so one failing operation undoes only itself), commits
once, and then answers every caller. With `synchronous=FULL` that is one fsync for the whole
batch: durability without a commit per job.

Lease bookkeeping (fetch, extend) is submitted as not durable: losing it to a power cut only
means a job is delivered again, which at-least-once allows. Those operations are committed first,
in their own transaction without an fsync, and answered at once, so a worker can start on its
next jobs while the durable part of the batch (enqueues, outcomes) waits for the disk.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from offload.errors import BrokerError

T = TypeVar("T")
Operation = Callable[[sqlite3.Connection], Any]

MAX_BATCH = 256
LOCK_WAIT = 30.0  # seconds a write waits for another process's transaction before failing


def begin_immediate(conn: sqlite3.Connection, wait: float = LOCK_WAIT) -> None:
    _retry_locked(conn, "BEGIN IMMEDIATE", wait)


def commit(conn: sqlite3.Connection, wait: float = LOCK_WAIT) -> None:
    _retry_locked(conn, "COMMIT", wait)


def _retry_locked(conn: sqlite3.Connection, statement: str, wait: float) -> None:
    """Run BEGIN IMMEDIATE / COMMIT, waiting for another process's lock with short sleeps.

    SQLite's own busy handler sleeps 1, 2, 5, 10... ms between tries, so two worker processes
    sharing a file would lose milliseconds on every collision. The writer connection is opened
    with busy_timeout=0 and waits here instead: from 50 µs, doubling, never over 1 ms.
    """
    deadline = time.monotonic() + wait
    pause = 0.00005
    while True:
        try:
            conn.execute(statement)
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if time.monotonic() > deadline:
                raise sqlite3.OperationalError(
                    f"database is locked: another process held the write lock for over {wait:.0f}s"
                ) from exc
        time.sleep(pause)
        pause = min(pause * 2, 0.001)


@dataclass(slots=True)
class _Entry:
    op: Operation
    future: Future[Any]
    wakes: bool  # makes jobs ready: producers notify waiting workers after the commit
    durable: bool


class _Stop:
    pass


class GroupCommitWriter:
    def __init__(
        self,
        conn: sqlite3.Connection,
        after_commit: Callable[[bool], None],
        synchronous: str = "FULL",
        name: str = "offload-sqlite-writer",
    ) -> None:
        self._conn = conn
        self._after_commit = after_commit  # called with "did this batch make jobs ready?"
        self._synchronous = synchronous
        self._queue: queue.SimpleQueue[_Entry | _Stop] = queue.SimpleQueue()
        # Held while a transaction runs, by the writer thread or by a blocking caller running
        # its operation inline (see `call`).
        self._conn_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, op: Operation, wakes: bool = False, durable: bool = True) -> Future[Any]:
        future: Future[Any] = Future()
        self._queue.put(_Entry(op, future, wakes, durable))
        return future

    def call(self, op: Operation, wakes: bool = False, durable: bool = True) -> Any:
        """Run `op` and wait for its commit, from a blocking (non-event-loop) thread.

        When the writer is idle the operation runs right here, sparing the two thread wake-ups
        a hand-off costs; when it is busy the operation joins the next group commit instead.
        """
        if self._queue.empty() and self._conn_lock.acquire(blocking=False):
            try:
                entry = _Entry(op, Future(), wakes, durable)
                entry.future.set_running_or_notify_cancel()
                self._run_transaction([entry], fsync=durable)
            finally:
                self._conn_lock.release()
            return entry.future.result()
        return self.submit(op, wakes, durable).result()

    async def run(
        self, op: Callable[[sqlite3.Connection], T], wakes: bool = False, durable: bool = True
    ) -> T:
        result: T = await asyncio.wrap_future(self.submit(op, wakes, durable))
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
            # Skip operations whose caller gave up (cancelled) before they started; the others
            # can no longer be cancelled, so answering them cannot fail and kill this thread.
            batch = [entry for entry in batch if entry.future.set_running_or_notify_cancel()]
            light = [entry for entry in batch if not entry.durable]
            durable = [entry for entry in batch if entry.durable]
            with self._conn_lock:
                if light:
                    self._run_transaction(light, fsync=False)
                if durable:
                    self._run_transaction(durable, fsync=True)
            if stop:
                break
        self._conn.close()

    def _run_transaction(self, batch: list[_Entry], fsync: bool) -> None:
        conn = self._conn
        relaxed = not fsync and self._synchronous != "NORMAL"
        try:
            if relaxed:
                conn.execute("PRAGMA synchronous=NORMAL")
            begin_immediate(conn)
        except sqlite3.Error as exc:
            self._fail(batch, BrokerError(f"SQLite broker cannot start a write transaction: {exc}"))
            return
        outcomes: list[tuple[bool, Any]] = []
        if len(batch) == 1:
            # Alone in its transaction, an operation needs no savepoint: a failure rolls back all.
            try:
                outcomes.append((True, batch[0].op(conn)))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                conn.execute("ROLLBACK")
                self._restore(relaxed)
                batch[0].future.set_exception(exc)
                return
        else:
            for entry in batch:
                conn.execute("SAVEPOINT op")
                try:
                    outcomes.append((True, entry.op(conn)))
                    conn.execute("RELEASE op")
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    outcomes.append((False, exc))
        try:
            commit(conn)
        except sqlite3.Error as exc:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            self._fail(batch, BrokerError(f"SQLite broker commit failed (nothing was written): {exc}"))
            return
        finally:
            self._restore(relaxed)
        woke = any(entry.wakes for entry, (ok, _) in zip(batch, outcomes, strict=True) if ok)
        try:
            self._after_commit(woke)
        finally:
            for entry, (ok, value) in zip(batch, outcomes, strict=True):
                if ok:
                    entry.future.set_result(value)
                else:
                    entry.future.set_exception(value)

    def _restore(self, relaxed: bool) -> None:
        if relaxed:
            self._conn.execute(f"PRAGMA synchronous={self._synchronous}")

    @staticmethod
    def _fail(batch: list[_Entry], error: BrokerError) -> None:
        for entry in batch:
            entry.future.set_exception(error)
