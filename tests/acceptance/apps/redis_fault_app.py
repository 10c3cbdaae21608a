"""The acceptance app plus a task for the Redis fault tests (recorded the same way)."""

from __future__ import annotations

import os
import time

from acceptance_app import _record, app

__all__ = ["app", "stale"]


@app.task(name="stale", timeout=None)
def stale(i: int) -> int:
    """About a second of work; returns the pid that ran it, so the stored result names its run.

    No timeout, so its lease is base.DEFAULT_LEASE as seen by the process that enqueues it.
    """
    _record("start", "stale", i)
    time.sleep(1.0)
    _record("end", "stale", i)
    return os.getpid()
