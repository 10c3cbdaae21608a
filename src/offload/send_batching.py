"""Concurrent sends on one event loop share the broker's round trips.

An API server answering hundreds of submits at once, or a web app whose requests each send a
job, calls `send_async` many times concurrently. Each call on its own costs the broker a
transaction or a round trip (SQLite: a writer hand-off, an INSERT and a loop wake-up; Redis: a
script call through the async client). A broker that can take several independent calls at once
(`Broker.enqueue_calls`) gets them here together: at most one batch of calls is with the broker
at a time per event loop, and the calls made meanwhile go together as the next one as soon as
it is answered. A broker's round trip cannot start any sooner than that anyway when it is serial
(SQLite's writer), and for one that is not (Redis), one pipelined round trip for many calls is
cheaper than many.

Joining calls does not join their fates: each call stays all-or-nothing on its own and gets its
own outcome (its jobs, its QueueFull, or an error of its own).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from offload.brokers.base import Broker, Enqueued
from offload.errors import BrokerError
from offload.message import Message

Items = Sequence[tuple[Message, bytes]]
Call = tuple[Items, "asyncio.Future[list[Enqueued]]"]


class SendBatcher:
    """The calls to one broker on one event loop: one batch in flight, the next one gathering."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._pending: list[Call] = []
        self._in_flight = False
        self._scheduled = False
        self._closed = False
        self._sending: asyncio.Future[None] | None = None

    async def enqueue(self, items: Items) -> list[Enqueued]:
        if self._closed:
            raise BrokerError("the broker connection is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Enqueued]] = loop.create_future()
        self._pending.append((items, future))
        if not self._in_flight and not self._scheduled:
            # After the callbacks already due in this iteration, so that the other requests
            # whose bodies arrived together join this batch.
            self._scheduled = True
            loop.call_soon(self._flush)
        return await future

    async def close(self) -> None:
        """Refuse new calls, fail those not yet handed to the broker (nothing of theirs is sent),
        and wait for the batch with the broker to be answered, so that closing the broker next
        does not cut it off."""
        self._closed = True
        pending, self._pending = self._pending, []
        for _, future in pending:
            if not future.done():
                future.set_exception(
                    BrokerError("the broker connection was closed before this send was handed to it")
                )
        if self._sending is not None:
            await asyncio.wait([self._sending])

    def _flush(self) -> None:
        self._scheduled = False
        # A caller cancelled before this point is left out: its jobs are never sent.
        calls = [(items, future) for items, future in self._pending if not future.done()]
        self._pending = []
        if calls:
            self._in_flight = True
            self._sending = asyncio.ensure_future(self._send(calls))  # held: tasks are weakly kept

    async def _send(self, calls: list[Call]) -> None:
        try:
            outcomes: Sequence[list[Enqueued] | Exception] = await self.broker.enqueue_calls(
                [items for items, _ in calls]
            )
        except Exception as exc:  # noqa: BLE001 - the whole batch failed: each caller gets the error
            outcomes = [exc] * len(calls)
        except BaseException:  # cancelled (the loop is shutting down): so are the callers
            for _, future in calls:
                future.cancel()
            raise
        finally:
            self._in_flight = False
            if self._pending and not self._closed:
                self._flush()
        for (_, future), outcome in zip(calls, outcomes, strict=True):
            if future.done():  # cancelled meanwhile; its jobs were sent (like any late cancel)
                continue
            if isinstance(outcome, Exception):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
