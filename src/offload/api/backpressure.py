"""Back pressure: a full queue answers 503 with a Retry-After computed from what the broker measured.

The estimate is the time until enough of the queue has drained for one more job to fit:
`(depth - max_depth + 1) / drain_rate` seconds, the drain rate being jobs finished per second over
the last minute. It is sent as an integer number of seconds, rounded up, at least 1 (RFC 9110
`delay-seconds`). A queue that finished nothing in the last minute has no rate to divide by: then
the estimate is one second per waiting job, between 1 and 60 seconds, so an idle-but-stuck queue
keeps callers away longer the deeper it is. Retry-After is an estimate for a polite client, not a
promise: the client adds its own jitter so that refused callers do not return in step.

Refusing must stay cheap when it matters most, under overload: once the broker has said a queue
is full, `FullQueues` answers further submits to it with the same 503 for a short hold, without a
broker round trip. The hold is short enough that the workers cannot empty the queue meanwhile (a
quarter of `max_depth` at the measured drain rate, at most 100 ms), so the queue stays full and
its workers busy; the first submit after the hold asks the broker again. Submits carrying an
Idempotency-Key always ask the broker (it may answer with their existing job).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from offload.api.problems import Problem
from offload.errors import QueueFull

MAX_RETRY_AFTER = 3600  # an hour: past that the estimate says nothing useful
STALLED_CAP = 60
MAX_HOLD = 0.1  # seconds a known-full queue is refused without asking the broker


class FullQueues:
    """The queues the broker recently refused, each until its hold ends.

    When a hold ends, one submit (the probe) asks the broker again; the submits that arrive
    while it waits still get the held refusal. Otherwise every submit arriving during that
    round trip would go to the broker too, which is slowest exactly when the queue is full and
    its workers are busy writing, and their 503s would take as long as an enqueue.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._held: dict[str, tuple[float, QueueFull]] = {}
        self._probing: set[str] = set()

    def refusal(self, queue: str) -> QueueFull | None:
        """The broker's last QueueFull for `queue` if still held, else None (ask the broker).

        A None for a queue whose hold has ended makes the caller its probe: it must call
        `remember` or `forget` once the broker has answered (or `forget` if it gave up).
        """
        held = self._held.get(queue)
        if held is None:
            return None
        if self._clock() < held[0] or queue in self._probing:
            return held[1]
        self._probing.add(queue)
        return None

    def remember(self, exc: QueueFull) -> None:
        hold = MAX_HOLD
        if exc.drain_rate > 0:
            hold = min(MAX_HOLD, 0.25 * exc.max_depth / exc.drain_rate)
        # A copy with no traceback: the raised one keeps its request's frames alive, and raising
        # one instance again and again would grow its traceback by every raise (and the heap
        # with it, and the pauses of the garbage collector that walks it).
        held = QueueFull(exc.queue, exc.depth, exc.max_depth, exc.drain_rate)
        self._held[exc.queue] = (self._clock() + hold, held)
        self._probing.discard(exc.queue)

    def forget(self, queue: str) -> None:
        self._held.pop(queue, None)
        self._probing.discard(queue)


def retry_after_seconds(depth: int, max_depth: int, drain_rate: float) -> int:
    """Whole seconds (>= 1, rounded up) until a job should fit, from depth and drain rate."""
    excess = max(1, depth - max_depth + 1)
    if drain_rate > 0 and math.isfinite(drain_rate):
        estimate = excess / drain_rate
    else:
        estimate = float(min(STALLED_CAP, max(1, depth)))
    return max(1, min(MAX_RETRY_AFTER, math.ceil(estimate)))


def queue_full_problem(exc: QueueFull) -> Problem:
    seconds = retry_after_seconds(exc.depth, exc.max_depth, exc.drain_rate)
    rate = f"{exc.drain_rate:.1f} jobs/s" if exc.drain_rate > 0 else "nothing in the last minute"
    return Problem(
        503,
        "queue-full",
        f"queue {exc.queue!r} is full ({exc.depth}/{exc.max_depth} jobs waiting; it drained {rate}); "
        f"nothing was enqueued: retry in {seconds} s",
        title="Queue full",
        headers={"Retry-After": str(seconds)},
        queue=exc.queue,
        depth=exc.depth,
        max_depth=exc.max_depth,
        drain_rate=round(exc.drain_rate, 3),
        retry_after=seconds,
    )


def broker_unavailable_problem(exc: BaseException) -> Problem:
    return Problem(
        503,
        "broker-unavailable",
        f"the broker did not answer ({type(exc).__name__}: {exc}); retry shortly (a submit may or "
        "may not have been enqueued: retry it with the same Idempotency-Key)",
        title="Broker unavailable",
        headers={"Retry-After": "1"},
    )
