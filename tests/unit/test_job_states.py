"""Job states and the moves allowed between them."""

from __future__ import annotations

import itertools
import time

import pytest

from offload import JobInfo, JobState
from offload.job import FINISHED, TRANSITIONS, can_move

S = JobState

ALLOWED = {
    (S.QUEUED, S.RUNNING),  # fetched under a lease
    (S.QUEUED, S.CANCELLED),  # cancelled before it started
    (S.QUEUED, S.DEAD),  # e.g. dead-lettered without running
    (S.RUNNING, S.QUEUED),  # retry, lease expiry, graceful hand-back
    (S.RUNNING, S.SUCCEEDED),
    (S.RUNNING, S.DEAD),
    (S.DEAD, S.QUEUED),  # replay from the dead-letter queue
}


@pytest.mark.parametrize(("source", "target"), list(itertools.product(JobState, JobState)))
def test_can_move(source: JobState, target: JobState) -> None:
    assert can_move(source, target) is ((source, target) in ALLOWED)


def test_every_state_has_a_transition_entry() -> None:
    assert set(TRANSITIONS) == set(JobState)


def test_finished_states() -> None:
    assert {S.SUCCEEDED, S.DEAD, S.CANCELLED} == FINISHED
    assert [s for s in JobState if s.finished] == [S.SUCCEEDED, S.DEAD, S.CANCELLED]
    # Nothing leaves a succeeded or cancelled job; a dead one can only be replayed.
    assert not TRANSITIONS[S.SUCCEEDED] and not TRANSITIONS[S.CANCELLED]
    assert TRANSITIONS[S.DEAD] == {S.QUEUED}


def test_states_are_their_wire_strings() -> None:
    assert [s.value for s in JobState] == ["queued", "running", "succeeded", "dead", "cancelled"]
    assert JobState("dead") is S.DEAD


def test_job_info_delayed_means_waiting_for_a_future_time() -> None:
    now = time.time()
    ready = JobInfo(id="a", task="t", queue="q", state=S.QUEUED, created_at=now - 1, run_at=now - 0.5)
    later = JobInfo(id="b", task="t", queue="q", state=S.QUEUED, created_at=now, run_at=now + 60)
    running = JobInfo(id="c", task="t", queue="q", state=S.RUNNING, created_at=now, run_at=now + 60)
    assert not ready.delayed
    assert later.delayed
    assert not running.delayed
