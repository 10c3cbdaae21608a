"""Renews the leases of running jobs, in one batch per tick, before they expire."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from offload.brokers.base import Broker, Delivery
from offload.cancellation import raise_if_cancel_requested

log = logging.getLogger("offload.worker")

TICK = 0.5  # seconds between checks; a lease is renewed once a third of it has passed


class LeaseKeeper:
    def __init__(self, broker: Broker, on_lost: Callable[[Delivery], None]) -> None:
        self._broker = broker
        self._on_lost = on_lost
        self._held: dict[str, tuple[Delivery, float]] = {}  # job id -> (delivery, renewed at)

    def hold(self, delivery: Delivery) -> None:
        self._held[delivery.job_id] = (delivery, time.monotonic())

    def drop(self, delivery: Delivery) -> None:
        held = self._held.get(delivery.job_id)
        if held is not None and held[0].token == delivery.token:
            del self._held[delivery.job_id]

    async def run(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            await self.renew_due()
            raise_if_cancel_requested()  # a cancel the broker's client swallowed

    async def renew_due(self) -> None:
        now = time.monotonic()
        due = [d for d, renewed in self._held.values() if now - renewed >= d.lease_seconds / 3]
        if not due:
            return
        try:
            alive = await self._broker.extend(due)
        except Exception:
            log.exception("renewing %d lease(s) failed; will retry", len(due))
            return
        for delivery, ok in zip(due, alive, strict=True):
            if delivery.job_id not in self._held:
                continue
            if ok:
                self._held[delivery.job_id] = (delivery, now)
            else:
                del self._held[delivery.job_id]
                self._on_lost(delivery)
