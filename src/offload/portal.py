"""One bridge from sync code to offload's async core: a private event loop (uvloop where installed,
as offload.eventloop chooses) on a daemon thread.

The loop's owner may leave work running in the background after a call returns (the RabbitMQ
broker removes its "publish not confirmed" marks that way). A script that sends and exits
without closing would cut that work off with the daemon thread, so the portal runs its owner's
cleanup when the interpreter exits (atexit, before daemon threads stop), bounded by
EXIT_TIMEOUT so an unreachable broker cannot hold the exit up for long.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from offload import eventloop

T = TypeVar("T")
Cleanup = Callable[[], Coroutine[Any, Any, None]]

EXIT_TIMEOUT = 5.0  # seconds the cleanup may take at interpreter exit

log = logging.getLogger("offload")


class Portal:
    def __init__(self, name: str = "offload-portal", at_exit: Cleanup | None = None) -> None:
        """`at_exit`: run on the loop when the interpreter exits with the loop still open."""
        self._name = name
        self._at_exit = at_exit
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0  # the process whose thread runs the loop (a forked child has no such thread)
        self._exit_registered = False
        self._lock = threading.Lock()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                factory = eventloop.loop_factory() or asyncio.new_event_loop
                loop = factory()
                thread = threading.Thread(target=loop.run_forever, name=self._name, daemon=True)
                thread.start()
                self._loop, self._thread, self._pid = loop, thread, os.getpid()
                if self._at_exit is not None and not self._exit_registered:
                    atexit.register(_close_at_exit, weakref.ref(self))  # weak: apps may come and go
                    self._exit_registered = True
            return self._loop

    def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run `fn()` on the portal's loop and wait for its result from this (sync) thread."""
        loop = self.loop
        if self._thread is threading.current_thread():
            raise RuntimeError("offload's sync API was called from its own portal thread")

        async def run() -> T:
            return await fn()

        return asyncio.run_coroutine_threadsafe(run(), loop).result()

    def close(self, cleanup: Cleanup | None = None, timeout: float = 30.0) -> None:
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        try:
            if cleanup is not None:
                asyncio.run_coroutine_threadsafe(cleanup(), loop).result(timeout=timeout)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=timeout)
            if not thread.is_alive():
                loop.close()

    def _exit(self) -> None:
        if self._loop is None or self._pid != os.getpid():
            return  # closed already, or a forked child: the loop's thread is the parent's
        try:
            self.close(self._at_exit, timeout=EXIT_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - at exit: say so, never raise
            log.warning("closing offload's sync connection at exit failed: %r", exc)


def _close_at_exit(ref: weakref.ref[Portal]) -> None:
    portal = ref()
    if portal is not None:
        portal._exit()
