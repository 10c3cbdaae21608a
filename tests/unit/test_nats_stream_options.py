"""The NATS URL's options for transport=stream's consumers: ack_wait and max_deliver."""

from __future__ import annotations

import pytest

from offload.brokers import nats_keys as k
from offload.errors import ConfigurationError


def test_ack_wait_and_max_deliver_default_and_come_from_the_url() -> None:
    assert k.parse_stream_options("nats://h") == (k.DEFAULT_ACK_WAIT, k.DEFAULT_MAX_DELIVER)
    assert k.parse_stream_options("nats://h?ack_wait=5&max_deliver=20") == (5.0, 20)
    k.parse_nats_url("nats://h?bucket=b&ack_wait=1.5&max_deliver=3")  # known options


@pytest.mark.parametrize(
    "query", ["ack_wait=x", "ack_wait=0.1", "ack_wait=7200", "max_deliver=0", "max_deliver=a"]
)
def test_bad_ack_wait_or_max_deliver_is_a_configuration_error(query: str) -> None:
    with pytest.raises(ConfigurationError):
        k.parse_stream_options(f"nats://h?{query}")
