"""The worker runtime: fetch (bounded prefetch) -> execute -> settle, with leases renewed."""

from offload.worker.loop import Worker

__all__ = ["Worker"]
