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

from bench import calls
from bench.procs import Workers, count_records, read_records, wait_for_records
from bench.servers import Probes, ops_delta
from bench.systems import Settings, System

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Counts:
    enqueue_one: int = 2_000
    enqueue_concurrent: int = 10_000
    senders: int = 16  # callers at once in enqueue-concurrent
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
            enqueue_concurrent=1_000,
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
            BENCH_POSTGRES_URL=self.settings.postgres_url,
            BENCH_AMQP_URL=self.settings.amqp_url,
            BENCH_NATS_URL=self.settings.nats_url,
            BENCH_PROBE_SERVERS=",".join(system.servers),
        )
        env.update(system.env(self.settings))
        env.update(extra)
        return env


def client(ctx: Context, system: System, action: str, count: int, **options: Any) -> dict[str, Any]:
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
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _start_workers(ctx: Context, system: System, processes: int) -> tuple[Workers, Path]:
    records = ctx.run_dir / "records"
    records.mkdir(parents=True, exist_ok=True)
    env = ctx.env(system, BENCH_RECORD_DIR=str(records), BENCH_CALLS_DIR=str(ctx.run_dir))
    commands = system.worker_commands(ctx.settings, processes)
    return Workers(commands, env, ctx.run_dir / "logs"), records


# -- scenarios -------------------------------------------------------------------------------


def _enqueue(ctx: Context, system: System, action: str, n: int, **options: Any) -> dict[str, Any]:
    out = client(ctx, system, action, n, probe=1, **options)
    metrics: dict[str, Any] = {
        "jobs_per_s": n / out["seconds"],
        "client_cpu_us_per_job": out["cpu_s"] / n * 1e6,
    }
    if system.servers:
        metrics["requests_per_job"] = sum(out["requests"].values()) / n
        metrics["detail"] = {"requests": out["requests"], "ops_jobs": n}
    if "ops" in out:
        total = sum(out["ops"].values())
        metrics["ops_per_job"] = total / n
        metrics["ops_background_share"] = out["ops_background"] / max(1, total)
        metrics["detail"]["ops"] = out["ops"]
    return metrics


def enqueue_one(ctx: Context, system: System) -> dict[str, Any]:
    return _enqueue(ctx, system, "enqueue-one", ctx.counts.enqueue_one)


def enqueue_concurrent(ctx: Context, system: System) -> dict[str, Any]:
    counts = ctx.counts
    return _enqueue(ctx, system, "enqueue-concurrent", counts.enqueue_concurrent, senders=counts.senders)


def enqueue_bulk(ctx: Context, system: System) -> dict[str, Any]:
    return _enqueue(ctx, system, "enqueue-bulk", ctx.counts.enqueue_bulk)


def _drain(ctx: Context, system: System, processes: int, kind: str, n: int) -> dict[str, Any]:
    n = min(n, system.drain_cap or n)
    client(ctx, system, "enqueue-bulk", n, kind=kind)
    probes = Probes(system.servers, ctx.env(system))
    try:
        return _drain_probed(ctx, system, processes, n, probes)
    finally:
        probes.close()


def _drain_probed(ctx: Context, system: System, processes: int, n: int, probes: Probes) -> dict[str, Any]:
    # Operations are counted from the first job done to the last where the server counts them at
    # once (Redis); where it reports them late (PostgreSQL), over the workers' whole life.
    lagging = probes.lag > 0
    background = probes.background_rate() if probes.counts_ops else 0.0  # others' operations
    if lagging:
        time.sleep(probes.lag)
        ops_before, ops_since = probes.ops(), time.monotonic()
    workers, records = _start_workers(ctx, system, processes)
    timeout = max(60.0, n / 100)
    with workers:
        spawned = time.time()
        workers.start_sampling()
        # CPU is counted from the first job done, so imports and start-up are left out.
        wait_for_records(records, 1, timeout=timeout, workers=workers)
        worker_cpu_before, server_cpu_before = workers.cpu_seconds(), probes.cpu_seconds()
        requests_before = probes.requests(p.pid for p in workers.tree())
        if not lagging:
            ops_before, ops_since = probes.ops(), time.monotonic()
        done_before = count_records(records)
        done = wait_for_records(records, n, timeout=timeout, workers=workers)
        worker_cpu = workers.cpu_seconds() - worker_cpu_before
        server_cpu = probes.cpu_seconds() - server_cpu_before
        requests = ops_delta(requests_before, probes.requests(p.pid for p in workers.tree()))
        if not lagging:
            ops_after, ops_until = probes.ops(), time.monotonic()
        workers.stop_sampling()
    if lagging:
        time.sleep(probes.lag)
        ops_after, ops_until = probes.ops(), time.monotonic()
    rows = read_records(records)
    broker_calls = calls.read(ctx.run_dir)  # offload only: written by its workers as they exit
    first_start = min(started for _, started, _ in rows)
    last_end = max(finished for _, _, finished in rows)
    peaks = workers.peak_rss.values()
    counted = max(1, n - done_before)
    metrics: dict[str, Any] = {
        "jobs_per_s": n / (last_end - first_start),
        "wall_jobs_per_s": n / (done - spawned),
        "startup_s": first_start - spawned,
        "rss_max_mb": max(peaks, default=0) / 2**20,
        "rss_total_mb": sum(peaks) / 2**20,
        "processes_seen": len(workers.peak_rss),
        "jobs": n,
        "cpu_us_per_job": (worker_cpu + server_cpu) / counted * 1e6,
        "worker_cpu_us_per_job": worker_cpu / counted * 1e6,
    }
    if system.servers:
        metrics["server_cpu_us_per_job"] = server_cpu / counted * 1e6
        metrics["requests_per_job"] = sum(requests.values()) / counted
        metrics["detail"] = {"requests": requests, "requests_jobs": counted}
    if broker_calls:
        metrics["fetch_calls_per_job"] = broker_calls.get("fetch_calls", 0) / n
        metrics["settle_calls_per_job"] = broker_calls.get("settle_calls", 0) / n
        metrics.setdefault("detail", {})["calls"] = broker_calls
    if probes.counts_ops:
        ops = ops_delta(ops_before, ops_after)
        total = sum(ops.values())
        metrics["ops_per_job"] = total / (n if lagging else counted)
        metrics["ops_background_share"] = background * (ops_until - ops_since) / max(1, total)
        metrics["detail"].update(ops=ops, ops_jobs=n if lagging else counted)
    return metrics


def drain_1p(ctx: Context, system: System) -> dict[str, Any]:
    return _drain(ctx, system, 1, "noop", ctx.counts.drain)


def drain_2p(ctx: Context, system: System) -> dict[str, Any]:
    return _drain(ctx, system, 2, "noop", ctx.counts.drain)


def cpu_2p(ctx: Context, system: System) -> dict[str, Any]:
    return _drain(ctx, system, 2, "cpu", ctx.counts.cpu)


def latency(ctx: Context, system: System) -> dict[str, Any]:
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
        # Every job's wait, for percentiles over all repeats pooled (report.medians); not written
        # to the JSON.
        SAMPLES: [w * 1000 for w in waits],
    }


SAMPLES = "samples_ms"  # a latency run's metric holding each job's wait (ms)


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
    "enqueue-concurrent": enqueue_concurrent,
    "enqueue-bulk": enqueue_bulk,
    "drain-1p": drain_1p,
    "drain-2p": drain_2p,
    "latency": latency,
    "cpu-2p": cpu_2p,
}
