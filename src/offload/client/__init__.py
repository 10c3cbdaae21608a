"""The Python client of the offload HTTP API (`offload api`), blocking and asyncio.

    from offload.client import Client, InvalidArguments

    with Client("http://127.0.0.1:8000", api_key="...") as client:
        accepted = client.submit("resize", [42], {"width": 640}, queue="images")
        job = client.wait(accepted.id, timeout=30)       # long-polls; stream=True reads SSE
        if job.finished and job.state == "succeeded":
            print(job.result)

    from offload.client import AsyncClient

    async with AsyncClient("http://127.0.0.1:8000", api_key="...") as client:
        accepted = await client.submit("resize", [42], {"width": 640})
        job = await client.wait(accepted.id, timeout=30)

`submit(task, args=(), kwargs=None, *, queue, priority, delay, webhook, idempotency_key)` takes the
task's arguments as a list and a dict, so they never clash with the options; `task` is the task's
name or its `Task`. Other calls: `get(id)`, `wait(id, timeout=None, *, stream=False)` (returns the
latest state when `timeout` passes: check `job.finished`), `cancel(id) -> bool`, `queues()`,
`dead()`, `replay(...)`, `purge_dead(...)`, `ready()`.

Retries (`RetryConfig`): a 429 or 503 waits its `Retry-After`; a connection error, a timeout or
another 5xx waits `uniform(0, min(cap, base * 2**n))` (1, 2, 4, 8, 16, 16... s); other 4xx are
raised at once. After `deadline` seconds (60) or `max_attempts` (10) the call raises `GiveUp`
with the last error. A submit sends one `Idempotency-Key` on all its attempts, so a retry never
makes a second job; GETs, cancel and the DLQ calls are idempotent and retried the same way.
Tests inject `RetryConfig(clock=..., sleep=..., async_sleep=..., random=...)` and an
`httpx.MockTransport`.

Errors come from the problem+json body: `ApiError(status, problem)` and its subclasses
(`Unauthorized`, `Forbidden`, `NotFound`, `InvalidArguments` with `.errors`, `RateLimited`,
`Overloaded` with `.queue/.depth/.max_depth`, ...); see `offload.client._errors`.
"""

from offload.client._async import AsyncClient
from offload.client._errors import (
    ApiError,
    BadRequest,
    ClientError,
    FieldError,
    Forbidden,
    GiveUp,
    InvalidArguments,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    ProtocolError,
    RateLimited,
    ServerError,
    Unauthorized,
    UnsupportedMediaType,
)
from offload.client._models import Job, JobAccepted, QueueStats
from offload.client._retry import RetryConfig
from offload.client._sse import ServerSentEvent, SSEDecoder
from offload.client._sync import Client
from offload.job import JobState

__all__ = [
    "ApiError",
    "AsyncClient",
    "BadRequest",
    "Client",
    "ClientError",
    "FieldError",
    "Forbidden",
    "GiveUp",
    "InvalidArguments",
    "Job",
    "JobAccepted",
    "JobState",
    "NotFound",
    "Overloaded",
    "PayloadTooLarge",
    "ProtocolError",
    "QueueStats",
    "RateLimited",
    "RetryConfig",
    "SSEDecoder",
    "ServerError",
    "ServerSentEvent",
    "Unauthorized",
    "UnsupportedMediaType",
]
