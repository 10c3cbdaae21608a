"""The systems under test, by name, and the broker groups they are compared in."""

from __future__ import annotations

from bench.systems.base import NATS, POSTGRES, RABBITMQ, REDIS, SQLITE, Producer, Settings, System
from bench.systems.celery_sys import CelerySystem
from bench.systems.dramatiq_sys import DramatiqSystem
from bench.systems.huey_sys import HueySystem
from bench.systems.offload_sys import OffloadSystem
from bench.systems.pgqueuer_sys import PgqueuerSystem
from bench.systems.procrastinate_sys import ProcrastinateSystem
from bench.systems.rq_sys import RqSystem
from bench.systems.saq_sys import SaqSystem
from bench.systems.taskiq_sys import TaskiqSystem

# Each group compares the systems on one broker; its offload system is the ratios' baseline.
GROUPS: dict[str, str] = {
    SQLITE: "offload-sqlite-strict",
    REDIS: "offload-redis",
    POSTGRES: "offload-postgres",
    RABBITMQ: "offload-rabbitmq",
    NATS: "offload-nats",
}

SYSTEMS: dict[str, System] = {
    s.name: s
    for s in (
        OffloadSystem(SQLITE, "strict"),
        OffloadSystem(SQLITE, "fast"),
        HueySystem("sqlite"),
        OffloadSystem(REDIS),
        OffloadSystem(REDIS, async_task=True),
        HueySystem("redis"),
        DramatiqSystem(REDIS),
        CelerySystem(REDIS),
        RqSystem(),
        TaskiqSystem(),
        SaqSystem(),
        OffloadSystem(POSTGRES),
        ProcrastinateSystem(),
        PgqueuerSystem(),
        OffloadSystem(RABBITMQ),
        DramatiqSystem(RABBITMQ),
        DramatiqSystem(RABBITMQ, confirms=True),
        CelerySystem(RABBITMQ),
        OffloadSystem(NATS),
    )
}

assert all(s.group in GROUPS for s in SYSTEMS.values())
assert all(SYSTEMS[baseline].group == group for group, baseline in GROUPS.items())

__all__ = ["GROUPS", "SYSTEMS", "Producer", "Settings", "System"]
