"""The NATS JetStream broker: queues, leases and results in a JetStream Key-Value bucket.

    nats://[user:password@]host:4222[,host2:4222,...]?bucket=offload&replicas=3&transport=stream
        (transport=stream also takes ack_wait=2&max_deliver=1000)

Each job is one KV record (`j.<id>`), changed only by compare-and-set on its revision
(`update(key, value, last=revision)`), so two workers can never both win a lease or both settle
it, and a settle whose lease token is no longer the record's is refused (fencing). Small index
keys, whose names are NATS subjects, say where each job is: waiting (ready or delayed), running
(value: lease expiry), dead or finished. How a fetch finds ready jobs is the transport:
`stream` (the default) pulls them from a work-queue stream, one durable pull consumer per queue
and priority class (nats_stream); `kv` lists the queues' index keys (a scan per fetch). Either
way the job is leased by CAS on its record. With transport=stream the job's message stays
un-acked while it runs (in-progress acks while the lease is live, an ack at settle), and a dead
worker's job comes back by JetStream's redelivery of that message: taken over once the record's
lease has run out, or dead-lettered past max_deliveries (the consumers' MaxDeliver is a backstop
whose advisory dead-letters the job too). With transport=kv fetches recover expired leases from
the running keys. An idle fetch waits for a core NATS signal that enqueues, retries and releases
publish, capped by the next due eta or lease expiry.

See docs/brokers/nats.md for the design, the guarantees and what a fault costs.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any

import nats
from nats.js import errors as js_errors

from offload.brokers import nats_keys as k
from offload.brokers.base import Broker, Delivery, Enqueued, QueueStats, Settle, lease_seconds
from offload.brokers.nats_kv import MAX_WAIT, REUSE_WITHIN, Entry, keep_claims
from offload.brokers.nats_stream import NatsStream, ReadyStreamFull
from offload.brokers.nats_tls import tls_context
from offload.errors import QueueFull
from offload.job import JobInfo, JobState
from offload.message import Message


class NatsBroker(NatsStream, Broker):
    # -- enqueue -------------------------------------------------------------------------------

    async def declare_queue(self, name: str, max_depth: int | None) -> None:
        await self._put(k.queue_meta(name), b"" if max_depth is None else str(max_depth).encode())
        self._known.add(name)

    async def enqueue(self, items: Sequence[tuple[Message, bytes]]) -> list[Enqueued]:
        if not items:
            return []
        now = time.time()
        results: list[Enqueued | None] = []
        fresh: list[tuple[Message, bytes, Entry | None]] = []
        in_batch: dict[str, str] = {}
        for message, body in items:
            key = message.idempotency_key
            claim: Entry | None = None
            if key is not None:
                if key in in_batch:
                    results.append(Enqueued(in_batch[key], created=False))
                    continue
                claim = await self._get(k.idem(key))
                if claim is not None and k.load_claim(claim.value).exp > now:
                    results.append(Enqueued(k.load_claim(claim.value).job, created=False))
                    continue
                in_batch[key] = message.id
            results.append(None)
            fresh.append((message, body, claim))
        adding: dict[str, int] = {}
        for message, _, _ in fresh:
            adding[message.queue] = adding.get(message.queue, 0) + 1
        for queue, count in adding.items():
            bound = await self._max_depth(queue)
            if bound is not None:
                depth = await self._depth(queue)
                if depth + count > bound:
                    raise QueueFull(queue, depth, bound, await self._drain_rate(queue, now))
        kv = await self._store()
        if self.stream:  # the consumers of new priority classes first: fetchers find them by name
            classes = {(k.qkey(m.queue), k.prio_token(m.priority)) for m, _, _ in fresh}
            await asyncio.gather(*(self._ensure_consumer(q, token) for q, token in classes))
        base = f"{time.time_ns():019d}"
        lost: dict[str, str] = {}  # job id -> the job that claimed its key first
        for message, _, claim in fresh:
            if message.idempotency_key is None:
                continue
            value = k.dump(k.Claim(message.id, now + message.idempotency_window))
            with self._errors():
                try:
                    if claim is None:
                        await kv.create(k.idem(message.idempotency_key), value)
                    else:
                        assert claim.revision is not None
                        await kv.update(k.idem(message.idempotency_key), value, last=claim.revision)
                except js_errors.KeyWrongLastSequenceError:  # another producer claimed it just now
                    held = await self._get(k.idem(message.idempotency_key))
                    if held is not None:
                        lost[message.id] = k.load_claim(held.value).job
        out: list[Enqueued] = []
        writes: list[Any] = []
        records: list[tuple[str, str, bytes]] = []
        fresh_iter = iter(fresh)
        for seq, result in enumerate(results):
            if result is not None:
                out.append(result)
                continue
            message, body, _ = next(fresh_iter)
            if message.id in lost:
                out.append(Enqueued(lost[message.id], created=False))
                continue
            run_at = max(now, message.eta) if message.eta is not None else now
            delayed = run_at > now and self.stream  # transport=kv: run_at in a w. key
            family = "t" if delayed else "w"
            tried = self._unsent.get(message.id)
            if tried is not None and tried[0][0] == family and now - tried[1] < REUSE_WITHIN:
                windex = tried[0]  # a re-send of a failed attempt: the same key, the same Nats-Msg-Id
            else:
                windex = k.waiting(
                    message.queue, message.priority, f"{base}{seq:06d}", run_at, message.id, family
                )
                self._unsent[message.id] = (windex, now)
            record = k.Record(
                queue=message.queue,
                task=message.task,
                state=JobState.QUEUED.value,
                prio=message.priority,
                created=message.created_at or now,
                run_at=run_at,
                lease=lease_seconds(message.timeout),
                maxd=message.max_deliveries,
                ttl=message.result_ttl,
                ikey=message.idempotency_key,
                index=windex,
                body=body,
            )
            writes.append(kv.put(windex, b""))
            records.append((message.id, windex, k.dump(record)))
            out.append(Enqueued(message.id, created=True))
            self._note(message.queue, message.priority, run_at if delayed else None)
        with self._errors():
            # The index first: a crash in between leaves an index key without a record (skipped,
            # later deleted), never a record that nothing points at.
            await asyncio.gather(*writes)
            if self.stream:
                try:
                    await self._publish_ready(*(r[1] for r in records if r[1].startswith("w.")))
                except ReadyStreamFull:
                    # The stream's own bound (discard=new), behind max_depth: refuse the batch.
                    # No record was written, so nothing was enqueued; drop the keys just written.
                    for job_id, _, _ in records:
                        self._unsent.pop(job_id, None)
                    await self._delete(*(r[1] for r in records))
                    queue = k.load(records[0][2]).queue
                    bound = self.ready_backstop
                    raise QueueFull(queue, bound, bound, await self._drain_rate(queue, now)) from None
            created = await asyncio.gather(
                *(self._create_record(job_id, data) for job_id, _, data in records)
            )
            # A re-sent job (its record is already stored) keeps the index key its record names;
            # a key written now that the record does not name is deleted.
            again = [
                (job_id, index) for (job_id, index, _), new in zip(records, created, strict=True) if not new
            ]
            if again:
                stored = await asyncio.gather(*(self._record(job_id) for job_id, _ in again))
                await self._delete(
                    *(
                        index
                        for (_, index), f in zip(again, stored, strict=True)
                        if f is None or f[0].index != index
                    )
                )
        for job_id, _, _ in records:
            self._unsent.pop(job_id, None)
        if len(self._unsent) > 10_000:  # attempts never re-sent
            self._unsent = {j: t for j, t in self._unsent.items() if now - t[1] < REUSE_WITHIN}
        for queue in adding:
            if queue not in self._known:
                with self._errors(), contextlib.suppress(js_errors.KeyWrongLastSequenceError):
                    await kv.create(k.queue_meta(queue), b"")
                self._known.add(queue)
        await self._signal()
        return out

    async def _depth(self, queue: str) -> int:
        """Waiting jobs, ready (w.) and delayed (t.): what max_depth bounds."""
        q = k.qkey(queue)
        ready, delayed = await asyncio.gather(
            self._scan(f"w.{q}.>", meta_only=True), self._scan(f"t.{q}.>", meta_only=True)
        )
        return len(ready) + len(delayed)

    # -- fetch ---------------------------------------------------------------------------------

    async def fetch(self, queues: Sequence[str], limit: int, wait: float) -> list[Delivery]:
        if limit <= 0 or not queues:
            return []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        waiter = (frozenset(k.qkey(q) for q in queues), asyncio.Event())
        self._waiters.add(waiter)
        force = False
        try:
            while True:
                waiter[1].clear()
                deliveries, retry_at = await self._take(queues, limit, force)
                remaining = deadline - loop.time()
                if deliveries or remaining <= 0:
                    return deliveries
                pause = min(remaining, MAX_WAIT)
                for due in (retry_at, self._next_due(queues) if self.stream else None):
                    if due is not None:
                        pause = min(pause, max(0.0, due - time.time()) + 0.001)
                try:
                    async with asyncio.timeout(pause):
                        await waiter[1].wait()
                    force = False
                except TimeoutError:
                    force = True  # nobody told us of new work: look at leases and etas again
        finally:
            self._waiters.discard(waiter)

    async def _take(
        self, queues: Sequence[str], limit: int, force: bool
    ) -> tuple[list[Delivery], float | None]:
        if self.stream:
            call = asyncio.ensure_future(self._lease(queues, limit, force))
        else:
            call = asyncio.ensure_future(self._lease_by_scan(queues, limit))
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            # The caller gave up (a worker told to stop): hand back whatever the call leased.
            call.add_done_callback(self._hand_back)
            raise

    def _hand_back(self, call: asyncio.Future[tuple[list[Delivery], float | None]]) -> None:
        if call.cancelled() or call.exception() is not None:
            return
        deliveries, _ = call.result()
        if deliveries:
            task = asyncio.ensure_future(self.settle([Settle(d, "release") for d in deliveries]))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _lease_by_scan(self, queues: Sequence[str], limit: int) -> tuple[list[Delivery], float | None]:
        """transport=kv: list the queues' waiting and running keys, recover expired leases, and
        lease the best due jobs (a scan per fetch: its cost grows with the queues' depth)."""
        now = time.time()
        scans = await asyncio.gather(
            *(self._scan(f"w.{k.qkey(q)}.>", meta_only=True) for q in queues),
            *(self._scan(f"r.{k.qkey(q)}.>") for q in queues),
        )
        waiting = [e for scan in scans[: len(queues)] for e in scan]
        running = [e for scan in scans[len(queues) :] for e in scan]
        next_due: float | None = None
        requeued = False
        for entry in running:
            expires = float(entry.value or 0)
            if expires > now:
                next_due = expires if next_due is None else min(next_due, expires)
            elif await self._recover(entry.key, now):
                requeued = True
        if requeued:  # the recovered jobs are new waiting keys
            await self._signal()
            scans = await asyncio.gather(*(self._scan(f"w.{k.qkey(q)}.>", meta_only=True) for q in queues))
            waiting = [e for scan in scans for e in scan]
        candidates: list[tuple[tuple[str, str], str, str]] = []
        for entry in waiting:
            order, run_at, job_id = k.parse_waiting(entry.key)
            if run_at > now:
                next_due = run_at if next_due is None else min(next_due, run_at)
            else:
                candidates.append((order, job_id, entry.key))
        candidates.sort()
        out: list[Delivery] = []
        position = 0
        while len(out) < limit and position < len(candidates):
            # Claim as many as are wanted at once; a claim lost to another worker is replaced by
            # the next candidate in the following round. gather keeps the priority order.
            batch = candidates[position : position + limit - len(out)]
            position += len(batch)
            claimed = await asyncio.gather(
                *(self._claim(job_id, windex, now) for _, job_id, windex in batch), return_exceptions=True
            )
            out.extend(d for d in claimed if isinstance(d, Delivery))
            failure = next((e for e in claimed if isinstance(e, BaseException)), None)
            if failure is not None:
                keep_claims(out, failure)
                break
        return out, next_due

    # -- settle --------------------------------------------------------------------------------

    async def settle(self, outcomes: Sequence[Settle]) -> list[bool]:
        if not outcomes:
            return []
        results = list(await asyncio.gather(*(self._settle_one(o) for o in outcomes)))
        await self._signal()  # the requeued jobs
        return results

    async def _settle_one(self, outcome: Settle) -> bool:
        done = await self._settle_record(outcome)
        await self._settled(outcome.delivery, done)  # transport=stream: ack the job's message
        return done

    async def _settle_record(self, outcome: Settle) -> bool:
        now = time.time()
        d = outcome.delivery
        found = await self._live(d, now)
        if found is None:
            return False
        rec, revision = found
        old = rec.index
        rec.token = 0
        rec.src = ""  # the claim that set it deleted that key: it returned a delivery
        if outcome.kind == "ack":
            rec.state = JobState.SUCCEEDED.value
            rec.result, rec.error, rec.finished = outcome.result, None, now
            rec.index = k.expiring(d.job_id)
            await self._put(rec.index, repr(now + rec.ttl).encode())
            if not await self._cas(k.job(d.job_id), k.dump(rec), revision):
                return False
            await self._delete(old)
            await self._finished(rec.queue, now)
            return True
        if outcome.kind == "release":
            rec.deliv -= 1
            return await self._to_waiting(d.job_id, rec, revision, old, now, now)
        rec.att += 1
        rec.error = outcome.error
        if outcome.kind == "retry" and rec.deliv < rec.maxd:
            return await self._to_waiting(d.job_id, rec, revision, old, now + outcome.delay, now)
        if outcome.kind == "retry":
            rec.error = f"max_deliveries ({rec.maxd}) reached; last error: {outcome.error}"
        return await self._to_dead(d.job_id, rec, revision, old, now)

    async def extend(self, deliveries: Sequence[Delivery]) -> list[bool]:
        return list(await asyncio.gather(*(self._extend_one(d) for d in deliveries)))

    async def _extend_one(self, d: Delivery) -> bool:
        now = time.time()
        found = await self._live(d, now)
        if found is None:
            return False
        rec, revision = found
        rec.lease_exp = now + d.lease_seconds
        if not await self._cas(k.job(d.job_id), k.dump(rec), revision):
            await self._settled(d, False)
            return False
        await self._put(rec.index, repr(rec.lease_exp).encode())
        await self._renewed(d, rec.lease_exp)  # transport=stream: an in-progress ack
        return True

    async def cancel(self, job_id: str) -> bool:
        now = time.time()
        found = await self._record(job_id)
        if found is None or found[0].state != JobState.QUEUED.value:
            return False
        rec, revision = found
        old = rec.index
        rec.state = JobState.CANCELLED.value
        rec.finished = now
        rec.index = k.expiring(job_id)
        await self._put(rec.index, repr(now + rec.ttl).encode())
        if not await self._cas(k.job(job_id), k.dump(rec), revision):
            return False
        await self._delete(old)
        return True

    # -- reads ---------------------------------------------------------------------------------

    async def get_job(self, job_id: str) -> JobInfo | None:
        found = await self._record(job_id)
        if found is None:
            return None
        rec = found[0]
        if not self.stream and rec.state == JobState.RUNNING.value and rec.lease_exp <= time.time():
            # transport=kv: make an expired lease visible (requeue or dead-letter) as the other
            # brokers do. (transport=stream: the job's message is redelivered and a fetcher
            # takes the job over; until then it shows as running.)
            await self._recover(rec.index, time.time())
            await self._signal()
            found = await self._record(job_id)
            if found is None:
                return None
        return self._info(job_id, found[0])

    async def wait_job(self, job_id: str, timeout: float) -> JobInfo | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        info = await self.get_job(job_id)
        if info is None or info.state.finished or timeout <= 0:
            return info
        kv = await self._store()
        with self._errors():
            watcher: Any = await kv.watch(k.job(job_id))  # pushed on every change of the record
        try:
            while (remaining := deadline - loop.time()) > 0:
                try:
                    entry = await watcher.updates(timeout=min(remaining, MAX_WAIT))
                except nats.errors.TimeoutError:
                    entry = None
                if entry is not None and entry.operation is not None:
                    return None  # deleted (purged) while we waited
                if entry is not None and JobState(k.load(entry.value).state).finished:
                    break
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()
        return await self.get_job(job_id)

    async def stats(self, queues: Sequence[str] | None = None) -> list[QueueStats]:
        now = time.time()
        if queues is None:
            names = sorted(k.qname(e.key.split(".", 1)[1]) for e in await self._scan("q.>", meta_only=True))
        else:
            names = list(queues)
        return list(await asyncio.gather(*(self._queue_stats(name, now) for name in names)))

    async def _queue_stats(self, name: str, now: float) -> QueueStats:
        q = k.qkey(name)
        keys, bound, rate = await asyncio.gather(
            self._scan(f"*.{q}.>", meta_only=True),  # w., t., r. and d. keys of the queue
            self._max_depth(name),
            self._drain_rate(name, now),
        )
        count = {"w": 0, "t": 0, "r": 0, "d": 0}
        delayed = 0
        for entry in keys:
            family = entry.key[0]
            count[family] = count.get(family, 0) + 1
            if family in "wt" and k.parse_waiting(entry.key)[1] > now:
                delayed += 1
        # An r. key outlives its job when a settle is cut off between writing the record and
        # deleting the key (a crash, an outage); a fetch clears such debris later. Count only the
        # keys whose record says running (few: at most the workers' slots), as _dead does.
        leased = [k.last_token(e.key) for e in keys if e.key[0] == "r"]
        records = await asyncio.gather(*(self._record(i) for i in leased))
        running = sum(
            1 for found in records if found is not None and found[0].state == JobState.RUNNING.value
        )
        return QueueStats(
            queue=name,
            ready=count["w"] + count["t"] - delayed,  # a due t. key is ready, not yet promoted
            delayed=delayed,
            running=running,
            dead=count["d"],
            max_depth=bound,
            drain_rate=rate,
        )

    async def _dead(
        self, job_ids: Sequence[str] | None, queue: str | None
    ) -> list[tuple[str, k.Record, int]]:
        pattern = "d.>" if queue is None else f"d.{k.qkey(queue)}.>"
        wanted = set(job_ids) if job_ids is not None else None
        ids = [k.last_token(e.key) for e in await self._scan(pattern, meta_only=True)]
        ids = [i for i in ids if wanted is None or i in wanted]
        found = await asyncio.gather(*(self._record(i) for i in ids))
        return [
            (i, f[0], f[1])
            for i, f in zip(ids, found, strict=True)
            if f is not None and f[0].state == JobState.DEAD.value
        ]

    async def dead_jobs(self, queue: str | None = None, limit: int = 100) -> list[JobInfo]:
        dead = sorted(await self._dead(None, queue), key=lambda t: t[1].finished or 0, reverse=True)
        return [self._info(job_id, rec) for job_id, rec, _ in dead[:limit]]

    async def replay_dead(self, job_ids: Sequence[str] | None = None, queue: str | None = None) -> int:
        now = time.time()
        count = 0
        for job_id, rec, revision in await self._dead(job_ids, queue):
            old = rec.index
            rec.deliv = rec.att = 0
            rec.finished = None
            if await self._to_waiting(job_id, rec, revision, old, now, now):
                count += 1
        await self._signal()
        return count

    async def purge_dead(self, job_ids: Sequence[str] | None = None, queue: str | None = None) -> int:
        count = 0
        for job_id, rec, revision in await self._dead(job_ids, queue):
            if await self._delete_record(job_id, revision):
                await self._delete(rec.index)
                count += 1
        return count

    async def purge(self, queue: str) -> int:
        count = 0
        q = k.qkey(queue)
        scans = await asyncio.gather(
            self._scan(f"w.{q}.>", meta_only=True), self._scan(f"t.{q}.>", meta_only=True)
        )
        for entry in scans[0] + scans[1]:
            job_id = k.parse_waiting(entry.key)[2]
            found = await self._record(job_id)
            if found is None or found[0].state != JobState.QUEUED.value or found[0].index != entry.key:
                continue
            if await self._delete_record(job_id, found[1]):
                await self._delete(entry.key)
                count += 1
        return count

    async def prune(self) -> int:
        now = time.time()
        count = 0
        for entry in await self._scan("x.>"):
            if float(entry.value or 0) > now:
                continue
            job_id = k.last_token(entry.key)
            found = await self._record(job_id)
            if found is not None and found[0].index == entry.key:
                if not await self._delete_record(job_id, found[1]):
                    continue
                count += 1
            await self._delete(entry.key)
        for entry in await self._scan("i.>"):
            if k.load_claim(entry.value).exp <= now and entry.revision is not None:
                with contextlib.suppress(js_errors.APIError):
                    await self._delete_record_key(entry.key, entry.revision)
        await self._sweep_markers(now)
        return count


async def delete_bucket(url: str) -> None:
    """Delete everything the broker keeps for the URL's bucket: the KV buckets `<bucket>` and
    `<bucket>_drain` and the ready stream `OFFLOAD_<bucket>` (missing ones are fine). A reset, for
    tests and benchmarks: the next connect starts an empty app."""
    servers, bucket, _ = k.parse_nats_url(url)

    async def quiet(exc: Exception) -> None:
        pass

    nc = await nats.connect(
        servers=servers, tls=tls_context(url), connect_timeout=3, max_reconnect_attempts=1, error_cb=quiet
    )
    try:
        js = nc.jetstream()
        for name in (bucket, f"{bucket}_drain"):
            with contextlib.suppress(js_errors.NotFoundError):
                await js.delete_key_value(name)
        with contextlib.suppress(js_errors.NotFoundError):
            await js.delete_stream(f"OFFLOAD_{bucket}")
    finally:
        await nc.close()
