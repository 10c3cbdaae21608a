"""The NATS broker's fetch path: a work-queue stream of "job <id> is ready" messages.

Each app (bucket) has a JetStream stream `OFFLOAD_<bucket>` with retention=workqueue. A job that
becomes ready (enqueued, retried, released, recovered, promoted when due) gets a message on
`_offload.<bucket>.ready.<queue>.<prio>` whose body is its ready key (`w.` in the KV bucket) and
whose `Nats-Msg-Id` is that key, so a re-sent publish is stored once. One durable pull consumer
per queue and priority class (`w_<queue>_<prio>`, explicit acks) hands the messages out, each to
one fetcher, in the order they were published: no scan, so a fetch costs the same at any queue
depth. The fetcher leases the job with one CAS on its KV record (fencing, lease and counters stay
in the record), then acks the message (the stream drops it) and deletes the ready key. A message
whose claim cannot be decided yet (its writer has published it but not yet written the record) is
nak'ed with a short, growing delay; one whose fetcher died before acking comes back after ACK_WAIT;
one that no longer matches its record (older than STALE_AFTER) is acked and dropped.

What a consumer cannot do is done by a maintenance pass, run by fetches at most every MAINT_EVERY
seconds per queue (and when a known eta or lease expiry is due): it recovers expired leases (their
`r.` keys) and promotes due delayed jobs (`t.` keys) to ready ones.

(Why not consumers on the KV stream itself, whose `w.` keys are already messages: nats-server
2.9 moves a stream's consumers past undelivered messages when a subject is purged, and the KV
design purges index keys all the time.)
"""

from __future__ import annotations

import asyncio
import heapq
import json
import math
import secrets
import time
from collections.abc import Coroutine, Sequence
from typing import Any

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js import errors as js_errors

from offload.brokers import nats_keys as k
from offload.brokers.base import Delivery
from offload.brokers.nats_kv import FINAL, STALE_AFTER, NatsKv, keep_claims
from offload.errors import BrokerError
from offload.job import JobState

MAINT_EVERY = 1.0  # a busy fetcher recovers leases and promotes due jobs at least this often
ACK_WAIT = 10.0  # a pulled message whose fetcher died before acking it comes back after this
PULL_TIMEOUT = 5.0  # a pull (no_wait) is answered at once; no answer in this long is an outage
CREATE_TIMEOUT = 15.0  # creating a stream or consumer can be slow on a busy server
GENERATION_KEY = "g.ready"  # the ready stream's generation token, in the KV bucket
GENERATION_WAIT = 10.0  # how long a process waits for another to make the ready stream
DEDUP_WINDOW = 120.0  # Nats-Msg-Id deduplication of re-published ready keys
READY_BACKSTOP = 10_000_000  # the stream refuses more (discard=new); the real bound is max_depth
NAK_FIRST, NAK_MAX = 0.01, 2.0  # "not yet claimable": redelivery delay, doubling per delivery
STRAY_AFTER = 5.0  # a running key this old is checked against its record by maintenance
_END = ("404", "408", "409")  # no (more) messages, request expired, consumer busy or deleted
_FULL = (10077, 10078)  # JetStream: maximum messages / bytes exceeded (discard=new)


class ReadyStreamFull(BrokerError):
    """The ready stream refused a message: it holds its max_msgs (ready_backstop) already."""


