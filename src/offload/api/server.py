"""Serving the API with uvicorn: a socket bound up front (clean errors, port 0 for tests) and a
server that leaves signal handling to its host (`offload api` and `offload run` stop it)."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Generator
from typing import Any

import uvicorn

from offload.errors import OffloadError

SHUTDOWN_GRACE = 5.0  # seconds open long-polls and event streams get when the server stops


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port, or an OffloadError that says what to change."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OffloadError(f"cannot listen on {host}:{port}: {exc.strerror}; check --host") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise OffloadError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --port "
            "(or stop what is using it)"
        ) from None
    sock.setblocking(False)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server that installs no signal handlers: set `should_exit` to stop it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def make_server(asgi: Any, **config: Any) -> EmbeddedServer:
    settings: dict[str, Any] = {
        "log_config": None,  # keep offload's logging setup
        "log_level": "warning",
        "access_log": False,
        "lifespan": "off",
        "timeout_graceful_shutdown": SHUTDOWN_GRACE,
        **config,
    }
    return EmbeddedServer(uvicorn.Config(asgi, **settings))
