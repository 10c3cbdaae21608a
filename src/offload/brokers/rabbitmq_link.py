"""The RabbitMQ broker's AMQP side: one connection and channel, re-opened after a failure, the
quorum queues it declares, and publishing with confirms (see rabbitmq.py for the design).

Queues, per offload queue `q` (names start with `prefix`):

    <prefix>.<q>.p<0..9>  quorum queue per priority class, declared when first published to:
                          x-max-length + reject-publish, x-delivery-limit, dead-lettering
                          (at-least-once) to <prefix>.poison
    <prefix>.delay.<ms>   quorum delay bucket: x-message-ttl=<ms>, dead-letters (at-least-once)
                          through the topic exchange <prefix>.work back to the job's class queue
    <prefix>.poison       messages RabbitMQ itself gave up on (x-delivery-limit)

A job's message is only a pointer to its record in the state store: `message_id` is the job id,
`correlation_id` the publish time in nanoseconds (the buffer's order across queues), and the
body is empty. The record holds the job's body (a claim reads it there, and a message whose
record is gone is dropped at its claim anyway), so RabbitMQ stores and sends no copy of it, and
a delivery is two frames (method and content header) instead of three; the priority class and
the offload queue are in the AMQP queue's name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, cast

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
import aiormq
from aiormq import spec

from offload.brokers.rabbitmq_url import RabbitMQOptions, bucket_ms
from offload.brokers.tls_errors import tls_hint
from offload.errors import BrokerError

log = logging.getLogger("offload.broker")

CONNECT_TIMEOUT = 10.0
PERSISTENT = 2  # delivery_mode: written to disk (a quorum queue stores every message anyway)
PUBLISH_TIMEOUT = 30.0  # a publish whose confirm takes longer fails (and the enqueue is rolled back)

# What a lost connection or channel raises (a refused publish, DeliveryError, is handled apart).
AMQP_ERRORS = (aio_pika.exceptions.AMQPError, ConnectionError, OSError, asyncio.TimeoutError, RuntimeError)

# Called with (queue name or None, AMQP names, priority classes) to record what was declared.
Remember = Callable[[str | None, list[str], list[int]], Awaitable[None]]


class AmqpLink:
    def __init__(self, options: RabbitMQOptions, remember: Remember) -> None:
        self.options = options
        self.prefix = options.prefix
        self._remember = remember
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._lock = asyncio.Lock()
        self._declared: set[str] = set()
        self._queues: dict[str, aio_pika.abc.AbstractQueue] = {}
        self.where = options.amqp_url.split("@")[-1].split("?")[0]

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        """Turn a lost connection into a BrokerError and forget the channel (the next call reconnects)."""
        try:
            yield
        except aio_pika.exceptions.DeliveryError:
            raise
        except AMQP_ERRORS as exc:
            self._forget()
            raise BrokerError(f"RabbitMQ at {self.where}: {type(exc).__name__}: {exc}") from exc

    @property
    def open(self) -> bool:
        return self._channel is not None and not self._channel.is_closed

    def _forget(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        self._declared.clear()
        self._queues.clear()
        if connection is not None and not connection.is_closed:
            task = asyncio.ensure_future(connection.close())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def channel(self) -> aio_pika.abc.AbstractChannel:
        if self._channel is not None and not self._channel.is_closed:
            return self._channel
        async with self._lock:
            if self._channel is not None and not self._channel.is_closed:
                return self._channel
            self._forget()
            try:
                connection = await aio_pika.connect(self.options.amqp_url, timeout=CONNECT_TIMEOUT)
            except Exception as exc:
                hint = tls_hint(exc) or "is it running? check the broker URL"
                raise BrokerError(f"cannot reach RabbitMQ at {self.where}: {exc}; {hint}") from exc
            try:
                channel = await connection.channel(publisher_confirms=True)
                p = self.prefix
                await channel.declare_exchange(f"{p}.work", aio_pika.ExchangeType.TOPIC, durable=True)
                await channel.declare_exchange(f"{p}.delay", aio_pika.ExchangeType.TOPIC, durable=True)
                await channel.declare_queue(f"{p}.poison", durable=True, arguments={"x-queue-type": "quorum"})
            except BaseException:
                with contextlib.suppress(Exception):
                    await connection.close()
                raise
            await self._remember(None, [f"{p}.poison"], [])
            self._connection, self._channel = connection, channel
            return channel

    async def open_channel(self) -> aio_pika.abc.AbstractChannel:
        """Another channel on the link's connection (no publisher confirms): the consumers'."""
        await self.channel()
        connection = self._connection
        if connection is None:
            raise BrokerError(f"RabbitMQ at {self.where}: the connection closed")
        with self.errors():
            return await connection.channel(publisher_confirms=False)

    async def close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        self._declared.clear()
        self._queues.clear()
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()

    def name(self, queue: str, prio: int) -> str:
        return f"{self.prefix}.{queue}.p{prio}"

    async def declare(self, queue: str, prio: int) -> str:
        """Declare one priority class of `queue` (idempotent) and bind it for delay returns."""
        name = self.name(queue, prio)
        if name in self._declared:
            return name
        channel = await self.channel()
        args: dict[str, Any] = {
            "x-queue-type": "quorum",
            "x-max-length": self.options.max_length,
            "x-overflow": "reject-publish",
            "x-delivery-limit": self.options.delivery_limit,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": f"{self.prefix}.poison",
            "x-dead-letter-strategy": "at-least-once",
        }
        with self.errors():
            q = await channel.declare_queue(name, durable=True, arguments=args)
            await q.bind(f"{self.prefix}.work", routing_key=f"*.{name}")
        await self._remember(queue, [name], [prio])  # after: a fetch only looks in declared classes
        self._declared.add(name)
        self._queues[name] = q
        return name

    async def bucket(self, ms: int) -> str:
        """Declare the delay bucket of `ms` (idempotent); its name."""
        name = f"{self.prefix}.delay.{ms}"
        if name in self._declared:
            return name
        channel = await self.channel()
        await self._remember(None, [name], [])  # before: cleanup tools must find it
        with self.errors():
            q = await channel.declare_queue(
                name,
                durable=True,
                arguments={
                    "x-queue-type": "quorum",
                    "x-message-ttl": ms,
                    "x-overflow": "reject-publish",
                    "x-dead-letter-exchange": f"{self.prefix}.work",
                    "x-dead-letter-strategy": "at-least-once",
                },
            )
            await q.bind(f"{self.prefix}.delay", routing_key=f"{ms}.#")
        self._declared.add(name)
        return name

    async def publish(self, job_id: str, queue: str, prio: int, delay: float) -> None:
        """Publish one job message (to its class queue, or to a delay bucket); return on the confirm.

        Raises DeliveryError if RabbitMQ refused it (a full queue), BrokerError if it is unreachable
        or found no queue to route it to.
        """
        prio = min(9, max(0, prio))
        # Straight to aiormq's channel with pamqp's properties: aio-pika's Message and Exchange
        # layers added about a fifth of a send's CPU and nothing this needs.
        properties = spec.Basic.Properties(
            message_id=job_id, delivery_mode=PERSISTENT, correlation_id=str(time.time_ns())
        )
        for attempt in (1, 2):
            target = await self.declare(queue, prio)
            bucket = None
            if delay > 0:
                ms = bucket_ms(delay)
                bucket = await self.bucket(ms)
                exchange, routing_key = f"{self.prefix}.delay", f"{ms}.{target}"
            else:
                exchange, routing_key = "", target  # the default exchange: straight to the queue
            channel = await self.channel()
            with self.errors():
                # aiormq's Channel: its abstract type lacks `wait` (aiormq has had it since 6.4).
                underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
                confirmed = await underlay.basic_publish(
                    b"",
                    exchange=exchange,
                    routing_key=routing_key,
                    properties=properties,
                    mandatory=True,
                    timeout=PUBLISH_TIMEOUT,
                    # Not waiting for the frames to be written (a loop turn in aiormq's writer
                    # task): the confirm, awaited next, says more, and a lost connection fails it.
                    wait=False,
                )
            if isinstance(confirmed, spec.Basic.Ack):
                return
            # Returned unroutable (mandatory) and then confirmed: no queue took it. Its queue was
            # deleted behind our back (an operator, a policy): declare it again and publish again
            # (nothing was stored, so this is no duplicate).
            self._undeclare(target, bucket)
            if attempt == 2:
                raise BrokerError(
                    f"RabbitMQ at {self.where} returned job {job_id}'s message as unroutable to "
                    f"{routing_key!r} twice, after declaring its queue again: is something deleting "
                    "offload's queues?"
                )
            log.warning("RabbitMQ returned a message to %r as unroutable: declaring again", routing_key)

    async def declare_again(self, queue: str, prio: int) -> str:
        """Declare a class that was deleted behind our back (an operator, a policy)."""
        self._undeclare(self.name(queue, prio))
        return await self.declare(queue, prio)

    def _undeclare(self, *names: str | None) -> None:
        for name in names:
            if name is not None:
                self._declared.discard(name)
                self._queues.pop(name, None)

    async def get(self, name: str) -> aio_pika.abc.AbstractIncomingMessage | None:
        """basic.get one message (manual ack) from a queue known to exist."""
        channel = await self.channel()
        with self.errors():
            q = self._queues.get(name)
            if q is None:
                q = self._queues[name] = await channel.get_queue(name, ensure=False)
            return await q.get(no_ack=False, fail=False)
