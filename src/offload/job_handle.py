"""`Job`: the handle `send` returns, to follow one job from sync or async code."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generic, TypeVar

import msgspec

from offload.errors import JobFailed, JobNotFound
from offload.job import JobInfo, JobState

if TYPE_CHECKING:
    from offload.app import App

R = TypeVar("R")


class Job(Generic[R]):
    """A job sent to a queue. `created` is False when an idempotency key matched an earlier job."""

    __slots__ = ("app", "created", "id", "return_type")

    def __init__(self, app: App, job_id: str, created: bool = True, return_type: Any = None) -> None:
        self.app = app
        self.id = job_id
        self.created = created
        self.return_type = return_type

    def __repr__(self) -> str:
        return f"<Job {self.id}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Job) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    # -- async -----------------------------------------------------------------------------

    async def info_async(self) -> JobInfo:
        broker = await self.app.broker()
        info = await broker.get_job(self.id)
        if info is None:
            raise JobNotFound(f"no job {self.id}: it never existed or was pruned after its result_ttl")
        return info

    async def wait(self, timeout: float | None = None) -> R:
        """Wait for the job to finish and return its result (raises JobFailed, TimeoutError)."""
        broker = await self.app.broker()
        remaining = 10 * 365 * 86_400.0 if timeout is None else timeout
        info = await broker.wait_job(self.id, remaining)
        if info is None:
            raise JobNotFound(f"no job {self.id}: it never existed or was pruned after its result_ttl")
        return self._outcome(info, timeout)

    async def cancel_async(self) -> bool:
        broker = await self.app.broker()
        return await broker.cancel(self.id)

    # -- sync ------------------------------------------------------------------------------

    def info(self) -> JobInfo:
        return self.app.portal.call(self.info_async)

    def status(self) -> JobState:
        return self.info().state

    def result(self, timeout: float | None = None) -> R:
        """Block until the job finishes and return its result (raises JobFailed, TimeoutError)."""

        async def wait() -> R:
            return await self.wait(timeout)

        return self.app.portal.call(wait)

    def cancel(self) -> bool:
        """Cancel the job if it has not started. Returns whether it was cancelled."""
        return self.app.portal.call(self.cancel_async)

    def _outcome(self, info: JobInfo, timeout: float | None) -> R:
        if info.state is JobState.SUCCEEDED:
            if self.return_type is not None:
                converted: R = msgspec.convert(info.result, self.return_type, strict=False)
                return converted
            result: R = info.result
            return result
        if info.state.finished:
            raise JobFailed(self.id, info.state.value, info.error)
        raise TimeoutError(f"job {self.id} still {info.state.value} after {timeout}s")
