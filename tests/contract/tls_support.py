"""What the TLS tests (test_redis_tls, test_nats_tls, test_rabbitmq_tls) share: certificates made
with the openssl command (a CA, a server certificate for 127.0.0.1 and a client certificate, both
signed by the CA, as ca.crt/.key, server.crt/.key and client.crt/.key in one directory), a
server of their own started on a spare port, and the round trip and refusal they check."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

from offload import App, BrokerError
from offload.worker import Worker


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certificates(where: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, both signed by the CA."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=offload test CA",
             "-keyout", "ca.key", "-out", "ca.crt", cwd=where)  # fmt: skip
    for name, extension in (
        ("server", "subjectAltName=IP:127.0.0.1"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=offload test {name}",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=where)  # fmt: skip
        (where / f"{name}.ext").write_text(extension + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=where)  # fmt: skip


def spare_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until_listening(process: subprocess.Popen[bytes], port: int, log: Path, name: str) -> None:
    """Until the server of `process` accepts connections on `port`; fails (with its log's tail)
    if it exits or does not listen within 10 s."""
    deadline = time.monotonic() + 10
    while True:
        if process.poll() is not None:
            tail = log.read_text()[-500:] if log.exists() else ""
            raise AssertionError(f"{name} exited: {tail}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"{name} did not start listening"
            time.sleep(0.05)


async def double_over(url: str, blocking_too: bool = False) -> list[int]:
    """Send double(0..2) to `url` (async sends; with blocking_too one more from a thread, through
    a sync sender's own connections), run them with a burst worker and return the results."""
    app = App(url, name="tls")

    @app.task
    def double(n: int) -> int:
        return 2 * n

    try:
        sent = [await double.send_async(n) for n in range(3)]
        if blocking_too:
            sent.append(await asyncio.to_thread(double.send, 3))
        await asyncio.wait_for(Worker(app, ["default"], concurrency=2, burst=True).run(), 30)
        return [await job.wait(5) for job in sent]
    finally:
        await app.close_async()


async def connect_error(url: str) -> BrokerError:
    """The BrokerError connecting to `url` raises (fails the test if it connects)."""
    app = App(url, name="tls")
    try:
        await app.broker()
    except BrokerError as exc:
        return exc
    finally:
        await app.close_async()
    raise AssertionError(f"connected to {url} where the TLS settings should have been refused")


@dataclass(frozen=True)
class TlsServer:
    port: int
    certs: Path  # the directory make_certificates filled

    def tls_query(self, client_cert: bool = True) -> str:
        """The URL options that trust the test CA and (client_cert) present the client's certificate."""
        files = {"ssl_ca_certs": "ca.crt"}
        if client_cert:
            files |= {"ssl_certfile": "client.crt", "ssl_keyfile": "client.key"}
        return "&".join(f"{name}={quote(str(self.certs / file))}" for name, file in files.items())


@contextlib.contextmanager
def tls_server(
    where: Path, program: str | None, command: Callable[[int, Path], list[str]]
) -> Iterator[TlsServer]:
    """A server of the test's own, speaking TLS with make_certificates' certificates (in `where`,
    also its working directory): `command(port, log)` starts it. Skipped without the program or
    openssl, failed instead when CI=true; stopped by pid afterwards."""
    if program is None or shutil.which(program) is None or shutil.which("openssl") is None:
        missing = f"{program or 'the server'} or openssl is not installed"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{missing}; CI=true requires them")
        pytest.skip(missing)
    make_certificates(where)
    port, log = spare_port(), where / "server.log"
    process = subprocess.Popen(command(port, log), cwd=where)
    try:
        wait_until_listening(process, port, log, program)
        yield TlsServer(port, where)
    finally:
        process.terminate()
        process.wait(10)
