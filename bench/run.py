"""Run offload side by side with its peers, broker by broker, and report medians and ratios.

    .venv/bin/python -m bench.run [--quick] [--repeat N] [--groups ...] [--systems ...] [--scenarios ...]

Writes bench/results/latest.json (every run, medians, ratios per group) and bench/results/latest.md.
See bench/README.md for the groups, the systems and what each scenario measures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any

import redis

from bench import report, servers, source
from bench.scenarios import REPO_ROOT, SAMPLES, SCENARIOS, Context, Counts
from bench.systems import GROUPS, SYSTEMS, Settings, System

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
WORK_DIR = BENCH_DIR / ".work"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts, 1 repeat: a smoke test")
    parser.add_argument("--repeat", type=int, help="repeats per scenario (default 3; 1 with --quick)")
    parser.add_argument(
        "--groups",
        nargs="+",
        choices=list(GROUPS),
        default=list(GROUPS),
        help="broker groups to run (default: all); each is compared against its offload system",
    )
    parser.add_argument(
        "--systems",
        nargs="+",
        choices=list(SYSTEMS),
        help="only these systems (default: every system of the chosen groups)",
    )
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/5", help="flushed before each run")
    parser.add_argument(
        "--postgres-url",
        default="postgresql://root@127.0.0.1:5432/offload_bench",
        help="its database is dropped and created again before each run",
    )
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    parser.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    parser.add_argument(
        "--threads", type=int, default=8, help="threads per huey/dramatiq/celery worker process"
    )
    parser.add_argument(
        "--offload-concurrency",
        type=int,
        default=32,
        help="offload's --concurrency, and the async peers' (taskiq, saq, procrastinate, pgqueuer)",
    )
    parser.add_argument(
        "--offload-launcher",
        choices=["cli", "runner"],
        default="cli",
        help="start offload workers with the `offload worker` CLI (default) or bench.offload_worker",
    )
    parser.add_argument(
        "--no-snapshot",
        action="store_true",
        help="run offload from src/ as it is at each moment, not from a copy taken at the start",
    )
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "latest", help="path without suffix")
    args = parser.parse_args(argv)
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    return args


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _versions(redis_client: redis.Redis) -> dict[str, str]:
    out = {"python": platform.python_version()}
    packages = (
        "offload",
        "huey",
        "dramatiq",
        "celery",
        "kombu",
        "rq",
        "taskiq",
        "taskiq-redis",
        "saq",
        "procrastinate",
        "pgqueuer",
        "redis",
        "asyncpg",
        "psycopg",
        "aio-pika",
        "pika",
        "nats-py",
    )
    for package in packages:
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            if package != "psycopg":  # listed only when present: huey imports it if it can
                out[package] = "?"
    try:
        out["redis-server"] = str(redis_client.info("server")["redis_version"])
    except redis.RedisError:
        out["redis-server"] = "?"
    return out


def _imported_offload(settings: Settings) -> str:
    """Where the worker and client processes import offload from (checks the snapshot)."""
    ctx = Context(settings, Counts(), WORK_DIR)
    done = subprocess.run(
        [sys.executable, "-c", "import offload; print(offload.__file__)"],
        env=ctx.env(SYSTEMS[GROUPS["sqlite"]]),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    where = done.stdout.strip()
    if settings.offload_snapshot and not where.startswith(str(settings.offload_snapshot)):
        raise SystemExit(f"subprocesses import offload from {where}, not the snapshot")
    return where


def _reset_servers(settings: Settings, system: System, redis_client: redis.Redis) -> None:
    """Empty what the bench owns on the system's servers: its Redis DB, its PostgreSQL database,
    the RabbitMQ queues the system declares (named by the adapter, and for offload also those
    its state store lists: delay buckets)."""
    # offload-rabbitmq's queue names live in the Redis DB about to be flushed: read them first,
    # whichever system comes next, so no delay bucket of an earlier measurement is left behind.
    queues = [*system.amqp_queues, *_amqp_names_in(redis_client)]
    redis_client.flushdb()
    if "postgres" in system.servers:
        servers.reset_postgres(settings.postgres_url)
    if queues:
        servers.reset_amqp(settings.amqp_url, tuple(dict.fromkeys(queues)))


def _amqp_names_in(redis_client: redis.Redis) -> list[str]:
    """AMQP queue names offload's RabbitMQ broker recorded in its state store (a SET `...amqp`)."""
    names: list[str] = []
    for key in redis_client.scan_iter(match="*amqp", count=1000):
        if redis_client.type(key) == b"set":
            names += sorted(m.decode() for m in redis_client.smembers(key))
    return names


def _available(settings: Settings, systems: list[System]) -> tuple[list[System], dict[str, str]]:
    """The systems that can run here, and why each of the others cannot."""
    checks = {"postgres": servers.check_postgres, "rabbitmq": servers.check_amqp}
    urls = {"postgres": settings.postgres_url, "rabbitmq": settings.amqp_url}
    down: dict[str, str] = {}
    for kind, check in checks.items():
        if any(kind in s.servers for s in systems):
            try:
                check(urls[kind])
            except Exception as exc:
                down[kind] = f"{kind} server not reachable: {exc!r}"
    ok: list[System] = []
    skipped: dict[str, str] = {}
    for system in systems:
        reason = next((down[k] for k in system.servers if k in down), None)
        if reason is None:
            env = Context(settings, Counts(), WORK_DIR).env(system)
            reason = system.unavailable(settings, env)
        if reason is None:
            ok.append(system)
        else:
            skipped[system.name] = reason
            _log(f"SKIPPING {system.name}: {reason}")
    return ok, skipped


