"""Redis broker URLs, with offload's options split off for redis-py.

    redis://[[user]:password@]host[:port][/db][?option=value&...]
    rediss://...                                           TLS
    redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service_name[/db][?...]
    rediss+sentinel://...                                  TLS to the primary and the Sentinels

A Sentinel URL lists Sentinels (port 26379 unless given), not Redis servers: the client asks them
for the current primary of `service_name` (also accepted as `?service_name=`, then the path may
hold just the db). The user and password authenticate to the primary, `sentinel_username` and
`sentinel_password` to the Sentinels. This is the form of the redis-sentinel-url package, also
used by Prefect and RedisVL.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from redis.connection import URL_QUERY_ARGUMENT_PARSERS

from offload.errors import ConfigurationError

DEFAULT_PREFIX = "offload:"
SENTINEL_PORT = 26379
SENTINEL_SCHEMES = {"redis+sentinel": "redis", "rediss+sentinel": "rediss"}
_OPTIONS = {"prefix", "require_noeviction", "wait_replicas", "wait_timeout"}
# TLS settings redis-py takes as strings but does not list among the URL options it parses: a
# private CA, a client certificate (Redis asks for one unless `tls-auth-clients no`), how strictly
# to check the server's certificate. rediss:// URLs only: a plain connection would refuse them.
_TLS_OPTIONS = {"ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile", "ssl_password", "ssl_cert_reqs"}
_CERT_REQS = ("none", "optional", "required")
_SENTINEL_OPTIONS = {"service_name", "sentinel_username", "sentinel_password"}
_SECRET_OPTIONS = {"sentinel_password", "ssl_password"}  # hidden in messages
_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


@dataclass(frozen=True)
class RedisUrl:
    """A parsed broker URL. For a Sentinel URL, `client_url` is a redis:// (rediss://) URL with
    the primary's credentials, db and redis-py options on the first Sentinel's address: redis-py
    parses its options from it, then the Sentinels supply the address."""

    client_url: str
    prefix: str
    require_noeviction: bool
    wait_replicas: int  # enqueues wait for this many replicas to confirm (WAIT); 0: no waiting
    wait_timeout: float  # ... for at most this many seconds
    where: str  # for messages: host:port, or the service and its Sentinels
    sentinels: tuple[tuple[str, int], ...] = ()  # empty: a standalone server
    service_name: str = ""
    sentinel_username: str | None = None
    sentinel_password: str | None = None


def redact(url: str) -> str:
    """The URL with its passwords hidden (the user's, a sentinel_password, the client key's
    ssl_password), for messages."""
    parts = urlsplit(url)
    user, at, hosts = parts.netloc.rpartition("@")
    if at and ":" in user:
        parts = parts._replace(netloc=f"{user.split(':', 1)[0]}:***@{hosts}")
    if "password=" in parts.query:
        query = parse_qsl(parts.query, keep_blank_values=True)
        hidden = [(k, "***" if k in _SECRET_OPTIONS else v) for k, v in query]
        parts = parts._replace(query=urlencode(hidden, safe="*:"))
    return urlunsplit(parts)


def parse_redis_url(url: str) -> RedisUrl:
    """Split our options off the URL and check every option's name (typos are errors)."""
    shown = redact(url)
    parts = urlsplit(url)
    sentinel = parts.scheme in SENTINEL_SCHEMES
    if parts.scheme not in ("redis", "rediss") and not sentinel:
        raise ConfigurationError(f"not a Redis URL: {shown!r}")
    prefix, require, wait_replicas, wait_timeout = DEFAULT_PREFIX, False, 0, 1.0
    extra: dict[str, str] = {}  # the Sentinel options
    rest: list[tuple[str, str]] = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name == "prefix":
            prefix = value
        elif name == "require_noeviction":
            if value.lower() not in _BOOLEANS:
                raise ConfigurationError(f"require_noeviction={value!r} in {shown!r}: use true or false")
            require = _BOOLEANS[value.lower()]
        elif name == "wait_replicas":
            if not value.isdigit():
                raise ConfigurationError(f"wait_replicas={value!r} in {shown!r}: use a whole number (0: off)")
            wait_replicas = int(value)
        elif name == "wait_timeout":
            wait_timeout = _seconds(name, value, shown)
        elif sentinel and name in _SENTINEL_OPTIONS:
            extra[name] = value
        elif name in _TLS_OPTIONS:
            _check_tls_option(parts.scheme, name, value, shown)
            rest.append((name, value))
        elif name in URL_QUERY_ARGUMENT_PARSERS:
            rest.append((name, value))
        else:
            known = sorted(
                _OPTIONS
                | _TLS_OPTIONS
                | set(URL_QUERY_ARGUMENT_PARSERS)
                | (_SENTINEL_OPTIONS if sentinel else set())
            )
            raise ConfigurationError(f"unknown Redis URL option {name!r} in {shown!r}; known: {known}")
    if not prefix:
        raise ConfigurationError(
            f"empty prefix in {shown!r}: every key needs one (default {DEFAULT_PREFIX!r})"
        )
    base = RedisUrl(
        client_url=urlunsplit(parts._replace(query=urlencode(rest))),
        prefix=prefix,
        require_noeviction=require,
        wait_replicas=wait_replicas,
        wait_timeout=wait_timeout,
        where="" if sentinel else f"{parts.hostname or '127.0.0.1'}:{parts.port or 6379}",
    )
    return _with_sentinels(base, url, shown, extra) if sentinel else base


