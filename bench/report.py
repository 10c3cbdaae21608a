"""Medians over repeats, the markdown table, and the ratios against the baseline."""

from __future__ import annotations

import math
import statistics
from typing import Any

# (label, scenario, metric, higher is better)
ROWS: list[tuple[str, str, str, bool]] = [
    ("enqueue one by one (jobs/s)", "enqueue-one", "jobs_per_s", True),
    ("enqueue bulk (jobs/s)", "enqueue-bulk", "jobs_per_s", True),
    ("drain no-op, 1 process (jobs/s)", "drain-1p", "jobs_per_s", True),
    ("drain no-op, 2 processes (jobs/s)", "drain-2p", "jobs_per_s", True),
    ("latency p50 at 200/s (ms)", "latency", "p50_ms", False),
    ("latency p90 at 200/s (ms)", "latency", "p90_ms", False),
    ("latency p99 at 200/s (ms)", "latency", "p99_ms", False),
    ("1 ms CPU jobs, 2 processes (jobs/s)", "cpu-2p", "jobs_per_s", True),
    ("CPU per no-op job, 1-process drain (µs)", "drain-1p", "cpu_us_per_job", False),
    ("peak RSS per worker process, 1-process drain (MB)", "drain-1p", "rss_max_mb", False),
    ("peak RSS per worker process, 2-process drain (MB)", "drain-2p", "rss_max_mb", False),
]
WORSE = 0.95  # ratios below this are flagged: the baseline is more than 5% worse

# Context rows: shown in the table, not in the ratios.
EXTRA_ROWS: list[tuple[str, str, str]] = [
    ("drain no-op, 1 process, incl. start-up (jobs/s)", "drain-1p", "wall_jobs_per_s"),
    ("drain no-op, 2 processes, incl. start-up (jobs/s)", "drain-2p", "wall_jobs_per_s"),
    ("CPU per no-op job, 2-process drain (µs)", "drain-2p", "cpu_us_per_job"),
    ("CPU per 1 ms CPU job, 2 processes (µs)", "cpu-2p", "cpu_us_per_job"),
    ("worker start-up to first job, 1 process (s)", "drain-1p", "startup_s"),
    ("latency max (ms)", "latency", "max_ms"),
    ("paced producer achieved (jobs/s)", "latency", "sent_per_s"),
]


def medians(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """system -> scenario -> metric -> median over the successful repeats."""
    grouped: dict[str, dict[str, dict[str, list[float]]]] = {}
    for run in runs:
        if run.get("error"):
            continue
        metrics = grouped.setdefault(run["system"], {}).setdefault(run["scenario"], {})
        for key, value in run["metrics"].items():
            metrics.setdefault(key, []).append(value)
    return {
        system: {
            scenario: {key: statistics.median(values) for key, values in metrics.items()}
            for scenario, metrics in scenarios.items()
        }
        for system, scenarios in grouped.items()
    }


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


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    systems = meta["systems"]
    baseline = meta["baseline"]
    counts = meta["counts"]
    parts = [
        "# offload benchmark",
        "",
        f"`{meta['command']}` — {meta['started']}, {meta['elapsed_s']:.0f} s, "
        f"medians of {meta['repeat']} repeat(s).",
        "",
        f"Machine: {meta['machine']}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
        + ".",
        "",
        f"Counts: enqueue one by one {counts['enqueue_one']:,}; bulk {counts['enqueue_bulk']:,}; "
        f"drains {counts['drain']:,} no-op jobs; latency {counts['latency_rate']:.0f} jobs/s for "
        f"{counts['latency_seconds']:.0f} s after {counts['latency_idle']:.1f} s idle; "
        f"CPU {counts['cpu']:,} × 1 ms. Workers: huey/dramatiq {meta['threads']} threads per process, "
        f"offload concurrency {meta['offload_concurrency']} per process "
        f"(launcher: {meta['offload_launcher']}).",
        "",
        _source_line(meta["offload_source"]),
        "",
        table(result["summary"], systems),
        "",
        f"## Ratios: {baseline} relative to each peer",
        "",
        "Values > 1 mean offload-sqlite-strict is better (faster, lower latency or less memory); "
        "⚠ marks where it is more than 5% worse.",
        "",
        ratio_table(result["ratios"], baseline, systems),
        "",
        "## Systems",
        "",
    ]
    parts += [f"- **{name}**: {note}" for name, note in meta["notes"].items()]
    errors = [r for r in result["runs"] if r.get("error")]
    if errors:
        parts += ["", "## Failed runs", ""]
        parts += [
            f"- {r['system']} / {r['scenario']} / repeat {r['repeat']}: {r['error'].splitlines()[0]}"
            for r in errors
        ]
    return "\n".join(parts) + "\n"
