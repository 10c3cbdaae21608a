"""What the Redis broker's scripts are sent and answer, as Python values: the record codecs.

The ENQUEUE script's packed batch metadata and bodies (and the staging of a batch too large for
one command), and the replies of ENQUEUE, FETCH and a job record's HMGET turned into Enqueued,
Delivery and JobInfo. No I/O here: redis.py sends and receives, these encode and decode. The
RabbitMQ broker's state store keeps its records in the same format and uses them too.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import msgspec

from offload.brokers.base import Delivery, Enqueued, lease_seconds
from offload.errors import QueueFull
from offload.job import JobInfo, JobState
from offload.message import Message, decode, decode_value

# An enqueue batch with more body bytes than this stages its bodies first (see _stage_chunks).
STAGE_BYTES = 32 * 1024 * 1024

# A job record's fields, in the order _job_info takes them.
_JOB_FIELDS = (
    b"queue",
    b"task",
    b"state",
    b"prio",
    b"run_at",
    b"created",
    b"deliv",
    b"att",
    b"maxd",
    b"started",
    b"finished",
    b"worker",
    b"ikey",
    b"body",
    b"result",
    b"error",
)

_pack = msgspec.msgpack.Encoder().encode  # batch metadata for the scripts (Lua's cmsgpack decodes it)


def _enqueue_meta(items: Sequence[tuple[Message, bytes]]) -> tuple[bytes, bytes | None]:
    """The ENQUEUE script's packed metadata, and the bodies back to back (None: stage them)."""
    leases: dict[float | None, str] = {}  # a batch mostly repeats a few timeouts and TTLs
    ttls: dict[float, str] = {}
    now = repr(time.time())
    meta = []
    size = 0
    for m, body in items:
        lease = leases.get(m.timeout)
        if lease is None:
            lease = leases[m.timeout] = repr(lease_seconds(m.timeout))
        ttl = ttls.get(m.result_ttl)
        if ttl is None:
            ttl = ttls[m.result_ttl] = repr(float(m.result_ttl))
        size += len(body)
        meta.append(
            (
                m.id,
                m.queue,
                m.task,
                str(m.priority),
                "" if m.eta is None else repr(float(m.eta)),
                repr(float(m.created_at)) if m.created_at else now,
                lease,
                str(m.max_deliveries),
                ttl,
                False if m.idempotency_key is None else m.idempotency_key,
                int(m.idempotency_window * 1000),
                len(body),
                str(-m.priority),
            )
        )
    if size > STAGE_BYTES:
        return _pack(meta), None
    return _pack(meta), b"".join([body for _, body in items])


def enqueue_command(items: Sequence[tuple[Message, bytes]]) -> tuple[str, list[Any]] | None:
    """The script (ENQUEUE_ONE or ENQUEUE) and the arguments after the namespace that store
    `items` in one command, or None when their bodies are too large for one (stage them)."""
    if len(items) == 1 and len(items[0][1]) <= STAGE_BYTES:
        return "ENQUEUE_ONE", _enqueue_one_args(*items[0])
    meta, bodies = _enqueue_meta(items)
    return None if bodies is None else ("ENQUEUE", [meta, bodies])


def _enqueue_one_args(m: Message, body: bytes) -> list[Any]:
    """ENQUEUE_ONE's arguments after the namespace (see redis_scripts)."""
    args: list[Any] = [
        m.id,
        m.queue,
        m.task,
        str(m.priority),
        str(-m.priority),
        "" if m.eta is None else repr(float(m.eta)),
        repr(float(m.created_at or time.time())),
        repr(lease_seconds(m.timeout)),
        str(m.max_deliveries),
        repr(float(m.result_ttl)),
        body,
    ]
    if m.idempotency_key is not None:
        args += [str(int(m.idempotency_window * 1000)), m.idempotency_key]
    return args


def _stage_chunks(items: Sequence[tuple[Message, bytes]]) -> Iterator[dict[int, bytes]]:
    """A large batch's bodies as HSET mappings of bounded size (field = the job's position).

    Redis caps one argument at 512 MB and a command at the client query buffer (1 GB); the
    enqueue script then moves the bodies into the jobs, all or nothing. If it never runs, the
    staging key expires.
    """
    chunk: dict[int, bytes] = {}
    size = 0
    for position, (_, body) in enumerate(items, 1):
        chunk[position] = body
        size += len(body)
        if size >= STAGE_BYTES:
            yield chunk
            chunk, size = {}, 0
    if chunk:
        yield chunk


def _enqueued(items: Sequence[tuple[Message, bytes]], reply: list[Any]) -> list[Enqueued]:
    """The ENQUEUE script's reply as the jobs' ids and whether each was created, or QueueFull."""
    if reply[0] == b"full":
        _, queue, depth, bound, rate = reply
        raise QueueFull(_text(queue), int(depth), int(bound), float(rate))
    out = [Enqueued(m.id, True) for m, _ in items]
    for i in range(1, len(reply), 2):  # the jobs whose idempotency key another job holds
        out[int(reply[i]) - 1] = Enqueued(_text(reply[i + 1]), False)
    return out


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _deliveries(reply: list[Any]) -> tuple[list[Delivery], float | None]:
    count, next_due = int(reply[0]), reply[1]
    out = []
    for i in range(2, 2 + 7 * count, 7):
        job_id, queue, body, token, deliveries, attempts, lease = reply[i : i + 7]
        out.append(
            Delivery(
                _text(job_id),
                _text(queue),
                bytes(body),
                int(token),
                int(deliveries),
                int(attempts),
                float(lease),
            )
        )
    return out, (float(next_due) if next_due else None)


def _opt_float(value: bytes | None) -> float | None:
    return None if value is None else float(value)


def _job_info(job_id: str, values: list[bytes | None]) -> JobInfo | None:
    (
        queue,
        task,
        state,
        prio,
        run_at,
        created,
        deliveries,
        attempts,
        max_deliveries,
        started,
        finished,
        worker,
        key,
        body,
        result,
        error,
    ) = values
    if state is None or queue is None or task is None:
        return None
    try:
        message = decode(body or b"")
        args, kwargs, options = message.args, message.kwargs, message.options
    except (msgspec.DecodeError, msgspec.ValidationError):  # a malformed body still has a record
        args, kwargs, options = (), {}, {}
    return JobInfo(
        id=job_id,
        task=task.decode(),
        queue=queue.decode(),
        state=JobState(state.decode()),
        priority=int(prio or 0),
        args=args,
        kwargs=kwargs,
        deliveries=int(deliveries or 0),
        attempts=int(attempts or 0),
        max_deliveries=int(max_deliveries or 0),
        created_at=float(created or 0),
        run_at=float(run_at or 0),
        started_at=_opt_float(started),
        finished_at=_opt_float(finished),
        result=decode_value(result),
        error=None if error is None else error.decode(),
        worker=None if worker is None else worker.decode(),
        idempotency_key=None if key is None else key.decode(),
        options=options,
    )
