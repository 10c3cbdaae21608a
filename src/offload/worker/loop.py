"""The worker loop: one asyncio loop per process, fetching no more jobs than it has free slots.

    fetch(free slots) -> execute (async / thread / process) -> settle (batched)
                \\-> leases renewed while jobs run; expired results pruned now and then

Shutdown (SIGTERM/SIGINT or `stop()`): fetching stops at once; running jobs get `grace` seconds;
then whatever still runs is cancelled and its lease handed back at once, so another worker can
take it without waiting for the lease to expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import time
from collections.abc import Sequence
from typing import Any

import msgspec

from offload.app import App
from offload.brokers.base import Broker, Delivery, Settle
from offload.cancellation import stop_tasks
from offload.errors import EncodeError, Retry
from offload.maintenance import Maintenance, run_periodically
from offload.message import Message, decode
from offload.worker import stackdump
from offload.worker.executors import Executors, ProcessTaskError
from offload.worker.leases import LeaseKeeper
from offload.worker.settler import Settler

log = logging.getLogger("offload.worker")

PRUNE_EVERY = 60.0


async def _prune(broker: Broker) -> None:
    pruned = await broker.prune()
    if pruned:
        log.info("pruned %d finished job(s) past their result TTL", pruned)


class Worker:
    """Runs jobs from `queues` with at most `concurrency` at once.

    burst: exit once the queues hold no waiting, delayed or leased job (for tests and batch
           runs: no fixed sleeps needed).
    grace: seconds running jobs get to finish after a stop is requested.
    """

    def __init__(
        self,
        app: App,
        queues: Sequence[str] = ("default",),
        *,
        concurrency: int = 16,
        burst: bool = False,
        grace: float = 30.0,
        fetch_wait: float = 5.0,
        process_slots: int | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self.app = app
        # Plus the app's system queues (webhook notifications), so no extra worker is needed.
        self.queues = list(queues) + [q for q in app.system_queues if q not in queues]
        self.concurrency = concurrency
        self.burst = burst
        self.grace = grace
        self.fetch_wait = fetch_wait
        self.process_slots = process_slots or min(concurrency, os.cpu_count() or 1)
        self.processed = 0
        self._running: dict[str, tuple[Delivery, asyncio.Task[None]]] = {}
        self._slot_freed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._fetching: asyncio.Task[list[Delivery]] | None = None

    # -- control ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop fetching and shut down gracefully (safe to call from a signal handler)."""
        if not self._stopping.is_set():
            log.info("worker stopping: no new jobs; %d running get %.0fs", len(self._running), self.grace)
        self._stopping.set()
        self._slot_freed.set()  # wake a fetch loop waiting for a free slot, so the grace clock starts now
        if self._fetching is not None:
            self._fetching.cancel()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop gracefully; SIGUSR1 dumps every thread's and task's stack."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        stackdump.install(loop)

    # -- the loop --------------------------------------------------------------------------

    async def run(self) -> None:
        broker = await self.app.broker()
        self._executors = Executors(self.concurrency, self.process_slots, self.app.import_path)
        self._settler = Settler(broker)
        self._leases = LeaseKeeper(broker, self._lease_lost)
        helpers = [
            asyncio.create_task(self._leases.run(), name="offload-leases"),
            *(
                asyncio.create_task(run_periodically(chore, broker), name=f"offload-{chore.name}")
                for chore in (Maintenance("pruning", PRUNE_EVERY, _prune), *self.app.maintenance)
            ),
        ]
        # Everything alive now (modules, the app, the broker's clients) lives as long as the
        # worker: move it out of the collector's way, so a full collection walks only what jobs
        # create (~6 ms for a worker's ~36,000 start-up objects on the 2-core dev machine, a
        # pause every job waiting at that moment would add to its latency). Collect first, so
        # only what is alive is frozen (a process that starts workers again pins no garbage).
        gc.collect()
        gc.freeze()
        log.info(
            "worker started: queues=%s concurrency=%d broker=%s",
            ",".join(self.queues),
            self.concurrency,
            self.app.broker_url,
        )
        try:
            await self._fetch_loop(broker)
            await self._shutdown()
        finally:
            with contextlib.suppress(asyncio.CancelledError):
                await stop_tasks(helpers)  # cancelled again if a library swallowed the cancel
            await self._settler.drain()
            self._executors.close()
        log.info("worker stopped after %d job(s)", self.processed)

    async def _fetch_loop(self, broker: Broker) -> None:
        while not self._stopping.is_set():
            free = self.concurrency - len(self._running)
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            wait = 0.05 if self.burst else self.fetch_wait
            self._fetching = asyncio.create_task(broker.fetch(self.queues, free, wait))
            try:
                deliveries = await self._fetching
            except asyncio.CancelledError:
                if self._stopping.is_set():
                    break
                raise
            except Exception:
                log.exception("fetching failed; retrying in 1s")
                await asyncio.sleep(1.0)
                continue
            finally:
                self._fetching = None
            if self._stopping.is_set():
                # A stop arrived while the fetch completed: hand these back untouched.
                for d in deliveries:
                    self._settler.add(Settle(d, "release"))
                break
            for delivery in deliveries:
                self._start(delivery)
            if not deliveries and self.burst and not self._running and await self._queues_idle(broker):
                return

    async def _queues_idle(self, broker: Broker) -> bool:
        await self._settler.drain()
        try:
            stats = await broker.stats(self.queues)
        except Exception:
            # Like a failed fetch: the broker is away for a moment; a burst worker keeps going.
            log.exception("reading queue stats failed; retrying in 1s")
            await asyncio.sleep(1.0)
            return False
        return all(s.depth == 0 and s.running == 0 for s in stats)

    def _start(self, delivery: Delivery) -> None:
        self._leases.hold(delivery)
        task = asyncio.create_task(self._execute(delivery), name=f"offload-job-{delivery.job_id}")
        self._running[delivery.job_id] = (delivery, task)
        task.add_done_callback(lambda _: self._finished(delivery))

    def _finished(self, delivery: Delivery) -> None:
        running = self._running.get(delivery.job_id)
        if running is not None and running[0].token == delivery.token:
            del self._running[delivery.job_id]
        self._leases.drop(delivery)
        self.processed += 1
        self._slot_freed.set()

    def _lease_lost(self, delivery: Delivery) -> None:
        log.warning("job %s: lease lost while running; its outcome will be refused", delivery.job_id)

    async def _shutdown(self) -> None:
        if self._running:
            tasks = [task for _, task in self._running.values()]
            _, pending = await asyncio.wait(tasks, timeout=self.grace)
            for task in pending:
                task.cancel()  # _execute hands the lease back when cancelled
            if pending:
                log.warning("grace period over: handing back %d unfinished job(s)", len(pending))
                await asyncio.wait(pending, timeout=5.0)

    # -- one job ---------------------------------------------------------------------------

    async def _execute(self, delivery: Delivery) -> None:
        settle = self._settle
        try:
            message = decode(delivery.body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            await settle(Settle(delivery, "dead", error=f"malformed job envelope: {exc}"))
            return
        task = self.app.tasks.get(message.task)
        if task is None:
            await settle(
                Settle(
                    delivery,
                    "dead",
                    error=(
                        f"unknown task {message.task!r}: this worker does not register it (deploy the "
                        "code that defines it, then replay the job from the dead-letter queue)"
                    ),
                ),
                message,
            )
            return
        try:
            result = await self._executors.run(
                task,
                list(message.args),
                dict(message.kwargs),
                message.timeout,
                delivery.attempts,
                message.created_at,
            )
        except asyncio.CancelledError:
            self._settler.add(Settle(delivery, "release"))
            raise
        except msgspec.ValidationError as exc:
            await settle(
                Settle(delivery, "dead", error=f"arguments do not match the task's types: {exc}"), message
            )
            return
        except EncodeError as exc:
            await settle(Settle(delivery, "dead", error=f"result could not be stored: {exc}"), message)
            return
        except Exception as exc:  # noqa: BLE001 - task code may raise anything; retry policy decides
            await settle(
                self._failure(delivery, message.max_deliveries, message.created_at, task, exc), message
            )
            return
        await settle(Settle(delivery, "ack", result=result), message)

    async def _settle(self, outcome: Settle, message: Message | None = None) -> None:
        """Settle, after the app's completion hooks when the job finished for good (ack / dead).

        The hooks run before the settle, so a crash in between re-runs the job and its hooks, which
        must therefore be idempotent (the webhook hook enqueues with an idempotency key).
        """
        if message is None or outcome.kind not in ("ack", "dead") or not self.app.completion_hooks:
            self._settler.add(outcome)
            return
        try:
            for hook in self.app.completion_hooks:
                try:
                    await hook(message, outcome)
                except Exception:
                    log.exception("job %s: completion hook %r failed", message.id, hook)
        finally:
            self._settler.add(outcome)  # also when cancelled during a hook: the job did finish

    def _failure(
        self, delivery: Delivery, max_deliveries: int, created_at: float, task: Any, exc: Exception
    ) -> Settle:
        if isinstance(exc, ProcessTaskError):
            decision = exc.decision
        else:
            decision = task.config.retry.decide(exc, delivery.attempts, time.time() - created_at)
        error = _describe(exc)
        if decision.retry and delivery.deliveries < max_deliveries:
            log.info(
                "job %s (%s) failed, retry in %.2fs: %s", delivery.job_id, task.name, decision.delay, error
            )
            return Settle(delivery, "retry", error=error, delay=decision.delay)
        reason = (
            decision.reason
            if not decision.retry
            else (f"max_deliveries ({max_deliveries}) reached; last error: {error}")
        )
        log.warning("job %s (%s) dead-lettered: %s", delivery.job_id, task.name, reason)
        return Settle(delivery, "dead", error=reason)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, Retry):
        return f"Retry: {exc}"
    return f"{type(exc).__name__}: {exc}"
