"""Runs one offload worker process on the benchmark app (stands in for `offload worker`).

    python -m bench.offload_worker --concurrency 32 [--queues default]

Stops gracefully on SIGTERM/SIGINT, like the CLI would.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from bench.systems.offload_sys import APP_PATH
from offload.loader import load_app
from offload.worker import Worker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--queues", default="default", help="comma-separated")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    app = load_app(APP_PATH)
    worker = Worker(app, args.queues.split(","), concurrency=args.concurrency, grace=5.0)

    async def serve() -> None:
        worker.install_signal_handlers()
        await worker.run()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
