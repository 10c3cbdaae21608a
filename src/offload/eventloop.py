"""The event loop offload's long-running commands run on: uvloop where it is installed.

`offload worker`, `offload api` and `offload run` spend their time in the event loop: socket
reads and writes, timers, wake-ups from the broker's threads. uvloop does that work in C (libuv);
with it, the API served about 40% more durable submits per second on the same machine
(bench/api_bench.py). It is a dependency wherever it builds (not on Windows);
`OFFLOAD_EVENT_LOOP=asyncio` chooses the standard loop instead (to compare, or to debug with
asyncio's debug mode), `uvloop` insists on uvloop, `auto` (the default) takes uvloop if present.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from offload.errors import ConfigurationError

T = TypeVar("T")

ENV = "OFFLOAD_EVENT_LOOP"
CHOICES = ("auto", "uvloop", "asyncio")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory, or None for asyncio's default, as OFFLOAD_EVENT_LOOP chooses."""
    choice = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ConfigurationError(f"{ENV}={choice!r}: choose one of {', '.join(CHOICES)}")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigurationError(
                f"{ENV}=uvloop but uvloop is not installed: pip install uvloop (not on Windows)"
            ) from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on the chosen loop."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
