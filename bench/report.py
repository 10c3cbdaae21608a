"""Medians over repeats, and per broker group: the table, the ratios against the group's offload
system, and where the time goes (server operations and CPU per job)."""

from __future__ import annotations

import math
import statistics
from typing import Any

from bench.scenarios import SAMPLES, percentile

# (label, scenario, metric, higher is better)
ROWS: list[tuple[str, str, str, bool]] = [
    ("enqueue one by one (jobs/s)", "enqueue-one", "jobs_per_s", True),
    ("enqueue one per call, 16 callers at once (jobs/s)", "enqueue-concurrent", "jobs_per_s", True),
    ("enqueue bulk (jobs/s)", "enqueue-bulk", "jobs_per_s", True),
    ("drain no-op, 1 process (jobs/s)", "drain-1p", "jobs_per_s", True),
    ("drain no-op, 2 processes (jobs/s)", "drain-2p", "jobs_per_s", True),
    ("latency p50 at 200/s (ms)", "latency", "p50_ms", False),
    ("latency p90 at 200/s (ms)", "latency", "p90_ms", False),
    ("latency p99 at 200/s (ms)", "latency", "p99_ms", False),
    ("1 ms CPU jobs, 2 processes (jobs/s)", "cpu-2p", "jobs_per_s", True),
    ("CPU per no-op job, 1-process drain, workers + server (µs)", "drain-1p", "cpu_us_per_job", False),
    ("peak RSS per worker process, 1-process drain (MB)", "drain-1p", "rss_max_mb", False),
    ("peak RSS per worker process, 2-process drain (MB)", "drain-2p", "rss_max_mb", False),
]
WORSE = 0.95  # ratios below this are flagged: the baseline is more than 5% worse

# Context rows: shown in the table, not in the ratios.
EXTRA_ROWS: list[tuple[str, str, str]] = [
    ("drain no-op, 1 process, incl. start-up (jobs/s)", "drain-1p", "wall_jobs_per_s"),
    ("drain no-op, 2 processes, incl. start-up (jobs/s)", "drain-2p", "wall_jobs_per_s"),
    ("CPU per no-op job, 2-process drain, workers + server (µs)", "drain-2p", "cpu_us_per_job"),
    ("CPU per 1 ms CPU job, 2 processes (µs)", "cpu-2p", "cpu_us_per_job"),
    ("worker start-up to first job, 1 process (s)", "drain-1p", "startup_s"),
    ("latency max (ms)", "latency", "max_ms"),
    ("paced producer achieved (jobs/s)", "latency", "sent_per_s"),
]


