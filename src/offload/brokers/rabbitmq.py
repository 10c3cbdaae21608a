"""The RabbitMQ broker: quorum queues carry the jobs, a Redis state store keeps their records.

    amqp://guest:guest@127.0.0.1:5672/?state=redis://127.0.0.1:6379/0&prefix=offload

RabbitMQ is the transport: every job is a persistent message in a quorum queue (one per priority
class, see rabbitmq_link), published with publisher confirms. RabbitMQ cannot answer the rest of
the port (job records, results, leases, fencing tokens, idempotency keys, the DLQ, drain rate), so
the records live in the Redis broker's format under the `state` URL and the Redis broker's
scripts answer those methods; this class inherits them and replaces the parts that move jobs.

Enqueue order (the crash window between the two stores): the record is written first, in the
same script as a mark "publish not confirmed" (UNPUBLISHED); then the messages are published
and confirmed; then the mark is removed (in the background: the send returns on the confirm). A
producer that dies in between leaves a marked record, and a sweeper (run by every fetching
process, every SWEEP_EVERY seconds) re-publishes records marked longer than `republish_after`
seconds. Publishing first instead would leave a message whose record may never come (a refused
idempotency key, a full queue, the producer dying), and a fetch could not tell "not written yet"
from "never will be" (nor from purged or cancelled) without a clock-based guess; a record-first
sweep only ever adds a duplicate message, which the claim below already tolerates.

Concurrent sends (enqueue_calls, fed by App's send batching): every call's records in one Redis
pipeline (one MARK_ENQUEUE script per call, so each call's idempotency and bound stay atomic on
their own), then every call's messages published before any confirm is awaited; a call that
RabbitMQ refused (reject-publish: QueueFull) or that failed to publish is rolled back alone.

Fetching (rabbitmq_consume): long-lived consumers on the fetched queues' priority classes push
messages into a small local buffer (QoS prefetch sized from the fetch limit). A fetch takes up
to `limit` of them, highest class first, claims them in one script (CLAIM: checks the record,
counts the delivery, issues the fencing token) and acks them right away: from then on the Redis
lease protects the job, as in the Redis broker. When the buffer holds fewer than `limit`, the
fetch first looks (HINT) where the state store sees ready jobs and takes the rest with
`basic.get`, so a fetch sees what was sent before it. A message whose job is finished,
cancelled, purged or unknown is acked and dropped; one that arrives early (a delay bucket is
coarser than the eta, or a duplicate of a job whose lease is live) goes back to a delay bucket.

Leases: an expired lease is recovered in the state store (STRANDED: requeued, or dead-lettered
past max_deliveries, and marked "publish not confirmed") and its job published anew: by the
holder's own timer, by any waiting fetch that sees it, and by every process's sweeper. A retry
or release is recorded with the same mark before its message is published. Settles are checked
against the token in the state store: a stale one changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import aio_pika.exceptions
from redis import exceptions as rex

from offload.brokers import rabbitmq_scripts as rlua
from offload.brokers.base import Delivery, Enqueued, Settle
from offload.brokers.rabbitmq_consume import Arrival, Inbox
from offload.brokers.rabbitmq_link import AMQP_ERRORS, AmqpLink
from offload.brokers.rabbitmq_sweep import Sweeper
from offload.brokers.rabbitmq_url import AMQP_NAMES, CLASSES, UNPUBLISHED, parse_rabbitmq_url
from offload.brokers.redis import RedisBroker, _enqueue_meta, _enqueued
from offload.errors import BrokerError, QueueFull
from offload.message import Message

__all__ = ["AMQP_NAMES", "RabbitMQBroker"]

log = logging.getLogger(__name__)

MAX_BLOCK = 1.0  # a waiting fetch looks again this often (a class nobody consumes yet, leases)
DUE_BLOCK = 0.05  # ... and at least this long after a look that found something due
FULL_LOOK_EVERY = 5.0  # seconds between looks that consume every declared class of the queues
UNMARK_AFTER = 0.05  # seconds a confirmed send's unmark waits for others to go with it
PREFETCH_PER_SLOT = 2  # each consumer's prefetch: this many messages per slot of the fetch limit

# Job ids a SETTLE marks "publish not confirmed" in its transaction (retries and releases).
_MARK: contextvars.ContextVar[Sequence[str]] = contextvars.ContextVar("offload_rabbitmq_mark", default=())


@dataclass
class _Lease:
    """A lease this process holds: the job's class (for a re-publish) and when it expires (loop
    time; one timer per claimed batch watches its leases, see _watch)."""

    prio: int
    expires: float


class RabbitMQBroker(RedisBroker):
    def __init__(self, url: str = "amqp://guest:guest@127.0.0.1:5672/") -> None:
        options = parse_rabbitmq_url(url)
        super().__init__(options.state_url)
        self.url = url
        self.options = options
        self.max_length = options.max_length
        self._link = AmqpLink(options, self._remember)
        self._inbox = Inbox(self._link)
        self._leases: dict[tuple[str, int], _Lease] = {}
        self._lease_timers: set[asyncio.TimerHandle] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._last_full_look = 0.0
        self._limit = 1  # the largest fetch limit seen: the worker's concurrency
        self._unmarking: list[str] = []
        self._unmarker: asyncio.Task[Any] | None = None
        self._sweeper = Sweeper(self._run, self._link, self._published, self._spawn, options)
        # Concurrent sends reach enqueue_calls together: one Redis round trip for their records,
        # then every message published before any confirm is awaited.
        self.batches_enqueue_calls = True

    # -- plumbing ------------------------------------------------------------------------------

    async def connect(self) -> None:
        await super().connect()
        client = await self._redis()
        for name in (
            "CLAIM",
            "ROLLBACK",
            "ROUTE",
            "MARK",
            "MARK_ENQUEUE",
            "SWEEP",
            "HINT",
            "POISON",
            "STRANDED",
        ):
            if name not in self._scripts:
                self._scripts[name] = client.register_script(getattr(rlua, name))
        await self._load_scripts()
        if not self._link.open:
            try:
                await self._link.channel()
            except BaseException:
                await super().close()
                raise

    async def close(self) -> None:
        for timer in self._lease_timers:
            timer.cancel()
        self._lease_timers.clear()
        self._leases.clear()
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._inbox.close()  # hands the buffer back
        await self._link.close()
        await super().close()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _remember(self, queue: str | None, names: list[str], classes: list[int]) -> None:
        client = await self._redis()
        with self._errors():
            async with client.pipeline(transaction=False) as pipe:
                pipe.sadd(self.namespace + AMQP_NAMES, *names)
                if queue is not None and classes:
                    pipe.sadd(self.namespace + CLASSES + queue, *classes)
                await pipe.execute()

    async def _run(self, name: str, args: Sequence[Any]) -> Any:
        if name == "ENQUEUE":
            # With the "not published yet" mark of its ids, in the same script (see the module
            # docstring): no record ever exists unmarked.
            return await super()._run("MARK_ENQUEUE", args)
        if name == "SETTLE" and (ids := _MARK.get()):
            return await self._marked(ids, name, args)
        return await super()._run(name, args)

    async def _marked(self, ids: Sequence[str], name: str, args: Sequence[Any]) -> Any:
        client = await self._redis()
        route, space = self._route[0], self.namespace
        for attempt in (1, 2):
            with self._errors():
                try:
                    async with client.pipeline(transaction=True) as pipe:
                        pipe.evalsha(self._scripts["MARK"].sha, 1, route, space, *ids)
                        pipe.evalsha(self._scripts[name].sha, 1, route, space, *args)
                        _, reply = await pipe.execute()
                    return reply
                except rex.NoScriptError:
                    if attempt == 2:
                        raise
            await self._load_scripts()  # Redis restarted or flushed its scripts

    async def _published(self, ids: Sequence[str]) -> None:
        """Confirmed by RabbitMQ: unmark the ids."""
        if not ids:
            return
        client = await self._redis()
        with self._errors():
            await client.zrem(self.namespace + UNPUBLISHED, *ids)

    def _unmark_later(self, ids: Sequence[str]) -> None:
        """Unmark confirmed ids in the background, many sends' at once. If this never happens,
        a sweeper publishes them again after `republish_after`: duplicates, dropped at claim."""
        self._unmarking.extend(ids)
        if self._unmarker is None or self._unmarker.done():
            self._unmarker = self._spawn(self._unmark())

    async def _unmark(self) -> None:
        await asyncio.sleep(UNMARK_AFTER)  # sends one after another share one ZREM
        while self._unmarking:
            ids, self._unmarking = self._unmarking, []
            try:
                await self._published(ids)
            except Exception as exc:  # noqa: BLE001 - see _unmark_later
                log.warning("unmarking %d confirmed publish(es) failed: %s", len(ids), exc)

    # -- enqueue -------------------------------------------------------------------------------

    async def declare_queue(self, name: str, max_depth: int | None) -> None:
        await super().declare_queue(name, max_depth)
        await self._link.declare(name, 0)  # the usual class, so a first send does not wait for it

    async def enqueue(self, items: Sequence[tuple[Message, bytes]]) -> list[Enqueued]:
        return await self._enqueue_as_one_call(items)

    async def enqueue_calls(
        self, calls: Sequence[Sequence[tuple[Message, bytes]]]
    ) -> Sequence[list[Enqueued] | Exception]:
        """Several sends at once, each all-or-nothing on its own (see the module docstring).

        1. Every call's records, marked "publish not confirmed", in one pipelined round trip
           (MARK_ENQUEUE per call: idempotency and the bound, atomically per call).
        2. Every fresh message of every call published before any confirm is awaited.
        3. A call whose publish was refused (QueueFull) or failed is rolled back alone; the
           others' marks are removed in the background.
        """
        outcomes = await self._mark_enqueue(calls)
        fresh: dict[int, list[tuple[Message, bytes]]] = {}
        for i, (items, outcome) in enumerate(zip(calls, outcomes, strict=True)):
            if not isinstance(outcome, Exception):
                created = [(m, body) for (m, body), e in zip(items, outcome, strict=True) if e.created]
                if created:
                    fresh[i] = created
        if not fresh:
            return outcomes
        failed = await self._publish_calls(fresh)
        if failed:
            # Not confirmed: take those calls' records back, so each caller's error is the whole
            # truth (a message that did go out finds no record and is dropped). If this fails
            # too, the marked records are re-published by a sweeper: the jobs run although we
            # raised.
            with contextlib.suppress(Exception):
                await self._run("ROLLBACK", [m.id for i in failed for m, _ in fresh[i]])
            for i, exc in failed.items():
                outcomes[i] = await self._refused(fresh[i], exc)
        self._unmark_later([m.id for i, items in fresh.items() if i not in failed for m, _ in items])
        return outcomes

    async def _mark_enqueue(
        self, calls: Sequence[Sequence[tuple[Message, bytes]]]
    ) -> list[list[Enqueued] | Exception]:
        """Each call's records, marked, by MARK_ENQUEUE: all in one pipeline (each script atomic
        on its own). Returns each call's results, or its QueueFull or BrokerError."""
        outcomes: list[list[Enqueued] | Exception] = [[] for _ in calls]
        prepared = [_enqueue_meta(items) if items else None for items in calls]
        piped: list[int] = []
        for i, p in enumerate(prepared):
            if p is None:
                continue
            if p[1] is not None:
                piped.append(i)
                continue
            try:  # bodies too large for one argument: staged by the Redis broker's enqueue, whose
                outcomes[i] = await super().enqueue(calls[i])  # script is MARK_ENQUEUE here (_run)
            except (QueueFull, BrokerError) as exc:
                outcomes[i] = exc
        if not piped:
            return outcomes
        # Re-sent whole if Redis lost its scripts: a call stored by the first try is not stored twice.
        replies = await self._pipeline(
            [self._evalsha("MARK_ENQUEUE", cast(tuple[bytes, bytes], prepared[i])) for i in piped]
        )
        for i, reply in zip(piped, replies, strict=True):
            try:
                if isinstance(reply, Exception):
                    with self._errors():
                        raise reply
                outcomes[i] = _enqueued(calls[i], reply)
            except (QueueFull, BrokerError) as exc:
                outcomes[i] = exc
        return outcomes

    async def _publish_calls(self, fresh: dict[int, list[tuple[Message, bytes]]]) -> dict[int, BaseException]:
        """Publish every call's messages, all sent before any confirm is awaited (one round trip
        for them all). Returns the calls not confirmed, with why."""
        now = time.time()
        flat = [(i, m) for i, items in fresh.items() for m, _ in items]
        try:
            for _, m in flat:  # declarations first, so the publishes below go out in order
                await self._link.declare(m.queue, min(9, max(0, m.priority)))
            answers = await self._publish_all([m for _, m in flat], now)
        except Exception as exc:  # noqa: BLE001 - a declaration failed: nothing confirmed
            return dict.fromkeys(fresh, exc)
        except BaseException:  # cancelled: no caller hears of these jobs, so take them all back
            with contextlib.suppress(Exception):
                await self._run("ROLLBACK", [m.id for _, m in flat])
            raise
        failed: dict[int, BaseException] = {}
        for (i, _), answer in zip(flat, answers, strict=True):
            if isinstance(answer, BaseException) and i not in failed:
                failed[i] = answer
        return failed

    async def _publish_all(self, messages: list[Message], now: float) -> list[BaseException | None]:
        """Publish the messages, each awaiting its confirm: what each raised, or None."""
        if len(messages) == 1:  # most sends: without gather's task and its loop turn
            m = messages[0]
            try:
                await self._link.publish(m.id, m.queue, m.priority, (m.eta or now) - now)
            except Exception as exc:  # noqa: BLE001 - reported per call, as gather's are
                return [exc]
            return [None]
        return await asyncio.gather(
            *(self._link.publish(m.id, m.queue, m.priority, (m.eta or now) - now) for m in messages),
            return_exceptions=True,
        )

    async def _refused(self, items: list[tuple[Message, bytes]], exc: BaseException) -> Exception:
        """What a call whose publish was not confirmed raises: QueueFull if RabbitMQ refused it."""
        if isinstance(exc, aio_pika.exceptions.DeliveryError):
            try:
                [stats] = await self.stats([items[0][0].queue])
            except BrokerError as lost:
                return lost
            full = QueueFull(stats.queue, stats.depth, self.max_length, stats.drain_rate)
            full.__cause__ = exc
            return full
        if isinstance(exc, Exception):
            return exc
        return BrokerError(f"publishing to RabbitMQ failed: {exc!r}")

    # -- fetch ---------------------------------------------------------------------------------

    def _names(self, queues: Sequence[str]) -> list[str]:
        return [self._link.name(q, p) for p in range(9, -1, -1) for q in queues]

    async def fetch(self, queues: Sequence[str], limit: int, wait: float) -> list[Delivery]:
        if limit <= 0 or not queues:
            return []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        self._limit = max(self._limit, limit)
        self._sweeper.maybe_sweep()
        names = self._names(queues)
        look = self._inbox.held(names) < limit
        due: float | None = None
        while True:
            if look or not all(self._inbox.consuming(self._link.name(q, 0)) for q in queues):
                due = await self._shielded(self._look(queues, names, limit))
                look = False
            deliveries, took = await self._take(names, limit)
            if deliveries:
                return deliveries
            if took:
                look = True  # all dropped or delayed on the way: look again
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            pause = min(remaining, MAX_BLOCK)
            if due is not None:
                pause = min(pause, max(due + 0.005, DUE_BLOCK))
            if self._inbox.held(names) == 0:
                self._inbox.arrived.clear()
                try:
                    async with asyncio.timeout(pause):
                        await self._inbox.arrived.wait()
                except TimeoutError:
                    look = True

    async def _shielded(self, coro: Any) -> Any:
        """Run `coro` to its end even if the fetch is cancelled (a worker stopping); then hand
        the buffer back, so other processes get those jobs now."""
        call = self._spawn(coro)
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            self._spawn(self._after_cancel(call))
            raise

    async def _after_cancel(self, call: asyncio.Task[Any]) -> None:
        with contextlib.suppress(BaseException):
            await call
        with contextlib.suppress(Exception):
            await self._inbox.give_back()

    async def _look(self, queues: Sequence[str], names: list[str], limit: int) -> float | None:
        """See the state store's view: consume every class that holds jobs (and each queue's
        class 0), recover expired leases, and `basic.get` what the buffer lacks. Returns the
        seconds until the next delayed job or lease expiry (None: none)."""
        for q in queues:
            await self._link.declare(q, 0)  # a fetch may come before any send: consume it anyway
        reply = await self._run("HINT", [limit, *queues])
        due = float(reply[0]) if reply[0] else None
        picks = [(queues[int(i)], int(p)) for i, p in (_text(x).split(":") for x in reply[1])]
        classes = {
            q: {0} | {int(c) for c in _text(e).split(",") if c}
            for q, e in zip(queues, reply[2:], strict=True)
        }
        for q, p in picks:
            classes[q].add(p)
        now = time.monotonic()
        fresh = not all(self._inbox.consuming(self._link.name(q, 0)) for q in queues)
        if fresh or now - self._last_full_look > FULL_LOOK_EVERY:
            self._last_full_look = now  # every declared class, also those with nothing ready now
            client = await self._redis()
            with self._errors():
                async with client.pipeline(transaction=False) as pipe:
                    for q in queues:
                        pipe.smembers(self.namespace + CLASSES + q)
                    found = await pipe.execute()
            for q, members in zip(queues, found, strict=True):
                classes[q].update(int(c) for c in members)
        pairs = [(q, p) for p in range(9, -1, -1) for q in queues if p in classes[q]]
        wanted = [self._link.name(q, p) for q, p in pairs]
        try:
            started = set(await self._inbox.consume(wanted, PREFETCH_PER_SLOT * self._limit))
        except BrokerError as exc:
            if not isinstance(exc.__cause__, aio_pika.exceptions.ChannelNotFoundEntity):
                raise
            # A class queue was deleted behind our back (with its messages: an operator, a
            # policy): declare the classes again, or this worker would fail every fetch until a
            # send declared it.
            log.warning("RabbitMQ: %s; declaring the queues' classes again", exc.__cause__)
            for q, p in pairs:
                await self._link.declare_again(q, p)
            started = set(await self._inbox.consume(wanted, PREFETCH_PER_SLOT * self._limit))
        if due is not None and due <= 0:
            await self._sweeper.recover(0.0)
        # A point in time: each new consumer's first pushes, and the classes where the state store
        # sees more ready jobs than this process holds (the answer to a basic.get comes after
        # every message already pushed from that queue).
        ready = Counter(self._link.name(q, p) for q, p in picks)
        for name in wanted:
            if name in started:
                await self._inbox.get(name)
            while self._inbox.held(names) < limit and ready[name] > self._inbox.held_in(name):
                if await self._inbox.get(name) is None:
                    break
        return due

    async def _take(self, names: Sequence[str], limit: int) -> tuple[list[Delivery], bool]:
        arrivals = self._inbox.take(names, limit)
        if not arrivals:
            return [], False
        call = self._spawn(self._claim(arrivals))
        try:
            return await asyncio.shield(call), True
        except asyncio.CancelledError:
            call.add_done_callback(self._give_back)
            self._spawn(self._after_cancel(call))
            raise

    def _give_back(self, call: asyncio.Future[list[Delivery]]) -> None:
        if call.cancelled() or call.exception() is not None:
            return
        if deliveries := call.result():
            self._spawn(self.settle([Settle(d, "release") for d in deliveries]))

    async def _claim(self, arrivals: list[Arrival]) -> list[Delivery]:
        try:
            reply = await self._run("CLAIM", [self.worker_name, *(a.job_id for a in arrivals)])
        except BaseException:
            self._inbox.put_back(arrivals)  # still ours, unacked: the next fetch tries again
            raise
        now = asyncio.get_running_loop().time()
        out: list[Delivery] = []
        done: list[Arrival] = []
        later: list[Any] = []
        for a, verdict in zip(arrivals, reply, strict=True):
            kind = _text(verdict[0])
            if kind == "take":
                _, q, body, token, deliveries, attempts, lease = verdict
                d = Delivery(
                    a.job_id, _text(q), bytes(body), int(token), int(deliveries), int(attempts), float(lease)
                )
                self._leases[(d.job_id, d.token)] = _Lease(a.prio, now + d.lease_seconds + 0.05)
                out.append(d)
                done.append(a)
            elif kind == "wait":
                _, seconds, q, prio = verdict
                later.append(self._delay(a, _text(q), int(prio), float(seconds)))
            else:
                done.append(a)
        if out:
            self._watch([(d.job_id, d.token) for d in out])
        await self._inbox.ack(done)  # from here the Redis lease protects each job
        if later:
            await asyncio.gather(*later)
        return out

    async def _delay(self, a: Arrival, queue: str, prio: int, seconds: float) -> None:
        try:
            await self._link.publish(a.job_id, queue, prio, seconds)
        except (BrokerError, *AMQP_ERRORS) as exc:
            log.warning("delaying job %s failed (RabbitMQ will redeliver it): %s", a.job_id, exc)
            await self._inbox.nack([a])
            return
        await self._inbox.ack([a])

    # -- leases --------------------------------------------------------------------------------

    def _watch(self, keys: list[tuple[str, int]]) -> None:
        """One timer for these leases, at the first expiry among those still held: a lease that
        ran out is recovered at once (the sweeper's recover_soon); the rest are watched again."""
        held = [lease.expires for k in keys if (lease := self._leases.get(k)) is not None]
        if not held:
            return
        loop = asyncio.get_running_loop()
        timer: asyncio.TimerHandle | None = None

        def fire() -> None:
            self._lease_timers.discard(timer)
            now = loop.time()
            left = []
            expired = False
            for k in keys:
                lease = self._leases.get(k)
                if lease is None:
                    continue  # settled, or this process closed
                if lease.expires <= now:
                    del self._leases[k]
                    expired = True
                else:
                    left.append(k)  # extended, or a longer lease of the batch
            if expired:
                self._sweeper.recover_soon()
            if left:
                self._watch(left)

        timer = loop.call_at(min(held), fire)
        self._lease_timers.add(timer)

    async def sweep(self) -> tuple[int, int]:
        """Re-publish what the sweeper finds (see rabbitmq_sweep.Sweeper.sweep)."""
        return await self._sweeper.sweep()

    # -- settle --------------------------------------------------------------------------------

    async def settle(self, outcomes: Sequence[Settle]) -> list[bool]:
        again = [o.delivery.job_id for o in outcomes if o.kind in ("retry", "release")]
        mark = _MARK.set(again)
        try:
            accepted = await super().settle(outcomes)  # the fencing check, in the state store
        finally:
            _MARK.reset(mark)
        back: list[tuple[Settle, int | None]] = []
        for outcome, ok in zip(outcomes, accepted, strict=True):
            d = outcome.delivery
            lease = self._leases.pop((d.job_id, d.token), None)
            if ok and outcome.kind in ("retry", "release"):
                back.append((outcome, None if lease is None else lease.prio))
        if back:
            await self._publish_again(back)
        return accepted

    async def _publish_again(self, back: list[tuple[Settle, int | None]]) -> None:
        """Publish retried and released jobs anew (their records are marked: if this fails, the
        sweeper publishes them)."""
        unknown = [o.delivery.job_id for o, prio in back if prio is None]
        routes = dict(zip(unknown, await self._run("ROUTE", unknown), strict=True)) if unknown else {}
        sends = []
        for o, prio in back:
            d = o.delivery
            p = prio if prio is not None else int(routes[d.job_id][2])
            sends.append(self._link.publish(d.job_id, d.queue, p, o.delay if o.kind == "retry" else 0.0))
        try:
            await asyncio.gather(*sends)
        except (BrokerError, *AMQP_ERRORS) as exc:
            log.warning(
                "publishing %d retried or released job(s) failed; the sweeper will: %s", len(back), exc
            )
            return
        self._unmark_later([o.delivery.job_id for o, _ in back])

    async def extend(self, deliveries: Sequence[Delivery]) -> list[bool]:
        alive = await super().extend(deliveries)
        now = asyncio.get_running_loop().time()
        for d, ok in zip(deliveries, alive, strict=True):
            lease = self._leases.get((d.job_id, d.token))
            if ok and lease is not None:
                lease.expires = now + d.lease_seconds + 0.05  # its batch's timer watches it again
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
        await self._sweeper.publish_rows(
            [(i, *r[1:]) for i, r in zip(chosen, routes, strict=True) if _text(r[0]) == "queued"]
        )
        return count


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
