"""The NATS JetStream broker's store layer: connection, key scans and CAS'd record transitions.

`NatsKv` owns the connection and the two KV buckets and knows the key layout (nats_keys); the
port (nats.NatsBroker) is built on it. Every change of a job record is `update(key, value,
last=revision)`: a writer that read an older revision loses and changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js import errors as js_errors
from nats.js.kv import KeyValue

from offload.brokers import nats_keys as k
from offload.brokers.base import Delivery
from offload.brokers.nats_tls import tls_context
from offload.brokers.tls_errors import tls_hint
from offload.cancellation import stop_tasks
from offload.errors import BrokerError
from offload.job import JobInfo, JobState
from offload.message import decode, decode_value

log = logging.getLogger("offload.broker")

DRAIN_WINDOW = 60.0
# An index key that disagrees with its record is left alone this long (its writer may be between
# its two writes), then deleted as debris of a crash.
STALE_AFTER = 30.0
FINAL = (JobState.SUCCEEDED.value, JobState.CANCELLED.value)  # states a job never leaves
MAX_WAIT = 5.0  # a waiting fetch re-scans at least this often (a lost signal costs at most this)
# A re-sent enqueue reuses the index keys of the failed attempt if that began this recently (well
# inside STALE_AFTER: a fetcher must not take the reused key for a crash's debris).
REUSE_WITHIN = STALE_AFTER / 3

SCAN_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0
_KV_OP = "KV-Operation"

Entry = KeyValue.Entry


@dataclass(frozen=True, slots=True)
class Item:
    """One key found by a scan."""

    key: str
    value: bytes
    revision: int
    created: float  # epoch seconds
    operation: str | None  # None for a live key; DEL or PURGE for a delete marker


class NatsKv:
    def __init__(self, url: str = "nats://127.0.0.1:4222") -> None:
        self.url = url
        self.servers, self.bucket, self.replicas = k.parse_nats_url(url)
        self.tls = tls_context(url)  # None: plain, unless the server asks for TLS
        self.stream = k.parse_transport(url) == "stream"  # fetch from the work-queue stream
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._kv: KeyValue | None = None
        self._drain: KeyValue | None = None
        self._waiters: set[tuple[frozenset[str], asyncio.Event]] = set()
        self._known: set[str] = set()
        # job id -> (index key, when) of an enqueue that failed part-way: re-sent soon after, the
        # job gets the same key (and so the same Nats-Msg-Id), so a retry leaves no stray key.
        self._unsent: dict[str, tuple[str, float]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._signal_prefix = f"_offload.{self.bucket}.sig."
        # Per queue (as its key token): the priority classes known to have a consumer, the
        # earliest known eta or lease expiry, and the wake-up signals to publish.
        self._classes: dict[str, set[str]] = {}
        self._due: dict[str, float] = {}
        self._notes: dict[str, tuple[float | None, set[str]]] = {}

    # -- plumbing ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except BrokerError:
            raise
        except nats.errors.TimeoutError as exc:  # before OSError: it is a builtin TimeoutError too
            raise BrokerError(f"NATS at {self.servers} did not answer in time: {exc}") from exc
        except (nats.errors.ConnectionClosedError, nats.errors.NoServersError, OSError) as exc:
            raise BrokerError(
                f"cannot reach NATS at {self.servers}: {exc}; {_unreachable_hint(exc)}"
            ) from exc
        except js_errors.ServiceUnavailableError as exc:
            raise BrokerError(
                f"JetStream is not available at {self.servers}: start nats-server with -js ({exc})"
            ) from exc

    # The client reconnects by itself and may answer a pending request after it is back, so a
    # short outage can pass without any operation failing: say when the link drops and returns.
    async def _log_disconnected(self) -> None:
        if self._nc is not None:  # not our own close()
            log.warning("NATS connection lost (%s); reconnecting", self.servers)

    async def _log_reconnected(self) -> None:
        log.info("NATS connection back (%s)", self.servers)

    async def connect(self) -> None:
        if self._nc is not None:
            return
        failures: list[Exception] = []  # what the client met while trying, for the message
        refused = asyncio.Event()  # a TLS failure: no use trying again until CONNECT_TIMEOUT

        async def note_error(exc: Exception) -> None:
            failures.append(exc)
            if isinstance(exc, ssl.SSLError):
                refused.set()
            await _log_error(exc)

        with self._errors():
            # Once connected, the client reconnects forever (operations meanwhile fail with
            # BrokerError); the first connection must succeed within CONNECT_TIMEOUT.
            connecting = asyncio.ensure_future(
                nats.connect(
                    servers=self.servers,
                    tls=self.tls,
                    connect_timeout=5,
                    max_reconnect_attempts=-1,
                    allow_reconnect=True,
                    error_cb=note_error,
                    disconnected_cb=self._log_disconnected,
                    reconnected_cb=self._log_reconnected,
                )
            )
            refusal = asyncio.ensure_future(refused.wait())
            try:
                await asyncio.wait(
                    {connecting, refusal}, timeout=CONNECT_TIMEOUT, return_when="FIRST_COMPLETED"
                )
            finally:
                refusal.cancel()
                if not connecting.done():
                    await stop_tasks([connecting])
            if connecting.cancelled():
                when = "" if refused.is_set() else f" within {CONNECT_TIMEOUT:.0f}s"
                last = f" (last error: {failures[-1]})" if failures else ""
                hint = _unreachable_hint(failures[-1] if failures else None)
                raise BrokerError(f"cannot reach NATS at {self.servers}{when}{last}; {hint}")
            nc = connecting.result()
            try:
                js = nc.jetstream()
                self._kv = await self._bucket(js, self.bucket, None)
                self._drain = await self._bucket(js, f"{self.bucket}_drain", DRAIN_WINDOW)
                if self.stream:
                    await self._make_ready_stream(js)
                await nc.subscribe(self._signal_prefix + "*", cb=self._on_signal)
            except BaseException:
                await nc.close()
                raise
        self._nc, self._js = nc, js

    async def _bucket(self, js: JetStreamContext, name: str, ttl: float | None) -> KeyValue:
        try:
            return await js.key_value(name)
        except js_errors.BucketNotFoundError:
            pass
        return await js.create_key_value(
            bucket=name,
            history=1,
            ttl=ttl,
            storage=js_api.StorageType.FILE,
            replicas=self.replicas,
        )

    async def _make_ready_stream(self, js: JetStreamContext) -> None:
        """Create the work-queue stream of ready jobs (the fetch path, nats_stream)."""
        raise NotImplementedError

    async def _publish_ready(self, *keys: str) -> None:
        """Announce ready (w.) keys on the work-queue stream (nats_stream)."""
        raise NotImplementedError

    async def close(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._nc is not None:
            nc, self._nc = self._nc, None
            self._kv = self._drain = self._js = None
            with contextlib.suppress(Exception):
                await nc.drain()
            if not nc.is_closed:
                await nc.close()

    async def _store(self) -> KeyValue:
        if self._kv is None:
            await self.connect()
        assert self._kv is not None
        return self._kv

    async def _on_signal(self, msg: Msg) -> None:
        queue = msg.subject[len(self._signal_prefix) :]
        try:
            eta, tokens = k.parse_signal(msg.data)
        except ValueError:
            eta, tokens = None, []
        self._learn(queue, eta, tokens)
        for queues, event in list(self._waiters):
            if queue in queues:
                event.set()

    def _learn(self, queue_key: str, eta: float | None, tokens: list[str] | set[str]) -> None:
        """Remember a queue's priority classes and its next due time (an eta or lease expiry)."""
        if tokens:
            self._classes.setdefault(queue_key, set()).update(tokens)
        if eta is not None:
            self._due[queue_key] = min(self._due.get(queue_key, eta), eta)

    def _note(self, queue: str, priority: int, run_at: float | None = None) -> None:
        """Queue a wake-up signal: new work in this queue's priority class (delayed until run_at)."""
        q = k.qkey(queue)
        eta, tokens = self._notes.get(q, (None, set()))
        if run_at is not None:
            eta = run_at if eta is None else min(eta, run_at)
        tokens.add(k.prio_token(priority))
        self._notes[q] = (eta, tokens)
        self._learn(q, run_at, tokens)

    async def _signal(self) -> None:
        """Publish the noted wake-up signals (core NATS: cheap, and a lost one costs a short wait)."""
        notes, self._notes = self._notes, {}
        if self._nc is None or not notes:
            return
        with self._errors():
            for q, (eta, tokens) in notes.items():
                await self._nc.publish(self._signal_prefix + q, k.signal_payload(eta, tokens))

    async def _scan(
        self, pattern: str, meta_only: bool = False, markers: bool = False, bucket: str | None = None
    ) -> list[Item]:
        """The live keys matching `pattern` (markers=True: the deleted ones), in one sweep.

        An ordered push consumer delivering the last message per subject; it is complete once
        delivered + pending (from the consumer's info, taken after subscribing) have arrived.
        """
        await self._store()
        assert self._js is not None
        bucket = bucket or self.bucket
        prefix = f"$KV.{bucket}."
        out: list[Item] = []
        seen = 0
        total: list[int] = []
        done = asyncio.Event()

        async def collect(msg: Msg) -> None:
            nonlocal seen
            seen += 1
            operation = (msg.headers or {}).get(_KV_OP)
            if (operation is None) != markers:
                meta = msg.metadata
                out.append(
                    Item(
                        msg.subject[len(prefix) :],
                        msg.data,
                        meta.sequence.stream,
                        meta.timestamp.timestamp(),
                        operation,
                    )
                )
            if total and seen >= total[0]:
                done.set()

        with self._errors():
            sub = await self._js.subscribe(
                prefix + pattern,
                stream=f"KV_{bucket}",
                cb=collect,
                ordered_consumer=True,
                deliver_policy=js_api.DeliverPolicy.LAST_PER_SUBJECT,
                headers_only=meta_only or None,
                inactive_threshold=60.0,
            )
            try:
                info = await sub.consumer_info()
                delivered = info.delivered.consumer_seq if info.delivered is not None else 0
                total.append((delivered or 0) + (info.num_pending or 0))
                if seen >= total[0]:
                    done.set()
                async with asyncio.timeout(SCAN_TIMEOUT):
                    await done.wait()
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        return out

    async def _get(self, key: str) -> Entry | None:
        kv = await self._store()
        with self._errors():
            try:
                return await kv.get(key)
            except js_errors.KeyNotFoundError:  # KeyDeletedError is a subclass
                return None

    async def _record(self, job_id: str) -> tuple[k.Record, int] | None:
        entry = await self._get(k.job(job_id))
        if entry is None or entry.revision is None:
            return None
        return k.load(entry.value), entry.revision

    async def _cas(self, key: str, value: bytes, revision: int) -> bool:
        kv = await self._store()
        with self._errors():
            try:
                await kv.update(key, value, last=revision)
            except js_errors.KeyWrongLastSequenceError:
                return False
        return True

    async def _put(self, key: str, value: bytes = b"") -> None:
        kv = await self._store()
        with self._errors():
            await kv.put(key, value)

    async def _delete(self, *keys: str) -> None:
        """Remove index keys with every trace (no delete marker: an index key is used once)."""
        await self._store()
        assert self._js is not None
        js = self._js
        with self._errors():
            await asyncio.gather(
                *(
                    js.purge_stream(f"KV_{self.bucket}", subject=f"$KV.{self.bucket}.{key}")
                    for key in keys
                    if key
                )
            )

    async def _finished(self, queue: str, now: float) -> None:
        assert self._drain is not None
        with self._errors():
            await self._drain.put(f"{k.qkey(queue)}.{int(now * 1000)}.{secrets.token_hex(6)}", b"")

    async def _max_depth(self, queue: str) -> int | None:
        entry = await self._get(k.queue_meta(queue))
        return int(entry.value) if entry is not None and entry.value else None

    async def _create_record(self, job_id: str, data: bytes) -> bool:
        kv = await self._store()
        try:
            await kv.create(k.job(job_id), data)
        except js_errors.KeyWrongLastSequenceError:  # re-sent: already stored
            return False
        return True

    # -- record transitions (each a CAS on the job record) -----------------------------------

    async def _claim(self, job_id: str, windex: str, now: float) -> Delivery | str:
        """Lease the job of a ready key: its Delivery, "stale" (the key is debris, now deleted)
        or "early" (the key is younger than STALE_AFTER: its writer may not have written the
        record yet, so try again shortly)."""
        return await self._claim_record(job_id, windex, now, await self._record(job_id))

    async def _claim_record(
        self, job_id: str, windex: str, now: float, found: tuple[k.Record, int] | None, mseq: int = 0
    ) -> Delivery | str:
        """_claim with the record just read. `mseq`: the stream sequence of the ready message the
        claim comes from (transport=stream), kept in the record."""
        if found is None or found[0].state != JobState.QUEUED.value or found[0].index != windex:
            # A finished job's record never points at a waiting key again: debris at once.
            if self._stale(windex, now) or (found is not None and found[0].state in FINAL):
                await self._delete(windex)
                return "stale"
            return "early"
        rec, revision = found
        rec.state = JobState.RUNNING.value
        rec.deliv += 1
        rec.token = secrets.randbits(62)
        # The lease starts now, not when the fetch began: a pull answered late (a stalled link)
        # would otherwise hand out a lease that has already run out.
        rec.started = time.time()
        rec.lease_exp = rec.started + rec.lease
        rec.index = k.running(rec.queue, job_id)
        rec.src = windex
        if mseq:
            rec.mseq = mseq
        # The running key first (value: lease expiry), so a lease is always found when it expires.
        await self._put(rec.index, repr(rec.lease_exp).encode())
        if not await self._cas(k.job(job_id), k.dump(rec), revision):
            return "early"  # changed meanwhile (cancelled, purged): look at it again
        await self._delete(windex)
        self._learn(k.qkey(rec.queue), rec.lease_exp, [])
        return Delivery(job_id, rec.queue, rec.body, rec.token, rec.deliv, rec.att, rec.lease)

    @staticmethod
    def _stale(index: str, now: float) -> bool:
        """A w./t. key written more than STALE_AFTER ago (its name holds its writer's clock)."""
        (_, seq), _, _ = k.parse_waiting(index)
        return now - int(seq[:19]) / 1e9 > STALE_AFTER

    async def _recover(self, rindex: str, now: float) -> bool:
        """Handle a running key whose lease expired: requeue or dead-letter. True if requeued."""
        job_id = k.last_token(rindex)
        found = await self._record(job_id)
        if found is None or found[0].state != JobState.RUNNING.value or found[0].index != rindex:
            entry = await self._get(rindex)
            if entry is not None and float(entry.value or 0) + STALE_AFTER < now:
                await self._delete(rindex)
            return False
        rec, revision = found
        if rec.lease_exp > now:  # extended since the index was written
            await self._put(rindex, repr(rec.lease_exp).encode())
            return False
        rec.token = 0
        # Nobody settled it, so its claim may have been cut off before it deleted the ready key it
        # came from: delete that key too (a stray ready key would count as ready in stats).
        src, rec.src = rec.src, ""
        if rec.deliv >= rec.maxd:
            rec.error = (
                f"delivered {rec.deliv} times without being settled (max_deliveries={rec.maxd}); "
                "the worker crashed or lost its lease each time"
            )
            await self._to_dead(job_id, rec, revision, rindex, now, src)
            return False
        return await self._to_waiting(job_id, rec, revision, rindex, now, now, src)

    async def _to_waiting(
        self, job_id: str, rec: k.Record, revision: int, old: str, run_at: float, now: float, src: str = ""
    ) -> bool:
        """Make the job wait again: ready (a w. key, handed out by its class's consumer) or, if
        run_at is in the future, delayed (a t. key, promoted when due)."""
        delayed = run_at > now and self.stream  # transport=kv: the run_at in a w. key delays it
        rec.state = JobState.QUEUED.value
        rec.run_at = run_at
        seq = f"{time.time_ns():019d}000000"
        rec.index = k.waiting(rec.queue, rec.prio, seq, run_at, job_id, "t" if delayed else "w")
        await self._put(rec.index)
        if self.stream and not delayed:
            # Before the record: a crash in between leaves a message that goes stale, never a
            # ready job without one. A fetcher that sees it first looks again shortly.
            await self._publish_ready(rec.index)
        if not await self._cas(k.job(job_id), k.dump(rec), revision):
            await self._delete(rec.index)
            return False
        await self._delete(old, src)
        self._note(rec.queue, rec.prio, run_at if delayed else None)
        return True

    async def _to_dead(
        self, job_id: str, rec: k.Record, revision: int, old: str, now: float, src: str = ""
    ) -> bool:
        was_running = rec.state == JobState.RUNNING.value
        rec.state = JobState.DEAD.value
        rec.finished = now
        rec.index = k.dead(rec.queue, job_id)
        await self._put(rec.index, repr(now).encode())
        if not await self._cas(k.job(job_id), k.dump(rec), revision):
            await self._delete(rec.index)
            return False
        await self._delete(old, src)
        if was_running:
            await self._finished(rec.queue, now)
        return True

    async def _live(self, d: Delivery, now: float) -> tuple[k.Record, int] | None:
        found = await self._record(d.job_id)
        if found is None:
            return None
        rec = found[0]
        if rec.state != JobState.RUNNING.value or rec.token != d.token or rec.lease_exp <= now:
            return None
        return found

    def _info(self, job_id: str, rec: k.Record) -> JobInfo:
        try:
            message = decode(rec.body)
            args, kwargs, options = message.args, message.kwargs, message.options
        except Exception:  # noqa: BLE001 - a malformed body still has a record
            args, kwargs, options = (), {}, {}
        return JobInfo(
            id=job_id,
            task=rec.task,
            queue=rec.queue,
            state=JobState(rec.state),
            priority=rec.prio,
            args=args,
            kwargs=kwargs,
            deliveries=rec.deliv,
            attempts=rec.att,
            max_deliveries=rec.maxd,
            created_at=rec.created,
            run_at=rec.run_at,
            started_at=rec.started,
            finished_at=rec.finished,
            result=decode_value(rec.result),
            error=rec.error,
            idempotency_key=rec.ikey,
            options=options,
        )

    async def _drain_rate(self, queue: str, now: float) -> float:
        entries = await self._scan(f"{k.qkey(queue)}.>", meta_only=True, bucket=f"{self.bucket}_drain")
        out = [int(entry.key.split(".")[-2]) / 1000 for entry in entries]
        times = [t for t in out if t >= now - DRAIN_WINDOW]
        if not times:
            return 0.0
        return len(times) / min(DRAIN_WINDOW, max(1.0, now - min(times)))

    async def _delete_record(self, job_id: str, revision: int) -> bool:
        kv = await self._store()
        with self._errors():
            try:
                await kv.delete(k.job(job_id), last=revision)
            except js_errors.KeyWrongLastSequenceError:
                return False
            except js_errors.APIError as exc:
                if exc.err_code in (10071, 10164):  # wrong last sequence
                    return False
                raise
        return True

    async def _sweep_markers(self, now: float) -> None:
        """Remove delete markers older than STALE_AFTER: every index key is used once."""
        for family in ("j", "i"):
            stale = [
                entry.key
                for entry in await self._scan(f"{family}.>", meta_only=True, markers=True)
                if now - entry.created > STALE_AFTER
            ]
            await self._delete(*stale)

    async def _delete_record_key(self, key: str, revision: int) -> None:
        kv = await self._store()
        with self._errors():
            await kv.delete(key, last=revision)


def keep_claims(claimed: list[Delivery], failure: BaseException) -> None:
    """A fetch's claims run concurrently; when some fail (the link dropped mid-fetch), the jobs
    the others leased are returned all the same, else they would wait for their leases to expire.
    Only a fetch that leased nothing fails."""
    if not claimed:
        raise failure
    log.warning("a claim failed (%s); returning the %d job(s) leased", failure, len(claimed))


async def _log_error(exc: Exception) -> None:
    log.debug("NATS client error: %s", exc)


def _unreachable_hint(exc: BaseException | None) -> str:
    return tls_hint(exc) or "is it running? check OFFLOAD_BROKER_URL"