def medians(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """system -> scenario -> metric -> median over the successful repeats.

    Latency percentiles are the exception: they are taken over every job of every repeat pooled
    (3 x 1,000 waits by default), not as the median of each repeat's percentile. A repeat's p99 is
    its tenth-slowest job, and one noisy repeat moves it a lot; pooling gives the tail three times
    the samples.
    """
    grouped: dict[str, dict[str, dict[str, list[float]]]] = {}
    pooled: dict[tuple[str, str], list[float]] = {}
    for run in runs:
        if run.get("error"):
            continue
        metrics = grouped.setdefault(run["system"], {}).setdefault(run["scenario"], {})
        for key, value in run["metrics"].items():
            if isinstance(value, int | float):
                metrics.setdefault(key, []).append(value)
        if SAMPLES in run:
            pooled.setdefault((run["system"], run["scenario"]), []).extend(run[SAMPLES])
    summary = {
        system: {
            scenario: {key: statistics.median(values) for key, values in metrics.items()}
            for scenario, metrics in scenarios.items()
        }
        for system, scenarios in grouped.items()
    }
    for (system, scenario), waits in pooled.items():
        waits.sort()
        for pct in (50, 90, 99):
            summary[system][scenario][f"p{pct}_ms"] = percentile(waits, pct)
    return summary


def ratios(summary: dict[str, Any], baseline: str, systems: list[str]) -> dict[str, dict[str, float]]:
    """label -> peer -> how many times better the baseline is (> 1: baseline better)."""
    out: dict[str, dict[str, float]] = {}
    base = summary.get(baseline, {})
    for label, scenario, metric, higher_better in ROWS:
        ours = base.get(scenario, {}).get(metric)
        for peer in systems:
            theirs = summary.get(peer, {}).get(scenario, {}).get(metric)
            if peer == baseline or ours is None or theirs is None or not ours or not theirs:
                continue
            out.setdefault(label, {})[peer] = ours / theirs if higher_better else theirs / ours
    return out


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(summary: dict[str, Any], systems: list[str]) -> str:
    lines = [
        "| metric | " + " | ".join(systems) + " |",
        "|---|" + "---:|" * len(systems),
    ]
    rows = [(label, scenario, metric) for label, scenario, metric, _ in ROWS] + EXTRA_ROWS
    for label, scenario, metric in rows:
        if not any(scenario in summary.get(s, {}) for s in systems):
            continue
        cells = [_fmt(summary.get(s, {}).get(scenario, {}).get(metric)) for s in systems]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratio_table(ratio: dict[str, dict[str, float]], baseline: str, systems: list[str]) -> str:
    peers = [s for s in systems if s != baseline]
    if not ratio or not peers:
        return "(no peers to compare with)"
    lines = [
        f"| {baseline} vs | " + " | ".join(peers) + " |",
        "|---|" + "---:|" * len(peers),
    ]
    for label, _, _, _ in ROWS:
        if label not in ratio:
            continue
        cells = []
        for peer in peers:
            value = ratio[label].get(peer)
            cells.append("–" if value is None else f"{value:.2f}×" + (" ⚠" if value < WORSE else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _source_line(code: dict[str, Any]) -> str:
    line = (
        f"offload code: git {code['head']}{' + uncommitted changes in src/' if code['src_dirty'] else ''}, "
        f"source fingerprint {code['fingerprint']}"
    )
    changed = code.get("fingerprint_at_end") not in (None, code["fingerprint"])
    if code["snapshot"]:
        line += " (a copy taken at the start was measured"
        line += "; src/ changed during the run)." if changed else ")."
    elif changed:
        line += f". **Warning: src/ changed during the run (now {code['fingerprint_at_end']})**."
    else:
        line += "."
    return line


# Where the time goes: (label, scenario, metric)
TIME_ROWS: list[tuple[str, str, str]] = [
    ("round trips per job, enqueue one by one", "enqueue-one", "requests_per_job"),
    ("round trips per job, enqueue 16 callers at once", "enqueue-concurrent", "requests_per_job"),
    ("round trips per job, enqueue bulk", "enqueue-bulk", "requests_per_job"),
    ("round trips per job, 1-process drain (fetch + settle)", "drain-1p", "requests_per_job"),
    ("round trips per job, 2-process drain", "drain-2p", "requests_per_job"),
    ("offload fetch calls per job, 1-process drain", "drain-1p", "fetch_calls_per_job"),
    ("offload settle calls per job, 1-process drain", "drain-1p", "settle_calls_per_job"),
    ("offload fetch calls per job, 2-process drain", "drain-2p", "fetch_calls_per_job"),
    ("offload settle calls per job, 2-process drain", "drain-2p", "settle_calls_per_job"),
    ("server operations per job, enqueue one by one", "enqueue-one", "ops_per_job"),
    ("server operations per job, enqueue bulk", "enqueue-bulk", "ops_per_job"),
    ("server operations per job, 1-process drain (fetch + settle)", "drain-1p", "ops_per_job"),
    ("server operations per job, 2-process drain", "drain-2p", "ops_per_job"),
    ("producer CPU per job, enqueue one by one (µs)", "enqueue-one", "client_cpu_us_per_job"),
    ("producer CPU per job, enqueue 16 callers at once (µs)", "enqueue-concurrent", "client_cpu_us_per_job"),
    ("producer CPU per job, enqueue bulk (µs)", "enqueue-bulk", "client_cpu_us_per_job"),
    ("worker CPU per no-op job, 1-process drain (µs)", "drain-1p", "worker_cpu_us_per_job"),
    ("server CPU per no-op job, 1-process drain (µs)", "drain-1p", "server_cpu_us_per_job"),
    ("worker CPU per no-op job, 2-process drain (µs)", "drain-2p", "worker_cpu_us_per_job"),
    ("server CPU per no-op job, 2-process drain (µs)", "drain-2p", "server_cpu_us_per_job"),
]
OPS_UNITS = {
    "sqlite": "",
    "redis": "Redis commands, those run inside Lua scripts included (INFO commandstats). The "
    "counts are server-wide: ⚠N% marks a figure of which other clients of the shared server "
    "(rate measured just before) may make up N%",
    "postgres": "transactions in the bench's database (pg_stat_database xact_commit + xact_rollback, "
    "over the workers' whole life for drains)",
    "rabbitmq": "Redis commands of the state store only, server-wide as in the Redis group (⚠N%: "
    "others' estimated share); RabbitMQ's own operations are not counted",
    "nats": "",
}
ROUND_TRIPS = (
    "Round trips: requests the workers (drains, from the first job done to the last) or the "
    "producer wrote to the broker servers, counted as TCP data segments sent (`ss -ti`). "
    "offload's fetch and settle calls (each one script, statement or batch; over the workers' "
    "whole life) are counted by a wrapper the bench puts on the broker class in its workers."
)
TITLES = {
    "sqlite": "SQLite",
    "redis": "Redis",
    "postgres": "PostgreSQL",
    "rabbitmq": "RabbitMQ",
    "nats": "NATS JetStream",
}


NOISY = 0.1  # server operations of which others' share (estimated) is above this are flagged


def time_table(summary: dict[str, Any], systems: list[str]) -> str:
    lines = [
        "| per job | " + " | ".join(systems) + " |",
        "|---|" + "---:|" * len(systems),
    ]
    shown = 0
    for label, scenario, metric in TIME_ROWS:
        cells = [summary.get(s, {}).get(scenario, {}).get(metric) for s in systems]
        if all(c is None for c in cells):
            continue
        shown += 1
        texts = [_fmt(c) for c in cells]
        if metric == "ops_per_job":
            for i, s in enumerate(systems):
                share = summary.get(s, {}).get(scenario, {}).get("ops_background_share") or 0.0
                if cells[i] is not None and share > NOISY:
                    texts[i] += f" ⚠{share:.0%}"
        lines.append(f"| {label} | " + " | ".join(texts) + " |")
    return "\n".join(lines) if shown else ""


def ops_breakdown(runs: list[dict[str, Any]], system: str) -> list[str]:
    """Round trips by server and operations by name, per job, for `system` (its last successful
    repeat of each scenario)."""
    out = []
    for scenario, what in (
        ("enqueue-one", "enqueue one by one"),
        ("enqueue-bulk", "enqueue bulk"),
        ("drain-1p", "1-process drain (fetch + settle)"),
    ):
        found = [r for r in runs if r["system"] == system and r["scenario"] == scenario and r.get("detail")]
        if not found:
            continue
        detail = found[-1]["detail"]
        shown = []
        requests = detail.get("requests") or {}
        jobs = detail.get("requests_jobs") or detail.get("ops_jobs") or 0
        if requests and jobs and len(requests) > 1:
            shown.append(
                "round trips " + " + ".join(f"{kind} {n / jobs:.3g}" for kind, n in sorted(requests.items()))
            )
        ops = detail.get("ops") or {}
        jobs = detail.get("ops_jobs") or 0
        if ops and jobs:
            top = sorted(ops.items(), key=lambda kv: -kv[1])[:8]
            shown.append(", ".join(f"{name.split(':', 1)[1]} {calls / jobs:.3g}" for name, calls in top))
        if shown:
            out.append(f"- {what}: " + "; ".join(shown))
    return out


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    counts = meta["counts"]
    quick = " **--quick: small counts, one repeat — a smoke test, not a result.**" if meta["quick"] else ""
    parts = [
        "# offload benchmark",
        "",
        f"`{meta['command']}` — {meta['started']}, {meta['elapsed_s']:.0f} s, "
        f"medians of {meta['repeat']} repeat(s) (latency percentiles: over every repeat's jobs "
        f"pooled).{quick}",
        "",
        f"Machine: {meta['machine']}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
        + ".",
        "",
        f"Counts: enqueue one by one {counts['enqueue_one']:,}; one per call from "
        f"{counts.get('senders', 16)} callers at once {counts.get('enqueue_concurrent', 0):,} (threads for "
        "sync libraries, asyncio tasks for async ones and offload); "
        f"bulk {counts['enqueue_bulk']:,}; "
        f"drains {counts['drain']:,} no-op jobs; latency {counts['latency_rate']:.0f} jobs/s for "
        f"{counts['latency_seconds']:.0f} s after {counts['latency_idle']:.1f} s idle; "
        f"CPU {counts['cpu']:,} × 1 ms. Workers: huey/dramatiq/celery {meta['threads']} threads per "
        f"process, offload concurrency {meta['offload_concurrency']} per process "
        f"(launcher: {meta['offload_launcher']}), taskiq/saq/procrastinate/pgqueuer the same "
        f"{meta['offload_concurrency']}.",
        "",
        _source_line(meta["offload_source"]),
        "",
        "Ratios are the group's offload system relative to each peer on the same broker: > 1 means "
        "offload is better (faster, lower latency, less CPU or memory); ⚠ marks where it is more "
        "than 5% worse.",
    ]
    for group, info in meta["groups"].items():
        systems = info["systems"]
        baseline = info["baseline"]
        parts += ["", f"## {TITLES.get(group, group)}", "", table(result["summary"], systems), ""]
        if len(systems) < 2:
            parts.append("No ratios: no peer on this broker.")
        elif baseline in systems and baseline in result["summary"]:
            parts += [
                f"Ratios: {baseline} relative to each peer.",
                "",
                ratio_table(result["ratios"].get(group, {}), baseline, systems),
            ]
        else:
            parts.append(f"No ratios: the baseline {baseline} was not measured.")
        timing = time_table(result["summary"], systems)
        if timing:
            parts += ["", f"### Where the time goes ({TITLES.get(group, group)})", ""]
            if group != "sqlite":
                parts += [ROUND_TRIPS, ""]
            unit = OPS_UNITS.get(group)
            if unit:
                parts += [f"Server operations: {unit}.", ""]
            parts.append(timing)
            breakdown = ops_breakdown(result["runs"], baseline)
            if breakdown:
                parts += ["", f"{baseline}, per job, by server and by operation:", "", *breakdown]
    parts += ["", "## Systems", ""]
    parts += [f"- **{name}**: {note}" for name, note in meta["notes"].items()]
    if meta.get("skipped"):
        parts += ["", "## Skipped", ""]
        parts += [f"- **{name}**: {reason}" for name, reason in meta["skipped"].items()]
    errors = [r for r in result["runs"] if r.get("error")]
    if errors:
        parts += ["", "## Failed runs", ""]
        parts += [
            f"- {r['system']} / {r['scenario']} / repeat {r['repeat']}: {r['error'].splitlines()[0]}"
            for r in errors
        ]
    return "\n".join(parts) + "\n"
