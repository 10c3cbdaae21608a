"""The `offload` command. Every option can also be set by the OFFLOAD_* variable shown in --help.

Bad input (an unknown task, invalid JSON, an unreachable or foreign store) prints one line that
says what to do, and exits non-zero without writing anything.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar
from urllib.parse import urlsplit

import click

from offload import eventloop, logs
from offload.app import DEFAULT_BROKER, App
from offload.errors import OffloadError
from offload.loader import load_app

F = TypeVar("F", bound=Callable[..., Any])

CONTEXT = {"auto_envvar_prefix": "OFFLOAD", "show_default": True, "help_option_names": ["-h", "--help"]}


def fail_cleanly(fn: F) -> F:
    """Turn offload errors into one line on stderr and exit status 1."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except OffloadError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def broker_option(fn: F) -> F:
    return click.option(
        "--broker",
        envvar="OFFLOAD_BROKER_URL",
        show_envvar=True,
        default=None,
        help=f"Broker URL; default: the app's, else {DEFAULT_BROKER}.",
    )(fn)


def app_option(fn: F) -> F:
    return click.option(
        "--app",
        "app_path",
        envvar="OFFLOAD_APP",
        show_envvar=True,
        default=None,
        help="MODULE:ATTR of your App (needed to check task names).",
    )(fn)


def _open(app_path: str | None, broker: str | None, must_exist: bool = True) -> App:
    if broker:
        os.environ["OFFLOAD_BROKER_URL"] = broker
    app = load_app(app_path) if app_path else App(broker)
    if broker:
        app.broker_url = broker
    url = urlsplit(app.broker_url)
    if must_exist and url.scheme == "sqlite":
        path = url.path[1:] if url.path.startswith("/") else url.path
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise OffloadError(
                f"directory {directory!r} of the SQLite store {path!r} does not exist; "
                "check --broker / OFFLOAD_BROKER_URL"
            )
        if not os.path.exists(path):
            raise OffloadError(
                f"no offload store at {path!r}: send a job or start a worker first, or set "
                "--broker / OFFLOAD_BROKER_URL to the store you meant"
            )
    return app


@click.group(context_settings=CONTEXT)
@click.option("--log-level", default="INFO", show_envvar=True, help="DEBUG, INFO, WARNING, ERROR.")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_envvar=True,
    help="json: one object per line, for log pipelines.",
)
def main(log_level: str, log_format: str) -> None:
    """offload: durable background jobs.

    `offload run` starts workers and a demo; `offload worker myapp:app` runs your tasks.
    """
    logs.configure(log_level, log_format)


@main.command(context_settings=CONTEXT)
@click.argument("app_path", envvar="OFFLOAD_APP", metavar="MODULE:ATTR")
@click.option("--queues", "-Q", default="default", show_envvar=True, help="Comma-separated queues.")
@click.option(
    "--concurrency",
    "-c",
    default=16,
    type=click.IntRange(1, 10_000),
    show_envvar=True,
    help="Jobs run at once per process.",
)
@click.option(
    "--processes",
    "-p",
    default=1,
    type=click.IntRange(1, 256),
    show_envvar=True,
    help="Worker processes (supervised, restarted on crash).",
)
@click.option("--burst", is_flag=True, show_envvar=True, help="Exit when the queues are empty.")
@click.option(
    "--grace",
    default=30.0,
    type=click.FloatRange(0),
    show_envvar=True,
    help="Seconds running jobs get to finish on SIGTERM.",
)
@broker_option
@fail_cleanly
def worker(
    app_path: str,
    queues: str,
    concurrency: int,
    processes: int,
    burst: bool,
    grace: float,
    broker: str | None,
) -> None:
    """Run jobs from QUEUES until stopped (SIGTERM drains gracefully)."""
    queue_list = [q.strip() for q in queues.split(",") if q.strip()]
    if processes > 1:
        from offload.worker.supervisor import Supervisor

        argv = [
            "worker",
            app_path,
            "--queues",
            ",".join(queue_list),
            "--concurrency",
            str(concurrency),
            "--grace",
            str(grace),
            "--processes",
            "1",
        ]
        if burst:
            argv.append("--burst")
        if broker:
            argv += ["--broker", broker]
        # Fail here, once, rather than in every child (which the supervisor would restart forever):
        # load the app and open its store.
        checked = _open(app_path, broker, must_exist=False)
        checked.run_sync(lambda b: b.stats([]))
        checked.close()
        sys.exit(Supervisor(argv, processes, burst, grace).run())
    app = _open(app_path, broker, must_exist=False)
    _run_worker(app, queue_list, concurrency, burst, grace)


