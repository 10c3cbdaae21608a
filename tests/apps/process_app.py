"""An importable app for process-executor tests: worker children import it by path.

The parent test builds its own App with `make_app(url)`; a child imports this module, whose `app`
registers the same task names (children only run task functions, they never touch the broker).
"""

from __future__ import annotations

import os
import time

from offload import App, NonRetryable

IMPORT_PATH = "tests.apps.process_app:app"


def make_app(broker_url: str) -> App:
    app = App(broker_url, name="process-app")
    app.import_path = IMPORT_PATH

    @app.task(name="proc.square", executor="process", timeout=30)
    def square(n: int) -> int:
        return n * n

    @app.task(name="proc.pid", executor="process", timeout=30)
    def pid() -> int:
        return os.getpid()

    @app.task(name="proc.quick", executor="process", timeout=0.1, retries=0)
    def quick() -> str:
        return "quick"

    @app.task(name="proc.sleepy", executor="process", timeout=0.3, retries=1, backoff=0.0)
    def sleepy(seconds: float) -> str:
        time.sleep(seconds)
        return "woke"

    @app.task(name="proc.reject", executor="process", retries=3, backoff=0.0)
    def reject(reason: str) -> None:
        raise NonRetryable(reason)

    @app.task(name="proc.crash", executor="process", retries=1, backoff=0.0)
    def crash() -> None:
        os._exit(3)

    return app


app = make_app(os.environ.get("OFFLOAD_BROKER_URL", "memory://process-app"))
