"""API keys: 401 without a good key, 403 without the scope, 429 past the rate; stored hashed."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from offload import App, ConfigurationError
from offload.api import auth
from offload.api.app import create_api
from offload.api.auth import KeyStore, parse_rate, parse_scopes

from .support import client_for, problem

Keys = tuple[KeyStore, dict[str, str]]

# (method, path, scope it needs)
ROUTES = [
    ("POST", "/v1/jobs", "submit"),
    ("GET", "/v1/jobs/abc", "read"),
    ("GET", "/v1/jobs/abc/events", "read"),
    ("POST", "/v1/jobs/abc/cancel", "submit"),
    ("GET", "/v1/queues", "read"),
    ("GET", "/v1/dlq", "admin"),
    ("POST", "/v1/dlq/replay", "admin"),
    ("POST", "/v1/dlq/purge", "admin"),
]
KEY_SCOPES = {
    "submit": {"submit"},
    "read": {"read"},
    "admin": {"submit", "read", "admin"},
    "both": {"submit", "read"},
}


def api(app: App, keys: Keys) -> Any:
    return create_api(app, keys=keys[0], insecure_local=False)


async def request(client: Any, method: str, path: str) -> Any:
    body = {"task": "t.add", "args": [1, 2]} if path == "/v1/jobs" else {"all": True}
    return await client.request(method, path, json=body if method == "POST" else None)


@pytest.mark.parametrize(("method", "path", "scope"), ROUTES)
async def test_no_key_is_401_with_a_challenge(
    app: App, keys: Keys, method: str, path: str, scope: str
) -> None:
    async with client_for(api(app, keys)) as client:
        response = await request(client, method, path)
        problem(response, 401, "unauthorized")
        assert response.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "header",
    [
        "Bearer ofk_000000000000_nope",
        "Bearer not-a-key",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "bearer",
    ],
)
async def test_unknown_or_malformed_key_is_401(app: App, keys: Keys, header: str) -> None:
    async with client_for(api(app, keys)) as client:
        response = await client.get("/v1/queues", headers={"Authorization": header})
        problem(response, 401, "unauthorized")


async def test_a_key_with_a_wrong_secret_is_401(app: App, keys: Keys) -> None:
    real = keys[1]["admin"]
    forged = real[:-4] + ("AAAA" if not real.endswith("AAAA") else "BBBB")
    async with client_for(api(app, keys), forged) as client:
        problem(await client.get("/v1/queues"), 401, "unauthorized")


@pytest.mark.parametrize("label", sorted(KEY_SCOPES))
@pytest.mark.parametrize(("method", "path", "scope"), ROUTES)
async def test_scopes(app: App, keys: Keys, label: str, method: str, path: str, scope: str) -> None:
    async with client_for(api(app, keys), keys[1][label]) as client:
        response = await request(client, method, path)
        if scope in KEY_SCOPES[label]:
            assert response.status_code not in (401, 403), response.text
        else:
            body = problem(response, 403, "forbidden")
            assert repr(scope) in body["detail"]


async def test_health_ready_and_openapi_need_no_key(app: App, keys: Keys) -> None:
    async with client_for(api(app, keys)) as client:
        for path in ("/healthz", "/readyz", "/openapi.json"):
            assert (await client.get(path)).status_code == 200, path


async def test_rate_limit_is_429_with_retry_after(app: App, keys: Keys) -> None:
    async with client_for(api(app, keys), keys[1]["limited"]) as client:  # 2/m
        assert (await client.get("/v1/queues")).status_code == 200
        assert (await client.get("/v1/queues")).status_code == 200
        response = await client.get("/v1/queues")
        body = problem(response, 429, "rate-limited")
        seconds = int(response.headers["retry-after"])
        assert 1 <= seconds <= 30 and body["retry_after"] == seconds
    async with client_for(api(app, keys), keys[1]["both"]) as other:  # per key: others unaffected
        assert (await other.get("/v1/queues")).status_code == 200


async def test_a_revoked_key_is_refused_by_a_running_server(
    app: App, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth, "RELOAD_EVERY", 0.0)
    store, made = keys
    async with client_for(api(app, keys), made["read"]) as client:
        assert (await client.get("/v1/queues")).status_code == 200
        other = KeyStore.open(store.path)  # as `offload keys revoke` would, from another process
        key_id = made["read"].split("_")[1]
        assert other.revoke(key_id) and not other.revoke(key_id)
        os.utime(store.path, ns=(0, os.stat(store.path).st_mtime_ns + 1_000_000))  # a new mtime for sure
        problem(await client.get("/v1/queues"), 401, "unauthorized")
        _, secret = other.create("read")
        os.utime(store.path, ns=(0, os.stat(store.path).st_mtime_ns + 2_000_000))
        assert (
            await client.get("/v1/queues", headers={"Authorization": f"Bearer {secret}"})
        ).status_code == 200


def test_the_keys_file_holds_hashes_only_readable_by_its_owner(keys: Keys) -> None:
    store, made = keys
    text = store.path.read_text()
    for key in made.values():
        assert key not in text and key.split("_", 2)[2] not in text
    data = json.loads(text)
    assert data["version"] == 1 and len(data["keys"]) == len(made)
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    record = data["keys"][0]
    assert set(record) == {"id", "sha256", "scopes", "rate", "created_at", "name", "revoked_at"}
    assert len(record["sha256"]) == 64


def test_keys_round_trip_through_the_file(keys: Keys) -> None:
    store, made = keys
    again = KeyStore.open(store.path)
    assert [k.id for k in again.all()] == [k.id for k in store.all()]
    key = again.authenticate(made["limited"])
    assert key is not None and key.rate == "2/m" and key.scopes == {"submit", "read"}


def test_a_missing_or_foreign_keys_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="offload keys create"):
        KeyStore.open(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text('{"something": "else"}')
    with pytest.raises(ConfigurationError, match="not an offload keys file"):
        KeyStore.open(tmp_path / "bad.json")


@pytest.mark.parametrize(
    ("text", "per_second", "burst"),
    [("100/s", 100, 100), ("60/m", 1, 60), ("3600/hour", 1, 3600), ("0.5/s", 0.5, 1)],
)
def test_rates(text: str, per_second: float, burst: float) -> None:
    assert parse_rate(text) == (per_second, burst)


@pytest.mark.parametrize("text", ["100", "0/s", "-1/s", "10/d", "x/s", ""])
def test_bad_rates(text: str) -> None:
    with pytest.raises(ConfigurationError, match="rate"):
        parse_rate(text)


def test_scopes_parse() -> None:
    assert parse_scopes("submit, READ") == {"submit", "read"}
    for bad in ("", "write", "submit,root"):
        with pytest.raises(ConfigurationError, match="scopes"):
            parse_scopes(bad)


def test_an_api_without_keys_must_say_insecure_local(app: App) -> None:
    with pytest.raises(ConfigurationError, match="insecure_local"):
        create_api(app, keys=None, insecure_local=False)
