"""Periodic chores every worker runs besides its jobs (pruning, the webhook DLQ scan).

A chore must be safe to run by many workers at once and to miss a turn: each worker runs every
chore on its own timer, started at a random point of the first interval so workers spread out.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from offload.brokers.base import Broker
from offload.cancellation import raise_if_cancel_requested

log = logging.getLogger("offload.worker")


@dataclass(frozen=True)
class Maintenance:
    name: str
    every: float  # seconds between runs
    run: Callable[[Broker], Awaitable[None]]


async def run_periodically(chore: Maintenance, broker: Broker) -> None:
    """Run `chore` every `chore.every` seconds until cancelled; a failed run is logged, not fatal."""
    await asyncio.sleep(random.uniform(0, chore.every / 2))
    while True:
        try:
            await chore.run(broker)
        except Exception:
            log.exception("%s failed; trying again in %.0fs", chore.name, chore.every)
        raise_if_cancel_requested()  # a cancel the broker's client swallowed (offload.cancellation)
        await asyncio.sleep(chore.every)
