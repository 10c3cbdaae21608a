"""Stopping a worker: SIGTERM drains running jobs, and past the grace period hands them back."""

from __future__ import annotations

import signal
import time

import acceptance_app
import pytest
from acceptance_harness import APP, Harness, wait_until


@pytest.mark.timeout(120)
def test_sigterm_drains_without_loss(harness: Harness) -> None:
    n = 300
    harness.send(acceptance_app.steady, range(n))
    worker = harness.spawn("worker", APP, "--concurrency", "8", "--grace", "20")
    wait_until(lambda: harness.count("end", "steady") >= 40, 60, "40 jobs to complete")

    worker.send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    assert harness.wait_exit(worker, 30) == 0
    assert time.monotonic() - stopped < 20, "the worker outlived its grace period"

    starts = harness.tally("start", "steady")
    ends = harness.tally("end", "steady")
    assert starts == ends, f"jobs cut off by SIGTERM: {sorted(set(starts) - set(ends))}"
    assert max(starts.values()) == 1
    stats = harness.stats()
    assert stats["running"] == 0, stats
    assert (stats["dead"], stats["delayed"]) == (0, 0), stats
    assert stats["ready"] == n - len(ends), stats
    assert stats["ready"] > 0, "every job finished before SIGTERM: the test proved nothing"
    drained = len(ends)

    assert harness.run("worker", APP, "--concurrency", "8", "--burst", timeout=90).code == 0
    starts = harness.tally("start", "steady")
    ends = harness.tally("end", "steady")
    lost = [k for k in range(n) if ends[k] == 0]
    duplicated = [k for k, c in starts.items() if c > 1]
    print(
        f"\nSIGTERM after {drained} of {n} jobs (none cut off); the rest by a burst worker: "
        f"lost={len(lost)} duplicated={len(duplicated)}"
    )
    assert lost == []
    assert duplicated == []
    assert starts == ends
    stats = harness.stats()
    assert (stats["ready"], stats["running"], stats["dead"]) == (0, 0, 0), stats


@pytest.mark.timeout(90)
@pytest.mark.parametrize("concurrency", [1, 16])
def test_sigterm_past_grace_hands_back_leases_at_once(harness: Harness, concurrency: int) -> None:
    # concurrency 1: every slot is busy, so the fetch loop is waiting for a free one.
    [job_id] = harness.send(acceptance_app.sleepy, [1])
    worker = harness.spawn("worker", APP, "--concurrency", str(concurrency), "--grace", "1")
    wait_until(lambda: harness.count("start", "sleepy") == 1, 60, "the job to start")

    worker.send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    assert harness.wait_exit(worker, 30) == 0
    took = time.monotonic() - stopped
    assert took < 6, f"the worker took {took:.1f}s to stop with --grace 1"

    # The lease was 125 s (timeout 120 s): the job is back only because it was handed back.
    info = harness.inspect(job_id)
    assert (info["state"], info["deliveries"], info["attempts"]) == ("queued", 0, 0), info
    stats = harness.stats()
    assert (stats["ready"], stats["running"]) == (1, 0), stats
    assert harness.count("end", "sleepy") == 0
    print(f"\nconcurrency {concurrency}: stopped {took:.2f}s after SIGTERM, job ready again at once")


@pytest.mark.timeout(90)
def test_sigusr1_dumps_every_workers_stacks_and_they_keep_working(harness: Harness) -> None:
    [job_id] = harness.send(acceptance_app.sleepy, [1])
    supervisor = harness.spawn("worker", APP, "--processes", "2", "--concurrency", "4", "--grace", "1")
    wait_until(lambda: harness.count("start", "sleepy") == 1, 60, "the job to start")
    wait_until(lambda: harness.stderr_of(supervisor).count("worker started") == 2, 60, "both workers")

    supervisor.send_signal(signal.SIGUSR1)
    wait_until(lambda: harness.stderr_of(supervisor).count("--- end of tasks") == 2, 30, "two task dumps")
    dump = harness.stderr_of(supervisor)
    assert dump.count("Current thread") + dump.count("Thread 0x") >= 2, dump  # faulthandler's dump
    assert "offload-job-" + job_id in dump, dump  # the running job's task, named after it
    assert "in sleepy" in dump, dump  # the thread running it, in the task's code

    supervisor.send_signal(signal.SIGTERM)
    assert harness.wait_exit(supervisor, 30) == 0
    assert "died" not in harness.stderr_of(supervisor), "a worker died of SIGUSR1"
