"""RetryPolicy: exponential backoff with full jitter and a cap, and the retry decision."""

from __future__ import annotations

import random

import pytest

from offload import NonRetryable, Retry, RetryPolicy


def ceiling(lo: float, hi: float) -> float:
    """A 'jitter' that always picks the top of the range: the backoff ceiling itself."""
    return hi


def test_backoff_ceiling_doubles_per_attempt_up_to_the_cap() -> None:
    policy = RetryPolicy(backoff=1.0, backoff_max=10.0, jitter=ceiling)
    assert [policy.backoff_delay(n) for n in range(6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_backoff_does_not_overflow_for_huge_attempt_numbers() -> None:
    policy = RetryPolicy(backoff=0.5, backoff_max=300.0, jitter=ceiling)
    assert policy.backoff_delay(10_000) == 300.0


def test_full_jitter_draws_between_zero_and_the_ceiling() -> None:
    calls: list[tuple[float, float]] = []

    def record(lo: float, hi: float) -> float:
        calls.append((lo, hi))
        return (lo + hi) / 2

    policy = RetryPolicy(backoff=2.0, backoff_max=100.0, jitter=record)
    assert policy.backoff_delay(3) == 8.0
    assert calls == [(0.0, 16.0)]

    seeded = RetryPolicy(backoff=1.0, backoff_max=30.0, jitter=random.Random(7).uniform)
    for attempt in range(12):
        top = min(30.0, 2.0**attempt)
        delays = [seeded.backoff_delay(attempt) for _ in range(50)]
        assert all(0.0 <= d <= top for d in delays)
    assert len({seeded.backoff_delay(8) for _ in range(20)}) > 1, "no jitter at all"


def test_decide_retries_with_backoff_until_retries_are_exhausted() -> None:
    policy = RetryPolicy(retries=2, backoff=1.0, jitter=ceiling)
    error = ValueError("boom")
    first = policy.decide(error, attempt=0, age=0.0)
    assert (first.retry, first.delay) == (True, 1.0)
    second = policy.decide(error, attempt=1, age=1.0)
    assert (second.retry, second.delay) == (True, 2.0)
    last = policy.decide(error, attempt=2, age=3.0)
    assert not last.retry
    assert "retries exhausted after 3 attempts" in last.reason and "boom" in last.reason


def test_zero_retries_means_run_once() -> None:
    assert not RetryPolicy(retries=0).decide(ValueError(), 0, 0.0).retry


def test_non_retryable_is_never_retried() -> None:
    decision = RetryPolicy(retries=10).decide(NonRetryable("bad input"), 0, 0.0)
    assert not decision.retry and "bad input" in decision.reason


def test_dont_retry_on_wins_over_retry_on() -> None:
    policy = RetryPolicy(retries=5, retry_on=(LookupError,), dont_retry_on=(KeyError,), jitter=ceiling)
    assert not policy.decide(KeyError("k"), 0, 0.0).retry
    assert "KeyError" in policy.decide(KeyError("k"), 0, 0.0).reason
    assert policy.decide(IndexError("i"), 0, 0.0).retry  # a LookupError, not a KeyError


def test_retry_on_limits_retried_errors() -> None:
    policy = RetryPolicy(retries=5, retry_on=(ConnectionError, TimeoutError), jitter=ceiling)
    assert policy.decide(ConnectionResetError(), 0, 0.0).retry  # subclasses count
    assert policy.decide(TimeoutError(), 0, 0.0).retry
    refused = policy.decide(ValueError("v"), 0, 0.0)
    assert not refused.retry and "not retried" in refused.reason


def test_retry_exception_sets_the_delay_and_is_always_eligible() -> None:
    policy = RetryPolicy(retries=3, retry_on=(ConnectionError,), jitter=ceiling)
    decision = policy.decide(Retry(delay=42.0), 0, 0.0)
    assert (decision.retry, decision.delay) == (True, 42.0)
    assert policy.decide(Retry(delay=-5), 0, 0.0).delay == 0.0
    assert policy.decide(Retry(), 2, 0.0).delay == 4.0  # no delay given: the backoff
    assert not policy.decide(Retry(delay=1), 3, 0.0).retry  # still counts as an attempt


def test_deadline_stops_retries_that_would_land_after_it() -> None:
    policy = RetryPolicy(retries=10, backoff=1.0, deadline=10.0, jitter=ceiling)
    assert policy.decide(ValueError(), 0, age=8.0).retry  # 8 + 1 <= 10
    late = policy.decide(ValueError(), 2, age=8.0)  # 8 + 4 > 10
    assert not late.retry and "deadline" in late.reason
    assert not policy.decide(Retry(delay=3), 0, age=8.0).retry


@pytest.mark.parametrize("attempt", [0, 1, 5])
def test_default_policy_is_exponential_with_a_cap(attempt: int) -> None:
    policy = RetryPolicy(jitter=ceiling)
    assert (policy.retries, policy.backoff, policy.backoff_max) == (3, 1.0, 300.0)
    assert policy.backoff_delay(attempt) == min(300.0, 2.0**attempt)
