"""The RabbitMQ broker over TLS (amqps://) with a private CA and a client certificate.

The shared test RabbitMQ listens without TLS, so the test puts a TLS terminator of its own in
front of it (as stunnel or a load balancer would be): it presents a certificate signed by the
test CA, requires the client's, and forwards the bytes to RabbitMQ. The client side is aiormq's
real TLS, configured from the URL alone.

Uses the shared test servers (OFFLOAD_TEST_AMQP_URL, OFFLOAD_TEST_REDIS_URL; skipped if either is
unreachable unless CI=true) and the openssl command.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest

from contract import rabbitmq_store
from contract.tls_support import connect_error, double_over, make_certificates

pytestmark = pytest.mark.timeout(60)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def tls_terminator(certs: Path, upstream: tuple[str, int]) -> AsyncIterator[int]:
    """A TLS server on a spare loopback port that verifies client certificates against the test
    CA and relays each connection to `upstream`; yields its port."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(certs / "ca.crt"))
    context.load_cert_chain(certs / "server.crt", certs / "server.key")
    context.verify_mode = ssl.CERT_REQUIRED
    relays: set[asyncio.Task[None]] = set()

    async def relay(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(*upstream)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(_pipe(client_reader, server_writer), _pipe(server_reader, client_writer))

    def start(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(relay(reader, writer))
        relays.add(task)
        task.add_done_callback(relays.discard)

    server = await asyncio.start_server(start, "127.0.0.1", 0, ssl=context)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in list(relays):
            task.cancel()
        await asyncio.gather(*relays, return_exceptions=True)


@pytest.fixture
async def amqps(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    """(the test's amqps:// URL without TLS options, the certificates' directory)."""
    if shutil.which("openssl") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("openssl is not installed; CI=true requires it")
        pytest.skip("openssl is not installed")
    plain = rabbitmq_store.rabbitmq_url(tmp_path)
    make_certificates(tmp_path)
    parts = urlsplit(plain)
    async with tls_terminator(tmp_path, (parts.hostname or "127.0.0.1", parts.port or 5672)) as port:
        netloc = f"{parts.username}:{parts.password}@127.0.0.1:{port}"
        yield parts._replace(scheme="amqps", netloc=netloc).geturl(), tmp_path
    await asyncio.to_thread(rabbitmq_store.cleanup, plain)


async def test_jobs_round_trip_over_tls_with_a_private_ca_and_a_client_certificate(
    amqps: tuple[str, Path],
) -> None:
    url, certs = amqps
    tls = "&".join(
        f"{name}={quote(str(certs / file))}"
        for name, file in (
            ("ssl_ca_certs", "ca.crt"),
            ("ssl_certfile", "client.crt"),
            ("ssl_keyfile", "client.key"),
        )
    )
    assert await double_over(f"{url}&{tls}") == [0, 2, 4]


async def test_a_server_certificate_from_an_unknown_ca_is_refused_with_what_to_set(
    amqps: tuple[str, Path],
) -> None:
    url, certs = amqps
    error = await connect_error(
        f"{url}&certfile={quote(str(certs / 'client.crt'))}&keyfile={quote(str(certs / 'client.key'))}"
    )
    assert re.search(r"certificate verify failed.*ssl_ca_certs", str(error))
