"""The NATS broker's fetch path: a work-queue stream of "job <id> is ready" messages.

Each app (bucket) has a JetStream stream `OFFLOAD_<bucket>` with retention=workqueue. A job that
becomes ready (enqueued, retried, released, promoted when due) gets a message on
`_offload.<bucket>.ready.<queue>.<prio>` whose body is its ready key (`w.` in the KV bucket) and
whose `Nats-Msg-Id` is that key, so a re-sent publish is stored once. One durable pull consumer
per queue and priority class (`w_<queue>_<prio>`, explicit acks, `ack_wait`, `max_deliver`) hands
the messages out, each to one fetcher, in the order they were published: no scan, so a fetch
costs the same at any queue depth.

The message stays un-acked while its job runs. The fetcher leases the job with one CAS on its KV
record (a fresh fencing token, `lease_exp`, the delivery count: the record stays the authority)
and keeps the message (`_held`). While the lease is live the broker sends the message an
in-progress ack every ack_wait/3 (and at each `extend`); `settle` acks it once the record's CAS
has decided the outcome (a retry or release has published a new ready message by then). A worker
that dies or is cut off stops those acks, so JetStream redelivers the message after ack_wait, and
that redelivery brings the job back: the fetcher that gets it naks it until the record's lease
has run out (delay = what is left of it), then takes the job over with a new token (the old
holder's late settle is refused by the CAS), or dead-letters it if it has been delivered
`max_deliveries` times already, terminating the message. A lease lost in a live process (an
extend or settle refused after it ran out, or the process's own check) hands the message back at
once with a nak.

A message that does not match its record is either stale (the record has moved on from it, or it
is older than STALE_AFTER: acked and dropped) or not written through yet (its writer published it
before writing the record: nak'ed with a short, growing delay). A message JetStream will not
deliver again (the consumer's max_deliver reached) is announced by the server's MAX_DELIVERIES
advisory: its job is dead-lettered and the message deleted.

What a consumer cannot do is done by a maintenance pass, run by fetches at most every MAINT_EVERY
seconds per queue (and when a known eta or lease expiry is due): it promotes due delayed jobs (`t.`
keys) to ready ones, drops debris, and, as a last resort, recovers a job left running whose lease
ran out long ago (ack_wait + STALE_AFTER) without its message bringing it back (the message was
lost with a crashed server, or its advisory was missed).

(Why not consumers on the KV stream itself, whose `w.` keys are already messages: nats-server
2.9 moves a stream's consumers past undelivered messages when a subject is purged, and the KV
design purges index keys all the time.)
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import math
import secrets
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import nats
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js import errors as js_errors

from offload.brokers import nats_keys as k
from offload.brokers.base import Delivery
from offload.brokers.nats_kv import FINAL, STALE_AFTER, NatsKv, keep_claims
from offload.cancellation import raise_if_cancel_requested, stop_tasks
from offload.errors import BrokerError
from offload.job import JobState

log = logging.getLogger("offload.broker")

MAINT_EVERY = 1.0  # a busy fetcher promotes due jobs and looks at the leases at least this often
BEATS_PER_WAIT = 3  # a held message gets this many in-progress acks per ack_wait
NAK_MARGIN = 0.05  # a message nak'ed until a live lease runs out comes back this long after it
PULL_TIMEOUT = 5.0  # a pull (no_wait) is answered at once; no answer in this long is an outage
SILENT_PULL = 1.0  # a first pull unanswered this long is asked again (see _pull)
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


@dataclass(slots=True)
class Held:
    """The ready message of a job leased here, un-acked while the job runs."""

    msg: Msg
    queue_key: str
    lease_exp: float  # as this process last set it; past it, the message is handed back


class NatsStream(NatsKv):
    def __init__(self, url: str = "nats://127.0.0.1:4222") -> None:
        super().__init__(url)
        self._consumers: set[str] = set()  # durable consumers known to exist
        self._maint_at: dict[str, float] = {}  # queue key -> time of its next maintenance
        self._maint_lock = asyncio.Lock()
        self.ready_backstop = READY_BACKSTOP  # max_msgs of a ready stream this process creates
        # The consumers' ack wait (the time a message whose holder went silent takes to come back)
        # and MaxDeliver (a backstop far above any job's max_deliveries).
        self.ack_wait, self.max_deliver = k.parse_stream_options(url)
        # A job that ran out its lease long ago and was not brought back by its message's
        # redelivery is recovered by maintenance after this long (the last resort).
        self.rescue_after = self.ack_wait + STALE_AFTER
        self._held: dict[tuple[str, int], Held] = {}  # (job id, token) -> its message
        self._keeper: asyncio.Task[None] | None = None  # sends the held messages' in-progress acks
        self._handing_back: set[asyncio.Future[None]] = set()  # the keeper's naks, not yet handled
        # job id -> (stream seq, deliveries, when to look again): a message JetStream will not
        # deliver again (max_deliver) whose job's lease was still live when the advisory came.
        self._exhausted_at: dict[str, tuple[int, int, float]] = {}

    async def connect(self) -> None:
        if self._nc is not None:
            return
        await super().connect()
        if self.stream:
            assert self._nc is not None
            with self._errors():
                # One member of the bucket's processes handles each advisory (a queue group).
                await self._nc.subscribe(
                    f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{self._ready_stream}.*",
                    queue=f"offload_{self.bucket}",
                    cb=self._on_max_deliveries,
                )

    async def close(self) -> None:
        # Held messages are left un-acked: JetStream redelivers them after ack_wait, and their
        # jobs are taken over once their leases have run out (as after a crash).
        if self._keeper is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await stop_tasks([self._keeper])  # cancelled again if nats-py swallowed the cancel
            self._keeper = None
        self._held.clear()
        self._exhausted_at.clear()
        await super().close()

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
            ack_wait=self.ack_wait,
            max_deliver=self.max_deliver,
            max_ack_pending=-1,
        )
        js = self._js
        with self._errors():
            try:
                # An existing consumer with another ack_wait or max_deliver is updated.
                info = await js.add_consumer(self._ready_stream, config=config, timeout=CREATE_TIMEOUT)
            except (TimeoutError, js_errors.APIError):
                # A busy server, or another process creating the same consumer just now: it is
                # enough that it exists.
                info = await js.consumer_info(self._ready_stream, name, timeout=CREATE_TIMEOUT)
        have = (info.config.ack_wait, info.config.max_deliver)
        if have != (self.ack_wait, self.max_deliver):
            log.warning(
                "consumer %s of %s has ack_wait=%s, max_deliver=%s, not the URL's %s, %s: give every "
                "process of the bucket the same options",
                name, self._ready_stream, *have, self.ack_wait, self.max_deliver,
            )  # fmt: skip
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
        out, answered = await self._pull_once(name, batch, SILENT_PULL)
        if not answered:
            # nats-server 2.9 does not answer a no_wait pull that meets a message past its
            # max_deliver (it sends the advisory instead): ask once more, then it is an outage.
            out, answered = await self._pull_once(name, batch, PULL_TIMEOUT)
        if not answered:
            raise BrokerError(f"NATS at {self.servers} did not answer a pull in {PULL_TIMEOUT:.0f}s")
        return out

    async def _pull_once(self, name: str, batch: int, timeout: float) -> tuple[list[Msg], bool]:
        """One no_wait pull request: the messages, and whether the server answered at all."""
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
                    try:
                        msg = await sub.next_msg(timeout=timeout)
                    except nats.errors.TimeoutError:
                        return out, bool(out)  # went silent after some messages: take those
                    status = (msg.headers or {}).get(js_api.Header.STATUS)
                    if status is None:
                        out.append(msg)
                    elif status in _END or status == "503":
                        if status in ("409", "503"):  # deleted under us: create it again next time
                            self._consumers.discard(name)
                        break
            finally:
                await sub.unsubscribe()
        return out, True

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
        await self._hand_back_expired(qkeys, now)  # redelivered to the pulls below
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
        seq: int = msg.metadata.sequence.stream
        found = await self._record(job_id)
        if found is not None:
            rec, revision = found
            if rec.state == JobState.RUNNING.value and rec.src == key:
                return await self._redelivered(msg, job_id, rec, revision, now)
            if seq <= rec.mseq and not (rec.state == JobState.QUEUED.value and rec.index == key):
                await msg.ack()  # the job was claimed from it and has moved on: its ack was lost
                return None
        result = await self._claim_record(job_id, key, now, found, seq)
        if isinstance(result, Delivery):
            self._hold(msg, result, time.time() + result.lease_seconds)
            return result
        if result == "stale":
            await msg.ack()
            return None
        delivered: int = msg.metadata.num_delivered
        delay: float = min(NAK_MAX, NAK_FIRST * 2 ** max(0, delivered - 1))
        await msg.nak(delay=delay)
        return now + delay

    async def _redelivered(
        self, msg: Msg, job_id: str, rec: k.Record, revision: int, now: float
    ) -> Delivery | float | None:
        """The message of a running job came back: its holder stopped sending in-progress acks
        (it died, is cut off, or lost its lease). The record's lease decides what happens."""
        if rec.lease_exp > now:
            # The holder may still be at work (an in-progress ack was lost or late): look again
            # when its lease has run out, unless it renews it (its in-progress acks hold the
            # message again) or settles (its ack removes the message).
            delay = rec.lease_exp - now + NAK_MARGIN
            await msg.nak(delay=delay)
            return now + delay
        src = rec.src
        rec.token = 0
        if rec.deliv >= rec.maxd:
            rec.src = ""
            rec.error = (
                f"delivered {rec.deliv} times without being settled (max_deliveries={rec.maxd}); "
                "the worker crashed, was cut off or lost its lease each time"
            )
            if await self._to_dead(job_id, rec, revision, rec.index, now, src):
                await msg.term()  # JetStream drops it
                log.warning("job %s dead-lettered: %s", job_id, rec.error)
                return None
            await msg.nak(delay=NAK_FIRST)  # changed meanwhile: look again
            return now + NAK_FIRST
        # Take the job over under a new lease and fencing token, from the same message.
        rec.deliv += 1
        rec.token = secrets.randbits(62)
        rec.started = time.time()
        rec.lease_exp = rec.started + rec.lease
        await self._put(rec.index, repr(rec.lease_exp).encode())
        if not await self._cas(k.job(job_id), k.dump(rec), revision):
            await msg.nak(delay=NAK_FIRST)
            return now + NAK_FIRST
        # A first claim cut off after its CAS never deleted the ready key it came from.
        await self._delete(src)
        self._learn(k.qkey(rec.queue), rec.lease_exp, [])
        delivery = Delivery(job_id, rec.queue, rec.body, rec.token, rec.deliv, rec.att, rec.lease)
        self._hold(msg, delivery, rec.lease_exp)
        return delivery

    # -- held messages: the lease on the stream's side -----------------------------------------

    def _hold(self, msg: Msg, d: Delivery, lease_exp: float) -> None:
        for key in [key for key in self._held if key[0] == d.job_id]:
            del self._held[key]  # an earlier lease of the job, taken over here: the same message
        self._held[(d.job_id, d.token)] = Held(msg, k.qkey(d.queue), lease_exp)
        self._keep_beating()

    def _keep_beating(self) -> None:
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.ensure_future(self._keep())

    async def _keep(self) -> None:
        """Send each held message an in-progress ack every ack_wait/3 while its job's lease is
        live; hand back (nak) those whose lease ran out here; look again at exhausted messages."""
        while True:
            await asyncio.sleep(self.ack_wait / BEATS_PER_WAIT)
            now = time.time()
            try:
                expired = [key for key, held in self._held.items() if held.lease_exp <= now]
                for key in expired:
                    held = self._held.pop(key, None)
                    if held is not None:
                        nak = asyncio.ensure_future(self._nak_handled(held.msg))
                        self._handing_back.add(nak)
                        nak.add_done_callback(self._handing_back.discard)
                await asyncio.gather(*(_quietly(h.msg.in_progress()) for h in self._held.values()))
                for seq, deliveries, due in list(self._exhausted_at.values()):
                    if due <= now:
                        await self._exhausted(seq, deliveries)
            except Exception as exc:  # noqa: BLE001 - the next round tries again
                log.debug("in-progress acks failed: %s", exc)
            raise_if_cancel_requested()  # a cancel nats-py swallowed (offload.cancellation)

    async def _hand_back_expired(self, qkeys: list[str], now: float) -> None:
        """Nak the held messages of these queues whose lease ran out here (the worker lost it), so
        the pulls that follow get them back at once (and take the jobs over)."""
        expired = [key for key, h in self._held.items() if h.lease_exp <= now and h.queue_key in qkeys]
        naks = [self._nak_handled(held.msg) for key in expired if (held := self._held.pop(key, None))]
        if naks:
            await asyncio.gather(*naks)
        if self._handing_back:  # the keeper's: a pull sent while one is in flight would miss it
            await asyncio.wait(list(self._handing_back))  # (wait: a cancelled fetch leaves them be)

    async def _nak_handled(self, msg: Msg) -> None:
        """Nak a held message for redelivery at once, and return once the server has handled the
        nak. It handles acks apart from pull requests, so a nak merely sent (even flushed) can
        lose the race with the pull that follows, and the job would wait out ack_wait; the server
        answers an ack sent as a request after handling it."""
        assert self._nc is not None
        try:
            await self._nc.request(msg.reply, b"-NAK", timeout=PULL_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - the link is down: the message comes back after ack_wait
            log.debug("handing back a ready message failed: %s", exc)

    async def _live(self, d: Delivery, now: float) -> tuple[k.Record, int] | None:
        """The record, if the delivery's lease is current. If not, its message is let go: handed
        back at once (nak) if the lease just ran out with nobody else on the job; left alone if
        the job was taken over (the message is the new holder's: acking it would drop it)."""
        found = await self._record(d.job_id)
        mine = False
        if found is not None:
            rec = found[0]
            if rec.state == JobState.RUNNING.value and rec.token == d.token:
                if rec.lease_exp > now:
                    return found
                mine = True
        held = self._held.pop((d.job_id, d.token), None)
        if held is not None and mine:
            await self._nak_handled(held.msg)
        return None

    async def _settled(self, d: Delivery, done: bool) -> None:
        """After a settle: ack the job's message if the record's CAS took the outcome (the record
        says what happens next: a retry or release has its new ready message already)."""
        held = self._held.pop((d.job_id, d.token), None)
        if held is not None and done:
            await _quietly(held.msg.ack())

    async def _renewed(self, d: Delivery, lease_exp: float) -> None:
        """After an extend: the message is held until the new lease_exp, and told so at once."""
        held = self._held.get((d.job_id, d.token))
        if held is not None:
            held.lease_exp = lease_exp
            await _quietly(held.msg.in_progress())

    # -- messages JetStream will not deliver again (max_deliver) ---------------------------------

    async def _on_max_deliveries(self, msg: Msg) -> None:
        """The server's MAX_DELIVERIES advisory: a ready message reached max_deliver."""
        try:
            data = json.loads(msg.data)
            seq, deliveries = int(data["stream_seq"]), int(data.get("deliveries") or 0)
        except (ValueError, KeyError, TypeError):
            return
        try:
            await self._exhausted(seq, deliveries)
        except Exception as exc:  # noqa: BLE001 - maintenance recovers the job later
            log.warning("handling the max_deliver advisory of ready message %d failed: %s", seq, exc)

    async def _exhausted(self, seq: int, deliveries: int) -> None:
        """Dead-letter the job of a message JetStream will not deliver again, and delete the
        message (else it would stay in the stream, un-acked, for ever)."""
        await self._store()
        assert self._js is not None
        js = self._js
        with self._errors():
            try:
                stored = await js.get_msg(self._ready_stream, seq)
            except js_errors.NotFoundError:
                return  # acked meanwhile (its holder settled)
        key = (stored.data or b"").decode()
        job_id = k.last_token(key) if key.startswith("w.") else ""
        found = await self._record(job_id) if job_id else None
        self._exhausted_at.pop(job_id, None)
        now = time.time()
        rec = found[0] if found is not None else None
        running = rec is not None and rec.state == JobState.RUNNING.value and rec.src == key
        queued = rec is not None and rec.state == JobState.QUEUED.value and rec.index == key
        if found is None or rec is None or not (running or queued):
            await self._delete_message(seq)  # its job has moved on: debris
            return
        revision = found[1]
        if running and rec.lease_exp > now:
            # Its holder may still finish it (its ack removes the message): decide when the lease
            # has run out.
            self._exhausted_at[job_id] = (seq, deliveries, rec.lease_exp + NAK_MARGIN)
            self._keep_beating()
            return
        limit = (
            f"its ready message reached max_deliver ({deliveries} deliveries of it), so JetStream "
            "will not deliver it again"
        )
        if running:
            rec.error = f"{limit}; the worker that ran it last (delivery {rec.deliv}) stopped renewing it"
            src, rec.src, rec.token = rec.src, "", 0
            done = await self._to_dead(job_id, rec, revision, rec.index, now, src)
        else:
            rec.error = f"{limit} without the job being run from it"
            done = await self._to_dead(job_id, rec, revision, rec.index, now)
        if done:
            await self._delete_message(seq)
            log.warning("job %s dead-lettered: %s", job_id, rec.error)
        else:  # changed meanwhile: look again shortly
            self._exhausted_at[job_id] = (seq, deliveries, now + MAINT_EVERY)
            self._keep_beating()

    async def _delete_message(self, seq: int) -> None:
        assert self._js is not None
        js = self._js
        with self._errors(), contextlib.suppress(js_errors.NotFoundError):
            await js.delete_msg(self._ready_stream, seq)

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
        """Promote the queue's due delayed jobs, learn when its leases run out (a fetcher pulls
        again then: their messages come back), and recover a job left running long after its
        lease ran out without its message bringing it back (the last resort). When the fetcher
        is idle (its queue had nothing ready), also drop debris among the ready keys."""
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
            back_by = expires + self.ack_wait + NAK_MARGIN  # its message is redelivered by then
            if expires > now:
                next_due = min(next_due, expires)
                if now - entry.created > STRAY_AFTER:
                    work.append(self._drop_stray(entry.key, now - entry.created))
            elif back_by > now:
                next_due = min(next_due, back_by)
            elif now - expires > self.rescue_after:
                work.append(self._rescue(entry.key, now))
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

    async def _rescue(self, rindex: str, now: float) -> None:
        """The last resort for a running key whose lease ran out more than rescue_after ago: its
        message did not bring the job back (lost with a crashed server, or MaxDeliver reached
        with its advisory missed). Recover it the KV way (requeued with a new message, or
        dead-lettered past max_deliveries) and delete the old message."""
        job_id = k.last_token(rindex)
        found = await self._record(job_id)
        if found is None or found[0].state != JobState.RUNNING.value or found[0].index != rindex:
            await self._recover(rindex, now)  # a stray running key: deleted once stale
            return
        rec = found[0]
        if now - rec.lease_exp <= self.rescue_after:
            return  # extended since its key was written
        stored = 0
        if rec.mseq:
            assert self._js is not None
            js = self._js
            with self._errors(), contextlib.suppress(js_errors.NotFoundError):
                message = await js.get_msg(self._ready_stream, rec.mseq)
                stored = rec.mseq if (message.data or b"").decode() == rec.src else 0
        log.warning(
            "job %s: its lease ran out %.0fs ago and its ready message %s; recovering it",
            job_id,
            now - rec.lease_exp,
            "was not redelivered (max_deliver reached, its advisory missed?)" if stored else "is gone",
        )
        await self._recover(rindex, now)
        if stored:
            after = await self._record(job_id)
            if after is None or after[0].state != JobState.RUNNING.value or after[0].src != rec.src:
                await self._delete_message(stored)

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
        """The earliest known eta or lease expiry of these queues (the held ones' too)."""
        qkeys = {k.qkey(name) for name in queues}
        dues = [self._due[q] for q in qkeys if q in self._due]
        dues.extend(h.lease_exp for h in self._held.values() if h.queue_key in qkeys)
        return min(dues) if dues else None


async def _quietly(ack: Coroutine[Any, Any, None]) -> None:
    """An ack, nak or in-progress ack (a publish): one lost is made good by a redelivery."""
    try:
        await ack
    except Exception as exc:  # noqa: BLE001 - the link is down, or the message was acked already
        log.debug("acking a ready message failed: %s", exc)


def _age(msg: Msg) -> str:
    return msg.data.decode().split(".")[3]  # w.<queue>.<prio>.<seq>.<run_at_ms>.<id>