class NatsStream(NatsKv):
    def __init__(self, url: str = "nats://127.0.0.1:4222") -> None:
        super().__init__(url)
        self._consumers: set[str] = set()  # durable consumers known to exist
        self._maint_at: dict[str, float] = {}  # queue key -> time of its next maintenance
        self._maint_lock = asyncio.Lock()
        self.ready_backstop = READY_BACKSTOP  # max_msgs of a ready stream this process creates

    @property
    def _ready_stream(self) -> str:
        return f"OFFLOAD_{self.bucket}"

    def _ready_subject(self, queue_key: str, token: str) -> str:
        return f"_offload.{self.bucket}.ready.{queue_key}.{token}"

    async def _make_ready_stream(self, js: JetStreamContext) -> None:
        """Make sure the bucket's work-queue stream exists and belongs to this bucket.

        A stream left by an earlier bucket of the same name (deleted and made again, as test and
        bench resets do) would hand out that bucket's messages. So the stream's description names a
        generation token kept in the bucket itself (`g.ready`): whoever creates that key (KV
        `create`: exactly one process) deletes any stream of another generation and makes a new
        one; everyone else waits for it.
        """
        assert self._kv is not None
        kv = self._kv
        token = secrets.token_hex(8)
        try:
            await kv.create(GENERATION_KEY, token.encode())
            mine = True
        except js_errors.KeyWrongLastSequenceError:
            entry = await kv.get(GENERATION_KEY)
            token, mine = bytes(entry.value or b"").decode(), False
        deadline = time.monotonic() + GENERATION_WAIT
        while True:
            try:
                info = await js.stream_info(self._ready_stream)
                if info.config.description == token:
                    return
                if not mine and time.monotonic() < deadline:  # its creator is at it
                    await asyncio.sleep(0.05)
                    continue
                await js.delete_stream(self._ready_stream)  # an earlier bucket's
            except js_errors.NotFoundError:
                if not mine and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                    continue
            await js.add_stream(
                name=self._ready_stream,
                description=token,
                subjects=[f"_offload.{self.bucket}.ready.>"],
                retention=js_api.RetentionPolicy.WORK_QUEUE,
                storage=js_api.StorageType.FILE,
                num_replicas=self.replicas,
                discard=js_api.DiscardPolicy.NEW,
                max_msgs=self.ready_backstop,
                duplicate_window=DEDUP_WINDOW,
            )
            return

    async def _publish_ready(self, *keys: str) -> None:
        """Announce ready keys (w. keys) to their class's consumer; acknowledged when stored.

        Raises ReadyStreamFull if the stream refused one (it holds its max_msgs already)."""
        await self._store()
        assert self._js is not None
        js = self._js
        with self._errors():
            done = await asyncio.gather(
                *(
                    js.publish(
                        self._ready_subject(key.split(".")[1], key.split(".")[2]),
                        key.encode(),
                        headers={"Nats-Msg-Id": key},
                    )
                    for key in keys
                ),
                return_exceptions=True,
            )
            failures = [e for e in done if isinstance(e, BaseException)]
            for failure in failures:
                if isinstance(failure, js_errors.APIError) and failure.err_code in _FULL:
                    # Take back the messages of this call that were stored: the batch is refused.
                    stored = [ack.seq for ack in done if isinstance(ack, js_api.PubAck)]
                    await asyncio.gather(
                        *(js.delete_msg(self._ready_stream, seq) for seq in stored), return_exceptions=True
                    )
                    raise ReadyStreamFull(f"the stream {self._ready_stream} is full: {failure.description}")
            if failures:
                raise failures[0]

    # -- consumers -----------------------------------------------------------------------------

    async def _ensure_consumer(self, queue_key: str, token: str) -> str:
        name = k.consumer_name(queue_key, token)
        if name in self._consumers:
            return name
        await self._store()
        assert self._js is not None
        config = js_api.ConsumerConfig(
            durable_name=name,
            filter_subject=self._ready_subject(queue_key, token),
            deliver_policy=js_api.DeliverPolicy.ALL,
            ack_policy=js_api.AckPolicy.EXPLICIT,
            ack_wait=ACK_WAIT,
            max_deliver=-1,
            max_ack_pending=-1,
        )
        js = self._js
        with self._errors():
            try:
                await js.add_consumer(self._ready_stream, config=config, timeout=CREATE_TIMEOUT)
            except (TimeoutError, js_errors.APIError):
                # A busy server, or another process creating the same consumer just now: it is
                # enough that it exists.
                await js.consumer_info(self._ready_stream, name, timeout=CREATE_TIMEOUT)
        self._consumers.add(name)
        self._classes.setdefault(queue_key, set()).add(token)
        return name

    async def _refresh_classes(self) -> None:
        """Learn every queue's priority classes from the names of the stream's consumers."""
        await self._store()
        assert self._nc is not None
        names: list[str] = []
        with self._errors():
            while True:
                reply = await self._nc.request(
                    f"$JS.API.CONSUMER.NAMES.{self._ready_stream}",
                    json.dumps({"offset": len(names)}).encode(),
                    timeout=PULL_TIMEOUT,
                )
                data = json.loads(reply.data)
                if "error" in data:
                    raise BrokerError(f"NATS refused to list the consumers: {data['error']}")
                page = data.get("consumers") or []
                names.extend(page)
                if not page or len(names) >= data.get("total", 0):
                    break
        for name in names:
            parsed = k.parse_consumer(name)
            if parsed is not None:
                self._consumers.add(name)
                self._learn(parsed[0], None, [parsed[1]])

    async def _pull(self, queue_key: str, token: str, batch: int) -> list[Msg]:
        """Up to `batch` ready messages of one class, at once (no_wait: never a lingering pull)."""
        name = await self._ensure_consumer(queue_key, token)
        assert self._nc is not None
        nc = self._nc
        out: list[Msg] = []
        with self._errors():
            inbox = nc.new_inbox()
            sub = await nc.subscribe(inbox)
            try:
                await nc.publish(
                    f"$JS.API.CONSUMER.MSG.NEXT.{self._ready_stream}.{name}",
                    json.dumps({"batch": batch, "no_wait": True}).encode(),
                    reply=inbox,
                )
                while len(out) < batch:
                    msg = await sub.next_msg(timeout=PULL_TIMEOUT)
                    status = (msg.headers or {}).get(js_api.Header.STATUS)
                    if status is None:
                        out.append(msg)
                    elif status in _END or status == "503":
                        if status in ("409", "503"):  # deleted under us: create it again next time
                            self._consumers.discard(name)
                        break
            finally:
                await sub.unsubscribe()
        return out

    # -- leasing -------------------------------------------------------------------------------

    async def _lease(
        self, queues: Sequence[str], limit: int, force: bool = False
    ) -> tuple[list[Delivery], float | None]:
        """Lease up to `limit` ready jobs, highest priority first, then oldest, across `queues`.

        Returns them and the time something may become ready (a nak'ed message's redelivery).
        """
        now = time.time()
        qkeys = list(dict.fromkeys(k.qkey(q) for q in queues))
        await self._maintain(qkeys, now, force)
        levels = sorted({t for q in qkeys for t in self._classes.get(q, ())})  # highest first
        out: list[Delivery] = []
        retry_at: float | None = None
        failure: BaseException | None = None
        for token in levels:
            serving = [q for q in qkeys if token in self._classes.get(q, ())]
            while len(out) < limit:
                need = limit - len(out)
                pulled = await asyncio.gather(*(self._pull(q, token, need) for q in serving))
                # Across queues of one class, the oldest first (the key names hold their age);
                # within a queue, the order the consumer gave.
                merged = list(heapq.merge(*pulled, key=_age)) if len(pulled) > 1 else pulled[0]
                taken, spare = merged[:need], merged[need:]
                for msg in spare:
                    await msg.nak()  # another queue's older job won; redelivered first
                claimed = await asyncio.gather(
                    *(self._claim_msg(msg, now) for msg in taken), return_exceptions=True
                )
                for result in claimed:
                    if isinstance(result, BaseException):
                        failure = failure or result
                    elif isinstance(result, Delivery):
                        out.append(result)
                    elif result is not None:
                        retry_at = result if retry_at is None else min(retry_at, result)
                if failure is not None or all(len(p) < need for p in pulled):
                    break  # every consumer of this class ran dry, or the broker is away
            if len(out) >= limit or failure is not None:
                break
        if failure is not None:
            keep_claims(out, failure)
        if self._notes:
            await self._signal()
        return out, retry_at

    async def _claim_msg(self, msg: Msg, now: float) -> Delivery | float | None:
        """Claim a pulled message's job: the Delivery, None (dropped) or when to look again."""
        key = msg.data.decode()
        job_id = k.last_token(key)
        result: Delivery | str = await self._claim(job_id, key, now)
        if isinstance(result, Delivery):
            await msg.ack()  # after the claim deleted the key: if that failed, a redelivery does
            return result
        if result == "stale":
            await msg.ack()
            return None
        delivered: int = msg.metadata.num_delivered
        delay: float = min(NAK_MAX, NAK_FIRST * 2 ** max(0, delivered - 1))
        await msg.nak(delay=delay)
        return now + delay

    # -- maintenance ---------------------------------------------------------------------------

    async def _maintain(self, qkeys: list[str], now: float, force: bool) -> None:
        due = [q for q in qkeys if force or self._maint_at.get(q, 0.0) <= now]
        if not due or self._maint_lock.locked():
            return
        async with self._maint_lock:
            await self._refresh_classes()
            await asyncio.gather(*(self._maintain_queue(q, now, force) for q in due))
            await self._signal()

    async def _maintain_queue(self, q: str, now: float, idle: bool) -> None:
        """Recover the queue's expired leases and promote its due delayed jobs. When the fetcher is
        idle (its queue had nothing ready), also drop debris among the ready keys."""
        running, timers = await asyncio.gather(self._scan(f"r.{q}.>"), self._scan(f"t.{q}.>", meta_only=True))
        next_due = math.inf
        work: list[Coroutine[Any, Any, Any]] = []
        if idle:
            ready = await self._scan(f"w.{q}.>", meta_only=True)
            work.extend(
                self._drop_stray(e.key, now - e.created) for e in ready if now - e.created > STRAY_AFTER
            )
        for entry in running:
            expires = float(entry.value or 0)
            if expires > now:
                next_due = min(next_due, expires)
                if now - entry.created > STRAY_AFTER:
                    work.append(self._drop_stray(entry.key, now - entry.created))
            else:
                work.append(self._recover(entry.key, now))
        for entry in timers:
            run_at = k.parse_waiting(entry.key)[1]
            if run_at > now:
                next_due = min(next_due, run_at)
            else:
                work.append(self._promote(entry.key, now))
        await asyncio.gather(*work)
        if math.isfinite(next_due):
            self._due[q] = next_due
        else:
            self._due.pop(q, None)
        self._maint_at[q] = min(now + MAINT_EVERY, next_due)

    async def _promote(self, tindex: str, now: float) -> bool:
        """Make a delayed job that is due ready: its t. key becomes a w. key. True if done."""
        job_id = k.last_token(tindex)
        found = await self._record(job_id)
        if found is None or found[0].state != JobState.QUEUED.value or found[0].index != tindex:
            if self._stale(tindex, now):
                await self._delete(tindex)
            return False
        rec, revision = found
        return await self._to_waiting(job_id, rec, revision, tindex, rec.run_at, now)

    async def _drop_stray(self, index: str, age: float) -> None:
        """Delete a running or ready key whose job has finished or is gone (an operation cut off
        between its writes leaves one): it would count in stats until cleaned up otherwise."""
        found = await self._record(k.last_token(index))
        if (found is None and age > STALE_AFTER) or (found is not None and found[0].state in FINAL):
            await self._delete(index)

    def _next_due(self, queues: Sequence[str]) -> float | None:
        """The earliest known eta or lease expiry of these queues."""
        dues = [self._due[q] for q in (k.qkey(name) for name in queues) if q in self._due]
        return min(dues) if dues else None


def _age(msg: Msg) -> str:
    return msg.data.decode().split(".")[3]  # w.<queue>.<prio>.<seq>.<run_at_ms>.<id>