def _with_sentinels(base: RedisUrl, url: str, shown: str, extra: dict[str, str]) -> RedisUrl:
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    sentinels = tuple(_host_port(h.strip(), shown) for h in hosts.split(",") if h.strip())
    if not sentinels:
        raise ConfigurationError(
            f"no Sentinel in {shown!r}: list them as {parts.scheme}://host1:26379,host2:26379/mymaster/0"
        )
    segments = [s for s in parts.path.split("/") if s]
    service = extra.get("service_name", "")
    if service:
        if len(segments) > 1 or (segments and not segments[0].isdigit()):
            raise ConfigurationError(
                f"{shown!r} names the service both in its path and as service_name=: keep one "
                f"({parts.scheme}://host:26379/mymaster/0 or {parts.scheme}://host:26379/0?service_name=mymaster)"
            )
        db = segments[0] if segments else ""
    else:
        if not segments or segments[0].isdigit():
            raise ConfigurationError(
                f"no service name in {shown!r}: name the primary the Sentinels monitor (their "
                f"`sentinel monitor <name> ...`), as in {parts.scheme}://host:26379/mymaster/0"
            )
        if len(segments) > 2 or (len(segments) == 2 and not segments[1].isdigit()):
            raise ConfigurationError(f"{shown!r}: the path is /service_name[/db], with db a number")
        service, db = segments[0], segments[1] if len(segments) == 2 else ""
    host, port = sentinels[0]
    netloc = f"{userinfo}@{_join(host, port)}" if at else _join(host, port)
    query = urlsplit(base.client_url).query
    return replace(
        base,
        client_url=urlunsplit((SENTINEL_SCHEMES[parts.scheme], netloc, f"/{db}" if db else "", query, "")),
        where=f"Sentinel service {service!r} (via {','.join(_join(h, p) for h, p in sentinels)})",
        sentinels=sentinels,
        service_name=service,
        sentinel_username=extra.get("sentinel_username"),
        sentinel_password=extra.get("sentinel_password"),
    )


def _check_tls_option(scheme: str, name: str, value: str, shown: str) -> None:
    if not scheme.startswith("rediss"):
        tls = scheme.replace("redis", "rediss", 1)
        raise ConfigurationError(f"{name} in {shown!r} is a TLS setting: use a {tls}:// URL")
    if name == "ssl_cert_reqs" and value.lower() not in _CERT_REQS:
        raise ConfigurationError(f"ssl_cert_reqs={value!r} in {shown!r}: use one of {', '.join(_CERT_REQS)}")
    if not value:
        raise ConfigurationError(f"empty {name} in {shown!r}: give a value or leave the option out")


def _host_port(text: str, shown: str) -> tuple[str, int]:
    if text.startswith("["):  # [IPv6]:port
        host, _, port = text[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    if not host or (port and not port.isdigit()):
        raise ConfigurationError(f"bad Sentinel address {text!r} in {shown!r}: use host:port")
    return host, int(port) if port else SENTINEL_PORT


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _seconds(name: str, value: str, shown: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ConfigurationError(f"{name}={value!r} in {shown!r}: use a number of seconds above 0")
    return seconds
