"""How the Redis broker reaches Redis: one server, or the primary that Sentinels name.

`open_client` makes the async client and `open_blocking_link` the sync senders' connections
(redis_blocking), for a `redis://` URL or a `redis+sentinel://` one (redis_url). Both turn off
redis-py's silent re-sends: a script whose reply was lost may have run, so each caller decides
(the worker retries its fetch; an enqueue is safe to re-send with the same job ids).

Through Sentinel, redis-py's Sentinel connection pools find the primary: a connection asks the
Sentinels for the primary's address each time it connects, and one that gets a READONLY reply
(it is talking to a primary since demoted to a replica) disconnects, so the next command
connects afresh. What fails meanwhile surfaces as the BrokerErrors of a Redis restart, and the
callers' own retries carry on once the Sentinels have promoted a replica.

`wait_command` and `too_few_replicas` are the `wait_replicas` option: WAIT after an enqueue, on
the same connection, and a BrokerError if fewer replicas than asked for confirmed it.
"""

from __future__ import annotations

from typing import Any, cast

import redis.asyncio as aioredis
import redis.asyncio.connection as aioconnection
import redis.connection as connection
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.asyncio.sentinel import SentinelConnectionPool as AsyncSentinelPool
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

from offload.brokers.redis_blocking import BlockingLink
from offload.brokers.redis_url import RedisUrl
from offload.errors import BrokerError

__all__ = [
    "SOCKET_TIMEOUT",
    "AsyncSentinel",
    "open_blocking_link",
    "open_client",
    "too_few_replicas",
    "wait_command",
]

SOCKET_TIMEOUT = 30.0
CONNECT_TIMEOUT = 5.0
MAX_CONNECTIONS = 64  # per broker, and again for its sync senders; the URL's max_connections overrides it
POOL_OPTIONS: dict[str, Any] = {
    "max_connections": MAX_CONNECTIONS,
    "timeout": SOCKET_TIMEOUT,  # past max_connections, commands wait this long for a free one
    "socket_timeout": SOCKET_TIMEOUT,
    "socket_connect_timeout": CONNECT_TIMEOUT,
    "socket_keepalive": True,
}


def open_client(target: RedisUrl) -> tuple[aioredis.Redis, AsyncSentinel | None]:
    """The async client (nothing is connected yet) and, for a Sentinel URL, the Sentinels'
    client, to be closed after the first."""
    retry = AsyncRetry(NoBackoff(), 0)
    if not target.sentinels:
        pool = aioredis.BlockingConnectionPool.from_url(target.client_url, **POOL_OPTIONS, retry=retry)
        return aioredis.Redis.from_pool(pool), None  # closing the client closes the pool
    options = _options(target, cast(Any, aioconnection.parse_url)(target.client_url), retry)
    sentinels, sentinel_options = list(target.sentinels), _sentinel_options(target, options)
    sentinel: AsyncSentinel = cast(Any, AsyncSentinel)(sentinels, sentinel_kwargs=sentinel_options)
    client: aioredis.Redis = sentinel.master_for(
        target.service_name, connection_pool_class=_BlockingSentinelPool, **options
    )
    return client, sentinel


def open_blocking_link(target: RedisUrl) -> BlockingLink:
    """enqueue_blocking's connections; through Sentinel, each asks the Sentinels for the primary
    when it connects (BlockingLink makes them from the pool's connection class and arguments)."""
    if not target.sentinels:
        return BlockingLink.from_url(target.client_url, POOL_OPTIONS, SOCKET_TIMEOUT)
    options = _options(target, cast(Any, connection.parse_url)(target.client_url), Retry(NoBackoff(), 0))
    options.pop("timeout", None)  # the async pool's wait for a free connection: not a sync option
    sentinels, sentinel_options = list(target.sentinels), _sentinel_options(target, options)
    sentinel = cast(Any, Sentinel)(sentinels, sentinel_kwargs=sentinel_options)
    pool = sentinel.master_for(
        target.service_name, connection_pool_class=SentinelConnectionPool, **options
    ).connection_pool

    def close() -> None:
        for client in sentinel.sentinels:
            client.close()

    return BlockingLink(pool, SOCKET_TIMEOUT, on_close=close)


class _BlockingSentinelPool(AsyncSentinelPool, aioredis.BlockingConnectionPool):
    """A Sentinel pool that, past max_connections, waits for a free connection (as the
    standalone client's BlockingConnectionPool does) instead of failing."""


def _options(target: RedisUrl, parsed: dict[str, Any], retry: Any) -> dict[str, Any]:
    """The primary's connection options: offload's defaults, then the URL's (as from_url does)."""
    options = {**POOL_OPTIONS, **parsed, "retry": retry}
    for name in ("host", "port", "connection_class"):
        options.pop(name, None)
    if target.client_url.startswith("rediss:"):
        options["ssl"] = True  # the Sentinel pool then makes TLS connections
    return options


def _sentinel_options(target: RedisUrl, options: dict[str, Any]) -> dict[str, Any]:
    """How to reach the Sentinels: the primary's socket and TLS settings, their own credentials,
    no retries (an unreachable Sentinel is skipped for the next one)."""
    kept = {
        name: value
        for name, value in options.items()
        if name.startswith(("socket_", "ssl")) and name != "socket_read_size"
    }
    kept["retry"] = options["retry"]
    if target.sentinel_username is not None:
        kept["username"] = target.sentinel_username
    if target.sentinel_password is not None:
        kept["password"] = target.sentinel_password
    return kept


def wait_command(target: RedisUrl) -> tuple[str, int, int]:
    """WAIT for the URL's wait_replicas, sent after an enqueue on the same connection: it returns
    once that many replicas have the connection's writes, or at the timeout."""
    return ("WAIT", target.wait_replicas, max(1, round(target.wait_timeout * 1000)))


def too_few_replicas(target: RedisUrl, confirmed: Any) -> BrokerError | None:
    """The error to report when WAIT says fewer replicas than asked for have an enqueue."""
    if int(confirmed) >= target.wait_replicas:
        return None
    return BrokerError(
        f"Redis at {target.where}: the enqueue is stored on the primary, but only {int(confirmed)} "
        f"of the {target.wait_replicas} replicas asked for (wait_replicas) confirmed it within "
        f"{target.wait_timeout:g} s, so a failover could lose it; re-sending it is safe"
    )
