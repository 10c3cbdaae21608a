"""`offload run`: the all-in-one process for a laptop or a small deployment.

It supervises worker processes (a child `offload worker --processes N`) and, for the demo app,
runs a producer in this process that sends jobs and prints each outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys

import click

from offload.loader import load_app


def run_all_in_one(
    app_path: str, processes: int, concurrency: int, duration: float | None, broker: str | None
) -> int:
    if broker:
        os.environ["OFFLOAD_BROKER_URL"] = broker
    app = load_app(app_path)
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
        await app.close_async()

    try:
        asyncio.run(main())
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
