"""The small interface every benchmarked system implements.

The runner process only uses `env`, `reset` and `worker_commands`; `producer` is called inside a
client subprocess (bench.client) whose environment already holds `env`, so that importing a
system's app never happens in the runner and every measurement starts from a fresh process.
"""

from __future__ import annotations

import abc
import os
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    """What every adapter needs to know about this run."""

    work_dir: Path
    redis_url: str
    threads: int  # threads per worker process for huey and dramatiq
    offload_concurrency: int
    offload_launcher: str  # "cli" (`offload worker`) or "runner" (bench.offload_worker)
    # A copy of offload's source taken when the run started, put first on every subprocess's
    # PYTHONPATH so edits made to src/ during the run do not change what is measured.
    offload_snapshot: Path | None = None


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

    def close(self) -> None:  # noqa: B027 - optional hook
        """Flush and close connections."""


class System(abc.ABC):
    name: str
    uses_redis: bool = False
    # One line for the report: settings and anything that makes the comparison less than equal.
    notes: str = ""

    def env(self, settings: Settings) -> dict[str, str]:
        """Variables that select this system's configuration in its app module."""
        return {}

    @abc.abstractmethod
    def reset(self, settings: Settings) -> None:
        """Remove all jobs and state (the runner flushes the Redis DB itself)."""

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
