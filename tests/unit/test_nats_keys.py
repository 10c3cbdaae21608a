"""The NATS broker's key layout and URL parsing (pure: no server needed)."""

from __future__ import annotations

import pytest

from offload.brokers import nats_keys as k
from offload.errors import ConfigurationError


@pytest.mark.parametrize("queue", ["default", "emails-high_1", "a.b", "with space", "ünï", "=x", ""])
def test_queue_names_become_one_key_token_and_back(queue: str) -> None:
    token = k.qkey(queue)
    assert "." not in token and " " not in token
    assert k.qname(token) == queue


def test_waiting_keys_sort_by_priority_then_age() -> None:
    keys = [
        k.waiting("q", 0, f"{1:025d}", 0.0, "a"),
        k.waiting("q", 9, f"{2:025d}", 0.0, "b"),
        k.waiting("q", 9, f"{1:025d}", 0.0, "c"),
        k.waiting("q", 5, f"{0:025d}", 12.5, "d"),
    ]
    ordered = sorted(keys, key=lambda key: k.parse_waiting(key)[0])
    assert [k.parse_waiting(key)[2] for key in ordered] == ["c", "b", "d", "a"]
    assert k.parse_waiting(keys[3])[1] == 12.5


def test_url_parsing() -> None:
    assert k.parse_nats_url("nats://127.0.0.1:4222") == (["nats://127.0.0.1:4222"], "offload", 1)
    servers, bucket, replicas = k.parse_nats_url("nats://u:p%40ss@a:4222,b:4222?bucket=jobs&replicas=3")
    assert servers == ["nats://u:p%40ss@a:4222", "nats://u:p%40ss@b:4222"]
    assert (bucket, replicas) == ("jobs", 3)
    for bad in ["nats://h?bucket=a.b", "nats://h?replicas=x", "nats://h?bukket=x", "redis://h"]:
        with pytest.raises(ConfigurationError):
            k.parse_nats_url(bad)


def test_transport_defaults_to_the_stream_and_kv_stays_selectable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OFFLOAD_NATS_TRANSPORT", raising=False)
    assert k.parse_transport("nats://h") == "stream"
    assert k.parse_transport("nats://h?transport=kv") == "kv"
    monkeypatch.setenv("OFFLOAD_NATS_TRANSPORT", "kv")
    assert k.parse_transport("nats://h") == "kv"
    assert k.parse_transport("nats://h?transport=stream") == "stream"  # the URL wins
    with pytest.raises(ConfigurationError):
        k.parse_transport("nats://h?transport=jetstream")
