"""The job envelope and its codec."""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
import types

import msgspec
import pytest

from offload import EncodeError, Message
from offload import message as message_module
from offload.message import (
    DEFAULT_MAX_MESSAGE_BYTES,
    ENVELOPE_VERSION,
    decode,
    decode_value,
    encode,
    encode_value,
    new_job_id,
)


def make(**fields: object) -> Message:
    return Message(id=new_job_id(), task="app.tasks.resize", **fields)  # type: ignore[arg-type]


def test_roundtrip_keeps_every_field() -> None:
    m = make(
        queue="images",
        args=(42, "x", [1, 2], {"k": None}),
        kwargs={"width": 640, "ratio": 1.5, "flag": True},
        priority=7,
        eta=time.time() + 60,
        created_at=time.time(),
        timeout=12.5,
        max_deliveries=4,
        idempotency_key="resize-42",
        idempotency_window=30.0,
        result_ttl=600.0,
        options={"webhook": "https://example.com/hook"},
    )
    assert decode(encode(m)) == m
    assert decode(encode(m).decode()) == m  # str input too


def test_defaults_are_omitted_on_the_wire_and_restored() -> None:
    m = make()
    data = encode(m)
    assert msgspec.json.decode(data) == {"id": m.id, "task": m.task}
    back = decode(data)
    assert (back.queue, back.priority, back.max_deliveries, back.v) == ("default", 0, 5, ENVELOPE_VERSION)


def test_message_is_immutable_and_replace_makes_a_copy() -> None:
    m = make(priority=1)
    with pytest.raises(AttributeError):
        m.priority = 2  # type: ignore[misc]
    changed = m.replace(priority=2)
    assert (m.priority, changed.priority, changed.id) == (1, 2, m.id)


def test_newer_envelope_version_is_refused() -> None:
    data = msgspec.json.encode({"id": "x", "task": "t", "v": ENVELOPE_VERSION + 1})
    with pytest.raises(msgspec.ValidationError, match="newer than this offload"):
        decode(data)


def test_unknown_fields_from_a_newer_sender_are_ignored() -> None:
    data = msgspec.json.encode({"id": "x", "task": "t", "future_field": [1, 2]})
    assert decode(data).task == "t"


@pytest.mark.parametrize(
    "data",
    [b"not json", b"[1, 2]", b'{"task": "t"}', b'{"id": "x", "task": "t", "priority": "high"}'],
)
def test_malformed_envelopes_raise_msgspec_errors(data: bytes) -> None:
    with pytest.raises((msgspec.DecodeError, msgspec.ValidationError)):
        decode(data)


def test_envelope_names_no_class_or_module() -> None:
    @dataclasses.dataclass
    class Point:
        x: int
        y: int

    data = encode(make(args=(Point(1, 2),)))
    assert b"Point" not in data
    assert decode(data).args == ({"x": 1, "y": 2},)


def test_unencodable_positional_argument_is_named() -> None:
    with pytest.raises(EncodeError, match=r"argument 1 of task 'app.tasks.resize' \(object\)"):
        encode(make(args=(1, object())))


def test_unencodable_keyword_argument_is_named() -> None:
    with pytest.raises(EncodeError, match=r"argument 'callback' of task 'app.tasks.resize' \(function\)"):
        encode(make(kwargs={"ok": 1, "callback": lambda: None}))


def test_unencodable_option_is_reported_for_the_job() -> None:
    with pytest.raises(EncodeError, match="cannot be encoded as JSON"):
        encode(make(options={"bad": object()}))


def test_encode_error_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        encode(make(args=(object(),)))


def test_oversized_message_is_refused_with_the_limit() -> None:
    m = make(args=("x" * 2000,))
    assert encode(m, max_bytes=4096)
    with pytest.raises(EncodeError, match="over the 1,000-byte limit"):
        encode(m, max_bytes=1000)
    assert DEFAULT_MAX_MESSAGE_BYTES == 1024 * 1024


def test_values_roundtrip_as_json() -> None:
    assert decode_value(encode_value({"a": [1, 2.5, None, True]})) == {"a": [1, 2.5, None, True]}
    assert decode_value(None) is None
    when = dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC)
    assert decode_value(encode_value(when)) == "2024-05-06T07:08:09Z"
    with pytest.raises(EncodeError, match="set"):
        encode_value({object()})


def test_job_ids_are_unique_and_sort_by_creation_time(monkeypatch: pytest.MonkeyPatch) -> None:
    ids = [new_job_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    now_ms = ids[-1][:12]
    later = types.SimpleNamespace(time_ns=lambda: (int(now_ms, 16) + 1) * 1_000_000)
    monkeypatch.setattr(message_module, "time", later)
    assert all(new_job_id() > i for i in ids)
