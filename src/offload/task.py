"""Tasks: typed handles made by `@app.task(...)`, and the per-send options they accept."""

from __future__ import annotations

import inspect
import re
import time
import typing
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, Literal, ParamSpec, TypeVar
from urllib.parse import urlsplit

import msgspec

from offload.errors import ConfigurationError, EncodeError
from offload.message import Message, new_job_id
from offload.retry import RetryPolicy

if TYPE_CHECKING:
    from offload.app import App
    from offload.job_handle import Job

P = ParamSpec("P")
R = TypeVar("R")

Executor = Literal["async", "thread", "process"]
EXECUTORS: tuple[Executor, ...] = ("async", "thread", "process")
QUEUE_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")
MAX_PRIORITY = 9


def check_queue_name(name: str) -> str:
    if not isinstance(name, str) or not QUEUE_NAME.match(name):
        raise ConfigurationError(
            f"queue name {name!r} is not valid: use 1-100 letters, digits, '_', '.', ':' or '-'"
        )
    return name


MAX_WEBHOOK_URL = 2048


def check_webhook_url(url: object) -> str:
    """A webhook must be an absolute http(s) URL with a host (at most 2048 characters)."""
    problem = not isinstance(url, str) or len(url) > MAX_WEBHOOK_URL
    if isinstance(url, str) and not problem:
        try:
            parts = urlsplit(url)
            problem = parts.scheme not in ("http", "https") or not parts.hostname
            _ = parts.port  # raises ValueError for a port that is not a number in range
        except ValueError:
            problem = True
    if problem:
        raise ConfigurationError(
            f"webhook must be an absolute http:// or https:// URL of at most {MAX_WEBHOOK_URL} "
            f"characters, not {url!r}"
        )
    assert isinstance(url, str)
    return url


def _positive(value: object) -> bool:
    """A real number of seconds above zero (not a bool, a string or NaN)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def _check_priority(priority: int) -> int:
    if not isinstance(priority, int) or not 0 <= priority <= MAX_PRIORITY:
        raise ConfigurationError(f"priority must be an int from 0 to {MAX_PRIORITY}, not {priority!r}")
    return priority


@dataclass(frozen=True)
class TaskConfig:
    """A task's options, validated when the task is declared."""

    name: str
    queue: str = "default"
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout: float | None = 300.0
    max_deliveries: int = 6
    priority: int = 0
    executor: Executor = "thread"
    result_ttl: float = 86_400.0
    public: bool = False  # may be submitted over the HTTP API
    webhook: str | None = None  # POSTed a signed notification when a job succeeds or dies

    def __post_init__(self) -> None:
        check_queue_name(self.queue)
        if self.webhook is not None:
            check_webhook_url(self.webhook)
        _check_priority(self.priority)
        if self.timeout is not None and not _positive(self.timeout):
            raise ConfigurationError(f"task {self.name!r}: timeout must be > 0 seconds or None")
        if not isinstance(self.max_deliveries, int) or self.max_deliveries < 1:
            raise ConfigurationError(f"task {self.name!r}: max_deliveries must be an int >= 1")
        retry = self.retry
        if not isinstance(retry.retries, int) or isinstance(retry.retries, bool) or retry.retries < 0:
            raise ConfigurationError(f"task {self.name!r}: retries must be an int >= 0")
        if not (_positive(retry.backoff) or retry.backoff == 0) or not _positive(retry.backoff_max):
            raise ConfigurationError(f"task {self.name!r}: backoff must be >= 0 and backoff_max > 0 seconds")
        if retry.deadline is not None and not _positive(retry.deadline):
            raise ConfigurationError(f"task {self.name!r}: retry_deadline must be > 0 seconds or None")
        for option, types in (("retry_on", retry.retry_on), ("dont_retry_on", retry.dont_retry_on)):
            if not all(isinstance(t, type) and issubclass(t, BaseException) for t in types):
                raise ConfigurationError(
                    f"task {self.name!r}: {option} must be a tuple of exception classes, not {types!r}"
                )
        if self.executor not in EXECUTORS:
            raise ConfigurationError(
                f"task {self.name!r}: executor must be one of {', '.join(EXECUTORS)}, not {self.executor!r}"
            )
        if not _positive(self.result_ttl):
            raise ConfigurationError(f"task {self.name!r}: result_ttl must be > 0 seconds")