def _run_worker(app: App, queues: list[str], concurrency: int, burst: bool, grace: float) -> None:
    from offload.worker import Worker

    async def run() -> None:
        w = Worker(app, queues, concurrency=concurrency, burst=burst, grace=grace)
        w.install_signal_handlers()
        try:
            await w.run()
        finally:
            await app.close_async()

    eventloop.run(run())


@main.command(context_settings=CONTEXT)
@click.argument("app_path", envvar="OFFLOAD_APP", metavar="[MODULE:ATTR]", default="offload.demo:app")
@click.option("--processes", "-p", default=2, type=click.IntRange(1, 256), show_envvar=True)
@click.option("--concurrency", "-c", default=16, type=click.IntRange(1, 10_000), show_envvar=True)
@click.option(
    "--duration",
    default=None,
    type=click.FloatRange(0),
    show_envvar=True,
    help="Stop after this many seconds (default: run until Ctrl-C).",
)
@click.option(
    "--port",
    default=8000,
    type=click.IntRange(0, 65535),
    show_envvar=True,
    help="Port of the HTTP API on 127.0.0.1 (no auth: insecure-local); 0 picks a free one.",
)
@broker_option
@fail_cleanly
def run(
    app_path: str, processes: int, concurrency: int, duration: float | None, port: int, broker: str | None
) -> None:
    """All in one: worker processes, the HTTP API on 127.0.0.1, and for the demo app a producer."""
    from offload.runner import run_all_in_one

    sys.exit(run_all_in_one(app_path, processes, concurrency, duration, broker, port))


MIB = 1024 * 1024


@main.command(context_settings=CONTEXT)
@click.argument("app_path", envvar="OFFLOAD_APP", metavar="MODULE:ATTR")
@click.option("--host", default="127.0.0.1", show_envvar=True, help="Address to listen on (0.0.0.0: all).")
@click.option("--port", default=8000, type=click.IntRange(0, 65535), show_envvar=True)
@click.option(
    "--keys-file",
    type=click.Path(dir_okay=False),
    default=None,
    show_envvar=True,
    help="API keys made by `offload keys create` (reloaded when it changes).",
)
@click.option(
    "--insecure-local",
    is_flag=True,
    show_envvar=True,
    help="No authentication; listens on 127.0.0.1 only.",
)
@click.option(
    "--max-body-bytes",
    default=MIB,
    type=click.IntRange(1),
    show_envvar=True,
    help="Larger request bodies are refused (413) before they are read.",
)
@broker_option
@fail_cleanly
def api(
    app_path: str,
    host: str,
    port: int,
    keys_file: str | None,
    insecure_local: bool,
    max_body_bytes: int,
    broker: str | None,
) -> None:
    """Serve the HTTP API of MODULE:ATTR: submit jobs, follow them, queues, dead letters."""
    from offload.api.auth import KeyStore

    if insecure_local and keys_file:
        raise OffloadError("give --keys-file or --insecure-local, not both")
    if not insecure_local and not keys_file:
        raise OffloadError(
            "offload api needs API keys: create one with `offload keys create --scopes submit,read "
            "--keys-file offload-keys.json` and pass --keys-file offload-keys.json (or use "
            "--insecure-local for an unauthenticated server on 127.0.0.1)"
        )
    if insecure_local and host != "127.0.0.1":
        click.echo(f"--insecure-local listens on 127.0.0.1 only (not {host})", err=True)
        host = "127.0.0.1"
    keys = KeyStore.open(keys_file) if keys_file else None
    if keys is not None and not keys.active():
        click.echo(f"warning: {keys_file} holds no active key; every request will get 401", err=True)
    app = _open(app_path, broker, must_exist=False)
    from offload.api.app import create_api
    from offload.api.server import bind, make_server, url_of

    asgi = create_api(app, keys=keys, insecure_local=insecure_local, max_body_bytes=max_body_bytes)
    sock = bind(host, port)

    async def serve() -> None:
        import signal

        await app.broker()  # a store that cannot be opened fails here, once, with its reason
        server = make_server(asgi)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
        auth = "no auth: insecure-local" if insecure_local else f"keys from {keys_file}"
        click.echo(f"offload api: {app_path} on {url_of(sock)} ({auth}); broker {app.broker_url}")
        try:
            await server.serve(sockets=[sock])
        finally:
            await app.close_async()

    eventloop.run(serve())


@main.group(context_settings=CONTEXT)
def keys() -> None:
    """API keys for `offload api`: create (shown once, stored hashed), list, revoke."""


