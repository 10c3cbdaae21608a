"""The measurements. Each runs one system once, from an empty queue, and returns its metrics.

Throughput of a drain is counted from the first job started to the last finished (as the jobs
themselves recorded), so process start-up and imports are left out; the wall time from spawning
the workers is reported beside it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from bench.procs import Workers, count_records, read_records, wait_for_records
from bench.systems import Settings, System

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Counts:
    enqueue_one: int = 2_000
    enqueue_bulk: int = 20_000
    drain: int = 20_000
    latency_rate: float = 200.0
    latency_seconds: float = 5.0
    latency_idle: float = 1.0  # seconds the worker sits idle before the paced run
    cpu: int = 5_000

    @classmethod
    def quick(cls) -> Counts:
        return cls(
            enqueue_one=200,
            enqueue_bulk=2_000,
            drain=2_000,
            latency_seconds=1.0,
            latency_idle=0.5,
            cpu=500,
        )


@dataclass
class Context:
    settings: Settings
    counts: Counts
    run_dir: Path  # records and logs of this measurement

    def env(self, system: System, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        snapshot = self.settings.offload_snapshot
        path = [str(snapshot) if snapshot else None, str(REPO_ROOT), env.get("PYTHONPATH")]
        env.update(
            PYTHONPATH=os.pathsep.join(filter(None, path)),
            PYTHONUNBUFFERED="1",
            BENCH_WORK_DIR=str(self.settings.work_dir),
            BENCH_REDIS_URL=self.settings.redis_url,
        )
        env.update(system.env(self.settings))
        env.update(extra)
        return env


def client(ctx: Context, system: System, action: str, count: int, **options: Any) -> dict[str, float]:
    """Run bench.client for `system` and return what it printed."""
    command = [sys.executable, "-m", "bench.client", system.name, action, "--count", str(count)]
    for key, value in options.items():
        command += [f"--{key}", str(value)]
    timeout = 120 + count / 50
    done = subprocess.run(
        command,
        env=ctx.env(system),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _start_workers(ctx: Context, system: System, processes: int) -> tuple[Workers, Path]:
    records = ctx.run_dir / "records"
    records.mkdir(parents=True, exist_ok=True)
    env = ctx.env(system, BENCH_RECORD_DIR=str(records))
    commands = system.worker_commands(ctx.settings, processes)
    return Workers(commands, env, ctx.run_dir / "logs"), records


# -- scenarios -------------------------------------------------------------------------------


def enqueue_one(ctx: Context, system: System) -> dict[str, float]:
    n = ctx.counts.enqueue_one
    out = client(ctx, system, "enqueue-one", n)
    return {"jobs_per_s": n / out["seconds"]}


def enqueue_bulk(ctx: Context, system: System) -> dict[str, float]:
    n = ctx.counts.enqueue_bulk
    out = client(ctx, system, "enqueue-bulk", n)
    return {"jobs_per_s": n / out["seconds"]}


def _redis_cpu_seconds(ctx: Context, system: System) -> float:
    """CPU used so far by the Redis server, for systems whose store it is (else 0)."""
    if not system.uses_redis:
        return 0.0
    info = redis.Redis.from_url(ctx.settings.redis_url).info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def _drain(ctx: Context, system: System, processes: int, kind: str, n: int) -> dict[str, float]:
    client(ctx, system, "enqueue-bulk", n, kind=kind)
    workers, records = _start_workers(ctx, system, processes)
    timeout = max(60.0, n / 100)
    with workers:
        spawned = time.time()
        workers.start_sampling()
        # CPU is counted from the first job done, so imports and start-up are left out.
        wait_for_records(records, 1, timeout=timeout, workers=workers)
        cpu_before = workers.cpu_seconds() + _redis_cpu_seconds(ctx, system)
        done_before = count_records(records)
        done = wait_for_records(records, n, timeout=timeout, workers=workers)
        cpu = workers.cpu_seconds() + _redis_cpu_seconds(ctx, system) - cpu_before
        workers.stop_sampling()
    rows = read_records(records)
    first_start = min(started for _, started, _ in rows)
    last_end = max(finished for _, _, finished in rows)
    peaks = workers.peak_rss.values()
    return {
        "jobs_per_s": n / (last_end - first_start),
        "wall_jobs_per_s": n / (done - spawned),
        "startup_s": first_start - spawned,
        "rss_max_mb": max(peaks, default=0) / 2**20,
        "rss_total_mb": sum(peaks) / 2**20,
        "processes_seen": len(workers.peak_rss),
        "cpu_us_per_job": cpu / max(1, n - done_before) * 1e6,
    }


def drain_1p(ctx: Context, system: System) -> dict[str, float]:
    return _drain(ctx, system, 1, "noop", ctx.counts.drain)


def drain_2p(ctx: Context, system: System) -> dict[str, float]:
    return _drain(ctx, system, 2, "noop", ctx.counts.drain)


def cpu_2p(ctx: Context, system: System) -> dict[str, float]:
    return _drain(ctx, system, 2, "cpu", ctx.counts.cpu)


def latency(ctx: Context, system: System) -> dict[str, float]:
    counts = ctx.counts
    n = round(counts.latency_rate * counts.latency_seconds)
    workers, records = _start_workers(ctx, system, 1)
    with workers:
        client(ctx, system, "enqueue-one", 1)  # warm-up job, stamped 0: left out below
        wait_for_records(records, 1, timeout=60.0, workers=workers)
        time.sleep(counts.latency_idle)
        sent = client(ctx, system, "paced", n, rate=counts.latency_rate)
        wait_for_records(records, n + 1, timeout=60.0 + counts.latency_seconds, workers=workers)
    waits = sorted(started - enqueued for enqueued, started, _ in read_records(records) if enqueued > 0)
    return {
        "p50_ms": percentile(waits, 50) * 1000,
        "p90_ms": percentile(waits, 90) * 1000,
        "p99_ms": percentile(waits, 99) * 1000,
        "max_ms": waits[-1] * 1000,
        "sent_per_s": n / sent["seconds"],
        "producer_late_max_ms": sent["late_max_s"] * 1000,
    }


def percentile(sorted_values: list[float], pct: float) -> float:
    """Linear-interpolated percentile of already sorted values."""
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * pct / 100
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


SCENARIOS = {
    "enqueue-one": enqueue_one,
    "enqueue-bulk": enqueue_bulk,
    "drain-1p": drain_1p,
    "drain-2p": drain_2p,
    "latency": latency,
    "cpu-2p": cpu_2p,
}
