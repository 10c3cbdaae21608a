"""Counts of offload's broker calls in a bench process (enqueue, fetch, settle, extend).

bench/apps/offload_app.py installs this when BENCH_CALLS_DIR is set (the runner sets it for
worker processes): each call of the broker class's port methods is counted with the jobs it
carried, and the totals are written to BENCH_CALLS_DIR/calls-<pid>.json when the process exits.
The runner divides them by the jobs of the drain, which says how many calls (each about one round
trip, see bench/servers.py) a job costs at each step. offload itself is not changed: the wrapper
is put on the broker class inside the bench's process only.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

METHODS = ("enqueue", "fetch", "settle", "extend")

counts: Counter[str] = Counter()


def install(url: str, directory: str) -> None:
    import importlib

    from offload import brokers

    kind = brokers.SCHEMES.get(urlsplit(url).scheme)
    if kind is None:
        return
    cls = getattr(importlib.import_module(kind.module), kind.cls)
    for name in METHODS:
        if hasattr(cls, name):
            setattr(cls, name, _counted(name, getattr(cls, name)))
    atexit.register(_write, Path(directory))


def _counted(name: str, method: Any) -> Any:
    @functools.wraps(method)
    async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = await method(self, *args, **kwargs)
        counts[f"{name}_calls"] += 1
        items = result if name == "fetch" else (args[0] if args else ())
        counts[f"{name}_jobs"] += len(items)
        return result

    return wrapper


def _write(directory: Path) -> None:
    if counts:
        (directory / f"calls-{os.getpid()}.json").write_text(json.dumps(dict(counts)))


def read(directory: Path) -> dict[str, int]:
    """The totals of every process that wrote its counts into `directory`."""
    total: Counter[str] = Counter()
    for path in directory.glob("calls-*.json"):
        total.update(json.loads(path.read_text()))
    return dict(total)