def keys_file_option(fn: F) -> F:
    return click.option(
        "--keys-file",
        type=click.Path(dir_okay=False),
        default="offload-keys.json",
        show_envvar=True,
        help="The keys file `offload api --keys-file` reads.",
    )(fn)


@keys.command("create", context_settings=CONTEXT)
@click.option("--scopes", required=True, help="Comma-separated: submit, read, admin (admin implies all).")
@click.option("--rate", default=None, help="Per-key rate limit per API process: N/s, N/m or N/h.")
@click.option("--name", default=None, help="A label for `offload keys list`.")
@keys_file_option
@fail_cleanly
def keys_create(scopes: str, rate: str | None, name: str | None, keys_file: str) -> None:
    """Create a key and print it once; the keys file keeps only its SHA-256."""
    from offload.api.auth import KeyStore

    store = KeyStore.open(keys_file, create=True)
    key, secret = store.create(scopes, rate, name)
    click.echo(secret)
    click.echo(
        f"created key {key.id} (scopes {','.join(sorted(key.scopes))}, rate {key.rate or 'unlimited'}) "
        f"in {keys_file}; it is shown only this once",
        err=True,
    )


@keys.command("list", context_settings=CONTEXT)
@keys_file_option
@fail_cleanly
def keys_list(keys_file: str) -> None:
    """Every key's id, scopes, rate and state (never the key)."""
    import time

    from offload.api.auth import KeyStore

    row = "{:<14} {:<20} {:<10} {:<20} {:<8} {}"
    click.echo(row.format("id", "scopes", "rate", "created", "state", "name"))
    for key in KeyStore.open(keys_file).all():
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(key.created_at))
        state = "active" if key.revoked_at is None else "revoked"
        scopes = ",".join(sorted(key.scopes))
        click.echo(row.format(key.id, scopes, key.rate or "-", created, state, key.name or ""))


@keys.command("revoke", context_settings=CONTEXT)
@click.argument("key_id")
@keys_file_option
@fail_cleanly
def keys_revoke(key_id: str, keys_file: str) -> None:
    """Revoke a key by id; running servers refuse it within a second."""
    from offload.api.auth import KeyStore

    if not KeyStore.open(keys_file).revoke(key_id):
        raise OffloadError(f"no active key {key_id!r} in {keys_file} (see `offload keys list`)")
    click.echo(f"revoked key {key_id}")


@main.command(context_settings=CONTEXT)
@click.argument("task_name", metavar="TASK")
@click.option("--args", "args_json", default="[]", help="JSON array of positional arguments.")
@click.option("--kwargs", "kwargs_json", default="{}", help="JSON object of keyword arguments.")
@click.option("--queue", default=None, help="Override the task's queue.")
@click.option("--delay", default=None, type=click.FloatRange(0), help="Seconds before it may run.")
@click.option("--priority", default=None, type=click.IntRange(0, 9))
@click.option("--idempotency-key", default=None, help="Same key within its window: same job.")
@app_option
@broker_option
@fail_cleanly
def enqueue(
    task_name: str,
    args_json: str,
    kwargs_json: str,
    queue: str | None,
    delay: float | None,
    priority: int | None,
    idempotency_key: str | None,
    app_path: str | None,
    broker: str | None,
) -> None:
    """Send one job for TASK and print its id."""
    if not app_path:
        raise OffloadError(
            "enqueue needs your app to check the task: pass --app MODULE:ATTR or set OFFLOAD_APP"
        )
    args = _json_arg("--args", args_json, list)
    kwargs = _json_arg("--kwargs", kwargs_json, dict)
    app = _open(app_path, broker, must_exist=False)
    task = app.get_task(task_name)
    call = task.options(queue=queue, delay=delay, priority=priority, idempotency_key=idempotency_key)
    job = call.send(*args, **kwargs)
    click.echo(job.id if job.created else f"{job.id} (existing job for this idempotency key)")
    app.close()


def _json_arg(flag: str, text: str, kind: type) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise OffloadError(f"{flag} is not valid JSON ({exc.msg} at position {exc.pos}): {text!r}") from None
    if not isinstance(value, kind):
        raise OffloadError(f"{flag} must be a JSON {'array' if kind is list else 'object'}, got {text!r}")
    return value


@main.command(context_settings=CONTEXT)
@click.argument("job_id")
@app_option
@broker_option
@fail_cleanly
def inspect(job_id: str, app_path: str | None, broker: str | None) -> None:
    """Show one job: state, attempts, result or error, timestamps (JSON)."""
    app = _open(app_path, broker)
    info = app.run_sync(lambda b: b.get_job(job_id))
    app.close()
    if info is None:
        raise OffloadError(f"no job {job_id} in {app.broker_url}: it never existed or was pruned")
    import msgspec

    click.echo(json.dumps(msgspec.to_builtins(info), indent=2))


