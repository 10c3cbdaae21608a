"""Health, readiness, the OpenAPI document, and problem+json for paths and methods that don't exist."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from openapi_spec_validator import validate

from offload import App
from offload.api.app import create_api
from offload.brokers.base import Broker

from .support import client_for, problem


class Opaque:
    """A type msgspec cannot build from JSON (and cannot describe)."""


async def test_healthz(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


async def test_readyz_asks_the_broker(
    client: httpx.AsyncClient, app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert (await client.get("/readyz")).json() == {"status": "ready"}
    broker: Broker = await app.broker()

    async def down(*args: Any) -> Any:
        raise ConnectionRefusedError("no broker")

    monkeypatch.setattr(broker, "stats", down)
    response = await client.get("/readyz")
    problem(response, 503, "broker-unavailable")
    assert response.headers["retry-after"] == "1"
    assert (await client.get("/healthz")).status_code == 200  # up, just not ready


async def test_readyz_when_the_broker_cannot_even_connect(tmp_path: Any) -> None:
    from .support import make_app

    app = make_app(f"sqlite:///{tmp_path}/missing-dir/x.db")
    async with client_for(create_api(app, keys=None, insecure_local=True)) as c:
        problem(await c.get("/readyz"), 503, "broker-unavailable")
        problem(await c.get("/v1/queues"), 503, "broker-unavailable")


async def document(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/openapi.json")
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    return body


async def test_the_openapi_document_is_valid_3_1(client: httpx.AsyncClient) -> None:
    doc = await document(client)
    assert doc["openapi"].startswith("3.1")
    validate(doc)
    assert set(doc["paths"]) == {
        "/v1/jobs",
        "/v1/jobs/{id}",
        "/v1/jobs/{id}/events",
        "/v1/jobs/{id}/cancel",
        "/v1/queues",
        "/v1/dlq",
        "/v1/dlq/replay",
        "/v1/dlq/purge",
        "/healthz",
        "/readyz",
        "/openapi.json",
    }


async def test_one_request_schema_per_public_task(client: httpx.AsyncClient) -> None:
    doc = await document(client)
    schemas = doc["components"]["schemas"]
    body = doc["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    mapping = body["discriminator"]["mapping"]
    assert set(mapping) == {"t.add", "t.resize", "t.echo", "t.only_positional", "t.fail", "t.gate"}
    add = schemas["Submit.t.add"]
    assert add["description"].startswith("Add two numbers.")
    # One branch per split of (a, b) between args and kwargs.
    by_keyword, mixed, by_position = add["oneOf"]
    assert all(b["properties"]["task"]["const"] == "t.add" for b in add["oneOf"])
    assert by_keyword["properties"]["kwargs"]["required"] == ["a", "b"]
    assert by_keyword["properties"]["args"]["maxItems"] == 0
    assert mixed["properties"]["kwargs"]["required"] == ["b"] and mixed["required"] == [
        "task",
        "args",
        "kwargs",
    ]
    args = by_position["properties"]["args"]
    assert [p["type"] for p in args["prefixItems"]] == ["integer", "integer"]
    assert (args["minItems"], args["maxItems"], args["items"]) == (2, 2, False)
    resize = schemas["Submit.t.resize"]["oneOf"][-1]
    assert resize["properties"]["args"]["prefixItems"][1]["$ref"] == "#/components/schemas/task.Size"
    assert schemas["task.Size"]["required"] == ["width", "height"]
    assert resize["properties"]["kwargs"]["properties"]["fmt"]["type"] == "string"
    echo = schemas["Submit.t.echo"]
    assert (
        echo["properties"]["args"]["items"] == {}
        and echo["properties"]["kwargs"]["additionalProperties"] == {}
    )
    # x is positional-only and required: no branch passes it by name.
    assert len(schemas["Submit.t.only_positional"]["oneOf"]) == 2


async def test_with_keys_the_document_names_the_bearer_scheme(app: App, keys: Any) -> None:
    async with client_for(create_api(app, keys=keys[0], insecure_local=False)) as c:
        doc = await document(c)
    validate(doc)
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert doc["paths"]["/v1/jobs"]["post"]["security"] == [{"bearer": []}]
    assert "security" not in doc["paths"]["/healthz"]["get"]


async def test_a_task_with_unsupported_hints_still_gets_a_document(
    app: App, client: httpx.AsyncClient
) -> None:
    @app.task(name="t.opaque", public=True)
    def opaque(thing: Opaque) -> None:
        return None

    doc = await document(client)
    validate(doc)
    assert (
        doc["components"]["schemas"]["Submit.t.opaque"]["oneOf"][1]["properties"]["args"]["prefixItems"][0][
            "title"
        ]
        == "thing"
    )
    response = await client.post("/v1/jobs", json={"task": "t.opaque", "args": [{}]})
    assert response.status_code == 422  # no JSON value can be an Opaque: the worker could never run it


async def test_unknown_path_and_wrong_method_are_problems(client: httpx.AsyncClient) -> None:
    problem(await client.get("/v2/nothing"), 404, "not-found")
    response = await client.delete("/v1/jobs")
    problem(response, 405, "method-not-allowed")
    assert "POST" in response.headers["allow"]


async def test_the_api_mounts_under_a_prefix(app: App) -> None:
    from starlette.applications import Starlette
    from starlette.routing import Mount

    outer = Starlette(routes=[Mount("/jobs-api", create_api(app, keys=None, insecure_local=True))])
    async with client_for(outer) as c:
        response = await c.post("/jobs-api/v1/jobs", json={"task": "t.add", "args": [1, 2]})
        assert response.status_code == 202
        location = response.headers["location"]
        assert location.startswith("/jobs-api/v1/jobs/") and response.json()["location"] == location
        assert (await c.get(location)).json()["state"] == "queued"
