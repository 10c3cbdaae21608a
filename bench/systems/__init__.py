"""The systems under test, by name."""

from __future__ import annotations

from bench.systems.base import Producer, Settings, System
from bench.systems.dramatiq_sys import DramatiqSystem
from bench.systems.huey_sys import HueySystem
from bench.systems.offload_sys import OffloadSystem

BASELINE = "offload-sqlite-strict"

SYSTEMS: dict[str, System] = {
    s.name: s
    for s in (
        OffloadSystem("strict"),
        OffloadSystem("fast"),
        HueySystem("sqlite"),
        HueySystem("redis"),
        DramatiqSystem(),
    )
}

__all__ = ["BASELINE", "SYSTEMS", "Producer", "Settings", "System"]
