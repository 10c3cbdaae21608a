"""`--processes N`: run N worker processes and restart any that crashes.

Each child is `python -m offload worker ... --processes 1`, a plain process with its own event
loop. SIGTERM/SIGINT are forwarded so children drain gracefully; children still alive after their
grace period (plus a margin) are killed. SIGUSR1 is forwarded too (each child dumps its stacks).
In burst mode a child that exits 0 is done and is not restarted; one that dies of a signal or an
error is restarted like any crash.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

log = logging.getLogger("offload.supervisor")

RESTART_BACKOFF_MAX = 10.0
STABLE_AFTER = 30.0  # a child up this long resets its restart backoff
DUMP_GAP = 1.0  # seconds between passing SIGUSR1 to one worker and the next


@dataclass
class _Slot:
    index: int
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    backoff: float = 0.5
    restart_at: float = 0.0
    done: bool = False
    restarts: int = field(default=0)


class Supervisor:
    def __init__(self, child_argv: Sequence[str], processes: int, burst: bool, grace: float) -> None:
        self.child_argv = list(child_argv)
        self.slots = [_Slot(i) for i in range(processes)]
        self.burst = burst
        self.grace = grace
        self._stop_requested: float | None = None
        self._dumps_due: list[_Slot] = []  # SIGUSR1 to pass on, one worker at a time
        self._next_dump = 0.0

    def _spawn(self, slot: _Slot) -> None:
        env = dict(os.environ, OFFLOAD_WORKER_INDEX=str(slot.index))
        slot.process = subprocess.Popen(
            [sys.executable, "-m", "offload", *self.child_argv], env=env, preexec_fn=_ignore_sigusr1
        )
        slot.started = time.monotonic()
        log.info("worker process %d started (pid %d)", slot.index, slot.process.pid)

    def _request_stop(self, signum: int, _frame: object) -> None:
        if self._stop_requested is None:
            self._stop_requested = time.monotonic()
            log.info("supervisor: %s, stopping workers", signal.Signals(signum).name)
            for slot in self.slots:
                if slot.process is not None and slot.process.poll() is None:
                    slot.process.send_signal(signal.SIGTERM)

    def _request_dumps(self, _signum: int, _frame: object) -> None:
        """SIGUSR1 (dump stacks, offload.worker.stackdump): for every worker process, in turn."""
        self._dumps_due = list(self.slots)

    def _pass_on_dump(self, now: float) -> None:
        # One at a time, DUMP_GAP apart: the workers share the supervisor's stderr, and a dump is
        # many small writes that would interleave.
        if now < self._next_dump:
            return
        while self._dumps_due:
            slot = self._dumps_due.pop(0)
            if slot.process is not None and slot.process.poll() is None:
                slot.process.send_signal(signal.SIGUSR1)
                self._next_dump = now + DUMP_GAP
                return

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        signal.signal(signal.SIGUSR1, self._request_dumps)
        for slot in self.slots:
            self._spawn(slot)
        while True:
            now = time.monotonic()
            alive = 0
            for slot in self.slots:
                process = slot.process
                if process is not None:
                    code = process.poll()
                    if code is None:
                        alive += 1
                        continue
                    slot.process = None
                    if self._stop_requested is not None or (self.burst and code == 0):
                        slot.done = True
                        continue
                    if now - slot.started > STABLE_AFTER:
                        slot.backoff = 0.5
                    slot.restart_at = now + slot.backoff
                    slot.restarts += 1
                    log.warning(
                        "worker process %d (pid %d) died (%s); restarting in %.1fs",
                        slot.index,
                        process.pid,
                        _describe_exit(code),
                        slot.backoff,
                    )
                    slot.backoff = min(slot.backoff * 2, RESTART_BACKOFF_MAX)
                    alive += 1
                elif not slot.done:
                    if self._stop_requested is not None:
                        slot.done = True
                    elif now >= slot.restart_at:
                        self._spawn(slot)
                        alive += 1
                    else:
                        alive += 1
            if alive == 0:
                return 0
            if self._stop_requested is not None and now - self._stop_requested > self.grace + 10:
                for slot in self.slots:
                    if slot.process is not None and slot.process.poll() is None:
                        log.warning("worker process %d ignored SIGTERM; killing it", slot.index)
                        slot.process.kill()
            if self._dumps_due:
                self._pass_on_dump(now)
            time.sleep(0.1)


def _ignore_sigusr1() -> None:
    """In a child, before it runs Python: a SIGUSR1 passed on while it starts (before it set up
    its stack dump) would otherwise kill it (the default action)."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"
