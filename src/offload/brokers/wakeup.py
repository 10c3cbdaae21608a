"""Cross-process wake-ups for the SQLite broker.

SQLite cannot push, so instead of sleep-polling the file, each waiting worker binds a Unix
datagram socket in a directory derived from the database path, and a producer sends one byte to
every socket there after it commits. A full socket buffer means the worker is already awake, so
sends never block; sockets of dead processes are removed by whoever finds them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import socket
import tempfile
from pathlib import Path


def channel_dir(db_path: str) -> Path:
    digest = hashlib.sha1(os.path.realpath(db_path).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"offload-wake-{digest}"


class WakeSender:
    """Sends wake-ups to every listener of one database. Thread-safe enough for one writer."""

    def __init__(self, db_path: str) -> None:
        self.dir = channel_dir(db_path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self._listing: list[str] = []
        self._listing_mtime = -1

    def notify(self) -> None:
        try:
            mtime = self.dir.stat().st_mtime_ns
        except FileNotFoundError:
            return
        if mtime != self._listing_mtime:
            self._listing = [str(self.dir / name) for name in os.listdir(self.dir)]
            self._listing_mtime = mtime
        for path in self._listing:
            try:
                self._sock.sendto(b"!", path)
            except BlockingIOError:
                pass  # its buffer is full: it has wake-ups pending already
            except (ConnectionRefusedError, FileNotFoundError):
                with contextlib.suppress(OSError):
                    os.unlink(path)  # a listener that died without cleaning up
            except OSError:
                pass

    def close(self) -> None:
        self._sock.close()


class WakeListener:
    """A socket that sets an asyncio.Event whenever a wake-up arrives."""

    def __init__(self, db_path: str, loop: asyncio.AbstractEventLoop) -> None:
        directory = channel_dir(db_path)
        directory.mkdir(mode=0o700, exist_ok=True)
        self.path = str(directory / f"{os.getpid()}-{secrets.token_hex(4)}.sock")
        self.event = asyncio.Event()
        self._loop = loop
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self._sock.bind(self.path)
        loop.add_reader(self._sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        try:
            while self._sock.recv(64):
                pass
        except (BlockingIOError, OSError):
            pass
        self.event.set()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
