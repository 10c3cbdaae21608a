"""When to retry a failed job and how long to wait: a pure policy, clock and randomness injected."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from offload.errors import NonRetryable, Retry


@dataclass(frozen=True)
class RetryDecision:
    retry: bool
    delay: float = 0.0
    reason: str = ""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter and a cap (the AWS "full jitter" scheme).

    retries:     failed attempts that are retried (0 = run once)
    backoff:     base delay in seconds; attempt n waits uniform(0, min(cap, backoff * 2**n))
    backoff_max: the cap
    retry_on:    only these exception types are retried (default: any Exception)
    dont_retry_on: these are never retried (checked first)
    deadline:    seconds after the job was created after which no retry is scheduled
    """

    retries: int = 3
    backoff: float = 1.0
    backoff_max: float = 300.0
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    dont_retry_on: tuple[type[BaseException], ...] = ()
    deadline: float | None = None
    jitter: Callable[[float, float], float] = field(default=random.uniform, compare=False)

    def backoff_delay(self, attempt: int) -> float:
        """Delay before retry number `attempt` (0-based), with full jitter."""
        ceiling = min(self.backoff_max, self.backoff * (2 ** min(attempt, 62)))
        return self.jitter(0.0, ceiling)

    def decide(self, exc: BaseException, attempt: int, age: float) -> RetryDecision:
        """Decide for a job whose attempt number `attempt` (0-based) raised `exc`, `age` s old."""
        if isinstance(exc, NonRetryable):
            return RetryDecision(False, reason=f"non-retryable: {exc!r}")
        if self.dont_retry_on and isinstance(exc, self.dont_retry_on):
            return RetryDecision(False, reason=f"non-retryable error {type(exc).__name__}: {exc}")
        if not isinstance(exc, Retry) and not isinstance(exc, self.retry_on):
            return RetryDecision(False, reason=f"error {type(exc).__name__} is not retried: {exc}")
        if attempt >= self.retries:
            return RetryDecision(False, reason=f"retries exhausted after {attempt + 1} attempts: {exc!r}")
        if isinstance(exc, Retry) and exc.delay is not None:
            delay = max(0.0, exc.delay)
        else:
            delay = self.backoff_delay(attempt)
        if self.deadline is not None and age + delay > self.deadline:
            return RetryDecision(False, reason=f"retry deadline of {self.deadline}s passed: {exc!r}")
        return RetryDecision(True, delay=delay)
