"""The RabbitMQ broker's URL and the names it gives things in RabbitMQ (see rabbitmq.py)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from offload.errors import ConfigurationError

DEFAULT_STATE = "redis://127.0.0.1:6379/0"
DEFAULT_PREFIX = "offload"
MIN_BUCKET_MS = 10
MAX_BUCKET_MS = 99 * 10**8  # ~115 days; longer delays hop through several buckets
# aio-pika's `heartbeat` unless the URL sets one. Messages pushed to a consumer whose host is cut
# off stay with it until RabbitMQ declares the connection dead, after about two heartbeats
# without a word from it (aio-pika's own default, 60 s, would hold them for minutes).
DEFAULT_HEARTBEAT = 5

# Redis keys the RabbitMQ broker adds to the Redis broker's layout (after the namespace):
AMQP_NAMES = "amqp"  # SET of every AMQP queue made, for cleanup tools
CLASSES = "amqp-classes:"  # SET per offload queue: the priority classes declared in RabbitMQ
UNPUBLISHED = "unpublished"  # ZSET: job id -> when its record was written and its publish began


@dataclass(frozen=True)
class RabbitMQOptions:
    amqp_url: str  # what aio-pika connects to (our options removed)
    state_url: str  # the Redis state store, with the key prefix
    prefix: str
    max_length: int  # x-max-length of each priority class queue (reject-publish past it)
    delivery_limit: int  # x-delivery-limit: RabbitMQ's own redelivery backstop
    republish_after: float  # seconds before a sweeper re-publishes a record whose publish never confirmed


STATE_SCHEMES = ("redis", "rediss", "redis+sentinel", "rediss+sentinel")


# TLS (amqps://): aiormq's own option names, and the names the Redis and NATS brokers use for the
# same files. auth=external logs in with the client certificate instead of a password.
TLS_OPTIONS = ("cafile", "capath", "certfile", "keyfile", "no_verify_ssl")
TLS_ALIASES = {
    "ssl_ca_certs": "cafile",
    "ssl_ca_path": "capath",
    "ssl_certfile": "certfile",
    "ssl_keyfile": "keyfile",
}
MISNAMED = {"ca_certs": "cafile= (or ssl_ca_certs=)"}  # aio-pika's docstring spelling; aiormq ignores it


def parse_rabbitmq_url(url: str) -> RabbitMQOptions:
    parts = urlsplit(url)
    if parts.scheme not in ("amqp", "amqps"):
        raise ConfigurationError(f"not an AMQP URL: {parts.scheme}://...")
    state, prefix = DEFAULT_STATE, DEFAULT_PREFIX
    numbers: dict[str, float] = {"max_length": 1_000_000, "delivery_limit": 20, "republish_after": 10.0}
    rest: list[tuple[str, str]] = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name == "state":
            state = value
        elif name == "prefix":
            prefix = value
        elif name in numbers:
            try:
                numbers[name] = float(value) if name == "republish_after" else int(value)
            except ValueError:
                raise ConfigurationError(f"{name}={value!r} in the RabbitMQ URL: use a number") from None
            if numbers[name] <= 0:
                raise ConfigurationError(f"{name}={value!r} in the RabbitMQ URL: must be positive")
        elif name in TLS_OPTIONS or name in TLS_ALIASES:
            if parts.scheme != "amqps":  # aiormq would ignore them and connect in plain text
                raise ConfigurationError(f"{name} in the RabbitMQ URL is a TLS setting: use an amqps:// URL")
            rest.append((TLS_ALIASES.get(name, name), value))
        elif name in MISNAMED:
            raise ConfigurationError(
                f"{name} in the RabbitMQ URL is not read by aiormq: use {MISNAMED[name]}"
            )
        else:
            rest.append((name, value))  # aio-pika's own options (heartbeat, ...)
    if not prefix:
        raise ConfigurationError("empty prefix in the RabbitMQ URL")
    if "heartbeat" not in {name for name, _ in rest}:
        rest.append(("heartbeat", str(DEFAULT_HEARTBEAT)))
    state_parts = urlsplit(state)
    if state_parts.scheme not in STATE_SCHEMES:
        raise ConfigurationError(
            f"state={state!r}: the RabbitMQ broker's state store must be a Redis URL "
            "(redis://, rediss://, or redis+sentinel:// for a Sentinel-managed primary)"
        )
    if "prefix" not in dict(parse_qsl(state_parts.query)):
        query = "&".join(q for q in (state_parts.query, urlencode({"prefix": f"{prefix}:"})) if q)
        state = urlunsplit(state_parts._replace(query=query))
    return RabbitMQOptions(
        amqp_url=urlunsplit(parts._replace(query=urlencode(rest))),
        state_url=state,
        prefix=prefix,
        max_length=int(numbers["max_length"]),
        delivery_limit=int(numbers["delivery_limit"]),
        republish_after=numbers["republish_after"],
    )


def bucket_ms(seconds: float) -> int:
    """The delay bucket for `seconds`: rounded down to two significant digits of milliseconds
    (at least MIN_BUCKET_MS), so at most ~900 buckets exist; an early arrival is re-bucketed."""
    ms = max(MIN_BUCKET_MS, min(MAX_BUCKET_MS, int(seconds * 1000)))
    scale = 10 ** max(0, len(str(ms)) - 2)
    return int(ms // scale * scale)
