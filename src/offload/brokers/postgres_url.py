"""The PostgreSQL broker's URL, and its errors as one line saying what to do.

    postgresql://user:password@host:5432/dbname?schema=offload&pool_size=10

offload's own options (removed before the URL reaches the driver):
    schema               where the tables live (default offload), one schema per deployment
    pool_size            connections per broker instance, i.e. per process and event loop (10)
    reconnect_timeout    seconds an operation keeps retrying through a lost connection (15)
    connect_timeout      seconds to open one connection (10)
    statement_cache_size prepared statements kept per connection (100; 0 behind pgbouncer in
                         transaction mode before 1.21)
libpq connection options asyncpg understands (sslmode, sslrootcert, target_session_attrs, ...)
pass through; any other option is a server setting for offload's sessions, e.g.
`?synchronous_commit=remote_apply` or `?statement_timeout=30000`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg  # type: ignore[import-untyped]

from offload.brokers.postgres_schema import check_schema_name
from offload.errors import ConfigurationError

DEFAULT_SCHEMA = "offload"

# Query options asyncpg reads from a DSN itself; the rest become server settings.
_DSN_OPTIONS = {
    "host",
    "port",
    "user",
    "password",
    "passfile",
    "dbname",
    "database",
    "service",
    "servicefile",
    "sslmode",
    "sslcert",
    "sslkey",
    "sslrootcert",
    "sslcrl",
    "sslpassword",
    "sslnegotiation",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "target_session_attrs",
    "krbsrvname",
    "gsslib",
}


@dataclass(frozen=True)
class PostgresOptions:
    dsn: str  # what the driver gets
    where: str  # host:port/dbname, for messages (never the password)
    schema: str = DEFAULT_SCHEMA
    pool_size: int = 10
    reconnect_timeout: float = 15.0
    connect_timeout: float = 10.0
    statement_cache_size: int = 100
    server_settings: dict[str, str] = field(default_factory=dict)


def parse_postgres_url(url: str) -> PostgresOptions:
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigurationError(f"not a PostgreSQL URL: {url!r}")
    try:
        query = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as exc:
        raise ConfigurationError(f"malformed options in PostgreSQL URL {url!r}: {exc}") from exc
    ours: dict[str, str] = {}
    dsn_query: list[tuple[str, str]] = []
    settings: dict[str, str] = {}
    for key, value in query:
        if key in ("schema", "pool_size", "reconnect_timeout", "connect_timeout", "statement_cache_size"):
            ours[key] = value
        elif key in _DSN_OPTIONS:
            dsn_query.append((key, value))
        else:
            settings[key] = value
    schema = check_schema_name(ours.get("schema", DEFAULT_SCHEMA))
    pool_size = int(_number(url, ours, "pool_size", 10, int, 1))
    host = parts.hostname or "localhost"
    where = f"{host}:{parts.port or 5432}{parts.path or '/'}"
    return PostgresOptions(
        dsn=urlunsplit(("postgresql", parts.netloc, parts.path, urlencode(dsn_query), "")),
        where=where,
        schema=schema,
        pool_size=pool_size,
        reconnect_timeout=_number(url, ours, "reconnect_timeout", 15.0, float, 0),
        connect_timeout=_number(url, ours, "connect_timeout", 10.0, float, 0.1),
        statement_cache_size=int(_number(url, ours, "statement_cache_size", 100, int, 0)),
        server_settings=settings,
    )


def _number(url: str, options: dict[str, str], key: str, default: float, kind: type, low: float) -> float:
    if key not in options:
        return default
    try:
        value = kind(options[key])
    except ValueError:
        value = None
    if value is None or value < low:
        raise ConfigurationError(f"{key}={options[key]!r} in {url!r}: use a number >= {low}")
    return value  # type: ignore[no-any-return]


_TRANSIENT_STATES = ("08", "57P01", "57P02", "57P03", "40001", "40P01", "53300")


def is_transient(exc: BaseException) -> bool:
    """A lost or refused connection, a server going down or starting, a deadlock: worth retrying."""
    if isinstance(exc, OSError):  # refused, reset, timed out
        return True
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", "") or ""
        return state.startswith(_TRANSIENT_STATES)
    if isinstance(exc, asyncpg.InterfaceError):  # "connection is closed", "connection was lost"
        text = str(exc).lower()
        return "closed" in text or "lost" in text
    # A connection the server terminated while it sat in the pool can fail its next query with
    # "cannot switch to state ...; another operation is in progress": the connection is broken,
    # not the request, so a fresh connection will do.
    return isinstance(exc, asyncpg.InternalClientError)


def explain(exc: BaseException, options: PostgresOptions) -> str:
    """One line: what went wrong and what to do about it."""
    where = options.where
    state = getattr(exc, "sqlstate", "") or ""
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if state == "3D000":
        db = where.split("/", 1)[-1]
        return (
            f"PostgreSQL database {db!r} does not exist at {where}: create it (createdb {db}) or fix the URL"
        )
    if state.startswith("28"):
        return f"PostgreSQL at {where} refused the login ({detail}): check the user and password in the URL"
    if state == "53300":
        return (
            f"PostgreSQL at {where} has too many connections ({detail}): lower pool_size= in the URL "
            "or raise max_connections"
        )
    if state == "57P03":
        return f"PostgreSQL at {where} is not accepting connections yet ({detail}); retry once it is up"
    if "SSL" in detail:  # the server is there; the TLS handshake or upgrade failed
        return (
            f"PostgreSQL at {where}: TLS failed ({detail}): check sslmode, sslrootcert (the CA that "
            "signed the server's certificate), sslcert and sslkey (a client certificate) in "
            "OFFLOAD_BROKER_URL"
        )
    if isinstance(exc, OSError) or state.startswith(("08", "57P")) or isinstance(exc, asyncpg.InterfaceError):
        return (
            f"cannot reach PostgreSQL at {where} ({detail}): start the server or fix the host and "
            "port in OFFLOAD_BROKER_URL"
        )
    return f"PostgreSQL broker at {where}: {detail}"
