"""GET /v1/queues and the dead-letter queue verbs."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from offload import App

from .support import problem, running_worker


async def dead_jobs(client: httpx.AsyncClient, app: App, count: int, queue: str = "default") -> list[str]:
    ids = []
    for i in range(count):
        response = await client.post("/v1/jobs", json={"task": "t.fail", "args": [f"no {i}"], "queue": queue})
        ids.append(response.json()["id"])
    async with running_worker(app, (queue,)):
        for job_id in ids:
            assert (await client.get(f"/v1/jobs/{job_id}", params={"wait": 10})).json()["state"] == "dead"
    return ids


async def test_queues_show_depth_bound_and_drain_rate(client: httpx.AsyncClient, app: App) -> None:
    app.queue("bounded", max_depth=10)
    await client.post("/v1/jobs", json={"task": "t.add", "args": [1, 2], "queue": "bounded"})
    await client.post("/v1/jobs", json={"task": "t.add", "args": [1, 2], "queue": "bounded", "delay": 60})
    response = await client.get("/v1/queues")
    assert response.status_code == 200
    stats = {q["queue"]: q for q in response.json()}
    assert stats["bounded"] == {
        "queue": "bounded",
        "ready": 1,
        "delayed": 1,
        "running": 0,
        "dead": 0,
        "max_depth": 10,
        "drain_rate": 0.0,
        "depth": 2,
    }


async def test_list_replay_and_purge_dead_jobs(client: httpx.AsyncClient, app: App) -> None:
    first = await dead_jobs(client, app, 3)
    other = await dead_jobs(client, app, 2, queue="other")
    listed = (await client.get("/v1/dlq")).json()
    assert {j["id"] for j in listed} == {*first, *other}
    assert all(j["state"] == "dead" and j["error"] for j in listed)
    assert {j["id"] for j in (await client.get("/v1/dlq", params={"queue": "other"})).json()} == set(other)
    assert len((await client.get("/v1/dlq", params={"limit": 2})).json()) == 2

    replayed = await client.post("/v1/dlq/replay", json={"ids": first[:1]})
    assert replayed.status_code == 200 and replayed.json() == {"count": 1}
    assert (await client.get(f"/v1/jobs/{first[0]}")).json()["state"] == "queued"
    assert (await client.post("/v1/dlq/replay", json={"queue": "other"})).json() == {"count": 2}
    assert (await client.post("/v1/dlq/purge", json={"ids": first[1:2]})).json() == {"count": 1}
    problem(await client.get(f"/v1/jobs/{first[1]}"), 404, "not-found")
    assert (await client.post("/v1/dlq/purge", json={"all": True})).json() == {"count": 1}
    assert (await client.get("/v1/dlq")).json() == []


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"all": False},
        {"ids": []},
        {"ids": ["a"], "queue": "q"},
        {"ids": "a"},
        {"ids": [1]},
        {"ids": ["x"] * 1001},
        {"queue": "bad name"},
        {"everything": True},
        [],
    ],
)
async def test_a_selection_is_exactly_one_of_ids_queue_or_all(client: httpx.AsyncClient, body: Any) -> None:
    for verb in ("replay", "purge"):
        problem(await client.post(f"/v1/dlq/{verb}", json=body), 400, "bad-request")


async def test_dlq_verbs_need_json(client: httpx.AsyncClient) -> None:
    problem(await client.post("/v1/dlq/replay", content=b"all=true"), 415, "unsupported-media-type")
    response = await client.post("/v1/dlq/purge", content=b"{", headers={"content-type": "application/json"})
    problem(response, 400, "malformed-json")


@pytest.mark.parametrize("params", [{"limit": "0"}, {"limit": "1001"}, {"limit": "x"}, {"queue": "a b"}])
async def test_dlq_list_parameters_are_checked(client: httpx.AsyncClient, params: dict[str, str]) -> None:
    problem(await client.get("/v1/dlq", params=params), 400, "bad-request")
