"""Crashes: a SIGKILLed worker process loses no job, a crash-looping job ends in the DLQ."""

from __future__ import annotations

import acceptance_app
import pytest
from acceptance_harness import APP, Harness, sigkill_a_worker_mid_run


@pytest.mark.timeout(180)
def test_sigkill_of_a_worker_mid_run_loses_no_job(harness: Harness) -> None:
    sigkill_a_worker_mid_run(harness, 5000, "SQLite")


@pytest.mark.timeout(180)
def test_crash_looping_task_ends_in_dlq_after_max_deliveries_while_others_complete(
    harness: Harness,
) -> None:
    quick = harness.send(acceptance_app.quick, range(100))
    [poison_id] = harness.send(acceptance_app.poison, [0])
    quick += harness.send(acceptance_app.quick, range(100, 200))

    supervisor = harness.spawn("worker", APP, "--processes", "2", "--burst")
    assert harness.wait_exit(supervisor, 120) == 0

    info = harness.inspect(poison_id)
    assert info["state"] == "dead", info
    assert info["deliveries"] == 3, info
    assert "max_deliveries" in info["error"], info
    poison_runs = [r for r in harness.records() if r.task == "poison" and r.event == "start"]
    assert len(poison_runs) == 3
    assert len({r.pid for r in poison_runs}) == 3, "each run should have taken down its process"
    ends = harness.tally("end", "quick")
    assert set(ends) == set(range(200))
    assert [i.state.value for i in harness.jobs(quick)] == ["succeeded"] * 200
    stats = harness.stats()
    assert (stats["ready"], stats["running"], stats["dead"]) == (0, 0, 1), stats
    print(f"\npoison job delivered {info['deliveries']} times: {info['error']}")

    listing = harness.run("dlq", "list")
    assert listing.code == 0, listing.err
    assert poison_id in listing.out and "max_deliveries" in listing.out, listing.out
    assert "1 dead job(s)" in listing.err

    replay = harness.run("dlq", "replay", poison_id)
    assert (replay.code, replay.out.strip()) == (0, "replayed 1 job(s)"), replay
    stats = harness.stats()
    assert (stats["ready"], stats["running"], stats["dead"]) == (1, 0, 0), stats
    info = harness.inspect(poison_id)
    assert (info["state"], info["deliveries"]) == ("queued", 0), info

    # Replayed with fresh counters, it gets max_deliveries runs again, then dies again.
    supervisor = harness.spawn("worker", APP, "--processes", "2", "--burst")
    assert harness.wait_exit(supervisor, 120) == 0
    info = harness.inspect(poison_id)
    assert (info["state"], info["deliveries"]) == ("dead", 3), info
    assert harness.tally("start", "poison")[0] == 6

    purge = harness.run("dlq", "purge", "--all")
    assert (purge.code, purge.out.strip()) == (0, "purged 1 dead job(s)"), purge
    stats = harness.stats()
    assert (stats["ready"], stats["running"], stats["dead"]) == (0, 0, 0), stats
    gone = harness.run("inspect", poison_id)
    assert gone.code == 1 and gone.err.startswith("error: no job"), gone
    assert harness.run("dlq", "list").err.strip() == "0 dead job(s)"
