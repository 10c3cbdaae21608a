"""The Redis broker: queues, leases and results in Redis, for workers on any number of hosts.

    redis://[[user]:password@]host:6379/0?prefix=offload:&require_noeviction=true
    rediss://...   (TLS)
    redis+sentinel://host1:26379,host2:26379/mymaster/0?...   (the primary that Sentinels name)

Every state change is one Lua script (see redis_scripts), so it is atomic, and every batchable
operation is one script call: an enqueue batch, a fetch of up to `limit` jobs, a batch of
outcomes, a batch of lease renewals. Jobs are leased, not popped: a fetch moves each job to a
lease with a fencing token and an expiry, and a later fetch recovers expired leases (requeue, or
dead-letter past max_deliveries). A fetch with nothing ready blocks in BLPOP on per-queue signal
lists that enqueues push to, capped by the time of the next delayed job or lease expiry.

Durability is Redis's: with `appendonly yes` and `appendfsync always` an acknowledged enqueue
survives a crash of the Redis host; see docs/brokers/redis.md for the other modes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import redis.asyncio as aioredis
from redis import exceptions as rex
from redis.commands.core import AsyncScript

from offload.brokers import redis_keys as keys
from offload.brokers import redis_scripts as lua
from offload.brokers.base import Broker, Delivery, Enqueued, QueueStats, Settle
from offload.brokers.redis_blocking import BlockingLink, command, evalsha, evalsha_reply, send
from offload.brokers.redis_client import (
    SOCKET_TIMEOUT,
    AsyncSentinel,
    open_blocking_link,
    open_client,
    too_few_replicas,
    wait_command,
)
from offload.brokers.redis_link import AsyncLink
from offload.brokers.redis_link import supported as link_supported
from offload.brokers.redis_records import (
    _JOB_FIELDS,
    _deliveries,
    _job_info,
    _pack,
    _stage_chunks,
    _text,
    enqueue_command,
)
from offload.brokers.redis_records import _enqueue_meta as _enqueue_meta  # re-exported: rabbitmq.py
from offload.brokers.redis_records import _enqueued as _enqueued  # imports them from here
from offload.brokers.redis_url import parse_redis_url, redact
from offload.brokers.tls_errors import tls_hint
from offload.errors import BrokerError, ConfigurationError, QueueFull
from offload.job import JobInfo
from offload.message import Message

log = logging.getLogger("offload.broker")

# A waiting fetch blocks at most this long per BLPOP, well inside the socket timeout.
MAX_BLOCK = 5.0
# Shorter waits are slept: Redis checks blocking timeouts only every 1/hz s (100 ms by default).
MIN_BLOCK = 0.01
STAGE_TTL = 3600


class RedisBroker(Broker):
    def __init__(self, url: str = "redis://127.0.0.1:6379/0") -> None:
        self.url = url
        self.target = parse_redis_url(url)
        self._redis_url, self.prefix = self.target.client_url, self.target.prefix
        self.require_noeviction = self.target.require_noeviction
        self.namespace = keys.keyspace(self.prefix)
        self.where = self.target.where
        if self.target.wait_replicas and not self._blocking_enqueues():
            raise ConfigurationError(
                f"wait_replicas in {redact(url)!r}: only the Redis broker's own enqueue waits for "
                "replicas; remove it from this broker's Redis URL"
            )
        self.worker_name = f"{socket.gethostname()}:{os.getpid()}"
        self._client: aioredis.Redis | None = None
        self._sentinel: AsyncSentinel | None = None  # asked for the primary's address (Sentinel URLs)
        self._scripts: dict[str, AsyncScript] = {}
        self._blocking_link: BlockingLink | None = None  # enqueue_blocking's connections, made by connect()
        self._async_link: AsyncLink | None = None  # scripts, pipelines on the loop; made by connect()
        # Concurrent sends reach enqueue_calls together: one pipelined round trip for all.
        self.batches_enqueue_calls = self._batches_in_scripts()
        self._route = [self.namespace + keys.QUEUES]  # KEYS[1] of every script: the namespace's slot
        self._background: set[asyncio.Task[Any]] = set()

    # -- plumbing ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Turn redis-py's exceptions into one-line BrokerErrors that say what to do."""
        where = self.where
        try:
            yield
        except rex.AuthenticationError as exc:
            raise BrokerError(
                f"Redis at {where} refused the credentials: {exc}; check the user and password in "
                "OFFLOAD_BROKER_URL"
            ) from exc
        except (rex.ConnectionError, rex.TimeoutError, OSError) as exc:
            text = str(exc)
            if (tls := tls_hint(exc)) is not None:
                hint = tls
            elif "reset by peer" in text and self.target.client_url.startswith("rediss:"):
                # Under TLS 1.3 a server that refuses the client's certificate may just reset.
                hint = (
                    "is it running? check OFFLOAD_BROKER_URL; if the server asks for a client "
                    "certificate, set ssl_certfile and ssl_keyfile"
                )
            else:
                hint = "is it running? check OFFLOAD_BROKER_URL"
            raise BrokerError(f"cannot reach Redis at {where}: {exc}; {hint}") from exc
        except rex.ResponseError as exc:
            text = str(exc)
            if text.startswith("OOM"):
                hint = "Redis is out of memory (maxmemory reached): raise maxmemory or drain the queues"
            elif text.startswith("READONLY"):
                hint = "this is a read-only replica: point OFFLOAD_BROKER_URL at the primary"
            elif text.startswith("UNBLOCKED"):
                hint = "the server stopped being the primary (a failover?): the next command reconnects"
            elif text.startswith("MISCONF"):
                hint = "Redis cannot persist to disk and refuses writes: check the Redis server's log"
            elif text.startswith("NOPERM"):
                hint = "the Redis user lacks a permission offload needs (scripts, lists, sorted sets)"
            else:
                hint = "unexpected reply"
            raise BrokerError(f"Redis at {where}: {hint} ({text})") from exc

    async def connect(self) -> None:
        if self._client is not None:
            return
        client, sentinel = open_client(self.target)  # past max_connections, commands wait
        try:
            with self._errors():
                await client.ping()
            await self._check_eviction_policy(client)
        except BaseException:
            await client.aclose()
            if sentinel is not None:
                await sentinel.aclose()
            raise
        self._scripts = {
            name: client.register_script(getattr(lua, name))
            for name in (
                "ENQUEUE",
                "ENQUEUE_ONE",
                "FETCH",
                "SETTLE",
                "EXTEND",
                "CANCEL",
                "STATS",
                "DEAD_JOBS",
                "DEAD_IDS",
                "PURGE",
                "PRUNE",
            )
        }
        if self._blocking_enqueues():
            # Connects when a sync sender first uses it.
            self._blocking_link = open_blocking_link(self.target)
        if link_supported(client.connection_pool):
            self._async_link = AsyncLink(client.connection_pool, SOCKET_TIMEOUT)
        self._client, self._sentinel = client, sentinel

    async def _check_eviction_policy(self, client: aioredis.Redis) -> None:
        try:
            with self._errors():
                config = await client.config_get("maxmemory-policy")
        except BrokerError as exc:
            if isinstance(exc.__cause__, rex.ResponseError):
                log.debug("cannot read maxmemory-policy from Redis at %s: %s", self.where, exc)
                return  # managed Redis often forbids CONFIG
            raise
        policy = _text(cast(Any, config).get("maxmemory-policy") or "")  # redis-py decodes CONFIG replies
        if not policy or policy == "noeviction":
            return
        message = (
            f"Redis at {self.where} has maxmemory-policy={policy}: when it fills up it may evict "
            "offload's jobs, leases and results, losing acknowledged work. Set "
            "`maxmemory-policy noeviction` (then a full Redis refuses enqueues instead)"
        )
        if self.require_noeviction:
            raise BrokerError(message + "; refusing to start because the URL has require_noeviction=true")
        log.warning("!!! %s !!!", message)

    async def close(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._blocking_link is not None:
            link, self._blocking_link = self._blocking_link, None
            link.close()  # no I/O beyond closing the idle sockets
        if self._async_link is not None:
            async_link, self._async_link = self._async_link, None
            await async_link.close()
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()
        if self._sentinel is not None:
            sentinel, self._sentinel = self._sentinel, None
            await sentinel.aclose()

    async def _redis(self) -> aioredis.Redis:
        if self._client is None:
            await self.connect()
        assert self._client is not None
        return self._client

    async def _run(self, name: str, args: Sequence[Any]) -> Any:
        await self._redis()
        link = self._async_link
        if link is None:  # a redis-py without what AsyncLink uses
            with self._errors():
                return await self._scripts[name](keys=self._route, args=[self.namespace, *args])
        command = self._evalsha(name, args)
        with self._errors():
            try:
                return await link.call(*command)
            except rex.NoScriptError:
                pass
            await self._load_scripts()  # Redis restarted or flushed its scripts: the call did not run
            return await link.call(*command)

    def _evalsha(self, name: str, args: Sequence[Any]) -> tuple[Any, ...]:
        """A script call as a plain command, for `_pipeline`."""
        return ("EVALSHA", self._scripts[name].sha, len(self._route), *self._route, self.namespace, *args)

    async def _pipeline(self, commands: Sequence[tuple[Any, ...]], resend: bool = True) -> list[Any]:
        """`commands` in one round trip (no MULTI), their replies in order, error replies as values.

        Scripts go as plain EVALSHA (`_evalsha`): a pipeline holding redis-py Script objects
        first asks SCRIPT EXISTS, a round trip more on every call. If the server lacks a script
        (restarted, or flushed), the scripts are loaded and (with `resend`) the commands sent
        again, so only pipeline commands that are safe to repeat; without it the NoScriptError
        replies are returned for the caller to handle.
        """
        client = await self._redis()
        for attempt in (1, 2):
            with self._errors():
                if self._async_link is not None:
                    answers = await self._async_link.pipeline(commands)
                else:
                    pipe = client.pipeline(transaction=False)
                    for command in commands:
                        pipe.execute_command(*command)
                    answers = await pipe.execute(raise_on_error=False)
            if attempt == 1 and any(isinstance(a, rex.NoScriptError) for a in answers):
                await self._load_scripts()
                if resend:
                    continue
            break
        return answers

    async def _load_scripts(self) -> None:
        """Load every script (after a restart or SCRIPT FLUSH), in one round trip."""
        client = await self._redis()
        with self._errors():
            async with client.pipeline(transaction=False) as pipe:
                for script in self._scripts.values():
                    pipe.script_load(script.script)
                await pipe.execute()

    # -- enqueue -------------------------------------------------------------------------------

    async def declare_queue(self, name: str, max_depth: int | None) -> None:
        client = await self._redis()
        with self._errors():
            await client.hset(self.namespace + keys.QUEUES, name, "" if max_depth is None else str(max_depth))

    async def enqueue(self, items: Sequence[tuple[Message, bytes]]) -> list[Enqueued]:
        if not items:
            return []
        # A subclass's _run may stand in for ENQUEUE (RabbitMQ's marks the ids): only ENQUEUE then.
        call = enqueue_command(items) if self._batches_in_scripts() else None
        if call is not None:
            reply = await self._enqueue_script(*call)
        else:
            meta, bodies = _enqueue_meta(items)
            if bodies is not None:
                reply = await self._enqueue_script("ENQUEUE", [meta, bodies])
            else:
                client = await self._redis()
                key = self._stage_key()
                with self._errors():
                    for chunk in _stage_chunks(items):
                        await cast(Any, client.hset(key, mapping=cast(Any, chunk)))
                    await cast(Any, client.expire(key, STAGE_TTL))
                reply = await self._enqueue_script("ENQUEUE", [meta, b"", key])
        return _enqueued(items, reply)

    async def _enqueue_script(self, name: str, args: Sequence[Any]) -> Any:
        """An enqueue script, then (with wait_replicas) WAIT on the same connection."""
        if not self.target.wait_replicas:
            return await self._run(name, args)
        reply, confirmed = await self._pipeline([self._evalsha(name, args), wait_command(self.target)])
        for answer in (reply, confirmed):
            if isinstance(answer, Exception):
                with self._errors():
                    raise answer
        if short := too_few_replicas(self.target, confirmed):
            raise short
        return reply

    async def enqueue_calls(
        self, calls: Sequence[Sequence[tuple[Message, bytes]]]
    ) -> Sequence[list[Enqueued] | Exception]:
        """The calls' ENQUEUE scripts in one pipelined round trip (no MULTI: each script is atomic
        on its own, so each call stays all-or-nothing and a refused one stops no other)."""
        if not self._batches_in_scripts():
            return await super().enqueue_calls(calls)  # a subclass's own enqueue
        prepared = [enqueue_command(items) if items else None for items in calls]
        if any(p is None for items, p in zip(calls, prepared, strict=True) if items):
            return await super().enqueue_calls(calls)  # a batch to stage
        commands = [self._evalsha(*p) for p in prepared if p is not None]
        if self.target.wait_replicas:
            commands.append(wait_command(self.target))
        answers = await self._pipeline(commands)
        confirmed = answers.pop() if self.target.wait_replicas else None
        replies = iter(answers)
        outcomes: list[list[Enqueued] | Exception] = []
        for items, p in zip(calls, prepared, strict=True):
            reply = next(replies) if p is not None else []
            try:
                if isinstance(reply, Exception):
                    with self._errors():
                        raise reply
                outcomes.append(_enqueued(items, reply) if p is not None else [])
            except (QueueFull, BrokerError) as exc:
                outcomes.append(exc)
        # With wait_replicas, too few confirmations put every call the scripts stored in question.
        if confirmed is not None and (short := too_few_replicas(self.target, confirmed)):
            return [short if isinstance(o, list) and o else o for o in outcomes]
        return outcomes

    def _batches_in_scripts(self) -> bool:
        """Whether this class enqueues with just the script (not RabbitMQ, which publishes too)."""
        return self._blocking_enqueues()

    @property
    def enqueue_blocking(self) -> Callable[[Sequence[tuple[Message, bytes]]], list[Enqueued]] | None:
        """`enqueue` for a sync caller on any thread but an event loop's, after `connect()`.

        The same script and the same answers (QueueFull, BrokerError, idempotency) as `enqueue`,
        sent by a synchronous client: one round trip, no hand-off to an event loop thread. None
        for a subclass that enqueues differently (RabbitMQ publishes to AMQP), so App falls back
        to its `enqueue` on the portal loop.
        """
        return self._enqueue_blocking if self._blocking_enqueues() else None

    def _blocking_enqueues(self) -> bool:
        """Whether this class enqueues the way `_enqueue_blocking` does (just the script)."""
        cls = type(self)
        return cls.enqueue is RedisBroker.enqueue and cls._run is RedisBroker._run

    def _enqueue_blocking(self, items: Sequence[tuple[Message, bytes]]) -> list[Enqueued]:
        link = self._blocking_link
        if link is None:
            raise RuntimeError("connect() the broker before enqueue_blocking()")
        if not items:
            return []
        call = enqueue_command(items)
        route, namespace = self._route[0], self.namespace
        if call is not None:
            name, args = call
            script = self._scripts[name]

            def store(conn: Any) -> Any:
                return evalsha(conn, script.sha, script.script, route, namespace, *args)

        else:

            def store(conn: Any) -> Any:
                return self._enqueue_staged(conn, items)

        wait = wait_command(self.target) if self.target.wait_replicas else None

        def send_and_wait(conn: Any) -> tuple[Any, Any]:
            reply = store(conn)  # then WAIT on the same connection, for this batch's writes
            return reply, command(conn, *wait) if wait else None

        with self._errors():
            reply, confirmed = link.run(send_and_wait)
        if wait and (short := too_few_replicas(self.target, confirmed)):
            raise short
        return _enqueued(items, reply)

    def _enqueue_staged(self, conn: Any, items: Sequence[tuple[Message, bytes]]) -> Any:
        """A batch too large for one command, on a blocking connection: its bodies staged in a
        transient hash, then ENQUEUE reading them from there. Returns the script's reply."""
        meta, _ = _enqueue_meta(items)
        key = self._stage_key()
        script = self._scripts["ENQUEUE"]
        for chunk in _stage_chunks(items):
            command(conn, "HSET", key, *(x for pair in chunk.items() for x in pair))
        command(conn, "EXPIRE", key, STAGE_TTL)
        return evalsha(conn, script.sha, script.script, self._route[0], self.namespace, meta, b"", key)

    @property
    def enqueue_batches_blocking(
        self,
    ) -> Callable[[Sequence[Sequence[tuple[Message, bytes]]]], list[list[Enqueued]]] | None:
        """Several batches for a sync caller (App.send_many past one batch): each all-or-nothing
        as with `enqueue_blocking`, one after another, stopping at the first refused one
        (QueueFull raised, the batches before it stored). None where enqueue_blocking is None."""
        return self._enqueue_batches_blocking if self._blocking_enqueues() else None

    def _enqueue_batches_blocking(
        self, batches: Sequence[Sequence[tuple[Message, bytes]]]
    ) -> list[list[Enqueued]]:
        """On one connection, batch k+1's command is built while batch k's script runs on the
        server, and sent once batch k's reply says it was stored: the client's share of a bulk
        send overlaps Redis's instead of adding to it."""
        link = self._blocking_link
        if link is None:
            raise RuntimeError("connect() the broker before enqueue_batches_blocking()")
        if len(batches) < 2 or self.target.wait_replicas or not all(batches):
            return [self._enqueue_blocking(b) for b in batches]  # WAIT after each batch
        route, namespace = self._route[0], self.namespace
        results: list[list[Enqueued]] = []
        refused: list[QueueFull] = []

        def send_rest(conn: Any) -> None:
            # Run again on a fresh connection if an idle one was dead: starts after the batches
            # already answered.
            pending = batches[len(results) :]
            call = enqueue_command(pending[0])
            for i, batch in enumerate(pending):
                last = i + 1 == len(pending)
                if call is None:  # bodies too large for one command
                    reply = self._enqueue_staged(conn, batch)
                    following = None if last else enqueue_command(pending[i + 1])
                else:
                    name, args = call
                    script = self._scripts[name]
                    send(conn, "EVALSHA", script.sha, 1, route, namespace, *args)
                    following = None if last else enqueue_command(pending[i + 1])  # meanwhile
                    reply = evalsha_reply(conn, script.sha, script.script, route, namespace, *args)
                try:
                    results.append(_enqueued(batch, reply))
                except QueueFull as exc:
                    refused.append(exc)  # raised below: the connection is fine
                    return
                call = following

        with self._errors():
            link.run(send_rest)
        if refused:
            raise refused[0]
        return results

    def _stage_key(self) -> str:
        """A transient hash for a large batch's bodies (see _stage_chunks)."""
        return f"{self.namespace}{keys.STAGE}{uuid.uuid4().hex}"

    # -- fetch ---------------------------------------------------------------------------------

    async def fetch(self, queues: Sequence[str], limit: int, wait: float) -> list[Delivery]:
        if limit <= 0 or not queues:
            return []
        await self._redis()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        signals = [self.namespace + keys.SIGNAL + q for q in queues]
        deliveries, next_due = await self._lease_ready(queues, limit)
        while True:
            remaining = deadline - loop.time()
            if deliveries or remaining <= 0:
                return deliveries
            pause = min(remaining, MAX_BLOCK)
            if next_due is not None:
                pause = min(pause, next_due + 0.001)
            if pause < MIN_BLOCK:
                await asyncio.sleep(pause)  # due in a moment: shorter than Redis's timer tick
                deliveries, next_due = await self._lease_ready(queues, limit)
            else:
                deliveries, next_due = await self._lease_ready(queues, limit, (signals, pause))

    async def _lease_ready(
        self, queues: Sequence[str], limit: int, after: tuple[list[str], float] | None = None
    ) -> tuple[list[Delivery], float | None]:
        """FETCH; with `after=(signal keys, seconds)`, behind a BLPOP on those keys in the same
        round trip: Redis runs the script the moment the BLPOP returns (a wake-up, or its timeout),
        without a trip back here and out again between the two (a job sent to an idle worker
        waits one round trip less)."""
        args = [limit, self.worker_name, len(queues), *queues]
        if after is not None:
            # Not shielded: cancelled (a worker told to stop) while blocked, the pipeline's
            # connection is dropped by redis-py and the FETCH queued behind the BLPOP with it, so
            # nothing is leased after a stop. Only a cancel in the instant between the BLPOP's
            # return and the reply leaves leases to expire instead of being handed back.
            return _deliveries(await self._waited(after, args))
        call = asyncio.ensure_future(self._run("FETCH", args))
        try:
            reply = await asyncio.shield(call)
        except asyncio.CancelledError:
            # The caller gave up (a worker told to stop). If the script ran, nobody holds its
            # leases: hand them back at once instead of leaving them to expire.
            call.add_done_callback(self._hand_back)
            raise
        return _deliveries(reply)

    async def _waited(self, after: tuple[list[str], float], fetch_args: Sequence[Any]) -> Any:
        signals, seconds = after
        commands = [("BLPOP", *signals, seconds), self._evalsha("FETCH", fetch_args)]
        _, reply = await self._pipeline(commands, resend=False)
        if isinstance(reply, rex.NoScriptError):  # the scripts are loaded again now; the wake-up
            return await self._run("FETCH", fetch_args)  # was taken: look without waiting again
        if isinstance(reply, Exception):
            with self._errors():
                raise reply
        return reply

    def _hand_back(self, call: asyncio.Future[Any]) -> None:
        if call.cancelled() or call.exception() is not None:
            return
        deliveries, _ = _deliveries(call.result())
        if deliveries:
            task = asyncio.ensure_future(self.settle([Settle(d, "release") for d in deliveries]))
            self._background.add(task)
            task.add_done_callback(self._handed_back)

    def _handed_back(self, task: asyncio.Future[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning(
                "handing back leases of a cancelled fetch failed (they will expire): %s", task.exception()
            )

    # -- settle --------------------------------------------------------------------------------

    async def settle(self, outcomes: Sequence[Settle]) -> list[bool]:
        if not outcomes:
            return []
        meta = []
        payloads = []
        for o in outcomes:
            payload = o.result if o.kind == "ack" else o.error
            data = payload.encode() if isinstance(payload, str) else (payload or b"")
            payloads.append(data)
            meta.append(
                (
                    o.delivery.job_id,
                    str(o.delivery.token),
                    o.kind,
                    payload is not None,
                    len(data),
                    float(o.delay),
                )
            )
        return [bool(ok) for ok in await self._run("SETTLE", [_pack(meta), b"".join(payloads)])]

    async def extend(self, deliveries: Sequence[Delivery]) -> list[bool]:
        if not deliveries:
            return []
        meta = [(d.job_id, str(d.token), float(d.lease_seconds)) for d in deliveries]
        return [bool(ok) for ok in await self._run("EXTEND", [_pack(meta)])]

    async def cancel(self, job_id: str) -> bool:
        return bool(await self._run("CANCEL", [job_id]))

    # -- reads ---------------------------------------------------------------------------------

    async def get_job(self, job_id: str) -> JobInfo | None:
        client = await self._redis()
        with self._errors():
            values = await cast(Any, client.hmget(self.namespace + keys.JOB + job_id, _JOB_FIELDS))
        return _job_info(job_id, values)

    async def _get_jobs(self, job_ids: Sequence[str]) -> list[JobInfo]:
        client = await self._redis()
        with self._errors():
            async with client.pipeline(transaction=False) as pipe:
                for job_id in job_ids:
                    pipe.hmget(self.namespace + keys.JOB + job_id, _JOB_FIELDS)
                rows = await pipe.execute()
        infos = [_job_info(job_id, values) for job_id, values in zip(job_ids, rows, strict=True)]
        return [info for info in infos if info is not None]

    async def stats(self, queues: Sequence[str] | None = None) -> list[QueueStats]:
        names = list(queues) if queues is not None else []
        reply = await self._run("STATS", [len(names), *names])
        out = []
        for i in range(0, len(reply), 7):
            queue, ready, delayed, running, dead, bound, rate = reply[i : i + 7]
            out.append(
                QueueStats(
                    queue=_text(queue),
                    ready=int(ready),
                    delayed=int(delayed),
                    running=int(running),
                    dead=int(dead),
                    max_depth=int(bound) if bound else None,
                    drain_rate=float(rate),
                )
            )
        if queues is None:
            out.sort(key=lambda s: s.queue)
        return out

    async def dead_jobs(self, queue: str | None = None, limit: int = 100) -> list[JobInfo]:
        if limit <= 0:
            return []
        ids = await self._run("DEAD_IDS", [queue or "", limit])
        return await self._get_jobs([_text(i) for i in ids])

    # -- operator verbs --------------------------------------------------------------------------

    async def _dead(self, action: str, job_ids: Sequence[str] | None, queue: str | None) -> int:
        if job_ids is not None and not job_ids:
            return 0
        ids = list(job_ids) if job_ids is not None else []
        return int(await self._run("DEAD_JOBS", [action, queue or "", "1" if job_ids else "0", *ids]))

    async def replay_dead(self, job_ids: Sequence[str] | None = None, queue: str | None = None) -> int:
        return await self._dead("replay", job_ids, queue)

    async def purge_dead(self, job_ids: Sequence[str] | None = None, queue: str | None = None) -> int:
        return await self._dead("purge", job_ids, queue)

    async def purge(self, queue: str) -> int:
        total = 0
        while gone := int(await self._run("PURGE", [queue])):
            total += gone
        return total

    async def prune(self) -> int:
        total = 0
        while True:
            pruned = int(await self._run("PRUNE", []))
            total += pruned
            if pruned < keys.CHUNK:
                return total
