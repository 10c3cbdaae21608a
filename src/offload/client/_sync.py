"""The blocking client: a thin shell over `_base` that sends, reads and sleeps with httpx.Client."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import httpx

from offload.client._base import RETRYABLE_TRANSPORT, BaseClient, Call, Named, decode
from offload.client._models import CancelResult, Count, Job, JobAccepted, QueueStats
from offload.client._retry import RetryConfig


class Client(BaseClient):
    """A blocking client of the offload HTTP API. See `offload.client` for an example.

    base_url:  e.g. "http://127.0.0.1:8000" (paths are appended: "/v1/jobs", ...)
    api_key:   sent as `Authorization: Bearer ...`; default the OFFLOAD_API_KEY variable
    timeout:   seconds for connecting, and for each read (long-polls add their wait to it)
    retry:     the retry schedule, deadline and injected clock / sleep / random
    transport: an httpx transport (httpx.MockTransport in tests, a WSGI/ASGI one, ...)
    headers:   extra headers sent with every request
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 10.0,
        retry: RetryConfig | None = None,
        transport: httpx.BaseTransport | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout=timeout, retry=retry, headers=headers)
        self._http = httpx.Client(
            base_url=self.base_url, headers=self._headers, timeout=self.timeout, transport=transport
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    # -- the API ---------------------------------------------------------------------------

    def submit(
        self,
        task: str | Named,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        queue: str | None = None,
        priority: int | None = None,
        delay: float | None = None,
        webhook: str | None = None,
        idempotency_key: str | None = None,
    ) -> JobAccepted:
        """Submit a job of a public task: `submit("resize", [42], {"width": 640})`.

        Every retry sends the same `Idempotency-Key` (`idempotency_key`, else a fresh uuid4 per
        call), so a retried submit never makes a second job.
        """
        req = self._submit_req(task, args, kwargs, queue, priority, delay, webhook, idempotency_key)
        return decode(self._send(self._call(req)), JobAccepted)

    def get(self, job_id: str) -> Job:
        """The job's current state."""
        return decode(self._send(self._call(self._get_req(job_id))), Job)

    def wait(self, job_id: str, timeout: float | None = None, *, stream: bool = False) -> Job:
        """Block until the job is finished or `timeout` seconds pass; return its latest state.

        Check `job.finished`: after a timeout the job may still be queued or running.
        stream=False long-polls `GET /v1/jobs/{id}?wait=N`; stream=True reads the event stream.
        """
        if stream:
            return self._wait_stream(job_id, timeout)
        poll = self._long_poll(job_id, timeout)
        while (call := poll.next_call()) is not None:
            poll.feed(self._send(call))
        return poll.result()

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued job: True if this call cancelled it (False if it was running or finished)."""
        return decode(self._send(self._call(self._cancel_req(job_id))), CancelResult).cancelled

    def queues(self) -> list[QueueStats]:
        """Every queue's counts."""
        return decode(self._send(self._call(self._queues_req())), list[QueueStats])

    def dead(self, queue: str | None = None, limit: int | None = None) -> list[Job]:
        """Dead-lettered jobs (admin scope)."""
        return decode(self._send(self._call(self._dead_req(queue, limit))), list[Job])

    def replay(self, ids: Sequence[str] | None = None, *, queue: str | None = None, all: bool = False) -> int:
        """Move dead jobs back to their queues: give ids, a queue or all=True (admin scope)."""
        return decode(self._send(self._call(self._dlq_req("replay", ids, queue, all))), Count).count

    def purge_dead(
        self, ids: Sequence[str] | None = None, *, queue: str | None = None, all: bool = False
    ) -> int:
        """Delete dead jobs: give ids, a queue or all=True (admin scope)."""
        return decode(self._send(self._call(self._dlq_req("purge", ids, queue, all))), Count).count

    def ready(self) -> bool:
        """`GET /readyz` once, without retries: True when the server and its broker answer."""
        try:
            return self._http.get("/readyz").is_success
        except RETRYABLE_TRANSPORT:
            return False

    # -- the shell -------------------------------------------------------------------------

    def _send(self, call: Call) -> httpx.Response:
        while True:
            try:
                response = self._http.send(call.request(self._http, self.timeout))
            except RETRYABLE_TRANSPORT as exc:
                self.retry.sleep(call.failed(exc))
                continue
            delay = call.answered(response)
            if delay is None:
                return response
            self.retry.sleep(delay)

    def _wait_stream(self, job_id: str, timeout: float | None) -> Job:
        events = self._event_stream(job_id, timeout)
        while (call := events.next_call()) is not None:
            try:
                response = self._http.send(call.request(self._http, self.timeout), stream=True)
                try:
                    if not response.is_success:
                        response.read()
                    delay = call.answered(response)
                    if delay is None:
                        for line in response.iter_lines():
                            if events.feed(line):
                                break
                        delay = events.ended()
                finally:
                    response.close()
            except RETRYABLE_TRANSPORT as exc:
                delay = events.failed(exc)
            if not events.done():
                self.retry.sleep(delay)
        return events.result()
