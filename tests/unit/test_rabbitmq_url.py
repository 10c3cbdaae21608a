"""The RabbitMQ URL: its own options, the Redis state store it names (Sentinel included), and
the extra it needs."""

from __future__ import annotations

import sys
from urllib.parse import quote

import pytest

from offload.brokers import broker_from_url
from offload.brokers.rabbitmq_url import parse_rabbitmq_url
from offload.errors import ConfigurationError, MissingExtraError


def test_state_store_defaults_its_key_prefix_to_the_brokers() -> None:
    options = parse_rabbitmq_url("amqp://guest:guest@mq:5672/?state=redis://cache:6379/2&prefix=shop")
    assert options.state_url == "redis://cache:6379/2?prefix=shop%3A"
    assert options.prefix == "shop"


def test_state_store_may_be_a_sentinel_url() -> None:
    state = "redis+sentinel://s1:26379,s2:26379/mymaster/0?wait_replicas=1"
    options = parse_rabbitmq_url(f"amqp://mq/?state={quote(state, safe='')}")
    assert options.state_url.startswith(
        "redis+sentinel://s1:26379,s2:26379/mymaster/0?wait_replicas=1&prefix="
    )


@pytest.mark.parametrize("state", ["postgresql://db/app", "sqlite:///x.db", "nats://n:4222"])
def test_a_state_store_that_is_not_redis_is_refused_with_the_schemes_to_use(state: str) -> None:
    with pytest.raises(ConfigurationError, match=r"redis\+sentinel://"):
        parse_rabbitmq_url(f"amqp://mq/?state={quote(state, safe='')}")


@pytest.mark.parametrize("missing", ["aio_pika", "redis"])
def test_missing_client_library_names_the_rabbitmq_extra(
    missing: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # amqp:// needs aio-pika for the messages and redis-py for the records; the extra has both.
    monkeypatch.setitem(sys.modules, missing, None)  # makes `import <missing>` fail
    with pytest.raises(MissingExtraError, match=r"pip install 'offload\[rabbitmq\]'"):
        broker_from_url("amqp://guest:guest@127.0.0.1:5672/")


def test_tls_files_go_to_aiormq_under_its_own_names() -> None:
    options = parse_rabbitmq_url(
        "amqps://mq/?ssl_ca_certs=/ca.pem&certfile=/c.pem&ssl_keyfile=/k.pem&auth=external"
    )
    assert options.amqp_url == (
        "amqps://mq/?cafile=%2Fca.pem&certfile=%2Fc.pem&keyfile=%2Fk.pem&auth=external&heartbeat=5"
    )


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("amqp://mq/?cafile=/ca.pem", r"TLS setting: use an amqps:// URL"),
        ("amqps://mq/?ca_certs=/ca.pem", r"not read by aiormq: use cafile="),
    ],
)
def test_tls_options_that_would_be_ignored_are_refused(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        parse_rabbitmq_url(url)
