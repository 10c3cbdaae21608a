"""Redis broker URLs through Sentinel (redis+sentinel://) and the wait_replicas option: parsing,
the clear errors for what is missing or misspelt, and the clients made from them (not connected).
"""

from __future__ import annotations

import re

import pytest

from offload import ConfigurationError
from offload.brokers import broker_from_url
from offload.brokers.rabbitmq import RabbitMQBroker
from offload.brokers.redis import RedisBroker
from offload.brokers.redis_client import open_blocking_link, open_client, too_few_replicas, wait_command
from offload.brokers.redis_url import parse_redis_url, redact


def test_the_service_and_db_in_the_path() -> None:
    parsed = parse_redis_url(
        "redis+sentinel://:s3cret@s1.example:26380,s2.example/mymaster/2"
        "?prefix=jobs:&socket_timeout=3&sentinel_password=sp&sentinel_username=watcher"
    )
    assert parsed.sentinels == (("s1.example", 26380), ("s2.example", 26379))  # 26379 by default
    assert parsed.service_name == "mymaster"
    assert parsed.client_url == "redis://:s3cret@s1.example:26380/2?socket_timeout=3"
    assert (parsed.sentinel_username, parsed.sentinel_password) == ("watcher", "sp")
    assert parsed.prefix == "jobs:"
    assert parsed.where == "Sentinel service 'mymaster' (via s1.example:26380,s2.example:26379)"


def test_the_service_as_an_option_and_the_db_alone_in_the_path() -> None:
    parsed = parse_redis_url("redis+sentinel://10.0.0.1,10.0.0.2:5000/3?service_name=cache")
    assert (parsed.service_name, parsed.sentinels) == ("cache", (("10.0.0.1", 26379), ("10.0.0.2", 5000)))
    assert parsed.client_url == "redis://10.0.0.1:26379/3"
    assert parse_redis_url("redis+sentinel://h?service_name=m").client_url == "redis://h:26379"
    assert parse_redis_url("redis+sentinel://h/m").client_url == "redis://h:26379"  # db 0


def test_tls_and_ipv6() -> None:
    parsed = parse_redis_url("rediss+sentinel://user:pw@[::1]:26379,h2/m/1?ssl_check_hostname=false")
    assert parsed.sentinels == (("::1", 26379), ("h2", 26379))
    assert parsed.client_url == "rediss://user:pw@[::1]:26379/1?ssl_check_hostname=false"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://h:26379/0", "no service name in 'redis+sentinel://h:26379/0'"),
        ("redis+sentinel://h:26379", "no service name"),
        ("redis+sentinel://h/m/0?service_name=m", "both in its path and as service_name="),
        ("redis+sentinel://h/m/x", "the path is /service_name[/db]"),
        ("redis+sentinel:///m/0", "no Sentinel in"),
        ("redis+sentinel://h:port/m", "bad Sentinel address 'h:port'"),
        ("redis+sentinel://h/m?master=m", "unknown Redis URL option 'master'"),
        ("redis://h/0?service_name=m", "unknown Redis URL option 'service_name'"),  # Sentinel URLs only
        ("redis+sentinel://h/m?wait_replicas=one", "wait_replicas='one'"),
        ("redis://h/0?wait_timeout=0", "wait_timeout='0'"),
    ],
)
def test_what_is_wrong_is_named(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        broker_from_url(url)


def test_unknown_options_list_the_sentinel_ones() -> None:
    with pytest.raises(ConfigurationError) as caught:
        broker_from_url("redis+sentinel://h/m?sentinel_pasword=x")
    assert "'sentinel_password'" in str(caught.value) and "'service_name'" in str(caught.value)


def test_messages_never_show_a_password() -> None:
    shown = redact("redis+sentinel://u:s3cret@h1,h2/m?sentinel_password=hidden2&prefix=p:")
    assert "s3cret" not in shown and "hidden2" not in shown
    assert shown.startswith("redis+sentinel://u:***@h1,h2/m?") and "prefix=p:" in shown
    with pytest.raises(ConfigurationError) as caught:
        broker_from_url("redis+sentinel://:s3cret@h/m?sentinel_password=hidden2&prefx=x")
    assert "s3cret" not in str(caught.value) and "hidden2" not in str(caught.value)


def test_both_schemes_make_a_redis_broker() -> None:
    for scheme in ("redis+sentinel", "rediss+sentinel"):
        broker = broker_from_url(f"{scheme}://127.0.0.1:26379/mymaster/0")
        assert isinstance(broker, RedisBroker)
        assert broker.target.service_name == "mymaster"


async def test_the_clients_go_through_the_sentinels() -> None:
    from redis.asyncio.connection import SSLConnection
    from redis.asyncio.sentinel import SentinelManagedConnection as AsyncManaged
    from redis.asyncio.sentinel import SentinelManagedSSLConnection as AsyncManagedSSL
    from redis.sentinel import SentinelManagedConnection

    target = parse_redis_url("redis+sentinel://:pw@s1,s2:26380/m/4?max_connections=7&sentinel_password=sp")
    client, sentinel = open_client(target)  # nothing connects until a command is sent
    assert sentinel is not None
    try:
        pool = client.connection_pool
        assert pool.connection_class is AsyncManaged
        assert pool.max_connections == 7
        assert pool.connection_kwargs["db"] == 4 and pool.connection_kwargs["password"] == "pw"
        assert pool.connection_kwargs["retry"].get_retries() == 0  # no silent re-sends
        assert [s.connection_pool.connection_kwargs["port"] for s in sentinel.sentinels] == [26379, 26380]
        assert sentinel.sentinels[0].connection_pool.connection_kwargs["password"] == "sp"
    finally:
        await client.aclose()
        await sentinel.aclose()
    link = open_blocking_link(target)
    try:
        assert link._connection_class is SentinelManagedConnection
        assert link._connection_kwargs["password"] == "pw" and link._connection_kwargs["db"] == 4
    finally:
        link.close()
    tls, tls_sentinel = open_client(parse_redis_url("rediss+sentinel://s1/m"))
    assert tls_sentinel is not None
    assert tls.connection_pool.connection_class is AsyncManagedSSL
    assert tls_sentinel.sentinels[0].connection_pool.connection_class is SSLConnection  # Sentinels too
    await tls.aclose()
    await tls_sentinel.aclose()


def test_wait_replicas() -> None:
    target = parse_redis_url("redis://h/0?wait_replicas=2&wait_timeout=0.25")
    assert wait_command(target) == ("WAIT", 2, 250)
    assert too_few_replicas(target, 2) is None
    short = too_few_replicas(target, 1)
    assert (
        short is not None
        and "only 1 of the 2 replicas" in str(short)
        and "re-sending it is safe" in str(short)
    )
    assert parse_redis_url("redis://h/0").wait_replicas == 0  # off unless asked for


def test_the_rabbitmq_state_store_refuses_wait_replicas() -> None:
    with pytest.raises(ConfigurationError, match="wait_replicas"):
        RabbitMQBroker("amqp://127.0.0.1/?state=redis://127.0.0.1:6379/0?wait_replicas=1")
