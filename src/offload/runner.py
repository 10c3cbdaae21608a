"""`offload run`: the all-in-one process for a laptop or a small deployment.

It supervises worker processes (a child `offload worker --processes N`), serves the HTTP API on
127.0.0.1 (insecure-local: no auth) in this process's event loop, and, for the demo app, runs a
producer here that sends jobs and prints each outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys

import click

from offload import eventloop
from offload.app import App
from offload.loader import load_app


def run_all_in_one(
    app_path: str,
    processes: int,
    concurrency: int,
    duration: float | None,
    broker: str | None,
    port: int = 8000,
) -> int:
    from offload.api.app import create_api
    from offload.api.server import bind, make_server, url_of

    if broker:
        os.environ["OFFLOAD_BROKER_URL"] = broker
    app = load_app(app_path)
    sock = bind("127.0.0.1", port)  # a busy port fails here, before any worker starts
    queues = sorted({t.config.queue for t in app.tasks.values()} | {"default"})
    click.echo(
        f"offload run: app {app_path} on {app.broker_url}; {processes} worker process(es) x "
        f"{concurrency} slots; queues {', '.join(queues)}. Ctrl-C stops gracefully."
    )
    workers = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "offload",
            "worker",
            app_path,
            "--queues",
            ",".join(queues),
            "--processes",
            str(processes),
            "--concurrency",
            str(concurrency),
        ],
        env={**os.environ, "OFFLOAD_LOG_LEVEL": os.environ.get("OFFLOAD_LOG_LEVEL", "WARNING")},
    )
    stop = asyncio.Event()
    counts: dict[str, int] = {}

    async def main() -> None:
        server = make_server(create_api(app, keys=None, insecure_local=True))
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        _announce_api(app, url_of(sock))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if duration is not None:
            loop.call_later(duration, stop.set)
        if app_path == "offload.demo:app":
            from offload.demo import produce

            counts.update(await produce(stop, click.echo))
        else:
            await stop.wait()
        server.should_exit = True
        await serving
        await app.close_async()

    try:
        eventloop.run(main())
    finally:
        if workers.poll() is None:
            workers.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            workers.wait(timeout=45)
        if workers.poll() is None:
            workers.kill()
    if counts:
        click.echo(
            f"offload run: sent {counts['sent']} jobs, {counts['succeeded']} succeeded, "
            f"{counts['failed']} failed; workers stopped."
        )
    return 0


def _announce_api(app: App, url: str) -> None:
    public = sorted(name for name, task in app.tasks.items() if task.config.public)
    click.echo(f"offload run: HTTP API on {url} (insecure-local: no auth; OpenAPI at {url}/openapi.json)")
    if not public:
        click.echo("  no task is public=True, so the API accepts no submissions")
        return
    example = (
        '{"task":"demo.thumbnail","args":[1,640]}'
        if "demo.thumbnail" in public
        else f'{{"task":"{public[0]}"}}'
    )
    click.echo(
        f"  try: curl -X POST {url.removeprefix('http://')}/v1/jobs -H 'content-type: application/json' "
        f"-d '{example}'"
    )
