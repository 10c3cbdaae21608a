"""The RabbitMQ broker: quorum queues carry the jobs, a Redis state store keeps their records.

    amqp://guest:guest@127.0.0.1:5672/?state=redis://127.0.0.1:6379/0&prefix=offload

RabbitMQ is the transport: every job is a persistent message in a quorum queue (one per priority
class, see rabbitmq_link), published with publisher confirms, taken with `basic.get` and acked
by hand once its outcome is recorded. RabbitMQ cannot answer the rest of the port (job records,
results, fencing tokens, idempotency keys, the DLQ, drain rate), so the records live in the Redis
broker's format under the `state` URL and the Redis broker's scripts answer those methods; this
class inherits them and replaces the parts that move jobs.

Enqueue order (the crash window between the two stores): the record is written first, in the
same MULTI/EXEC as a mark "publish not confirmed" (UNPUBLISHED); then the message is published
and confirmed; then the mark is removed. A producer that dies in between leaves a marked record,
and a sweeper (run by every fetching process, every SWEEP_EVERY seconds) re-publishes records
marked longer than `republish_after` seconds. Publishing first instead would leave a message
whose record may never come (a refused idempotency key, a full queue, the producer dying), and
a fetch could not tell "not written yet" from "never will be" (nor from purged or cancelled)
without a clock-based guess; a record-first sweep only ever adds a duplicate message, which the
claim below already tolerates.

A fetch asks the state store which priority classes hold ready jobs (HINT), takes messages from
those with `basic.get` (highest class first; queues of one class in turn), then claims them in
one script (CLAIM): it checks the record, counts the delivery, issues the fencing token. A
message whose job is finished, cancelled, purged or unknown is acked and dropped; one that
arrives early (a delay bucket is coarser than the eta, or RabbitMQ redelivered a job whose lease
is still live) goes back to a delay bucket. Leases are enforced by the fetching process: when one
runs out, the message is re-published and then acked, so it is deliverable again; if the process
dies, RabbitMQ redelivers at once and the claim waits out the lease. Settles are checked against
the token in the state store before the AMQP message is touched: a stale ack changes nothing.
Every re-publish comes before the ack of the message it replaces, so a crash between the two
leaves a duplicate, never nothing.

Why `basic.get` and not a consumer with prefetch = free slots: see docs/brokers/rabbitmq.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import aio_pika.abc
import aio_pika.exceptions
import msgspec

from offload.brokers import rabbitmq_scripts as rlua
from offload.brokers import redis_keys as keys
from offload.brokers.base import Delivery, Enqueued, Settle
from offload.brokers.rabbitmq_link import AMQP_ERRORS, AmqpLink
from offload.brokers.rabbitmq_url import AMQP_NAMES, CLASSES, UNPUBLISHED, parse_rabbitmq_url
from offload.brokers.redis import RedisBroker
from offload.errors import BrokerError, QueueFull
from offload.message import Message

__all__ = ["AMQP_NAMES", "RabbitMQBroker"]

log = logging.getLogger(__name__)

MAX_BLOCK = 1.0  # a waiting fetch re-checks this often (delay buckets arrive without a signal)
MIN_BLOCK = 0.02
SLEEP_BELOW = 0.15  # shorter pauses are slept: Redis's BLPOP timeout is only as fine as its hz
FULL_LOOK_EVERY = 5.0  # seconds between fetches that look in every class (strays, duplicates)
SWEEP_EVERY = 5.0  # seconds between sweeps (unconfirmed publishes, the poison queue)
SWEEP_BATCH = 500
# A lease expired this long ago whose job nobody claimed is recovered by the sweeper (STRANDED):
# the worker holding its message is cut off or frozen. The holder's own lease timer, when it
# runs, gets there first (at lease + 0.05 s), so a live worker's expiry adds no extra message.
STRANDED_AFTER = 1.0


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
        options = parse_rabbitmq_url(url)
        super().__init__(options.state_url)
        self.url = url
        self.options = options
        self.max_length = options.max_length
        self._link = AmqpLink(options, self._remember)
        self._held: dict[tuple[str, int], _Held] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._last_sweep = 0.0
        self._last_full_look = 0.0

    # -- plumbing ------------------------------------------------------------------------------

    async def connect(self) -> None:
        await super().connect()
        client = await self._redis()
        for name in ("CLAIM", "ROLLBACK", "ROUTE", "MARK", "SWEEP", "HINT", "POISON", "STRANDED"):
            if name not in self._scripts:
                self._scripts[name] = client.register_script(getattr(rlua, name))
        if not self._link.open:
            try:
                await self._link.channel()
            except BaseException:
                await super().close()
                raise

    async def close(self) -> None:
        for held in self._held.values():
            if held.timer is not None:
                held.timer.cancel()
        self._held.clear()  # the channel's close hands unacked messages back to RabbitMQ
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._link.close()
        await super().close()

    async def _remember(self, queue: str | None, names: list[str], classes: list[int]) -> None:
        client = await self._redis()
        with self._errors():
            async with client.pipeline(transaction=False) as pipe:
                pipe.sadd(self.namespace + AMQP_NAMES, *names)
                if queue is not None and classes:
                    pipe.sadd(self.namespace + CLASSES + queue, *classes)
                await pipe.execute()

    async def _run(self, name: str, args: Sequence[Any]) -> Any:
        if name != "ENQUEUE":
            return await super()._run(name, args)
        # The Redis broker's enqueue script, in one transaction with the "not published yet"
        # mark of its ids (see the module docstring): no record ever exists unmarked.
        ids = [item[0] for item in msgspec.msgpack.decode(args[0])]
        client = await self._redis()
        with self._errors():
            async with client.pipeline(transaction=True) as pipe:
                await self._scripts["MARK"](keys=self._route, args=[self.namespace, *ids], client=pipe)
                await self._scripts["ENQUEUE"](keys=self._route, args=[self.namespace, *args], client=pipe)
                _, reply = await pipe.execute()
        return reply

    async def _published(self, ids: Sequence[str], queues: Sequence[str]) -> None:
        """Confirmed by RabbitMQ: unmark the ids and wake fetches waiting on their queues."""
        client = await self._redis()
        with self._errors():
            async with client.pipeline(transaction=False) as pipe:
                if ids:
                    pipe.zrem(self.namespace + UNPUBLISHED, *ids)
                for q in dict.fromkeys(queues):
                    pipe.lpush(self.namespace + keys.SIGNAL + q, "1")
                    pipe.ltrim(self.namespace + keys.SIGNAL + q, 0, keys.SIGNAL_CAP - 1)
                await pipe.execute()

    # -- enqueue -------------------------------------------------------------------------------

    async def declare_queue(self, name: str, max_depth: int | None) -> None:
        await super().declare_queue(name, max_depth)
        await self._link.declare(name, 0)  # the usual class, so a first send does not wait for it

    async def enqueue(self, items: Sequence[tuple[Message, bytes]]) -> list[Enqueued]:
        results = await super().enqueue(items)  # marked records, idempotency and the bound, atomically
        now = time.time()
        fresh = [(m, body) for (m, body), e in zip(items, results, strict=True) if e.created]
        if not fresh:
            return results
        try:
            for m, _ in fresh:  # declarations first, so the publishes below go out in order
                await self._link.declare(m.queue, min(9, max(0, m.priority)))
            await asyncio.gather(
                *(
                    self._link.publish(m.id, m.queue, m.priority, body, (m.eta or now) - now)
                    for m, body in fresh
                )
            )
        except BaseException as exc:
            # Not confirmed: take the records back, so the caller's error is the whole truth (a
            # message that did go out finds no record and is dropped). If this fails too, the
            # marked records are re-published by a sweeper: the job runs although we raised.
            with contextlib.suppress(Exception):
                await self._run("ROLLBACK", [m.id for m, _ in fresh])
            if isinstance(exc, aio_pika.exceptions.DeliveryError):
                [stats] = await self.stats([fresh[0][0].queue])
                raise QueueFull(stats.queue, stats.depth, self.max_length, stats.drain_rate) from exc
            raise
        await self._published([m.id for m, _ in fresh], [m.queue for m, _ in fresh])
        return results

    # -- fetch ---------------------------------------------------------------------------------

    async def fetch(self, queues: Sequence[str], limit: int, wait: float) -> list[Delivery]:
        if limit <= 0 or not queues:
            return []
        client = await self._redis()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        signals = [self.namespace + keys.SIGNAL + q for q in queues]
        self._maybe_sweep()
        while True:
            deliveries, due = await self._take_amqp(queues, limit)
            remaining = deadline - loop.time()
            if deliveries or remaining <= 0:
                return deliveries
            pause = min(remaining, MAX_BLOCK)
            if due is not None:
                pause = min(pause, max(due + 0.005, MIN_BLOCK))
            if pause < SLEEP_BELOW:
                await asyncio.sleep(pause)
                continue
            with self._errors():
                await cast(Any, client.blpop(signals, timeout=pause))

    async def _take_amqp(self, queues: Sequence[str], limit: int) -> tuple[list[Delivery], float | None]:
        call = asyncio.ensure_future(self._take_now(queues, limit))
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            call.add_done_callback(self._give_back)
            raise

    def _give_back(self, call: asyncio.Future[tuple[list[Delivery], float | None]]) -> None:
        if call.cancelled() or call.exception() is not None:
            return
        if deliveries := call.result()[0]:
            self._spawn(self.settle([Settle(d, "release") for d in deliveries]))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _take_now(self, queues: Sequence[str], limit: int) -> tuple[list[Delivery], float | None]:
        reply = await self._run("HINT", [limit, *queues])
        due = float(reply[0]) if reply[0] else None
        picks = [(queues[int(i)], int(p)) for i, p in (_text(x).split(":") for x in reply[1])]
        now = time.monotonic()
        if now - self._last_full_look > FULL_LOOK_EVERY:
            self._last_full_look = now  # every declared class, for messages Redis does not expect
            client = await self._redis()
            with self._errors():
                found = [await client.smembers(self.namespace + CLASSES + q) for q in queues]
            extra = [{int(c) for c in members} for members in found]
        else:
            extra = [{int(c) for c in _text(r).split(",") if c} for r in reply[2:]]
        out: list[Delivery] = []
        taken = await self._pull(queues, picks, extra, limit)
        while taken:
            out.extend(await self._claim(taken))
            if len(out) >= limit:
                break
            # Dropped or delayed on the way: look again, where anything may still wait.
            extra = [{p for q2, p in picks if q2 == q} | e for q, e in zip(queues, extra, strict=True)]
            taken = await self._pull(queues, [], extra, limit - len(out))
        return out, due

    async def _pull(
        self, queues: Sequence[str], picks: list[tuple[str, int]], extra: list[set[int]], limit: int
    ) -> list[aio_pika.abc.AbstractIncomingMessage]:
        """Take up to `limit` messages: first the picks, in order (highest priority, then oldest,
        across the queues, as the state store sees them); then from the `extra` classes of each
        queue, highest class first and the queues of a class in turn.

        Each message is taken only when it will be returned, which keeps `basic.nack` out: a
        requeued message counts towards x-delivery-limit in a quorum queue.
        """
        taken: list[aio_pika.abc.AbstractIncomingMessage] = []
        empty: set[str] = set()
        for q, prio in picks:
            name = self._link.name(q, prio)
            if len(taken) >= limit:
                return taken
            if name not in empty:
                msg = await self._link.get(name)
                if msg is None:
                    empty.add(name)
                else:
                    taken.append(msg)
        for prio in sorted(set[int]().union(*extra), reverse=True):
            names = [self._link.name(q, prio) for q, e in zip(queues, extra, strict=True) if prio in e]
            names = [n for n in names if n not in empty]
            while names and len(taken) < limit:
                for name in list(names):
                    if len(taken) >= limit:
                        break
                    msg = await self._link.get(name)
                    if msg is None:
                        names.remove(name)
                    else:
                        taken.append(msg)
            if len(taken) >= limit:
                break
        return taken

    async def _claim(self, taken: list[aio_pika.abc.AbstractIncomingMessage]) -> list[Delivery]:
        ids = [msg.message_id or "" for msg in taken]
        try:
            reply = await self._run("CLAIM", [self.worker_name, *ids])
        except BaseException:
            for msg in taken:  # unclaimed: hand them back at once (this counts as a redelivery)
                with contextlib.suppress(*AMQP_ERRORS):
                    await msg.nack(requeue=True)
            raise
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
                try:
                    await self._link.publish(job_id, _text(q), int(prio), msg.body, float(seconds))
                    await msg.ack()
                except AMQP_ERRORS as exc:  # RabbitMQ hands the message back itself
                    log.warning("delaying job %s failed (RabbitMQ will redeliver it): %s", job_id, exc)
            else:
                with contextlib.suppress(*AMQP_ERRORS):
                    await msg.ack()
        return out

    def _expired(self, job_id: str, token: int) -> None:
        held = self._held.pop((job_id, token), None)
        if held is not None:
            self._spawn(self._requeue(job_id, held, 0.0, signal=True))

    async def _requeue(self, job_id: str, held: _Held, delay: float, signal: bool = False) -> None:
        """Make the job's message deliverable again (after `delay`): publish anew, then ack the old."""
        try:
            await self._link.publish(job_id, held.queue, held.prio, held.message.body, delay)
        except Exception as exc:  # noqa: BLE001 - the old message is not acked: RabbitMQ redelivers it
            log.warning("re-publishing job %s failed (RabbitMQ will redeliver it): %s", job_id, exc)
            return
        with contextlib.suppress(*AMQP_ERRORS):
            await held.message.ack()  # on a channel that is gone: redelivered, then dropped or delayed
        if signal:
            with contextlib.suppress(BrokerError):
                await self._published([], [held.queue])

    # -- the sweeper ------------------------------------------------------------------------------

    def _maybe_sweep(self) -> None:
        now = time.monotonic()
        if now - self._last_sweep >= SWEEP_EVERY:
            self._last_sweep = now
            self._spawn(self._sweep())

    async def _sweep(self) -> None:
        try:
            await self.sweep()
        except Exception as exc:  # noqa: BLE001 - the next fetch's sweep tries again
            log.warning("sweeping unconfirmed publishes and poison messages failed: %s", exc)

    async def sweep(self) -> tuple[int, int]:
        """Re-publish records whose publish was never confirmed (a producer died between its two
        writes) or whose lease expired while another process holds their message (STRANDED), and
        dead-letter the jobs of poison messages. Returns (re-published, poisoned)."""
        republished = 0
        # Without this, a job whose worker is cut off from RabbitMQ (or frozen) past its lease
        # runs nowhere else until RabbitMQ declares that worker's connection dead: minutes.
        while rows := await self._run("STRANDED", [repr(STRANDED_AFTER), SWEEP_BATCH]):
            for job_id, q, prio, body in rows:
                log.warning(
                    "job %s: its lease expired and its worker did not hand it back; publishing it again",
                    _text(job_id),
                )
                await self._link.publish(_text(job_id), _text(q), int(prio), bytes(body), 0.0)
            await self._published([_text(r[0]) for r in rows], [_text(r[1]) for r in rows])
            republished += len(rows)
            if len(rows) < SWEEP_BATCH:
                break
        while rows := await self._run("SWEEP", [repr(self.options.republish_after), SWEEP_BATCH]):
            for job_id, q, prio, seconds, body in rows:
                log.warning("job %s: its publish was never confirmed; publishing it now", _text(job_id))
                await self._link.publish(_text(job_id), _text(q), int(prio), bytes(body), float(seconds))
            await self._published([_text(r[0]) for r in rows], [_text(r[1]) for r in rows])
            republished += len(rows)
            if len(rows) < SWEEP_BATCH:
                break
        poisoned = 0
        while True:
            taken: list[aio_pika.abc.AbstractIncomingMessage] = []
            while len(taken) < SWEEP_BATCH and (msg := await self._link.get(f"{self.options.prefix}.poison")):
                taken.append(msg)
            if not taken:
                break
            poisoned += int(await self._run("POISON", [m.message_id or "" for m in taken]))
            for msg in taken:
                await msg.ack()
        if poisoned:
            log.warning("dead-lettered %d job(s) RabbitMQ gave up on (x-delivery-limit)", poisoned)
        return republished, poisoned

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
                with contextlib.suppress(*AMQP_ERRORS):
                    await held.message.ack()  # if the channel is gone: redelivered, then dropped
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
        await self._run("MARK", chosen)  # first: a crash before the publishes leaves them to the sweeper
        count = await super().replay_dead(chosen, queue)
        routes = await self._run("ROUTE", chosen)
        for job_id, (state, q, prio, seconds, body) in zip(chosen, routes, strict=True):
            if _text(state) == "queued":
                await self._link.publish(job_id, _text(q), int(prio), bytes(body), float(seconds))
        await self._published(chosen, [_text(r[1]) for r in routes if _text(r[0]) == "queued"])
        return count


def _prio(message: aio_pika.abc.AbstractIncomingMessage) -> int:
    value = (message.headers or {}).get("p", 0)
    return int(cast(Any, value))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
