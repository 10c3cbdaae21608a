"""The public names are a promise: changing them is a decision, made here on purpose."""

from __future__ import annotations

import offload
from offload import errors

PUBLIC = [
    "App",
    "BrokerError",
    "ConfigurationError",
    "EncodeError",
    "Job",
    "JobFailed",
    "JobInfo",
    "JobNotFound",
    "JobState",
    "LeaseLost",
    "Message",
    "MissingExtraError",
    "NonRetryable",
    "OffloadError",
    "QueueFull",
    "Retry",
    "RetryPolicy",
    "Task",
    "TaskCall",
    "TaskTimeout",
    "UnknownTaskError",
]


def test_all_is_pinned() -> None:
    assert offload.__all__ == PUBLIC


def test_every_public_name_exists() -> None:
    for name in offload.__all__:
        assert getattr(offload, name) is not None


def test_exception_tree() -> None:
    base = offload.OffloadError
    for name in (
        "ConfigurationError",
        "MissingExtraError",
        "EncodeError",
        "UnknownTaskError",
        "QueueFull",
        "BrokerError",
        "LeaseLost",
        "JobNotFound",
        "JobFailed",
        "TaskTimeout",
    ):
        assert issubclass(getattr(offload, name), base), name
    assert issubclass(offload.MissingExtraError, offload.ConfigurationError)
    assert issubclass(offload.ConfigurationError, ValueError)
    assert issubclass(offload.EncodeError, TypeError)
    assert issubclass(offload.TaskTimeout, TimeoutError)
    assert issubclass(offload.BrokerError, ConnectionError)
    assert issubclass(offload.JobNotFound, LookupError)
    # Control flow raised by task code is not an offload failure.
    assert not issubclass(offload.Retry, base)
    assert not issubclass(offload.NonRetryable, base)


def test_queue_full_estimates_the_wait_from_the_drain_rate() -> None:
    full = errors.QueueFull("q", depth=100, max_depth=100, drain_rate=10.0)
    assert full.retry_after == 1.0
    assert "100/100" in str(full) and "about 1.0s" in str(full)
    backlog = errors.QueueFull("q", depth=150, max_depth=100, drain_rate=10.0)
    assert backlog.retry_after == 5.1  # 51 jobs must drain before one more fits
    stalled = errors.QueueFull("q", depth=100, max_depth=100, drain_rate=0.0)
    assert stalled.retry_after == 60.0 and "not draining" in str(stalled)


def test_missing_extra_names_the_install_command() -> None:
    error = errors.MissingExtraError("redis", "redis")
    assert "pip install 'offload[redis]'" in str(error) and error.extra == "redis"
    assert isinstance(error, ImportError)


def test_job_failed_carries_the_outcome() -> None:
    error = errors.JobFailed("abc", "dead", "ValueError: x")
    assert (error.job_id, error.state, error.error) == ("abc", "dead", "ValueError: x")
    assert "abc" in str(error) and "dead" in str(error)