def _clean_up(settings: Settings, systems: list[System], redis_client: redis.Redis) -> None:
    """Leave no queues or exchanges of ours on the shared RabbitMQ server (the bench's Redis DB
    and PostgreSQL database stay, for inspection; the next run empties them)."""
    for system in systems:
        if "rabbitmq" in system.servers:
            try:
                queues = (*system.amqp_queues, *_amqp_names_in(redis_client))
                servers.reset_amqp(settings.amqp_url, tuple(dict.fromkeys(queues)), system.amqp_exchanges)
            except Exception as exc:
                _log(f"could not delete {system.name}'s RabbitMQ queues: {exc}")


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # unwinds through every `with workers:`, which stops them


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    counts = Counts.quick() if args.quick else Counts()
    shutil.rmtree(WORK_DIR, ignore_errors=True)
    WORK_DIR.mkdir(parents=True)
    code = {
        **source.git_state(REPO_ROOT),
        "fingerprint": source.fingerprint(),
        "snapshot": not args.no_snapshot,
    }
    settings = Settings(
        work_dir=WORK_DIR,
        redis_url=args.redis_url,
        threads=args.threads,
        offload_concurrency=args.offload_concurrency,
        offload_launcher=args.offload_launcher,
        offload_snapshot=None if args.no_snapshot else source.snapshot(WORK_DIR / "snapshot"),
        postgres_url=args.postgres_url,
        amqp_url=args.amqp_url,
        nats_url=args.nats_url,
    )
    code["imported_from"] = _imported_offload(settings)
    redis_client = redis.Redis.from_url(args.redis_url)
    redis_client.ping()
    names = args.systems or [name for name, s in SYSTEMS.items() if s.group in args.groups]
    systems, skipped = _available(settings, [SYSTEMS[name] for name in names])
    started = time.time()
    runs: list[dict[str, Any]] = []
    interrupted = False
    try:
        # Repeat-major, so slow drift of the machine spreads over every system alike.
        for repeat in range(1, args.repeat + 1):
            for system in systems:
                for scenario in args.scenarios:
                    runs.append(_measure(settings, counts, redis_client, system, scenario, repeat))
    except KeyboardInterrupt:
        interrupted = True
        _log("interrupted: reporting what was measured")
    code["fingerprint_at_end"] = source.fingerprint()
    if code["fingerprint_at_end"] != code["fingerprint"]:
        _log(
            "offload's source changed during the run"
            + ("; the snapshot taken at the start was measured" if settings.offload_snapshot else "")
        )
    _clean_up(settings, systems, redis_client)
    summary = report.medians(runs)
    for run in runs:
        run.pop(SAMPLES, None)  # 1,000 numbers per latency run: the summary has what they give
    names = [s.name for s in systems]
    groups = {
        group: {"baseline": baseline, "systems": [s.name for s in systems if s.group == group]}
        for group, baseline in GROUPS.items()
        if any(s.group == group for s in systems)
    }
    result = {
        "meta": {
            "command": " ".join(
                [".venv/bin/python -m bench.run", *(argv if argv is not None else sys.argv[1:])]
            ),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
            "elapsed_s": time.time() - started,
            "interrupted": interrupted,
            "repeat": args.repeat,
            "quick": args.quick,
            "systems": names,
            "groups": groups,
            "skipped": skipped,
            "scenarios": args.scenarios,
            "counts": dataclasses.asdict(counts),
            "threads": args.threads,
            "offload_concurrency": args.offload_concurrency,
            "offload_launcher": args.offload_launcher,
            "offload_source": code,
            "machine": f"{os.cpu_count()} CPUs, {platform.platform()}",
            "versions": _versions(redis_client),
            "notes": {s.name: s.notes for s in systems},
        },
        "runs": runs,
        "summary": summary,
        "ratios": {
            group: report.ratios(summary, info["baseline"], info["systems"]) for group, info in groups.items()
        },
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    text = report.markdown(result)
    args.output.with_suffix(".md").write_text(text)
    print(text)
    _log(f"wrote {args.output.with_suffix('.json')} and {args.output.with_suffix('.md')}")
    return 130 if interrupted else 0


def _measure(
    settings: Settings, counts: Counts, redis_client: redis.Redis, system: Any, scenario: str, repeat: int
) -> dict[str, Any]:
    run_dir = WORK_DIR / "runs" / f"{system.name}-{scenario}-{repeat}"
    run_dir.mkdir(parents=True)
    ctx = Context(settings, counts, run_dir)
    _log(f"repeat {repeat}: {system.name} {scenario} ...")
    begin = time.monotonic()
    record: dict[str, Any] = {"system": system.name, "scenario": scenario, "repeat": repeat}
    try:
        _reset_servers(settings, system, redis_client)
        system.reset(settings, ctx.env(system))
        record["metrics"] = SCENARIOS[scenario](ctx, system)
        samples = record["metrics"].pop(SAMPLES, None)
        if samples is not None:
            record[SAMPLES] = samples  # pooled by report.medians, dropped before the JSON is written
        detail = record["metrics"].pop("detail", None)
        if detail:
            record["detail"] = detail
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
        _log(f"  FAILED: {record['error']}\n{traceback.format_exc()}")
    record["seconds"] = time.monotonic() - begin
    if "metrics" in record:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in record["metrics"].items())
        if record.get("detail"):
            shown += f"; {record['detail']}"
        _log(f"  {shown} ({record['seconds']:.1f}s)")
    else:
        # keep the logs of a failed run for inspection; drop the others' records
        return record
    shutil.rmtree(run_dir / "records", ignore_errors=True)
    return record


if __name__ == "__main__":
    sys.exit(main())
