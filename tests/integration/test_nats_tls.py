"""The NATS broker over TLS against a nats-server of its own (JetStream on) that verifies both
sides: a private CA (ssl_ca_certs) and a client certificate (ssl_certfile, ssl_keyfile).

Needs nats-server and the openssl command: skipped without them, failed instead when CI=true.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from contract.tls_support import TlsServer, connect_error, double_over, tls_server
from offload import ConfigurationError
from offload.brokers import nats_keys
from offload.brokers.nats_tls import tls_context

pytestmark = pytest.mark.timeout(60)

NATS_SERVER = shutil.which("nats-server") or (
    "/usr/sbin/nats-server" if os.path.exists("/usr/sbin/nats-server") else None
)


# -- the URL options (no server) ---------------------------------------------------------------


def test_tls_options_make_every_server_a_tls_address() -> None:
    servers, _, _ = nats_keys.parse_nats_url("nats://a:4222,b:4222?ssl_ca_certs=/etc/ca.pem")
    assert servers == ["tls://a:4222", "tls://b:4222"]  # TLS or nothing, never a plain fallback
    assert nats_keys.parse_nats_url("nats://a:4222")[0] == ["nats://a:4222"]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("ssl_ca_certs=/no/such/ca.pem", r"ssl_ca_certs='/no/such/ca.pem' .* cannot be loaded"),
        ("ssl_keyfile=/k.pem", r"need ssl_certfile"),
        ("ssl_certfile=/no/such/client.pem", r"client certificate .* cannot be loaded"),
        ("ssl_ca_certs=", r"empty ssl_ca_certs"),
    ],
)
def test_unusable_tls_options_are_named_when_the_url_is_read(query: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        tls_context(f"nats://h:4222?{query}")


# -- a server of our own ---------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[TlsServer]:
    def nats_server(port: int, log: Path) -> list[str]:
        return [
            NATS_SERVER or "nats-server",
            *("-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(tmp_path / "js"), "-l", str(log)),
            *("--tls", "--tlscert", "server.crt", "--tlskey", "server.key", "--tlscacert", "ca.crt"),
            "--tlsverify",
        ]

    with tls_server(tmp_path, NATS_SERVER, nats_server) as running:
        yield running


def url(server: TlsServer, client_cert: bool = True) -> str:
    return f"nats://127.0.0.1:{server.port}?bucket=tls_test&{server.tls_query(client_cert)}"


async def test_jobs_round_trip_over_tls_with_a_private_ca_and_a_client_certificate(
    server: TlsServer,
) -> None:
    assert await double_over(url(server)) == [0, 2, 4]


async def test_a_client_without_the_certificate_the_server_verifies_gets_a_broker_error(
    server: TlsServer,
) -> None:
    assert "cannot reach NATS" in str(await connect_error(url(server, client_cert=False)))


async def test_a_server_certificate_from_an_unknown_ca_is_refused_with_what_to_set(
    server: TlsServer,
) -> None:
    client = f"ssl_certfile={server.certs / 'client.crt'}&ssl_keyfile={server.certs / 'client.key'}"
    error = await connect_error(f"nats://127.0.0.1:{server.port}?{client}")  # the system's CAs only
    assert re.search(r"certificate verify failed.*ssl_ca_certs", str(error))
