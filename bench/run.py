"""Run offload side by side with huey and dramatiq and report medians and ratios.

    .venv/bin/python -m bench.run [--quick] [--repeat N] [--systems ...] [--scenarios ...]

Writes bench/results/latest.json (every run, medians, ratios) and bench/results/latest.md.
See bench/README.md for what each scenario measures.
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

from bench import report, source
from bench.scenarios import REPO_ROOT, SCENARIOS, Context, Counts
from bench.systems import BASELINE, SYSTEMS, Settings

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
WORK_DIR = BENCH_DIR / ".work"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts, 1 repeat: a smoke test")
    parser.add_argument("--repeat", type=int, help="repeats per scenario (default 3; 1 with --quick)")
    parser.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=list(SYSTEMS))
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/5", help="flushed before each run")
    parser.add_argument("--threads", type=int, default=8, help="threads per huey/dramatiq worker process")
    parser.add_argument("--offload-concurrency", type=int, default=32)
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
    for package in ("offload", "huey", "dramatiq", "redis", "psycopg"):
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
        env=ctx.env(SYSTEMS[BASELINE]),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    where = done.stdout.strip()
    if settings.offload_snapshot and not where.startswith(str(settings.offload_snapshot)):
        raise SystemExit(f"subprocesses import offload from {where}, not the snapshot")
    return where


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
    )
    code["imported_from"] = _imported_offload(settings)
    redis_client = redis.Redis.from_url(args.redis_url)
    redis_client.ping()
    systems = [SYSTEMS[name] for name in args.systems]
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
    summary = report.medians(runs)
    names = [s.name for s in systems]
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
            "scenarios": args.scenarios,
            "baseline": BASELINE,
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
        "ratios": report.ratios(summary, BASELINE, names),
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
    redis_client.flushdb()
    system.reset(settings)
    ctx = Context(settings, counts, run_dir)
    _log(f"repeat {repeat}: {system.name} {scenario} ...")
    begin = time.monotonic()
    record: dict[str, Any] = {"system": system.name, "scenario": scenario, "repeat": repeat}
    try:
        record["metrics"] = SCENARIOS[scenario](ctx, system)
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
        _log(f"  FAILED: {record['error']}\n{traceback.format_exc()}")
    record["seconds"] = time.monotonic() - begin
    if "metrics" in record:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in record["metrics"].items())
        _log(f"  {shown} ({record['seconds']:.1f}s)")
    else:
        # keep the logs of a failed run for inspection; drop the others' records
        return record
    shutil.rmtree(run_dir / "records", ignore_errors=True)
    return record


if __name__ == "__main__":
    sys.exit(main())
