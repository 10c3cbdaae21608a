"""Fixtures for the acceptance tests (the harness itself is in acceptance_harness.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from acceptance_harness import Harness


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.stash[CALL_FAILED] = report.failed


CALL_FAILED = pytest.StashKey[bool]()


@pytest.fixture
def harness(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Harness]:
    h = Harness(tmp_path)
    try:
        yield h
    finally:
        if request.node.stash.get(CALL_FAILED, False):
            # What the processes still running were doing when the test failed (shown with the
            # failure as the teardown's output).
            print(h.dump_running())
        h.close()
