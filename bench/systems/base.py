"""The small interface every benchmarked system implements.

The runner process only uses `env`, `unavailable`, `reset` and `worker_commands`; `producer` is
called inside a client subprocess (bench.client) whose environment already holds `env`, so that
importing a system's app never happens in the runner and every measurement starts from a fresh
process.
"""

from __future__ import annotations

import abc
import asyncio
import importlib
import os
import sys
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Broker groups: each system belongs to one, and each group's ratios are against its baseline.
SQLITE, REDIS, POSTGRES, RABBITMQ, NATS = "sqlite", "redis", "postgres", "rabbitmq", "nats"


@dataclass(frozen=True)
class Settings:
    """What every adapter needs to know about this run."""

    work_dir: Path
    redis_url: str  # a DB of its own: flushed before every measurement
    threads: int  # threads per worker process for huey, dramatiq, celery
    offload_concurrency: int  # offload's --concurrency, and the async peers' concurrency
    offload_launcher: str  # "cli" (`offload worker`) or "runner" (bench.offload_worker)
    # A copy of offload's source taken when the run started, put first on every subprocess's
    # PYTHONPATH so edits made to src/ during the run do not change what is measured.
    offload_snapshot: Path | None = None
    # A database of its own on this server: dropped and created again before every measurement.
    postgres_url: str = "postgresql://root@127.0.0.1:5432/offload_bench"
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    nats_url: str = "nats://127.0.0.1:4222"


class Producer(abc.ABC):
    """Sends benchmark jobs from one client process."""

    def connect(self) -> None:  # noqa: B027 - optional: open connections outside the timed part
        """Open connections / create schemas, so timing covers sending only."""

    @abc.abstractmethod
    def send_one(self, kind: str, enqueued: float) -> None:
        """Enqueue one job with the system's ordinary one-job call."""

    @abc.abstractmethod
    def send_bulk(self, kind: str, count: int) -> None:
        """Enqueue `count` jobs the fastest public way the system offers."""

    def prepare_concurrent(self, senders: int) -> None:  # noqa: B027 - optional hook
        """Before the clock: open what `senders` concurrent callers need (connections)."""

    def send_concurrent(self, kind: str, count: int, senders: int) -> None:
        """Enqueue `count` jobs from `senders` callers at once, each job its own call awaited
        before that caller sends its next (many web requests, each sending one job).

        A sync library's callers are threads; an async library's are tasks on one loop."""
        shares = split(count, senders)
        errors: list[BaseException] = []

        def sender(n: int) -> None:
            try:
                for _ in range(n):
                    self.send_one(kind, 0.0)
            except BaseException as exc:  # re-raised below, in the caller
                errors.append(exc)

        threads = [threading.Thread(target=sender, args=(n,)) for n in shares]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    def close(self) -> None:  # noqa: B027 - optional hook
        """Flush and close connections."""


def split(count: int, parts: int) -> list[int]:
    """`count` as `parts` shares differing by at most one."""
    return [count // parts + (1 if i < count % parts else 0) for i in range(parts)]


class AsyncProducer(Producer):
    """A producer for an asyncio library: one event loop, kept for the client's lifetime."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.loop.run_until_complete(coro)

    def send_one(self, kind: str, enqueued: float) -> None:
        self.run(self.asend_one(kind, enqueued))

    @abc.abstractmethod
    async def asend_one(self, kind: str, enqueued: float) -> None:
        """The library's one-job async call."""

    def send_concurrent(self, kind: str, count: int, senders: int) -> None:
        async def sender(n: int) -> None:
            for _ in range(n):
                await self.asend_one(kind, 0.0)

        async def all_senders() -> None:
            await asyncio.gather(*(sender(n) for n in split(count, senders)))

        self.run(all_senders())

    def close(self) -> None:
        self.run(self.aclose())
        self.loop.close()

    async def aclose(self) -> None:
        """Close the library's connections (on the producer's loop)."""


class System(abc.ABC):
    name: str
    group: str  # SQLITE, REDIS, POSTGRES, RABBITMQ or NATS
    # Servers whose state is reset before each measurement and whose CPU (and, where the server
    # can count them, operations) are measured: "redis", "postgres", "rabbitmq", "nats".
    servers: tuple[str, ...] = ()
    # RabbitMQ queues this system creates, deleted before every measurement, and exchanges only
    # it uses, deleted at the end of the run.
    amqp_queues: tuple[str, ...] = ()
    amqp_exchanges: tuple[str, ...] = ()
    # Modules the system needs; a missing one skips the system with a message.
    requires: tuple[str, ...] = ()
    # One line for the report: settings and anything that makes the comparison less than equal.
    notes: str = ""
    # At most this many jobs per drain, for systems slow enough that the full count would take
    # minutes (a rate from fewer jobs; the report's notes say so).
    drain_cap: int | None = None

    def env(self, settings: Settings) -> dict[str, str]:
        """Variables that select this system's configuration in its app module."""
        return {}

    def unavailable(self, settings: Settings, env: dict[str, str]) -> str | None:
        """Why this system cannot run here (checked once, in the runner), or None.

        `env` is the environment its worker and client processes get."""
        for module in self.requires:
            try:
                importlib.import_module(module)
            except ImportError as exc:
                return f"cannot import {module}: {exc}"
        return None

    def reset(self, settings: Settings, env: dict[str, str]) -> None:  # noqa: B027 - optional
        """After the runner reset the servers: remove files, install schemas (env: as unavailable)."""

    @abc.abstractmethod
    def worker_commands(self, settings: Settings, processes: int) -> list[list[str]]:
        """Commands that start `processes` worker processes (one command may start several)."""

    @abc.abstractmethod
    def producer(self) -> Producer:
        """A producer for the client process (its environment holds `env`)."""


def venv_script(name: str) -> str:
    """A console script installed next to the running interpreter."""
    return str(Path(sys.executable).parent / name)


def remove_sqlite(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        try:
            os.unlink(f"{path}{suffix}")
        except FileNotFoundError:
            pass


def redis_url() -> str:
    return os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/5")
