"""Every exception offload raises, in one tree.

    OffloadError
    ├── ConfigurationError        a bad option, URL or argument, found before anything is written
    │   └── MissingExtraError     a broker URL whose client library is not installed
    ├── EncodeError               an argument or result that cannot be encoded as JSON
    ├── UnknownTaskError          a task name no registered task answers to
    ├── QueueFull                 a bounded queue refused an enqueue (carries depth, estimated wait)
    ├── BrokerError               the broker could not be reached, or its store is not offload's
    ├── LeaseLost                 a settle came from a lease that expired (fencing)
    ├── JobNotFound               no job with that id (never existed, or pruned)
    ├── JobFailed                 `Job.result()` of a job that failed, was cancelled or dead-lettered
    └── TaskTimeout               a task ran past its timeout

Control flow, not failure (raised by task code):

    Retry                         run this job again after `delay` seconds
    NonRetryable                  fail now, skip the remaining retries
"""

from __future__ import annotations


class OffloadError(Exception):
    """Base class of every offload error."""


class ConfigurationError(OffloadError, ValueError):
    """An option, URL or argument is not valid; nothing was written."""


class MissingExtraError(ConfigurationError, ImportError):
    """A broker's client library is not installed."""

    def __init__(self, scheme: str, extra: str) -> None:
        super().__init__(
            f"the {scheme}:// broker needs an optional dependency: pip install 'offload[{extra}]'"
        )
        self.extra = extra


class EncodeError(OffloadError, TypeError):
    """A value cannot be encoded as JSON for the job envelope."""


class UnknownTaskError(OffloadError, LookupError):
    """No task is registered under that name."""


class QueueFull(OffloadError):
    """The queue is at its `max_depth`; nothing was enqueued. Retry after `retry_after` seconds."""

    def __init__(self, queue: str, depth: int, max_depth: int, drain_rate: float) -> None:
        self.queue = queue
        self.depth = depth
        self.max_depth = max_depth
        self.drain_rate = drain_rate  # jobs per second, measured over the last minute
        wait = f"about {self.retry_after:.1f}s" if drain_rate > 0 else "unknown (queue not draining)"
        super().__init__(f"queue {queue!r} is full ({depth}/{max_depth} jobs); estimated wait {wait}")

    @property
    def retry_after(self) -> float:
        """Seconds until enough of the queue has drained to accept work again (estimate)."""
        if self.drain_rate <= 0:
            return 60.0
        excess = self.depth - self.max_depth + 1
        return max(1.0, excess / self.drain_rate)


class BrokerError(OffloadError, ConnectionError):
    """The broker is unreachable, or its store is not an offload store."""


class LeaseLost(OffloadError):
    """The lease behind this settle expired and the job was handed to another delivery."""


class JobNotFound(OffloadError, LookupError):
    """No job has that id: it never existed, or it finished and was pruned."""


class JobFailed(OffloadError):
    """The job ended without a result: failed, cancelled or dead-lettered."""

    def __init__(self, job_id: str, state: str, error: str | None) -> None:
        self.job_id = job_id
        self.state = state
        self.error = error
        super().__init__(f"job {job_id} ended {state}: {error or 'no error recorded'}")


class TaskTimeout(OffloadError, TimeoutError):
    """The task ran past its timeout."""


class Retry(Exception):
    """Raised by a task to be run again after `delay` seconds (counts as an attempt)."""

    def __init__(self, delay: float | None = None, reason: str = "") -> None:
        self.delay = delay
        self.reason = reason
        super().__init__(reason or f"retry requested (delay={delay})")


class NonRetryable(Exception):
    """Raised by a task (or wrapping an error) to fail at once, skipping remaining retries."""
