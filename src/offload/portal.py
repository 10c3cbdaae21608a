"""One bridge from sync code to offload's async core: a private event loop (uvloop where installed,
as offload.eventloop chooses) on a daemon thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from offload import eventloop

T = TypeVar("T")


class Portal:
    def __init__(self, name: str = "offload-portal") -> None:
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                factory = eventloop.loop_factory() or asyncio.new_event_loop
                loop = factory()
                thread = threading.Thread(target=loop.run_forever, name=self._name, daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run `fn()` on the portal's loop and wait for its result from this (sync) thread."""
        loop = self.loop
        if self._thread is threading.current_thread():
            raise RuntimeError("offload's sync API was called from its own portal thread")

        async def run() -> T:
            return await fn()

        return asyncio.run_coroutine_threadsafe(run(), loop).result()

    def close(self, cleanup: Callable[[], Coroutine[Any, Any, None]] | None = None) -> None:
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        if cleanup is not None:
            asyncio.run_coroutine_threadsafe(cleanup(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()
