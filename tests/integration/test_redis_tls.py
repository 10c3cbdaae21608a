"""The Redis broker over TLS against a redis-server of its own that checks both sides: a private
CA (ssl_ca_certs) and a client certificate (ssl_certfile, ssl_keyfile), as a managed or
self-hosted Redis with `tls-auth-clients yes` (Redis's default) asks for.

Needs redis-server built with TLS and the openssl command: skipped without them, failed instead
when CI=true.
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
from offload.brokers.redis_url import parse_redis_url
from offload.worker import Worker

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


@dataclass(frozen=True)
class TlsServer:
    port: int
    certs: Path

    def url(self, client_cert: bool = True, **options: str) -> str:
        query = {"ssl_ca_certs": str(self.certs / "ca.crt"), "prefix": "tls-test:", **options}
        if client_cert:
            query |= {
                "ssl_certfile": str(self.certs / "client.crt"),
                "ssl_keyfile": str(self.certs / "client.key"),
            }
        return f"rediss://127.0.0.1:{self.port}/0?" + "&".join(f"{k}={quote(v)}" for k, v in query.items())


def _missing(what: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what}; CI=true requires it")
    pytest.skip(what)


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[TlsServer]:
    if shutil.which("redis-server") is None or shutil.which("openssl") is None:
        _missing("redis-server or openssl is not installed")
    make_certificates(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "redis.log"
    process = subprocess.Popen(
        [
            "redis-server",
            *("--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1"),
            *(
                "--tls-cert-file",
                "server.crt",
                "--tls-key-file",
                "server.key",
                "--tls-ca-cert-file",
                "ca.crt",
            ),
            *("--save", "", "--appendonly", "no", "--dir", str(tmp_path), "--logfile", str(log)),
        ],
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            if process.poll() is not None:
                _missing(
                    f"redis-server with TLS did not start (built without TLS?): {log.read_text()[-500:]}"
                )
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start listening"
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
        sent_async = await double.send_async(1)  # the async client's connections
        sent_blocking = await asyncio.to_thread(double.send, 2)  # a sync sender's own connections
        await asyncio.wait_for(Worker(app, ["default"], concurrency=2, burst=True).run(), 30)
        assert await sent_async.wait(5) == 2
        assert await sent_blocking.wait(5) == 4
    finally:
        await app.close_async()


async def test_a_client_without_the_certificate_the_server_asks_for_gets_a_broker_error(
    tls_server: TlsServer,
) -> None:
    app = App(tls_server.url(client_cert=False), name="tls")
    try:
        # The server's alert, or (when it arrives after the client's first read) a reset.
        with pytest.raises(
            BrokerError, match=r"(certificate required|reset by peer).*ssl_certfile and ssl_keyfile"
        ):
            await app.broker()
    finally:
        await app.close_async()


async def test_a_server_certificate_from_an_unknown_ca_is_refused_with_what_to_set(
    tls_server: TlsServer,
) -> None:
    app = App(f"rediss://127.0.0.1:{tls_server.port}/0", name="tls")  # the system's CAs only
    try:
        with pytest.raises(BrokerError, match=r"certificate verify failed.*ssl_ca_certs"):
            await app.broker()
    finally:
        await app.close_async()