@main.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@app_option
@broker_option
@fail_cleanly
def queues(as_json: bool, app_path: str | None, broker: str | None) -> None:
    """Depth, running, delayed and dead jobs and the drain rate of every queue."""
    app = _open(app_path, broker)
    stats = app.run_sync(lambda b: b.stats())
    app.close()
    if as_json:
        import msgspec

        click.echo(json.dumps([msgspec.to_builtins(s) for s in stats], indent=2))
        return
    row = "{:<20} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9}"
    click.echo(row.format("queue", "ready", "delayed", "running", "dead", "bound", "drain/s"))
    for s in stats:
        bound = "-" if s.max_depth is None else str(s.max_depth)
        drain = f"{s.drain_rate:.1f}"
        click.echo(row.format(s.queue, s.ready, s.delayed, s.running, s.dead, bound, drain))


@main.group(context_settings=CONTEXT)
def dlq() -> None:
    """The dead-letter queue: list, replay, purge."""


@dlq.command("list", context_settings=CONTEXT)
@click.option("--queue", default=None)
@click.option("--limit", default=50, type=click.IntRange(1, 100_000))
@app_option
@broker_option
@fail_cleanly
def dlq_list(queue: str | None, limit: int, app_path: str | None, broker: str | None) -> None:
    """Dead jobs, newest first, with the reason each died."""
    app = _open(app_path, broker)
    jobs = app.run_sync(lambda b: b.dead_jobs(queue, limit))
    app.close()
    for job in jobs:
        click.echo(f"{job.id}  {job.queue:<12} {job.task:<30} deliveries={job.deliveries}  {job.error}")
    click.echo(f"{len(jobs)} dead job(s)", err=True)


def _selection(job_ids: tuple[str, ...], queue: str | None, all_: bool) -> list[str] | None:
    if not job_ids and queue is None and not all_:
        raise OffloadError("name JOB_IDs, or pass --queue NAME or --all")
    return list(job_ids) if job_ids else None


@dlq.command("replay", context_settings=CONTEXT)
@click.argument("job_ids", nargs=-1)
@click.option("--queue", default=None)
@click.option("--all", "all_", is_flag=True, help="Every dead job.")
@app_option
@broker_option
@fail_cleanly
def dlq_replay(
    job_ids: tuple[str, ...], queue: str | None, all_: bool, app_path: str | None, broker: str | None
) -> None:
    """Put dead jobs back on their queue with fresh counters."""
    ids = _selection(job_ids, queue, all_)
    app = _open(app_path, broker)
    count = app.run_sync(lambda b: b.replay_dead(ids, queue))
    app.close()
    click.echo(f"replayed {count} job(s)")


@dlq.command("purge", context_settings=CONTEXT)
@click.argument("job_ids", nargs=-1)
@click.option("--queue", default=None)
@click.option("--all", "all_", is_flag=True, help="Every dead job.")
@app_option
@broker_option
@fail_cleanly
def dlq_purge(
    job_ids: tuple[str, ...], queue: str | None, all_: bool, app_path: str | None, broker: str | None
) -> None:
    """Delete dead jobs for good."""
    ids = _selection(job_ids, queue, all_)
    app = _open(app_path, broker)
    count = app.run_sync(lambda b: b.purge_dead(ids, queue))
    app.close()
    click.echo(f"purged {count} dead job(s)")


@main.command(context_settings=CONTEXT)
@click.argument("queue")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@app_option
@broker_option
@fail_cleanly
def purge(queue: str, yes: bool, app_path: str | None, broker: str | None) -> None:
    """Delete the waiting jobs of QUEUE (running and finished jobs are kept)."""
    app = _open(app_path, broker)
    if not yes:
        click.confirm(f"delete every waiting job in queue {queue!r} of {app.broker_url}?", abort=True)
    count = app.run_sync(lambda b: b.purge(queue))
    app.close()
    click.echo(f"purged {count} waiting job(s) from {queue!r}")


def _show_environment_variables(group: click.Group) -> None:
    """Every option can be set by an OFFLOAD_* variable (auto_envvar_prefix): say which in --help."""
    for command in group.commands.values():
        for param in command.params:
            if isinstance(param, click.Option):
                param.show_envvar = True
        if isinstance(command, click.Group):
            _show_environment_variables(command)


_show_environment_variables(main)