@dataclass(frozen=True)
class SendOptions:
    """Per-send overrides: `task.options(delay=60, priority=9, idempotency_key="k").send(...)`."""

    queue: str | None = None
    priority: int | None = None
    delay: float | None = None
    eta: datetime | float | None = None
    idempotency_key: str | None = None
    idempotency_window: float = 86_400.0
    timeout: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.queue is not None:
            check_queue_name(self.queue)
        if self.priority is not None:
            _check_priority(self.priority)
        if self.delay is not None and self.eta is not None:
            raise ConfigurationError("give delay or eta, not both")
        if self.delay is not None and not (_positive(self.delay) or self.delay == 0):
            raise ConfigurationError(f"delay must be >= 0 seconds, not {self.delay!r}")
        if self.eta is not None and not (isinstance(self.eta, datetime) or _positive(self.eta)):
            raise ConfigurationError(f"eta must be a datetime or epoch seconds, not {self.eta!r}")
        if self.timeout is not None and not _positive(self.timeout):
            raise ConfigurationError(f"timeout must be > 0 seconds, not {self.timeout!r}")
        if self.idempotency_key is not None and not (0 < len(self.idempotency_key) <= 255):
            raise ConfigurationError("idempotency_key must be 1 to 255 characters")
        if not _positive(self.idempotency_window):
            raise ConfigurationError("idempotency_window must be > 0 seconds")

    def eta_epoch(self, now: float) -> float | None:
        if self.delay is not None:
            return now + self.delay
        if isinstance(self.eta, datetime):
            if self.eta.tzinfo is None:
                raise ConfigurationError("eta must be timezone-aware (e.g. datetime.now(UTC))")
            return self.eta.timestamp()
        return self.eta


class TaskCall(Generic[P, R]):
    """A task with send options bound; `Task` itself is one with no overrides."""

    def __init__(self, task: Task[P, R], options: SendOptions) -> None:
        self._task = task
        self._options = options

    def options(
        self,
        *,
        queue: str | None = None,
        priority: int | None = None,
        delay: float | None = None,
        eta: datetime | float | None = None,
        idempotency_key: str | None = None,
        idempotency_window: float | None = None,
        timeout: float | None = None,
        webhook: str | None = None,
    ) -> TaskCall[P, R]:
        """Per-send overrides; `webhook` is POSTed a signed notification when the job finishes."""
        o = self._options
        extra = o.extra if webhook is None else {**o.extra, "webhook": check_webhook_url(webhook)}
        return TaskCall(
            self._task,
            SendOptions(
                queue=queue if queue is not None else o.queue,
                priority=priority if priority is not None else o.priority,
                delay=delay if delay is not None else (o.delay if eta is None else None),
                eta=eta if eta is not None else (o.eta if delay is None else None),
                idempotency_key=idempotency_key if idempotency_key is not None else o.idempotency_key,
                idempotency_window=(
                    idempotency_window if idempotency_window is not None else o.idempotency_window
                ),
                timeout=timeout if timeout is not None else o.timeout,
                extra=extra,
            ),
        )

    def message(self, *args: P.args, **kwargs: P.kwargs) -> Message:
        """Build the job envelope without sending it (for `app.send_many`)."""
        self._task.check_arguments(args, kwargs)
        return self.checked_message(args, kwargs)

    def checked_message(self, args: Sequence[Any], kwargs: dict[str, Any]) -> Message:
        """`message` for arguments already checked against the signature (the HTTP API's validator
        does that, and reports every fault; binding them again would cost a submit ~8 µs)."""
        task, opts = self._task, self._options
        now = time.time()
        return Message(
            id=new_job_id(),
            task=task.name,
            queue=opts.queue or task.config.queue,
            args=tuple(args),
            kwargs=kwargs,
            priority=task.config.priority if opts.priority is None else opts.priority,
            eta=opts.eta_epoch(now),
            created_at=now,
            timeout=opts.timeout or task.config.timeout,
            max_deliveries=task.config.max_deliveries,
            idempotency_key=opts.idempotency_key,
            idempotency_window=opts.idempotency_window,
            result_ttl=task.config.result_ttl,
            options=opts.extra,
        )

    def send(self, *args: P.args, **kwargs: P.kwargs) -> Job[R]:
        """Enqueue the job durably and return its handle (blocking; see `send_async`)."""
        job: Job[R] = self._task.app.send_many([self.message(*args, **kwargs)])[0]
        return job

    async def send_async(self, *args: P.args, **kwargs: P.kwargs) -> Job[R]:
        jobs = await self._task.app.send_many_async([self.message(*args, **kwargs)])
        job: Job[R] = jobs[0]
        return job


