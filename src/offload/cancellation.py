"""Stopping tasks when a cancel can be lost on the way.

On Python 3.11, `asyncio.wait_for` returns the inner result instead of raising CancelledError when
the inner awaitable finishes in the same loop turn as the cancel (rewritten in 3.12), and the
broker clients (redis-py, nats-py, aiormq) call it inside. A task whose CancelledError was
swallowed that way carries on to its next await as if nothing happened; a worker waiting for it to
stop (a maintenance chore, say, next due in a minute) waited forever. The request itself is not
lost: `Task.cancelling()` still counts it, which is what `cancel_requested` reads. (offload's own
waits use `asyncio.timeout`, which keeps the cancel.)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("offload.worker")

AGAIN_AFTER = 1.0  # seconds a cancelled task gets before it is cancelled again
GIVE_UP_AFTER = 30.0


def cancel_requested() -> bool:
    """Whether the current task was asked to stop, even if its CancelledError never arrived."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def raise_if_cancel_requested() -> None:
    """For long-lived loops: raise the CancelledError a library swallowed."""
    if cancel_requested():
        raise asyncio.CancelledError


async def stop_tasks(
    tasks: Iterable[asyncio.Future[Any]],
    again_after: float = AGAIN_AFTER,
    give_up_after: float = GIVE_UP_AFTER,
) -> set[asyncio.Future[Any]]:
    """Cancel the tasks and wait for them to end, cancelling again each that outlives a cancel.

    Their outcomes are consumed, as `gather(..., return_exceptions=True)` does (no "exception was
    never retrieved"). Returns those still running after `give_up_after` seconds (logged; the
    caller moves on).
    """
    given = list(tasks)
    pending = {t for t in given if not t.done()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + give_up_after
    while pending:
        for task in pending:
            task.cancel()
        remaining = deadline - loop.time()
        if remaining <= 0:
            names = ", ".join(sorted(_name(t) for t in pending))
            log.warning("task(s) still running %.0fs after being cancelled: %s", give_up_after, names)
            break
        _, pending = await asyncio.wait(pending, timeout=min(again_after, remaining))
    for task in given:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: the caller looks at it if it cares
    return pending


def _name(future: asyncio.Future[Any]) -> str:
    return future.get_name() if isinstance(future, asyncio.Task) else repr(future)
