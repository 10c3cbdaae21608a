"""When the client retries a request and how long it waits: pure, with clock, sleep and random injected.

Attempt n (0-based) that fails with a connection error, a timeout or a 5xx waits
`random(0, min(cap, base * 2**n))` ("full jitter": ceilings 1, 2, 4, 8, 16, 16, ... s by default);
a 429 or 503 with `Retry-After` waits that many seconds instead. Every wait is cut to what is left
of the total `deadline`; once the deadline has passed, or `max_attempts` attempts have failed, the
call raises `GiveUp` carrying the last error. The attempt after a wait is always made, so a
`Retry-After` longer than the time left still gets one last try at the deadline.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from offload.client._errors import GiveUp


@dataclass(frozen=True)
class RetryConfig:
    """How a client retries. `RetryConfig(max_attempts=1)` turns retries off.

    max_attempts: attempts per call, the first included
    deadline:     seconds from the first attempt after which no new attempt starts
    base, cap:    the backoff ceiling of retry n is min(cap, base * 2**n)
    clock:        monotonic seconds (`time.monotonic`)
    sleep:        the sync client's sleep (`time.sleep`)
    async_sleep:  the async client's sleep (`asyncio.sleep`)
    random:       `random(low, high)` -> a float in [low, high] (`random.uniform`)
    """

    max_attempts: int = 10
    deadline: float = 60.0
    base: float = 1.0
    cap: float = 16.0
    clock: Callable[[], float] = field(default=time.monotonic, compare=False, repr=False)
    sleep: Callable[[float], object] = field(default=time.sleep, compare=False, repr=False)
    async_sleep: Callable[[float], Awaitable[object]] = field(
        default=asyncio.sleep, compare=False, repr=False
    )
    random: Callable[[float, float], float] = field(default=random.uniform, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ValueError(f"max_attempts must be an int >= 1, not {self.max_attempts!r}")
        if not self.deadline >= 0:
            raise ValueError(f"deadline must be >= 0 seconds, not {self.deadline!r}")
        if not (self.base > 0 and self.cap > 0):
            raise ValueError("base and cap must be > 0 seconds")

    def ceiling(self, retry: int) -> float:
        """The most retry number `retry` (0-based) may wait: min(cap, base * 2**retry)."""
        return min(self.cap, self.base * 2.0 ** min(retry, 62))

    def backoff(self, retry: int) -> float:
        """A full-jitter wait for retry number `retry`: uniform in [0, ceiling(retry)]."""
        ceiling = self.ceiling(retry)
        return min(ceiling, max(0.0, self.random(0.0, ceiling)))


class Attempts:
    """The retry state of one logical call. No I/O: the client shells send and sleep.

    `deadline` (seconds) can only shorten the config's, e.g. to a `wait(timeout=...)`.
    """

    def __init__(self, config: RetryConfig, deadline: float | None = None) -> None:
        self.config = config
        self.deadline = config.deadline if deadline is None else max(0.0, min(config.deadline, deadline))
        self.started = config.clock()
        self.failures = 0
        self.last_error: BaseException | None = None

    def elapsed(self) -> float:
        return self.config.clock() - self.started

    def failed(self, error: BaseException, retry_after: float | None = None) -> float:
        """Record a retryable failure: the seconds to sleep before the next attempt, or raise GiveUp."""
        self.failures += 1
        self.last_error = error
        elapsed = self.elapsed()
        if self.failures >= self.config.max_attempts:
            raise GiveUp(error, self.failures, elapsed, f"max_attempts={self.config.max_attempts}") from error
        remaining = self.deadline - elapsed
        if remaining <= 0:
            raise GiveUp(error, self.failures, elapsed, f"deadline of {self.deadline:g}s passed") from error
        delay = self.config.backoff(self.failures - 1) if retry_after is None else retry_after
        return min(delay, remaining)