class Task(TaskCall[P, R]):
    """A registered task. Calling it runs the function here; `send` runs it on a worker."""

    def __init__(self, app: App, fn: Callable[P, Any], config: TaskConfig) -> None:
        super().__init__(self, SendOptions())
        self.app = app
        self.fn = fn
        self.config = config
        self.is_async = inspect.iscoroutinefunction(fn)
        self.signature = inspect.signature(fn)
        self._arg_types = _argument_types(fn, self.signature)
        self._positional_counts = _positional_counts(self.signature)
        self.return_type = _return_type(fn)
        if config.executor == "async" and not self.is_async:
            raise ConfigurationError(f"task {config.name!r}: executor='async' needs an async def")
        if config.executor == "process" and self.is_async:
            raise ConfigurationError(
                f"task {config.name!r}: executor='process' runs plain functions; make it a def"
            )
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    @property
    def name(self) -> str:
        return self.config.name

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Any:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<Task {self.name} queue={self.config.queue}>"

    def check_arguments(self, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
        counts = self._positional_counts
        if counts is not None and not kwargs and counts[0] <= len(args) <= counts[1]:
            return  # what bind() would accept, without its ~4 µs (a good part of a send's CPU)
        try:
            self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise EncodeError(f"task {self.name!r} cannot take these arguments: {exc}") from None

    def convert_arguments(
        self, args: Sequence[Any], kwargs: dict[str, Any]
    ) -> tuple[list[Any], dict[str, Any]]:
        """Turn decoded JSON arguments back into the annotated types (datetime, Structs, ...)."""
        if not self._arg_types:
            return list(args), kwargs
        bound = self.signature.bind(*args, **kwargs)
        for name, value in bound.arguments.items():
            target = self._arg_types.get(name)
            if target is not None:
                bound.arguments[name] = msgspec.convert(value, target, strict=False)
        return list(bound.args), dict(bound.kwargs)


def _positional_counts(signature: inspect.Signature) -> tuple[int, int] | None:
    """For a signature of plain parameters only (no *args, **kwargs or keyword-only ones): how
    many positional arguments it needs at least and takes at most. None for any other."""
    params = signature.parameters.values()
    plain = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if not all(p.kind in plain for p in params):
        return None
    return sum(1 for p in params if p.default is p.empty), len(params)


def _argument_types(fn: Callable[..., Any], signature: inspect.Signature) -> dict[str, Any]:
    """Annotated parameter types worth converting (skip Any and plain JSON types)."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - unresolvable hints just mean no conversion
        return {}
    out = {}
    for name, param in signature.parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        hint = hints.get(name)
        if hint is None or hint is Any or hint in (str, int, float, bool):
            continue
        out[name] = hint
    return out


def _return_type(fn: Callable[..., Any]) -> Any:
    try:
        hint = typing.get_type_hints(fn).get("return")
    except Exception:  # noqa: BLE001
        return None
    return None if hint in (None, type(None), Any) else hint


TaskFunction = Callable[P, Awaitable[R]] | Callable[P, R]
