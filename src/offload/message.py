"""The job envelope: an immutable, versioned JSON document, and its codec.

Only JSON crosses the broker. Nothing in a message names a class or module to import: the worker
looks a task up by name in its own registry, so a message can at worst name a task that does not
exist (which dead-letters it), never make the worker run code it did not register.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import msgspec

from offload.errors import EncodeError

ENVELOPE_VERSION = 1
DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024


class Message(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One job as it travels through the broker."""

    id: str
    task: str
    queue: str = "default"
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = {}
    priority: int = 0  # higher runs first, 0..9 by convention
    eta: float | None = None  # epoch seconds; not delivered before
    created_at: float = 0.0
    timeout: float | None = None  # seconds; also sizes the lease
    max_deliveries: int = 5  # deliveries (crashes included) before the dead-letter queue
    idempotency_key: str | None = None
    idempotency_window: float = 86_400.0  # seconds the key keeps returning this job
    result_ttl: float = 86_400.0  # seconds the outcome is kept after the job finishes
    # Options owned by middleware or later features (workflows, webhooks, ...). JSON values only.
    options: dict[str, Any] = {}
    v: int = ENVELOPE_VERSION

    def replace(self, **changes: Any) -> Message:
        return msgspec.structs.replace(self, **changes)


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Message)


_id_lock = threading.Lock()
_id_last = [0, 0]  # the last id's milliseconds and random part


def new_job_id() -> str:
    """A 32-hex-digit id that sorts by creation time: 48-bit milliseconds + 80 random bits.

    As in monotonic ULIDs, ids made in the same millisecond by one process count up from one
    random start, so jobs sent together keep their order (FIFO within a batch) and the random
    bytes are drawn once per millisecond rather than once per job.
    """
    ms = time.time_ns() // 1_000_000
    with _id_lock:
        if ms <= _id_last[0]:
            ms, rand = _id_last[0], _id_last[1] + 1
        else:
            rand = int.from_bytes(os.urandom(10), "big") >> 1  # headroom for the increments
        _id_last[0], _id_last[1] = ms, rand
    return f"{ms:012x}{rand:020x}"


def encode(message: Message, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> bytes:
    """Encode a message, naming the argument at fault when one cannot be encoded."""
    try:
        data = _encoder.encode(message)
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodeError(_explain_encode_failure(message, exc)) from exc
    if len(data) > max_bytes:
        raise EncodeError(
            f"job for task {message.task!r} encodes to {len(data):,} bytes, over the "
            f"{max_bytes:,}-byte limit; store large data elsewhere (a file, an object store) "
            "and pass a reference, or raise App(max_message_bytes=...)"
        )
    return data


def decode(data: bytes | str) -> Message:
    """Decode an envelope; raises msgspec.DecodeError/ValidationError for a malformed one."""
    message = _decoder.decode(data)
    if message.v > ENVELOPE_VERSION:
        raise msgspec.ValidationError(
            f"envelope version {message.v} is newer than this offload understands "
            f"({ENVELOPE_VERSION}); upgrade the worker"
        )
    return message


def encode_value(value: Any) -> bytes:
    """Encode a task result (or any JSON value)."""
    try:
        return _encoder.encode(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodeError(f"value of type {type(value).__name__} is not JSON-encodable: {exc}") from exc


def decode_value(data: bytes | str | None) -> Any:
    if data is None:
        return None
    return msgspec.json.decode(data)


def _explain_encode_failure(message: Message, exc: Exception) -> str:
    for index, value in enumerate(message.args):
        if _fails(value):
            return (
                f"argument {index} of task {message.task!r} ({type(value).__name__}) cannot be "
                f"encoded as JSON: {exc}; pass JSON-compatible values (str, int, float, bool, "
                "None, list, dict, or dataclasses/msgspec Structs of them)"
            )
    for name, value in message.kwargs.items():
        if _fails(value):
            return (
                f"argument {name!r} of task {message.task!r} ({type(value).__name__}) cannot be "
                f"encoded as JSON: {exc}; pass JSON-compatible values"
            )
    return f"job for task {message.task!r} cannot be encoded as JSON: {exc}"


def _fails(value: Any) -> bool:
    try:
        _encoder.encode(value)
    except (TypeError, ValueError, OverflowError):
        return True
    return False
