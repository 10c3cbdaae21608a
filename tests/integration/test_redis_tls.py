"""The Redis broker over TLS against a redis-server of its own that checks both sides: a private
CA (ssl_ca_certs) and a client certificate (ssl_certfile, ssl_keyfile), as a managed or
self-hosted Redis with `tls-auth-clients yes` (Redis's default) asks for.

Needs redis-server built with TLS and the openssl command: skipped without them, failed instead
when CI=true.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from contract.tls_support import TlsServer, connect_error, double_over, tls_server
from offload import ConfigurationError
from offload.brokers.redis_url import parse_redis_url

pytestmark = pytest.mark.timeout(60)


# -- the URL options (no server) ---------------------------------------------------------------


def test_tls_file_options_go_to_the_connections() -> None:
    parsed = parse_redis_url(
        "rediss://h:6380/0?ssl_ca_certs=/etc/ca.pem&ssl_certfile=/c.crt&ssl_keyfile=/c.key&ssl_cert_reqs=required"
    )
    assert parsed.client_url == (
        "rediss://h:6380/0?ssl_ca_certs=%2Fetc%2Fca.pem&ssl_certfile=%2Fc.crt&ssl_keyfile=%2Fc.key&ssl_cert_reqs=required"
    )
    sentinel = parse_redis_url("rediss+sentinel://s1/mymaster?ssl_ca_certs=/etc/ca.pem")
    assert sentinel.client_url == "rediss://s1:26379?ssl_ca_certs=%2Fetc%2Fca.pem"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://h/0?ssl_ca_certs=/etc/ca.pem", r"TLS setting: use a rediss:// URL"),
        ("redis+sentinel://s1/m?ssl_certfile=/c.crt", r"TLS setting: use a rediss\+sentinel:// URL"),
        ("rediss://h/0?ssl_cert_reqs=always", r"use one of none, optional, required"),
        ("rediss://h/0?ssl_ca_certs=", r"empty ssl_ca_certs"),
    ],
)
def test_misused_tls_options_are_named(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        parse_redis_url(url)


def test_the_client_keys_password_is_never_shown() -> None:
    with pytest.raises(ConfigurationError) as caught:
        parse_redis_url("rediss://h/0?ssl_password=k3y-s3cret&prefx=x")
    assert "k3y-s3cret" not in str(caught.value) and "ssl_password=***" in str(caught.value)


# -- a server of our own ---------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[TlsServer]:
    def redis_server(port: int, log: Path) -> list[str]:
        return [
            "redis-server",
            *("--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1"),
            *("--tls-cert-file", "server.crt", "--tls-key-file", "server.key"),
            *("--tls-ca-cert-file", "ca.crt"),
            *("--save", "", "--appendonly", "no", "--dir", str(tmp_path), "--logfile", str(log)),
        ]

    with tls_server(tmp_path, "redis-server", redis_server) as running:
        yield running


def url(server: TlsServer, client_cert: bool = True) -> str:
    return f"rediss://127.0.0.1:{server.port}/0?prefix=tls-test:&{server.tls_query(client_cert)}"


async def test_jobs_round_trip_over_tls_with_a_private_ca_and_a_client_certificate(
    server: TlsServer,
) -> None:
    # Async sends use the async client's connections; the fourth, from a thread, a sync sender's.
    assert await double_over(url(server), blocking_too=True) == [0, 2, 4, 6]


async def test_a_client_without_the_certificate_the_server_asks_for_gets_a_broker_error(
    server: TlsServer,
) -> None:
    error = await connect_error(url(server, client_cert=False))
    # The server's alert, or (when it arrives after the client's first read) a reset.
    assert re.search(r"(certificate required|reset by peer).*ssl_certfile and ssl_keyfile", str(error))


async def test_a_server_certificate_from_an_unknown_ca_is_refused_with_what_to_set(
    server: TlsServer,
) -> None:
    error = await connect_error(f"rediss://127.0.0.1:{server.port}/0")  # the system's CAs only
    assert re.search(r"certificate verify failed.*ssl_ca_certs", str(error))
