"""The pure retry schedule: full-jitter ceilings, Retry-After, the total deadline, GiveUp."""

from __future__ import annotations

import random

import httpx
import pytest

from offload.client import GiveUp, Overloaded, RetryConfig
from offload.client._retry import Attempts

from .conftest import FakeTime


def test_default_ceilings_double_from_one_second_up_to_sixteen() -> None:
    config = RetryConfig()
    assert [config.ceiling(n) for n in range(8)] == [1, 2, 4, 8, 16, 16, 16, 16]
    assert config.ceiling(10_000) == 16  # no overflow for huge attempt numbers
    assert (config.base, config.cap, config.deadline) == (1.0, 16.0, 60.0)


def test_backoff_is_full_jitter_between_zero_and_the_ceiling(fake_time: FakeTime) -> None:
    config = fake_time.config()
    for n in range(7):
        config.backoff(n)
    assert fake_time.randoms == [
        (0.0, 1.0),
        (0.0, 2.0),
        (0.0, 4.0),
        (0.0, 8.0),
        (0.0, 16.0),
        (0.0, 16.0),
        (0.0, 16.0),
    ]


def test_full_jitter_bounds_with_a_real_generator() -> None:
    config = RetryConfig(random=random.Random(7).uniform)
    for n in range(6):
        waits = [config.backoff(n) for _ in range(300)]
        assert all(0.0 <= w <= config.ceiling(n) for w in waits)
        # really spread over the whole range, not pinned near the ceiling
        assert min(waits) < 0.1 * config.ceiling(n) and max(waits) > 0.9 * config.ceiling(n)


def test_a_misbehaving_random_is_clamped_to_the_range() -> None:
    assert RetryConfig(random=lambda lo, hi: hi * 10).backoff(0) == 1.0
    assert RetryConfig(random=lambda lo, hi: -5.0).backoff(3) == 0.0


def test_custom_base_and_cap() -> None:
    config = RetryConfig(base=0.25, cap=1.0)
    assert [config.ceiling(n) for n in range(5)] == [0.25, 0.5, 1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    "options",
    [
        {"max_attempts": 0},
        {"max_attempts": 1.5},
        {"deadline": -1},
        {"base": 0},
        {"cap": 0},
        {"deadline": float("nan")},
    ],
)
def test_bad_config_is_refused(options: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryConfig(**options)  # type: ignore[arg-type]


def test_backoff_waits_follow_the_ceilings(fake_time: FakeTime) -> None:
    attempts = Attempts(fake_time.config(max_attempts=100, deadline=1000))
    waits = []
    for _ in range(7):
        wait = attempts.failed(httpx.ConnectError("refused"))
        fake_time.sleep(wait)
        waits.append(wait)
    assert waits == [1, 2, 4, 8, 16, 16, 16]


def test_retry_after_replaces_the_backoff_and_is_cut_to_the_deadline(fake_time: FakeTime) -> None:
    attempts = Attempts(fake_time.config(deadline=60))
    error = Overloaded(503, {}, retry_after=45)
    assert attempts.failed(error, retry_after=45) == 45
    fake_time.sleep(45)
    assert attempts.failed(error, retry_after=45) == 15  # only 15 s of the deadline are left
    fake_time.sleep(15)
    with pytest.raises(GiveUp) as info:
        attempts.failed(error, retry_after=45)
    assert info.value.last_error is error and info.value.__cause__ is error
    assert info.value.attempts == 3 and info.value.elapsed == 60
    assert "deadline" in str(info.value)


def test_backoff_is_cut_to_the_deadline(fake_time: FakeTime) -> None:
    attempts = Attempts(fake_time.config(deadline=5, max_attempts=100))
    waits = []
    while True:
        try:
            wait = attempts.failed(httpx.ReadTimeout("slow"))
        except GiveUp as exc:
            assert isinstance(exc.last_error, httpx.ReadTimeout)
            break
        fake_time.sleep(wait)
        waits.append(wait)
    assert waits == [1, 2, 2]  # 1 + 2 = 3 s gone, so the 4 s ceiling is cut to the 2 s left


def test_max_attempts_gives_up_with_the_last_error(fake_time: FakeTime) -> None:
    attempts = Attempts(fake_time.config(max_attempts=3))
    errors = [httpx.ConnectError(f"refused {n}") for n in range(3)]
    attempts.failed(errors[0])
    attempts.failed(errors[1])
    with pytest.raises(GiveUp, match="max_attempts=3") as info:
        attempts.failed(errors[2])
    assert info.value.last_error is errors[2] and info.value.attempts == 3


def test_max_attempts_one_means_no_retry(fake_time: FakeTime) -> None:
    with pytest.raises(GiveUp):
        Attempts(fake_time.config(max_attempts=1)).failed(httpx.ConnectError("refused"))


def test_a_call_deadline_can_only_shorten_the_config_deadline(fake_time: FakeTime) -> None:
    config = fake_time.config(deadline=60)
    assert Attempts(config, 5).deadline == 5
    assert Attempts(config, 500).deadline == 60
    assert Attempts(config, -3).deadline == 0
    assert Attempts(config).deadline == 60
