"""The RabbitMQ broker: quorum queues carry the jobs, a Redis state store keeps their records.

    amqp://guest:guest@127.0.0.1:5672/?state=redis://127.0.0.1:6379/0&prefix=offload

RabbitMQ is the transport: every job is a persistent message in a quorum queue, published with
publisher confirms (enqueue returns only once RabbitMQ confirmed it), taken with `basic.get` and
acked by hand once its outcome is recorded. RabbitMQ cannot answer the rest of the port (job
records, results, fencing tokens, idempotency keys, the DLQ, drain rate), so the job records live
in the Redis broker's format under the `state` URL and the Redis broker's scripts answer those
methods; this class inherits them and replaces the parts that move jobs.

Queues, per offload queue `q` (names start with `prefix`):

    <prefix>.<q>.p<0..9>  quorum queue per priority class: x-max-length + reject-publish,
                          x-delivery-limit, dead-letter (at-least-once) to <prefix>.poison
    <prefix>.delay.<ms>   quorum delay bucket: x-message-ttl=<ms>, dead-letters (at-least-once)
                          through the topic exchange <prefix>.work back to the job's queue
    <prefix>.poison       messages RabbitMQ itself gave up on (x-delivery-limit)

A fetch takes messages (highest priority class first), then claims them in the state store in
one script: the script checks the record, counts the delivery, and issues the fencing token. A
message whose job is finished, cancelled or purged is acked and dropped; one that arrives early
(a delay bucket is coarser than the eta, or RabbitMQ redelivered a job whose lease is still live)
goes back to a delay bucket. Leases are enforced by the fetching process: when one runs out, the
message is re-published and acked, so it is deliverable again; if the process dies, RabbitMQ
redelivers at once and the claim waits out the lease. Settles are checked against the token
before the AMQP message is touched: a stale ack changes nothing, in Redis or in RabbitMQ.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aio_pika
import aio_pika.abc
import aio_pika.exceptions

from offload.brokers import rabbitmq_scripts as rlua
from offload.brokers import redis_keys as keys
from offload.brokers.base import Delivery, Enqueued, Settle
from offload.brokers.redis import RedisBroker
from offload.errors import BrokerError, ConfigurationError, QueueFull
from offload.message import Message

log = logging.getLogger(__name__)

DEFAULT_STATE = "redis://127.0.0.1:6379/0"
DEFAULT_PREFIX = "offload"
PRIORITIES = range(9, -1, -1)  # priority classes, highest first (priorities are clamped to 0..9)
MAX_BLOCK = 1.0  # a waiting fetch re-checks this often (delay buckets arrive without a signal)
MIN_BLOCK = 0.02
MIN_BUCKET_MS = 10
MAX_BUCKET_MS = 99 * 10**8  # ~115 days; longer delays hop through several buckets
_OPTIONS = {"state", "prefix", "max_length", "delivery_limit"}
AMQP_NAMES = "amqp"  # Redis SET (in the namespace) of every AMQP queue made, for cleanup tools


def parse_rabbitmq_url(url: str) -> tuple[str, str, str, int, int]:
    """Split our options off: (AMQP URL, state URL, prefix, max_length, delivery_limit)."""
    parts = urlsplit(url)
    if parts.scheme not in ("amqp", "amqps"):
        raise ConfigurationError(f"not an AMQP URL: {parts.scheme}://...")
    state, prefix, max_length, delivery_limit = DEFAULT_STATE, DEFAULT_PREFIX, 1_000_000, 20
    rest: list[tuple[str, str]] = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name == "state":
            state = value
        elif name == "prefix":
            prefix = value
        elif name in ("max_length", "delivery_limit"):
            try:
                number = int(value)
            except ValueError:
                raise ConfigurationError(
                    f"{name}={value!r} in the RabbitMQ URL: use a whole number"
                ) from None
            if name == "max_length":
                max_length = number
            else:
                delivery_limit = number
        else:
            rest.append((name, value))  # aio-pika's own options (heartbeat, ...)
    if not prefix:
        raise ConfigurationError("empty prefix in the RabbitMQ URL")
    state_parts = urlsplit(state)
    if state_parts.scheme not in ("redis", "rediss"):
        raise ConfigurationError(f"state={state!r}: the RabbitMQ broker's state store must be a Redis URL")
    if "prefix" not in dict(parse_qsl(state_parts.query)):
        query = "&".join(q for q in (state_parts.query, urlencode({"prefix": f"{prefix}:"})) if q)
        state = urlunsplit(state_parts._replace(query=query))
    amqp = urlunsplit(parts._replace(query=urlencode(rest)))
    return amqp, state, prefix, max_length, delivery_limit


def bucket_ms(seconds: float) -> int:
    """The delay bucket for `seconds`: rounded down to two significant digits of milliseconds
    (at least MIN_BUCKET_MS), so at most ~900 buckets exist; an early arrival is re-bucketed."""
    ms = max(MIN_BUCKET_MS, min(MAX_BUCKET_MS, int(seconds * 1000)))
    scale = 10 ** max(0, len(str(ms)) - 2)
    return int(ms // scale * scale)


@dataclass
class _Held:
    """An AMQP message this process took, and the lease it is under."""

    message: aio_pika.abc.AbstractIncomingMessage
    queue: str
    prio: int
    token: int
    timer: asyncio.TimerHandle | None = None


class RabbitMQBroker(RedisBroker):
    def __init__(self, url: str = "amqp://guest:guest@127.0.0.1:5672/") -> None:
        amqp, state, prefix, max_length, delivery_limit = parse_rabbitmq_url(url)
        super().__init__(state)
        self.url = url
        self._amqp_url = amqp
        self.amqp_prefix = prefix
        self.max_length = max_length
        self.delivery_limit = delivery_limit
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._queues: dict[str, aio_pika.abc.AbstractQueue] = {}
        self._buckets: set[int] = set()
        self._held: dict[tuple[str, int], _Held] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- plumbing ------------------------------------------------------------------------------

    async def connect(self) -> None:
        if self._channel is not None:
            return
        await super().connect()
        client = await self._redis()
        for name in ("CLAIM", "ROLLBACK", "ROUTE"):
            self._scripts[name] = client.register_script(getattr(rlua, name))
        try:
            self._connection = await aio_pika.connect(self._amqp_url, timeout=10)
        except Exception as exc:
            await super().close()
            raise BrokerError(f"cannot reach RabbitMQ: {exc}; is it running? check the broker URL") from exc
        channel = await self._connection.channel(publisher_confirms=True)
        p = self.amqp_prefix
        work = await channel.declare_exchange(f"{p}.work", aio_pika.ExchangeType.TOPIC, durable=True)
        await channel.declare_exchange(f"{p}.delay", aio_pika.ExchangeType.TOPIC, durable=True)
        poison = await channel.declare_queue(
            f"{p}.poison", durable=True, arguments={"x-queue-type": "quorum"}
        )
        await self._remember(poison.name)
        self._work = work
        self._channel = channel

    async def close(self) -> None:
        for held in self._held.values():
            if held.timer is not None:
                held.timer.cancel()
        self._held.clear()  # the channel's close hands unacked messages back to RabbitMQ
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._connection is not None:
            connection, self._connection, self._channel = self._connection, None, None
            self._queues.clear()
            self._buckets.clear()
            with contextlib.suppress(Exception):
                await connection.close()
        await super().close()

    async def _ch(self) -> aio_pika.abc.AbstractChannel:
        if self._channel is None:
            await self.connect()
        assert self._channel is not None
        return self._channel

    async def _remember(self, *names: str) -> None:
        client = await self._redis()
        await cast(Any, client.sadd(self.namespace + AMQP_NAMES, *names))

    def _sub(self, queue: str, prio: int) -> str:
        return f"{self.amqp_prefix}.{queue}.p{prio}"

    async def _declare(self, queue: str) -> None:
        """Declare the queue's priority classes (quorum queues) and bind them for delay returns."""
        if self._sub(queue, 0) in self._queues:
            return
        channel = await self._ch()
        args: dict[str, Any] = {
            "x-queue-type": "quorum",
            "x-max-length": self.max_length,
            "x-overflow": "reject-publish",
            "x-delivery-limit": self.delivery_limit,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": f"{self.amqp_prefix}.poison",
            "x-dead-letter-strategy": "at-least-once",
        }
        names = [self._sub(queue, prio) for prio in PRIORITIES]
        await self._remember(*names)
        for name in names:
            q = await channel.declare_queue(name, durable=True, arguments=args)
            await q.bind(self._work, routing_key=f"*.{name}")
            self._queues[name] = q

    async def _bucket(self, ms: int) -> str:
        name = f"{self.amqp_prefix}.delay.{ms}"
        if ms not in self._buckets:
            channel = await self._ch()
            await self._remember(name)
            q = await channel.declare_queue(
                name,
                durable=True,
                arguments={
                    "x-queue-type": "quorum",
                    "x-message-ttl": ms,
                    "x-overflow": "reject-publish",
                    "x-dead-letter-exchange": f"{self.amqp_prefix}.work",
                    "x-dead-letter-strategy": "at-least-once",
                },
            )
            await q.bind(f"{self.amqp_prefix}.delay", routing_key=f"{ms}.#")
            self._buckets.add(ms)
        return name

    async def _publish(self, job_id: str, queue: str, prio: int, body: bytes, delay: float) -> None:
        """Publish one job message (to its queue, or to a delay bucket) and wait for the confirm."""
        prio = min(9, max(0, prio))
        await self._declare(queue)
        channel = await self._ch()
        message = aio_pika.Message(
            body,
            message_id=job_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers={"q": queue, "p": prio, "seq": time.time_ns()},
        )
        target = self._sub(queue, prio)
        if delay > 0:
            ms = bucket_ms(delay)
            await self._bucket(ms)
            exchange = await channel.get_exchange(f"{self.amqp_prefix}.delay", ensure=False)
            await exchange.publish(message, routing_key=f"{ms}.{target}", mandatory=True)
        else:
            await channel.default_exchange.publish(message, routing_key=target, mandatory=True)

    # -- enqueue -------------------------------------------------------------------------------

    async def enqueue(self, items: Sequence[tuple[Message, bytes]]) -> list[Enqueued]:
        results = await super().enqueue(items)  # records, idempotency and the bound, atomically
        now = time.time()
        fresh = [(m, body) for (m, body), e in zip(items, results, strict=True) if e.created]
        try:
            for queue in dict.fromkeys(m.queue for m, _ in fresh):
                await self._declare(queue)  # first, so the publishes below go out in order
            for m, _ in fresh:
                if m.eta is not None and m.eta > now:
                    await self._bucket(bucket_ms(m.eta - now))
            await asyncio.gather(
                *(self._publish(m.id, m.queue, m.priority, body, (m.eta or now) - now) for m, body in fresh)
            )
        except BaseException as exc:
            await self._run("ROLLBACK", [m.id for m, _ in fresh])
            if isinstance(exc, aio_pika.exceptions.DeliveryError):
                [stats] = await self.stats([fresh[0][0].queue])
                raise QueueFull(stats.queue, stats.depth, self.max_length, stats.drain_rate) from exc
            raise
        return results

    # -- fetch ---------------------------------------------------------------------------------

    async def fetch(self, queues: Sequence[str], limit: int, wait: float) -> list[Delivery]:
        if limit <= 0 or not queues:
            return []
        client = await self._redis()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        signals = [self.namespace + keys.SIGNAL + q for q in queues]
        while True:
            deliveries = await self._take_amqp(queues, limit)
            remaining = deadline - loop.time()
            if deliveries or remaining <= 0:
                return deliveries
            pause = min(remaining, MAX_BLOCK)
            due = await self._next_due(queues)
            if due is not None:
                pause = min(pause, max(due + 0.005, MIN_BLOCK))
            with self._errors():
                await cast(Any, client.blpop(signals, timeout=max(pause, MIN_BLOCK)))

    async def _next_due(self, queues: Sequence[str]) -> float | None:
        client = await self._redis()
        now = time.time()
        due: float | None = None
        for q in queues:
            head = await client.zrange(self.namespace + keys.DELAYED + q, 0, 0, withscores=True)
            if head:
                at = float(head[0][1]) - now
                due = at if due is None else min(due, at)
        return due

    async def _take_amqp(self, queues: Sequence[str], limit: int) -> list[Delivery]:
        call = asyncio.ensure_future(self._take_now(queues, limit))
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            call.add_done_callback(self._give_back)
            raise

    def _give_back(self, call: asyncio.Future[list[Delivery]]) -> None:
        if call.cancelled() or call.exception() is not None:
            return
        if deliveries := call.result():
            self._spawn(self.settle([Settle(d, "release") for d in deliveries]))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _get(self, name: str) -> aio_pika.abc.AbstractIncomingMessage | None:
        return await self._queues[name].get(no_ack=False, fail=False)

    async def _take_now(self, queues: Sequence[str], limit: int) -> list[Delivery]:
        for q in queues:
            await self._declare(q)
        out: list[Delivery] = []
        while len(out) < limit:
            taken = await self._pull(queues, limit - len(out))
            if not taken:
                break
            out.extend(await self._claim(taken))
        return out

    async def _pull(self, queues: Sequence[str], limit: int) -> list[aio_pika.abc.AbstractIncomingMessage]:
        """Take up to `limit` messages, highest priority class first, then oldest."""
        taken: list[aio_pika.abc.AbstractIncomingMessage] = []
        for prio in PRIORITIES:
            if len(queues) == 1:
                name = self._sub(queues[0], prio)
                while len(taken) < limit and (msg := await self._get(name)) is not None:
                    taken.append(msg)
                continue
            heads: dict[str, aio_pika.abc.AbstractIncomingMessage] = {}
            for q in queues:
                if (msg := await self._get(self._sub(q, prio))) is not None:
                    heads[q] = msg
            while heads and len(taken) < limit:
                q = min(heads, key=lambda name: _seq(heads[name]))
                taken.append(heads.pop(q))
                if (msg := await self._get(self._sub(q, prio))) is not None:
                    heads[q] = msg
            for msg in heads.values():
                await msg.nack(requeue=True)
            if len(taken) >= limit:
                break
        return taken

    async def _claim(self, taken: list[aio_pika.abc.AbstractIncomingMessage]) -> list[Delivery]:
        ids = [msg.message_id or "" for msg in taken]
        reply = await self._run("CLAIM", [self.worker_name, *ids])
        loop = asyncio.get_running_loop()
        out: list[Delivery] = []
        for msg, job_id, verdict in zip(taken, ids, reply, strict=True):
            kind = _text(verdict[0])
            if kind == "take":
                _, q, body, token, deliveries, attempts, lease = verdict
                d = Delivery(
                    job_id, _text(q), bytes(body), int(token), int(deliveries), int(attempts), float(lease)
                )
                held = _Held(msg, d.queue, _prio(msg), d.token)
                self._held[(job_id, d.token)] = held
                held.timer = loop.call_later(d.lease_seconds + 0.05, self._expired, job_id, d.token)
                out.append(d)
            elif kind == "wait":
                _, seconds, q, prio = verdict
                await self._publish(job_id, _text(q), int(prio), msg.body, float(seconds))
                await msg.ack()
            else:
                await msg.ack()
        return out

    def _expired(self, job_id: str, token: int) -> None:
        held = self._held.pop((job_id, token), None)
        if held is not None:
            self._spawn(self._requeue(job_id, held, 0.0, signal=True))

    async def _requeue(self, job_id: str, held: _Held, delay: float, signal: bool = False) -> None:
        """Make the job's message deliverable again (after `delay`): publish anew, ack the old."""
        try:
            await self._publish(job_id, held.queue, held.prio, held.message.body, delay)
            await held.message.ack()
            if signal:
                client = await self._redis()
                await cast(Any, client.lpush(self.namespace + keys.SIGNAL + held.queue, "1"))
        except Exception as exc:  # noqa: BLE001 - the channel is gone: RabbitMQ hands the message back itself
            log.warning("re-publishing job %s failed (RabbitMQ will redeliver it): %s", job_id, exc)

    # -- settle --------------------------------------------------------------------------------

    async def settle(self, outcomes: Sequence[Settle]) -> list[bool]:
        accepted = await super().settle(outcomes)  # the fencing check, in the state store
        for outcome, ok in zip(outcomes, accepted, strict=True):
            if not ok:
                continue  # a stale token: neither the record nor the AMQP message changes
            d = outcome.delivery
            held = self._held.pop((d.job_id, d.token), None)
            if held is None:
                continue  # taken by another process: its lease timer re-publishes, the claim drops it
            if held.timer is not None:
                held.timer.cancel()
            if outcome.kind in ("ack", "dead"):
                await held.message.ack()
            else:
                delay = outcome.delay if outcome.kind == "retry" else 0.0
                await self._requeue(d.job_id, held, delay)
        return accepted

    async def extend(self, deliveries: Sequence[Delivery]) -> list[bool]:
        alive = await super().extend(deliveries)
        loop = asyncio.get_running_loop()
        for d, ok in zip(deliveries, alive, strict=True):
            held = self._held.get((d.job_id, d.token))
            if ok and held is not None:
                if held.timer is not None:
                    held.timer.cancel()
                held.timer = loop.call_later(d.lease_seconds + 0.05, self._expired, d.job_id, d.token)
        return alive

    # -- the DLQ -------------------------------------------------------------------------------

    async def replay_dead(self, job_ids: Sequence[str] | None = None, queue: str | None = None) -> int:
        chosen = [r.id for r in await self.dead_jobs(queue, limit=1_000_000)]
        if job_ids is not None:
            wanted = set(job_ids)
            chosen = [i for i in chosen if i in wanted]
        if not chosen:
            return 0
        count = await super().replay_dead(chosen, queue)
        client = await self._redis()
        for job_id, route in zip(chosen, await self._run("ROUTE", chosen), strict=True):
            if _text(route[0]) == "queued":
                body = await cast(Any, client.hget(self.namespace + keys.JOB + job_id, "body"))
                await self._publish(job_id, _text(route[1]), int(route[2]), bytes(body), 0.0)
        return count


def _seq(message: aio_pika.abc.AbstractIncomingMessage) -> int:
    value = (message.headers or {}).get("seq", 0)
    return int(cast(Any, value))


def _prio(message: aio_pika.abc.AbstractIncomingMessage) -> int:
    value = (message.headers or {}).get("p", 0)
    return int(cast(Any, value))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
