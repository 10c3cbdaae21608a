"""Fixtures for the HTTP API tests (helpers live in support.py)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from offload import App
from offload.api.app import create_api
from offload.api.auth import KeyStore

from .support import client_for, make_app


@pytest.fixture
def broker_url() -> str:
    return f"memory://api-{uuid.uuid4().hex}"


@pytest.fixture
async def app(broker_url: str) -> AsyncIterator[App]:
    a = make_app(broker_url)
    try:
        yield a
    finally:
        await a.close_async()
        a.close()


@pytest.fixture
def keys(tmp_path: Path) -> tuple[KeyStore, dict[str, str]]:
    """A keys file with one key per scope set; returns the store and {label: key}."""
    store = KeyStore.open(tmp_path / "keys.json", create=True)
    made = {
        "submit": store.create("submit")[1],
        "read": store.create("read")[1],
        "admin": store.create("admin")[1],
        "both": store.create("submit,read")[1],
        "limited": store.create("submit,read", rate="2/m")[1],
    }
    return store, made


@pytest.fixture
async def client(app: App) -> AsyncIterator[httpx.AsyncClient]:
    """An unauthenticated client of an insecure-local API (auth is tested on its own)."""
    async with client_for(create_api(app, keys=None, insecure_local=True)) as c:
        yield c
