"""`offload api`, `offload keys ...` and the API inside `offload run`, as a user runs them."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from offload.cli import main

APP_MODULE = """
from offload import App

app = App()

@app.task(name="cli.add", public=True)
def add(a: int, b: int) -> int:
    return a + b
"""


def cli(*args: str, cwd: Path) -> tuple[int, str, str]:
    runner = CliRunner()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        result = runner.invoke(main, list(args), catch_exceptions=False)
    finally:
        os.chdir(old)
    return result.exit_code, result.stdout, result.stderr


def test_keys_create_list_revoke(tmp_path: Path) -> None:
    code, out, err = cli(
        "keys", "create", "--scopes", "submit,read", "--rate", "100/s", "--name", "ci", cwd=tmp_path
    )
    assert code == 0, err
    key = out.strip()
    assert re.fullmatch(r"ofk_[0-9a-f]{12}_[A-Za-z0-9_-]{43}", key), key
    assert "shown only this once" in err
    stored = (tmp_path / "offload-keys.json").read_text()
    assert key not in stored and key.split("_", 2)[2] not in stored
    key_id = key.split("_")[1]
    code, out, _ = cli("keys", "list", cwd=tmp_path)
    assert code == 0 and key_id in out and "read,submit" in out and "100/s" in out and "active" in out
    assert key not in out
    assert cli("keys", "revoke", key_id, cwd=tmp_path)[0] == 0
    assert "revoked" in cli("keys", "list", cwd=tmp_path)[1]
    code, _, err = cli("keys", "revoke", key_id, cwd=tmp_path)
    assert code == 1 and "no active key" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scopes", "write"], "scopes must be"),
        (["--scopes", "read", "--rate", "fast"], "rate 'fast' is not valid"),
    ],
)
def test_keys_create_refuses_bad_input(tmp_path: Path, args: list[str], message: str) -> None:
    code, _, err = cli("keys", "create", *args, cwd=tmp_path)
    assert code == 1 and message in err and not (tmp_path / "offload-keys.json").exists()


def test_api_refuses_to_start_without_keys_or_insecure_local(tmp_path: Path) -> None:
    (tmp_path / "cliapp.py").write_text(APP_MODULE)
    code, _, err = cli("api", "cliapp:app", cwd=tmp_path)
    assert code == 1
    assert err.count("\n") == 1 and "offload keys create" in err and "--insecure-local" in err
    code, _, err = cli("api", "cliapp:app", "--keys-file", "missing.json", cwd=tmp_path)
    assert code == 1 and "offload keys create" in err


async def start(args: list[str], cwd: Path, pattern: str) -> tuple[asyncio.subprocess.Process, str]:
    """Start `offload ...`; return the process and the URL it printed."""
    env = {**os.environ, "OFFLOAD_LOG_LEVEL": "WARNING", "PYTHONPATH": str(cwd)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "offload", *args, cwd=cwd, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdout is not None
    seen = []
    async with asyncio.timeout(30):
        while True:
            line = (await proc.stdout.readline()).decode()
            seen.append(line)
            if not line:
                raise AssertionError(f"exited before serving: {''.join(seen)}")
            match = re.search(pattern, line)
            if match:
                return proc, match.group(1)


async def lines(proc: asyncio.subprocess.Process) -> AsyncIterator[str]:
    assert proc.stdout is not None
    async for line in proc.stdout:
        yield line.decode()


async def test_offload_api_serves_with_keys_and_stops_on_sigterm(tmp_path: Path) -> None:
    (tmp_path / "cliapp.py").write_text(APP_MODULE)
    key = cli("keys", "create", "--scopes", "submit,read", cwd=tmp_path)[1].strip()
    proc, url = await start(
        [
            "api",
            "cliapp:app",
            "--port",
            "0",
            "--keys-file",
            "offload-keys.json",
            "--broker",
            "sqlite:///api.db",
        ],
        tmp_path,
        r"on (http://127\.0\.0\.1:\d+)",
    )
    try:
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}) as client:
            response = await client.post("/v1/jobs", json={"task": "cli.add", "args": [1, 2]})
            assert response.status_code == 202, response.text
            assert (await client.get(response.headers["location"])).json()["state"] == "queued"
            assert (
                await client.get("/v1/queues", headers={"Authorization": "Bearer nope"})
            ).status_code == 401
            big = await client.post(
                "/v1/jobs", content=b"x" * (2 * 1024 * 1024), headers={"content-type": "application/json"}
            )
            assert big.status_code == 413  # refused from Content-Length over a real socket

            async def chunked() -> AsyncIterator[bytes]:
                for _ in range(40):
                    yield b" " * 65536

            streamed = await client.post(
                "/v1/jobs", content=chunked(), headers={"content-type": "application/json"}
            )
            assert streamed.status_code == 413  # refused by counting
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0


async def test_offload_run_serves_the_api_and_the_printed_example_works(tmp_path: Path) -> None:
    proc, url = await start(
        ["run", "--processes", "1", "--port", "0", "--duration", "60"],
        tmp_path,
        r"HTTP API on (http://127\.0\.0\.1:\d+)",
    )
    try:
        example = ""
        async with asyncio.timeout(10):
            async for line in lines(proc):
                if "curl -X POST" in line:
                    example = line
                    break
        assert '\'{"task":"demo.thumbnail","args":[1,640]}\'' in example
        body = json.loads(example.split("-d '")[1].rstrip().rstrip("'"))
        async with httpx.AsyncClient(base_url=url) as client:
            response = await client.post("/v1/jobs", json=body)
            assert response.status_code == 202
            job = (await client.get(response.headers["location"], params={"wait": 30})).json()
            assert job["state"] == "succeeded" and job["result"]["width"] == 640
    finally:
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
