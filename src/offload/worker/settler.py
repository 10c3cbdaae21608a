"""Batches outcomes: everything settled while one `broker.settle` is in flight goes in the next."""

from __future__ import annotations

import asyncio
import logging

from offload.brokers.base import Broker, Settle

log = logging.getLogger("offload.worker")


class Settler:
    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._pending: list[Settle] = []
        self._flushing: asyncio.Task[None] | None = None

    def add(self, outcome: Settle) -> None:
        self._pending.append(outcome)
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                accepted = await self._broker.settle(batch)
            except Exception:
                # The leases stay with the broker and expire, so the jobs run again: not lost.
                log.exception("settling %d job(s) failed; they will be redelivered", len(batch))
                continue
            for outcome, ok in zip(batch, accepted, strict=True):
                if not ok:
                    log.warning(
                        "job %s: %s refused, its lease had expired (another delivery owns it)",
                        outcome.delivery.job_id,
                        outcome.kind,
                    )

    async def drain(self) -> None:
        """Wait until everything added so far is settled."""
        while self._flushing is not None and not self._flushing.done():
            await self._flushing
