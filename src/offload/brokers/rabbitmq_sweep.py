"""The RabbitMQ broker's sweeper and lease recovery: what publishes a job anew when no message
for it will otherwise come (see rabbitmq.py).

- Expired leases (STRANDED): the job's message was acked at its claim, so a lease that runs out
  is recovered in the state store (requeued, or dead-lettered past max_deliveries, and marked
  "publish not confirmed") and the job published anew. The holder's own timer does it at once
  (grace 0), a waiting fetch that sees an expired lease too, and every process's sweeper for
  leases expired STRANDED_AFTER seconds ago (their holder died, froze or is cut off).
- Unconfirmed publishes (SWEEP): records marked longer than `republish_after` seconds ago (a
  producer died between its two writes, or a settle's re-publish failed).
- Poison messages (POISON): what RabbitMQ dead-lettered past x-delivery-limit. Messages are
  acked at their claim, so its count only says how often an unclaimed message was handed back
  (consumers closing with it buffered): a job still queued is published anew.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from offload.brokers.rabbitmq_link import AmqpLink
from offload.brokers.rabbitmq_url import RabbitMQOptions

log = logging.getLogger("offload.brokers.rabbitmq")

SWEEP_EVERY = 5.0  # seconds between sweeps
SWEEP_BATCH = 500
# A lease expired this long ago whose job nobody claimed is recovered by the sweeper: its
# holder's own timer, when it runs, gets there first (at lease + 0.05 s).
STRANDED_AFTER = 1.0


class Sweeper:
    def __init__(
        self,
        run: Callable[[str, Sequence[Any]], Awaitable[Any]],
        link: AmqpLink,
        published: Callable[[Sequence[str]], Awaitable[None]],
        spawn: Callable[[Coroutine[Any, Any, Any]], Any],
        options: RabbitMQOptions,
    ) -> None:
        self._run = run
        self._link = link
        self._published = published
        self._spawn = spawn
        self._options = options
        self._last_sweep = 0.0
        self._recovering = False
        self._recover_again = False

    def maybe_sweep(self) -> None:
        now = time.monotonic()
        if now - self._last_sweep >= SWEEP_EVERY:
            self._last_sweep = now
            self._spawn(self._sweep())

    async def _sweep(self) -> None:
        try:
            await self.sweep()
        except Exception as exc:  # noqa: BLE001 - the next fetch's sweep tries again
            log.warning("sweeping unconfirmed publishes, expired leases and poison messages failed: %s", exc)

    def recover_soon(self) -> None:
        """Recover expired leases now (a lease timer ran out); calls made meanwhile coalesce."""
        if self._recovering:
            self._recover_again = True
        else:
            self._recovering = True
            self._spawn(self._recover_loop())

    async def _recover_loop(self) -> None:
        try:
            while True:
                self._recover_again = False
                try:
                    await self.recover(0.0)
                except Exception as exc:  # noqa: BLE001 - a waiting fetch or the sweeper retries
                    log.warning("recovering expired leases failed: %s", exc)
                if not self._recover_again:
                    break
        finally:
            self._recovering = False

    async def recover(self, grace: float) -> int:
        """Leases expired `grace` seconds ago or more: requeued or dead-lettered in the state
        store, marked, and their jobs published anew. Returns how many were published."""
        total = 0
        while rows := await self._run("STRANDED", [repr(grace), SWEEP_BATCH]):
            if grace > 0:
                for job_id, *_ in rows:
                    log.warning(
                        "job %s: its lease expired and its worker did not hand it back; publishing it again",
                        _text(job_id),
                    )
            await self.publish_rows([(i, q, p, "0") for i, q, p in rows])
            total += len(rows)
            if len(rows) < SWEEP_BATCH:
                break
        return total

    async def sweep(self) -> tuple[int, int]:
        """Re-publish records whose lease expired without their holder recovering them, records
        whose publish was never confirmed, and the jobs of poison messages. Returns
        (re-published, poison messages)."""
        republished = await self.recover(STRANDED_AFTER)
        while rows := await self._run("SWEEP", [repr(self._options.republish_after), SWEEP_BATCH]):
            for job_id, *_ in rows:
                log.warning("job %s: its publish was never confirmed; publishing it now", _text(job_id))
            await self.publish_rows(rows)
            republished += len(rows)
            if len(rows) < SWEEP_BATCH:
                break
        poisoned = 0
        while True:
            taken: list[Any] = []
            while len(taken) < SWEEP_BATCH and (
                msg := await self._link.get(f"{self._options.prefix}.poison")
            ):
                taken.append(msg)
            if not taken:
                break
            await self.publish_rows(await self._run("POISON", [m.message_id or "" for m in taken]))
            for msg in taken:  # after the publishes: a crash in between leaves a duplicate, not nothing
                await msg.ack()
            poisoned += len(taken)
        if poisoned:
            log.warning(
                "RabbitMQ dead-lettered %d message(s) past x-delivery-limit; their waiting jobs were "
                "published again",
                poisoned,
            )
        return republished, poisoned

    async def publish_rows(self, rows: Sequence[Any]) -> None:
        """Publish {id, queue, prio, seconds until due} rows together, then unmark them."""
        if not rows:
            return
        await asyncio.gather(
            *(self._link.publish(_text(i), _text(q), int(p), float(s)) for i, q, p, s in rows)
        )
        await self._published([_text(r[0]) for r in rows])


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
