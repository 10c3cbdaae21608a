"""Redis broker URLs: `redis://` and `rediss://`, with offload's options split off for redis-py."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from redis.connection import URL_QUERY_ARGUMENT_PARSERS

from offload.errors import ConfigurationError

DEFAULT_PREFIX = "offload:"
_OPTIONS = {"prefix", "require_noeviction"}


def redact(url: str) -> str:
    """The URL with its password hidden, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def parse_redis_url(url: str) -> tuple[str, str, bool]:
    """Split our options off the URL: (the URL for redis-py, prefix, require_noeviction)."""
    shown = redact(url)
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigurationError(f"not a Redis URL: {shown!r}")
    prefix, require = DEFAULT_PREFIX, False
    rest: list[tuple[str, str]] = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name == "prefix":
            prefix = value
        elif name == "require_noeviction":
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ConfigurationError(f"require_noeviction={value!r} in {shown!r}: use true or false")
            require = value.lower() in ("true", "1", "yes")
        elif name in URL_QUERY_ARGUMENT_PARSERS:
            rest.append((name, value))
        else:
            known = sorted(_OPTIONS | set(URL_QUERY_ARGUMENT_PARSERS))
            raise ConfigurationError(f"unknown Redis URL option {name!r} in {shown!r}; known: {known}")
    if not prefix:
        raise ConfigurationError(
            f"empty prefix in {shown!r}: every key needs one (default {DEFAULT_PREFIX!r})"
        )
    return urlunsplit(parts._replace(query=urlencode(rest))), prefix, require
