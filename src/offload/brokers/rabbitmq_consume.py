"""The RabbitMQ broker's consuming side: long-lived consumers on the priority-class quorum queues,
a small local buffer of the messages they pushed, acks, and the point-in-time probe (basic.get).

RabbitMQ is only the transport here (see rabbitmq.py): a message is acked as soon as its job is
claimed in the Redis state store, and from then on the Redis lease protects the job. What this
process holds unacked is its buffer (at most `prefetch` messages per consumer) and the messages
of a claim in flight; closing hands the buffer back (basic.nack with requeue).

Deliveries are registered on the aiormq channel directly: aiormq starts the callback as a task
when it reads the delivery, before it reads any later frame of the channel, so once a basic.get
on a queue has answered, every message RabbitMQ pushed to this channel from that queue before
it is in the buffer. A fetch uses that to see "now" when the buffer is short (rabbitmq.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import uuid
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import aio_pika.abc
import aiormq.abc
from aiormq import spec

from offload.brokers.rabbitmq_link import AMQP_ERRORS, AmqpLink

PREFETCH_MIN = 8
PREFETCH_MAX = 1000


@dataclass(slots=True)
class Arrival:
    """A message a consumer pushed (or a basic.get took) and this process has not acked."""

    tag: int
    epoch: int  # the consumer channel that delivered it (a tag means nothing on another)
    job_id: str
    name: str  # the AMQP queue
    prio: int
    seq: int  # publish time (ns)


class Inbox:
    def __init__(self, link: AmqpLink) -> None:
        self._link = link
        self._carrier: aio_pika.abc.AbstractChannel | None = None
        self._channel: aiormq.abc.AbstractChannel | None = None
        self._epoch = 0
        self._prefetch = 0  # the QoS set on the channel (per consumer)
        self._consumers: dict[str, str] = {}  # AMQP queue -> consumer tag
        self._buffer: dict[str, deque[Arrival]] = {}
        self._unacked: set[int] = set()  # tags of this epoch: buffered, or in a claim
        self._lock = asyncio.Lock()
        self.arrived = asyncio.Event()  # set by every delivery (and when the channel closes)

    @property
    def open(self) -> bool:
        return self._channel is not None and not self._channel.is_closed

    def consuming(self, name: str) -> bool:
        return self.open and name in self._consumers

    def held(self, names: Iterable[str]) -> int:
        return sum(len(self._buffer.get(n, ())) for n in names)

    def held_in(self, name: str) -> int:
        return len(self._buffer.get(name, ()))

    # -- consumers ----------------------------------------------------------------------------

    async def consume(self, names: Sequence[str], prefetch: int) -> list[str]:
        """Consume these AMQP queues (known to exist); returns those not consumed before."""
        if all(self.consuming(n) for n in names):
            return []
        async with self._lock:
            if not self.open:
                await self._reopen()
            channel = self._channel
            assert channel is not None
            prefetch = max(PREFETCH_MIN, min(PREFETCH_MAX, prefetch))
            started = []
            with self._link.errors():
                for name in names:
                    if name in self._consumers:
                        continue
                    if prefetch != self._prefetch:  # applies to the consumers started after it
                        await channel.basic_qos(prefetch_count=prefetch)
                        self._prefetch = prefetch
                    tag = f"offload.{uuid.uuid4().hex}"
                    on_message = functools.partial(self._on_message, self._epoch, name, int(name[-1]))
                    self._consumers[name] = tag
                    try:
                        await channel.basic_consume(name, on_message, consumer_tag=tag)
                    except BaseException:
                        self._consumers.pop(name, None)
                        raise
                    started.append(name)
            return started

    async def _reopen(self) -> None:
        self._forget()
        carrier = await self._link.open_channel()
        self._carrier = carrier
        self._channel = channel = await carrier.get_underlay_channel()
        channel.closing.add_done_callback(lambda _: self.arrived.set())

    def _forget(self) -> None:
        """Drop this epoch's state: its unacked messages go back to RabbitMQ with its channel."""
        self._epoch += 1
        self._consumers.clear()
        self._buffer.clear()
        self._unacked.clear()
        self._prefetch = 0
        carrier, self._carrier, self._channel = self._carrier, None, None
        if carrier is not None and not carrier.is_closed:
            task = asyncio.ensure_future(carrier.close())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _on_message(
        self, epoch: int, name: str, prio: int, message: aiormq.abc.DeliveredMessage
    ) -> None:
        # Runs as its own task, started when aiormq read the delivery: in delivery order, and
        # ahead of whatever waits for a later frame (a basic.get's answer).
        if epoch != self._epoch:
            return  # a closed channel's delivery: RabbitMQ has it back
        arrival = _arrival(message, epoch, name, prio)
        self._unacked.add(arrival.tag)
        self._buffer.setdefault(name, deque()).append(arrival)
        self.arrived.set()

    async def get(self, name: str) -> Arrival | None:
        """basic.get one message from `name` into the buffer (None: the queue had none to give).

        Its answer comes after every message already pushed to this channel from `name`."""
        channel = self._channel
        if channel is None or channel.is_closed:
            return None
        epoch = self._epoch
        with self._link.errors():
            message = await channel.basic_get(name, no_ack=False)
        if not isinstance(message.delivery, spec.Basic.GetOk) or epoch != self._epoch:
            return None
        arrival = _arrival(message, epoch, name, int(name[-1]))
        self._unacked.add(arrival.tag)
        self._buffer.setdefault(name, deque()).append(arrival)
        return arrival

    # -- taking and settling messages ---------------------------------------------------------

    def take(self, names: Sequence[str], limit: int) -> list[Arrival]:
        """Up to `limit` buffered messages of these queues: highest class first, then oldest."""
        pool = [a for n in names for a in self._buffer.get(n, ())]
        if not pool:
            return []
        pool.sort(key=lambda a: (-a.prio, a.seq))
        chosen = pool[:limit]
        tags = {a.tag for a in chosen}
        for name in {a.name for a in chosen}:
            kept = deque(a for a in self._buffer[name] if a.tag not in tags)
            if kept:
                self._buffer[name] = kept
            else:
                del self._buffer[name]
        return chosen

    def put_back(self, arrivals: Sequence[Arrival]) -> None:
        """Return messages taken from the buffer (a claim that failed) to its front."""
        for a in reversed(arrivals):
            if a.epoch == self._epoch and a.tag in self._unacked:
                self._buffer.setdefault(a.name, deque()).appendleft(a)
        if arrivals:
            self.arrived.set()

    async def ack(self, arrivals: Sequence[Arrival]) -> None:
        """Ack these messages: one basic.ack with `multiple` for those below every other unacked
        tag, one each for the rest. Lost with the channel, they come back (and are dropped or
        delayed by their claim)."""
        tags = sorted(a.tag for a in arrivals if a.epoch == self._epoch and a.tag in self._unacked)
        channel = self._channel
        if not tags or channel is None:
            return
        self._unacked.difference_update(tags)
        floor = min(self._unacked, default=None)
        below = [t for t in tags if floor is None or t < floor]
        rest = tags[len(below) :]
        with contextlib.suppress(*AMQP_ERRORS):
            if below:
                await channel.basic_ack(below[-1], multiple=len(below) > 1, wait=False)
            for tag in rest:
                await channel.basic_ack(tag, wait=False)

    async def nack(self, arrivals: Sequence[Arrival]) -> None:
        """Hand messages back to RabbitMQ (requeued; in a quorum queue this counts towards its
        x-delivery-limit, see the poison sweep in rabbitmq.py)."""
        channel = self._channel
        for a in arrivals:
            if a.epoch != self._epoch or a.tag not in self._unacked or channel is None:
                continue
            self._unacked.discard(a.tag)
            with contextlib.suppress(*AMQP_ERRORS):
                await channel.basic_nack(a.tag, requeue=True, wait=False)

    async def give_back(self) -> None:
        """Stop consuming and hand the buffer back, so other processes get those jobs now."""
        async with self._lock:
            channel = self._channel
            if channel is None or channel.is_closed:
                self._forget()
                return
            tags, self._consumers = list(self._consumers.values()), {}
            with contextlib.suppress(*AMQP_ERRORS):
                for tag in tags:  # after the cancel-ok, nothing more arrives from that consumer
                    await channel.basic_cancel(tag)
            buffered = [a for queue in self._buffer.values() for a in queue]
            self._buffer.clear()
            self._prefetch = 0
            await self.nack(buffered)

    async def close(self) -> None:
        await self.give_back()
        carrier, self._carrier, self._channel = self._carrier, None, None
        self._epoch += 1
        self._unacked.clear()
        if carrier is not None:
            with contextlib.suppress(Exception):
                await carrier.close()


def _arrival(message: aiormq.abc.DeliveredMessage, epoch: int, name: str, prio: int) -> Arrival:
    """The class is the queue's (`<prefix>.<queue>.p<N>`); the body, if any, is ignored (the
    record holds it, see rabbitmq_link)."""
    props = message.header.properties
    seq: Any = props.correlation_id
    if not seq:  # published by an older version: in its headers
        seq = (props.headers or {}).get("seq", 0)
    return Arrival(
        tag=int(message.delivery.delivery_tag or 0),  # type: ignore[union-attr]
        epoch=epoch,
        job_id=props.message_id or "",
        name=name,
        prio=prio,
        seq=int(seq),
    )
