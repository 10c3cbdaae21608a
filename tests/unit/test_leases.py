"""Lease sizing, and the worker's lease keeper, against a fake broker (no clocks waited on)."""

from __future__ import annotations

import pytest

from offload.brokers.base import DEFAULT_LEASE, Delivery, lease_seconds
from offload.worker import leases
from offload.worker.leases import LeaseKeeper


@pytest.mark.parametrize(
    ("timeout", "lease"),
    [(None, DEFAULT_LEASE), (0.1, 1.1), (1.0, 2.0), (3.0, 6.0), (30.0, 35.0), (3600.0, 3605.0)],
)
def test_lease_is_the_timeout_plus_a_margin(timeout: float | None, lease: float) -> None:
    assert lease_seconds(timeout) == pytest.approx(lease)


class FakeBroker:
    def __init__(self, alive: dict[str, bool]) -> None:
        self.alive = alive
        self.extended: list[list[str]] = []

    async def extend(self, deliveries: list[Delivery]) -> list[bool]:
        self.extended.append([d.job_id for d in deliveries])
        return [self.alive[d.job_id] for d in deliveries]


def delivery(job_id: str, lease: float = 3.0, token: int = 1) -> Delivery:
    return Delivery(job_id, "default", b"{}", token, 1, 0, lease)


async def test_keeper_renews_leases_a_third_through_and_reports_lost_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [100.0]
    monkeypatch.setattr(leases.time, "monotonic", lambda: clock[0])
    broker = FakeBroker({"kept": True, "lost": False, "young": True})
    lost: list[str] = []
    keeper = LeaseKeeper(broker, lambda d: lost.append(d.job_id))  # type: ignore[arg-type]
    keeper.hold(delivery("kept"))
    keeper.hold(delivery("lost"))
    clock[0] = 100.5
    keeper.hold(delivery("young"))

    clock[0] = 100.9  # under a third of the 3s lease
    await keeper.renew_due()
    assert broker.extended == []

    clock[0] = 101.0  # a third through for kept/lost, not for young
    await keeper.renew_due()
    assert broker.extended == [["kept", "lost"]]
    assert lost == ["lost"]

    clock[0] = 101.6  # young is due now; kept was renewed at 101.0
    await keeper.renew_due()
    assert broker.extended[-1] == ["young"]
    clock[0] = 102.0
    await keeper.renew_due()
    assert broker.extended[-1] == ["kept"]
    assert lost == ["lost"]


async def test_keeper_drops_only_the_same_lease(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    monkeypatch.setattr(leases.time, "monotonic", lambda: clock[0])
    broker = FakeBroker({"a": True})
    keeper = LeaseKeeper(broker, lambda d: None)  # type: ignore[arg-type]
    keeper.hold(delivery("a", token=2))
    keeper.drop(delivery("a", token=1))  # an older lease of the same job: not this one
    clock[0] = 5.0
    await keeper.renew_due()
    assert broker.extended == [["a"]]
    keeper.drop(delivery("a", token=2))
    clock[0] = 10.0
    await keeper.renew_due()
    assert broker.extended == [["a"]]
