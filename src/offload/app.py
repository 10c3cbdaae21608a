"""`App`: the task registry, the broker (one connection per event loop), queue bounds."""

from __future__ import annotations

import asyncio
import os
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar, overload

from offload.brokers import Broker, Enqueued, Settle, broker_from_url
from offload.errors import ConfigurationError, UnknownTaskError
from offload.job_handle import Job
from offload.maintenance import Maintenance
from offload.message import DEFAULT_MAX_MESSAGE_BYTES, Message, encode
from offload.portal import Portal
from offload.retry import RetryPolicy
from offload.send_batching import SendBatcher
from offload.task import Executor, Task, TaskConfig, check_queue_name

P = ParamSpec("P")
R = TypeVar("R")

DEFAULT_BROKER = "sqlite:///offload.db"
# send_many splits larger lists into batches of this size: one transaction / round trip each.
SEND_BATCH = 5_000

# Called by the worker with (message, outcome) just before it settles an "ack" or "dead" outcome.
CompletionHook = Callable[[Message, Settle], Awaitable[None]]


class App:
    """The entry point: `app = App()`, `@app.task(...)`, `task.send(...)`, `offload worker mod:app`.

    broker: a URL (sqlite:///offload.db, memory://, ...); default OFFLOAD_BROKER_URL, else
            sqlite:///offload.db in the current directory.
    webhook_secret: signs webhook notifications (default OFFLOAD_WEBHOOK_SECRET, read when a
            notification is sent; a job with a webhook and no secret is never notified unsigned).
    """

    def __init__(
        self,
        broker: str | None = None,
        *,
        name: str = "offload",
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        webhook_secret: str | None = None,
    ) -> None:
        self.broker_url = broker or os.environ.get("OFFLOAD_BROKER_URL") or DEFAULT_BROKER
        broker_from_url(self.broker_url)  # validate the URL now, not at first send
        self.name = name
        self.max_message_bytes = max_message_bytes
        self.tasks: dict[str, Task[Any, Any]] = {}
        self.queue_bounds: dict[str, int | None] = {}
        self.portal = Portal(at_exit=self.close_async)  # finishes background sends at exit
        # "module:attribute" this app was loaded from, so process-pool children can import it.
        self.import_path: str | None = None
        self._sync_broker: Broker | None = None  # the portal loop's broker, for sync sends
        self._brokers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task[Broker]] = (
            weakref.WeakKeyDictionary()
        )
        self._batchers: weakref.WeakKeyDictionary[Broker, SendBatcher] = weakref.WeakKeyDictionary()
        self.webhook_secret = webhook_secret
        self.completion_hooks: list[CompletionHook] = []
        # Queues every worker of this app serves besides the ones it is given (notifications).
        self.system_queues: list[str] = []
        # Chores every worker of this app runs now and then (the webhook DLQ scan).
        self.maintenance: list[Maintenance] = []
        from offload.api.notify import install_webhooks  # late: notify registers a task on this App

        install_webhooks(self)

    def __repr__(self) -> str:
        return f"<App {self.name} broker={self.broker_url}>"

    # -- declaring -------------------------------------------------------------------------

    def queue(self, name: str, *, max_depth: int | None = None) -> None:
        """Declare a queue and its bound: past `max_depth` waiting jobs, send raises QueueFull."""
        check_queue_name(name)
        if max_depth is not None and (not isinstance(max_depth, int) or max_depth < 1):
            raise ConfigurationError(f"queue {name!r}: max_depth must be an int >= 1 or None")
        self.queue_bounds[name] = max_depth

    @overload
    def task(self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> Task[P, R]: ...

    @overload
    def task(self, fn: Callable[P, R], /) -> Task[P, R]: ...

    @overload
    def task(
        self,
        *,
        name: str | None = None,
        queue: str = "default",
        retries: int = 3,
        timeout: float | None = 300.0,
        max_deliveries: int | None = None,
        priority: int = 0,
        executor: Executor | None = None,
        backoff: float = 1.0,
        backoff_max: float = 300.0,
        retry_on: tuple[type[BaseException], ...] = (Exception,),
        dont_retry_on: tuple[type[BaseException], ...] = (),
        retry_deadline: float | None = None,
        result_ttl: float = 86_400.0,
        public: bool = False,
        webhook: str | None = None,
    ) -> _TaskDecorator: ...

    def task(self, fn: Callable[..., Any] | None = None, /, **options: Any) -> Any:  # type: ignore[misc]
        """Register a task. Options are checked here; an unknown one fails at decoration time.

        retries: failed attempts retried with exponential backoff (backoff, backoff_max) and
            full jitter; retry_on / dont_retry_on choose which exceptions are retried.
        timeout: seconds a run may take (also sizes the job's lease); None for no limit.
        max_deliveries: deliveries, crashes included, before the job is dead-lettered
            (default retries + 3, so a couple of worker crashes do not eat the retries).
        executor: "async" (async def, on the event loop), "thread" (plain def, the default),
            "process" (plain def in a child process, killed at its timeout).
        public: the task may be submitted over the HTTP API (`offload api`).
        webhook: an http(s) URL POSTed a signed notification when a job of this task succeeds
            or is dead-lettered (a per-send `options(webhook=...)` overrides it).
        """
        decorator = _TaskDecorator(self, options)
        return decorator if fn is None else decorator(fn)

    def register(self, task: Task[Any, Any]) -> None:
        if task.name in self.tasks and self.tasks[task.name].fn is not task.fn:
            raise ConfigurationError(f"two different functions are registered as task {task.name!r}")
        self.tasks[task.name] = task

    def get_task(self, name: str) -> Task[Any, Any]:
        try:
            return self.tasks[name]
        except KeyError:
            raise UnknownTaskError(
                f"no task named {name!r} in {self!r}; known tasks: {', '.join(sorted(self.tasks)) or 'none'}"
            ) from None

    # -- the broker ------------------------------------------------------------------------

    async def broker(self) -> Broker:
        """The connected broker for the running event loop (made on first use)."""
        loop = asyncio.get_running_loop()
        pending = self._brokers.get(loop)
        if pending is not None and pending.done() and not pending.cancelled() and pending.exception() is None:
            return pending.result()  # connected: skip the shield, which costs every send a future
        if pending is None:
            pending = self._brokers[loop] = loop.create_task(self._connect())
        try:
            return await asyncio.shield(pending)
        except BaseException:
            if pending.done():
                self._brokers.pop(loop, None)  # let the next call try again
            raise

    async def _connect(self) -> Broker:
        broker = broker_from_url(self.broker_url)
        await broker.connect()
        for name, bound in self.queue_bounds.items():
            await broker.declare_queue(name, bound)
        return broker

    async def close_async(self) -> None:
        """Close this event loop's broker connection."""
        pending = self._brokers.pop(asyncio.get_running_loop(), None)
        if pending is not None and pending.done() and not pending.exception():
            broker = pending.result()
            batcher = self._batchers.pop(broker, None)
            if batcher is not None:
                await batcher.close()
            await broker.close()

    def close(self) -> None:
        """Close the sync API's broker connection and its thread."""
        self._sync_broker = None
        self.portal.close(self.close_async)

    # -- sending ---------------------------------------------------------------------------

    async def send_many_async(self, messages: Sequence[Message]) -> list[Job[Any]]:
        """Enqueue many jobs, one transaction / round trip per batch of up to 5,000.

        Each batch is all-or-nothing (QueueFull enqueues none of it); batches before a refused
        one stay enqueued.
        """
        items = [(m, encode(m, self.max_message_bytes)) for m in messages]
        broker = await self.broker()
        if len(items) <= SEND_BATCH and broker.batches_enqueue_calls:
            return self._jobs(items, await self._batcher(broker).enqueue(items))
        jobs: list[Job[Any]] = []
        for start in range(0, len(items), SEND_BATCH):
            batch = items[start : start + SEND_BATCH]
            jobs.extend(self._jobs(batch, await broker.enqueue(batch)))
        return jobs

    def _batcher(self, broker: Broker) -> SendBatcher:
        """The send batcher of the running loop's broker (sends on one loop share round trips)."""
        batcher = self._batchers.get(broker)
        if batcher is None:
            batcher = self._batchers[broker] = SendBatcher(broker)
        return batcher

    def send_many(self, messages: Sequence[Message]) -> list[Job[Any]]:
        """Enqueue many jobs from sync code; see `send_many_async`."""
        if self._sync_broker is None:
            self._sync_broker = self.portal.call(self.broker)
        blocking = getattr(self._sync_broker, "enqueue_blocking", None)
        if blocking is None:
            return self.portal.call(lambda: self.send_many_async(messages))
        # The broker can take a blocking caller directly (SQLite): skip the portal's hand-offs.
        items = [(m, encode(m, self.max_message_bytes)) for m in messages]
        many = getattr(self._sync_broker, "enqueue_batches_blocking", None)
        if many is not None and len(items) > SEND_BATCH:  # Redis: one batch's work overlaps the next's
            batches = [items[start : start + SEND_BATCH] for start in range(0, len(items), SEND_BATCH)]
            return [job for b, r in zip(batches, many(batches), strict=True) for job in self._jobs(b, r)]
        jobs: list[Job[Any]] = []
        for start in range(0, len(items), SEND_BATCH):
            batch = items[start : start + SEND_BATCH]
            jobs.extend(self._jobs(batch, blocking(batch)))
        return jobs

    def _jobs(self, batch: Sequence[tuple[Message, bytes]], results: Sequence[Enqueued]) -> list[Job[Any]]:
        jobs: list[Job[Any]] = []
        for (message, _), result in zip(batch, results, strict=True):
            task = self.tasks.get(message.task)
            return_type = task.return_type if task is not None else None
            jobs.append(Job(self, result.job_id, result.created, return_type))
        return jobs

    def job(self, job_id: str) -> Job[Any]:
        """A handle on an existing job by id."""
        return Job(self, job_id)

    def run_sync(self, fn: Callable[[Broker], Awaitable[R]]) -> R:
        """Run `fn(broker)` from sync code (used by the CLI and tests)."""

        async def call() -> R:
            return await fn(await self.broker())

        return self.portal.call(call)


class _TaskDecorator:
    def __init__(self, app: App, options: dict[str, Any]) -> None:
        allowed = {
            "name",
            "queue",
            "retries",
            "timeout",
            "max_deliveries",
            "priority",
            "executor",
            "backoff",
            "backoff_max",
            "retry_on",
            "dont_retry_on",
            "retry_deadline",
            "result_ttl",
            "public",
            "webhook",
        }
        unknown = set(options) - allowed
        if unknown:
            raise ConfigurationError(
                f"unknown task option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(allowed))}"
            )
        self.app = app
        self.options = options

    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> Task[P, R]: ...

    @overload
    def __call__(self, fn: Callable[P, R], /) -> Task[P, R]: ...

    def __call__(self, fn: Callable[..., Any], /) -> Task[Any, Any]:
        o = dict(self.options)
        retries = o.pop("retries", 3)
        policy = RetryPolicy(
            retries=retries,
            backoff=o.pop("backoff", 1.0),
            backoff_max=o.pop("backoff_max", 300.0),
            retry_on=_exception_types(o.pop("retry_on", (Exception,))),
            dont_retry_on=_exception_types(o.pop("dont_retry_on", ())),
            deadline=o.pop("retry_deadline", None),
        )
        is_async = asyncio.iscoroutinefunction(fn)
        max_deliveries = o.pop("max_deliveries", None)
        config = TaskConfig(
            name=o.pop("name", None) or f"{fn.__module__}.{fn.__qualname__}",
            retry=policy,
            max_deliveries=max_deliveries if max_deliveries is not None else _default_deliveries(retries),
            executor=o.pop("executor", None) or ("async" if is_async else "thread"),
            **o,
        )
        task: Task[Any, Any] = Task(self.app, fn, config)
        self.app.register(task)
        return task


def _exception_types(value: Any) -> tuple[Any, ...]:
    """retry_on / dont_retry_on as a tuple (TaskConfig checks that it holds exception classes)."""
    return tuple(value) if isinstance(value, tuple | list | set | frozenset) else (value,)


def _default_deliveries(retries: Any) -> int:
    """retries + 3, so that a couple of worker crashes do not eat a job's retries."""
    return retries + 3 if isinstance(retries, int) else 1
