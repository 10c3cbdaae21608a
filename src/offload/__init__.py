"""offload: move slow or expensive work off the request path.

from offload import App
app = App()

@app.task(retries=5, timeout=30)
def resize(image_id: int, width: int) -> str: ...

job = resize.send(42, width=640)
job.result(timeout=10)
"""

from offload.app import App
from offload.errors import (
    BrokerError,
    ConfigurationError,
    EncodeError,
    JobFailed,
    JobNotFound,
    LeaseLost,
    MissingExtraError,
    NonRetryable,
    OffloadError,
    QueueFull,
    Retry,
    TaskTimeout,
    UnknownTaskError,
)
from offload.job import JobInfo, JobState
from offload.job_handle import Job
from offload.message import Message
from offload.retry import RetryPolicy
from offload.task import Task, TaskCall

__all__ = [
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
