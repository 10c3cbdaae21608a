"""The NATS broker over TLS against a nats-server of its own (JetStream on) that verifies both
sides: a private CA (ssl_ca_certs) and a client certificate (ssl_certfile, ssl_keyfile).

Needs nats-server and the openssl command: skipped without them, failed instead when CI=true.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

from contract.tls_certs import make_certificates
from offload import App, BrokerError, ConfigurationError
from offload.brokers import nats_keys
from offload.brokers.nats_tls import tls_context
from offload.worker import Worker

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


@dataclass(frozen=True)
class TlsServer:
    port: int
    certs: Path

    def url(self, client_cert: bool = True) -> str:
        query = {"ssl_ca_certs": str(self.certs / "ca.crt"), "bucket": "tls_test"}
        if client_cert:
            query |= {
                "ssl_certfile": str(self.certs / "client.crt"),
                "ssl_keyfile": str(self.certs / "client.key"),
            }
        return f"nats://127.0.0.1:{self.port}?" + "&".join(f"{k}={quote(v)}" for k, v in query.items())


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[TlsServer]:
    if NATS_SERVER is None or shutil.which("openssl") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("nats-server or openssl is not installed; CI=true requires them")
        pytest.skip("nats-server or openssl is not installed")
    make_certificates(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(
        [
            NATS_SERVER,
            *("-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(tmp_path / "js")),
            *("--tls", "--tlscert", "server.crt", "--tlskey", "server.key", "--tlscacert", "ca.crt"),
            "--tlsverify",
            *("-l", str(tmp_path / "nats.log")),
        ],
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            assert process.poll() is None, f"nats-server exited: {(tmp_path / 'nats.log').read_text()[-500:]}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "nats-server did not start listening"
                time.sleep(0.05)
        yield TlsServer(port, tmp_path)
    finally:
        process.terminate()
        process.wait(10)


async def test_jobs_round_trip_over_tls_with_a_private_ca_and_a_client_certificate(
    tls_server: TlsServer,
) -> None:
    app = App(tls_server.url(), name="tls")

    @app.task
    def double(n: int) -> int:
        return 2 * n

    try:
        sent = [await double.send_async(n) for n in range(3)]
        await asyncio.wait_for(Worker(app, ["default"], concurrency=2, burst=True).run(), 30)
        assert [await job.wait(5) for job in sent] == [0, 2, 4]
    finally:
        await app.close_async()


async def test_a_client_without_the_certificate_the_server_verifies_gets_a_broker_error(
    tls_server: TlsServer,
) -> None:
    app = App(tls_server.url(client_cert=False), name="tls")
    try:
        with pytest.raises(BrokerError, match=r"cannot reach NATS"):
            await app.broker()
    finally:
        await app.close_async()


async def test_a_server_certificate_from_an_unknown_ca_is_refused_with_what_to_set(
    tls_server: TlsServer,
) -> None:
    client = f"ssl_certfile={tls_server.certs / 'client.crt'}&ssl_keyfile={tls_server.certs / 'client.key'}"
    app = App(f"nats://127.0.0.1:{tls_server.port}?{client}", name="tls")  # the system's CAs only
    try:
        with pytest.raises(BrokerError, match=r"certificate verify failed.*ssl_ca_certs"):
            await app.broker()
    finally:
        await app.close_async()
