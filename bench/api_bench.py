"""HTTP API benchmark: what `POST /v1/jobs` costs over a do-nothing endpoint on the same server,
and how the API behaves at ten times the rate its workers can drain.

    .venv/bin/python -m bench.api_bench                  # ~1 min on 2 cores
    .venv/bin/python -m bench.api_bench --seconds 3      # a quicker look

One server process serves, with uvicorn exactly as `offload api` does (offload.api.server),
offload's API plus `POST /trivial` (202 `{"ok":true}`, no broker) on the same port. The broker is
SQLite in a temporary directory, `durability=strict` (an fsync'd commit per group of submits).
A separate load-generator process (raw HTTP/1.1 keep-alive connections over loopback, so the
client's own overhead stays small) measures:

1. overhead: submits/s and p50/p99 latency of `POST /v1/jobs` (a no-op task, unbounded queue,
   no worker running, so only the API and the enqueue are measured) against `POST /trivial`,
   interleaved in rounds, closed loop over `--connections` connections.
2. overload: one worker process (`offload worker`, `--worker-concurrency` slots) drains a queue
   bounded at `--max-depth` whose jobs each sleep `--job-ms`; its sustainable rate is measured
   first, then submits are offered at 10x that rate (open loop, paced) for `--seconds`. Reported:
   share of 503s, their latency (target < 5 ms), accepted p99, whether every 503 had an integer
   Retry-After >= 1, and the API process's RSS before and after.

The server runs on the event loop `offload api` uses (uvloop where installed);
`OFFLOAD_EVENT_LOOP=asyncio` runs it on asyncio's own loop, to compare.
Loopback only; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from offload import App, eventloop

# -- the app under test (imported by the server and the worker processes) --------------------------

app = App(os.environ.get("OFFLOAD_BROKER_URL", "memory://api-bench"), name="api-bench")
app.queue("bounded", max_depth=int(os.environ.get("API_BENCH_MAX_DEPTH", "100")))
JOB_SECONDS = float(os.environ.get("API_BENCH_JOB_MS", "20")) / 1000


@app.task(name="bench.noop", queue="unbounded", public=True)
def noop(n: int) -> int:
    return n


@app.task(name="bench.sleep", queue="bounded", public=True)
async def sleep(n: int) -> int:
    await asyncio.sleep(JOB_SECONDS)
    return n


def serve(port: int) -> None:
    """The server process: offload's API and /trivial on one uvicorn server."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route
    from starlette.types import Receive, Scope, Send

    from offload.api.app import create_api
    from offload.api.server import bind, make_server, url_of

    async def trivial(request: Request) -> Response:
        await request.body()
        return Response(b'{"ok":true}', status_code=202, media_type="application/json")

    # Each endpoint sits in a Starlette app of its own, so both pay the same framework layers
    # (error middleware, router, request/response objects) and the ratio is what offload adds.
    api = create_api(app, keys=None, insecure_local=True)
    trivial_app = Starlette(routes=[Route("/trivial", trivial, methods=["POST"])])

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        await (trivial_app if scope.get("path") == "/trivial" else api)(scope, receive, send)

    sock = bind("127.0.0.1", port)

    async def main() -> None:
        await app.broker()
        server = make_server(asgi)
        print(f"serving {url_of(sock)} pid {os.getpid()}", flush=True)
        await server.serve(sockets=[sock])

    eventloop.run(main())  # the loop `offload api` runs on (uvloop unless OFFLOAD_EVENT_LOOP=asyncio)


# -- the load generator ------------------------------------------------------------------------------


class Connection:
    """One keep-alive HTTP/1.1 connection; requests one at a time; the least client overhead."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def post(self, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        payload = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return status, headers, payload

    def close(self) -> None:
        self.writer.close()


@dataclass
class Sample:
    latencies: dict[int, list[float]] = field(default_factory=dict)  # status -> seconds
    bad_retry_after: int = 0
    elapsed: float = 0.0

    def add(self, status: int, seconds: float) -> None:
        self.latencies.setdefault(status, []).append(seconds)

    def count(self, status: int | None = None) -> int:
        if status is None:
            return sum(len(v) for v in self.latencies.values())
        return len(self.latencies.get(status, []))

    def all(self) -> list[float]:
        return [x for v in self.latencies.values() for x in v]


def pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] * 1000


async def closed_loop(port: int, path: str, make_body: Any, seconds: float, connections: int) -> Sample:
    sample = Sample()
    conns = [await Connection.open("127.0.0.1", port) for _ in range(connections)]
    deadline = time.perf_counter() + seconds
    counter = iter(range(10**9))

    async def run(conn: Connection) -> None:
        while time.perf_counter() < deadline:
            body = make_body(next(counter))
            started = time.perf_counter()
            status, _, _ = await conn.post(path, body)
            sample.add(status, time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(run(c) for c in conns))
    sample.elapsed = time.perf_counter() - started
    for c in conns:
        c.close()
    return sample


async def open_loop(port: int, rate: float, seconds: float, connections: int) -> Sample:
    """Offer `rate` submits/s (paced per connection); late requests go at once (no catch-up burst)."""
    sample = Sample()
    conns = [await Connection.open("127.0.0.1", port) for _ in range(connections)]
    interval = connections / rate
    total = int(rate * seconds)
    counter = iter(range(total))
    begin = time.perf_counter()

    async def run(index: int, conn: Connection) -> None:
        next_at = begin + index * interval / connections
        for n in counter:
            delay = next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            body = json.dumps({"task": "bench.sleep", "args": [n]}).encode()
            started = time.perf_counter()
            status, headers, _ = await conn.post("/v1/jobs", body)
            sample.add(status, time.perf_counter() - started)
            if status == 503:
                retry_after = headers.get("retry-after", "")
                if not (retry_after.isdigit() and int(retry_after) >= 1):
                    sample.bad_retry_after += 1
            next_at = max(next_at + interval, time.perf_counter() - interval)

    await asyncio.gather(*(run(i, c) for i, c in enumerate(conns)))
    sample.elapsed = time.perf_counter() - begin
    for c in conns:
        c.close()
    return sample


# -- orchestration ---------------------------------------------------------------------------------------


def rss_mib(pid: int) -> float:
    import psutil

    return float(psutil.Process(pid).memory_info().rss) / 2**20


def start_server(env: dict[str, str]) -> tuple[subprocess.Popen[str], int, int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.api_bench", "--serve"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r":(\d+) pid (\d+)", line)
    if match is None:
        proc.kill()
        raise SystemExit(f"server did not start: {line!r}")
    return proc, int(match.group(1)), int(match.group(2))


WORKER_COMMAND = [sys.executable, "-m", "offload", "--log-level", "WARNING", "worker", "bench.api_bench:app"]


def start_worker(env: dict[str, str], concurrency: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*WORKER_COMMAND, "--queues", "bounded", "--concurrency", str(concurrency)],
        env=env,
        text=True,
    )


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


async def measure_drain(port: int, seconds: float) -> float:
    """Jobs/s the worker sustains: keep the bounded queue full for `seconds`, count what it took."""
    stats = Sample()
    conns = [await Connection.open("127.0.0.1", port) for _ in range(4)]
    deadline = time.perf_counter() + seconds

    async def run(conn: Connection) -> None:
        n = 0
        while time.perf_counter() < deadline:
            status, _, _ = await conn.post(
                "/v1/jobs", json.dumps({"task": "bench.sleep", "args": [n]}).encode()
            )
            stats.add(status, 0.0)
            n += 1
            if status == 503:
                await asyncio.sleep(0.005)

    started = time.perf_counter()
    await asyncio.gather(*(run(c) for c in conns))
    elapsed = time.perf_counter() - started
    for c in conns:
        c.close()
    return stats.count(202) / elapsed


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=6.0, help="per measurement")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the overhead test")
    parser.add_argument("--max-depth", type=int, default=100)
    parser.add_argument("--job-ms", type=float, default=20.0)
    parser.add_argument("--worker-concurrency", type=int, default=8)
    args = parser.parse_args(argv)
    if args.serve:
        serve(0)
        return
    asyncio.run(run(args))


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="offload-api-bench-") as tmp:
        env = {
            **os.environ,
            "OFFLOAD_BROKER_URL": f"sqlite:///{Path(tmp) / 'bench.db'}",
            "API_BENCH_MAX_DEPTH": str(args.max_depth),
            "API_BENCH_JOB_MS": str(args.job_ms),
            "PYTHONPATH": os.pathsep.join(
                [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")]
            ),
        }
        server, port, pid = start_server(env)
        worker: subprocess.Popen[str] | None = None
        try:
            # 1. overhead of a submit over a trivial endpoint, interleaved
            submit: list[Sample] = []
            trivial: list[Sample] = []
            warm = json.dumps({"task": "bench.noop", "args": [0]}).encode()
            await closed_loop(port, "/v1/jobs", lambda n: warm, 1.0, args.connections)
            await closed_loop(port, "/trivial", lambda n: warm, 1.0, args.connections)

            def body_of(n: int) -> bytes:
                return b'{"task":"bench.noop","args":[%d]}' % n

            for _ in range(args.rounds):
                trivial.append(await closed_loop(port, "/trivial", body_of, args.seconds, args.connections))
                submit.append(await closed_loop(port, "/v1/jobs", body_of, args.seconds, args.connections))
            # 2. overload at 10x what the worker drains
            worker = start_worker(env, args.worker_concurrency)
            drain = await measure_drain(port, max(3.0, args.seconds / 2))
            rss_before = rss_mib(pid)
            overload = await open_loop(port, 10 * drain, args.seconds, args.connections)
            rss_after = rss_mib(pid)
        finally:
            if worker is not None:
                stop(worker)
            stop(server)
    report(args, submit, trivial, drain, overload, rss_before, rss_after)


def report(
    args: argparse.Namespace,
    submit: list[Sample],
    trivial: list[Sample],
    drain: float,
    overload: Sample,
    rss_before: float,
    rss_after: float,
) -> None:
    def rate(samples: list[Sample], status: int) -> float:
        return statistics.median(s.count(status) / s.elapsed for s in samples)

    def lat(samples: list[Sample], q: float) -> float:
        return statistics.median(pct(s.all(), q) for s in samples)

    submit_rate, trivial_rate = rate(submit, 202), rate(trivial, 202)
    errors = sum(s.count() - s.count(202) for s in submit + trivial)
    rows = [
        ("POST /trivial (same server, no broker)", trivial_rate, lat(trivial, 50), lat(trivial, 99)),
        ("POST /v1/jobs (validate + durable enqueue)", submit_rate, lat(submit, 50), lat(submit, 99)),
    ]
    print(
        f"\n## HTTP API overhead ({args.connections} connections, {args.rounds} x {args.seconds:.0f} s, "
        "medians)\n"
    )
    print("| endpoint | requests/s | p50 ms | p99 ms |\n|---|---:|---:|---:|")
    for name, per_second, p50, p99 in rows:
        print(f"| {name} | {per_second:,.0f} | {p50:.2f} | {p99:.2f} |")
    (_, r1, a1, b1), (_, r2, a2, b2) = rows
    print(f"| ratio submit / trivial | {r2 / r1:.2f} | {a2 / a1:.2f} | {b2 / b1:.2f} |")
    if errors:
        print(f"\n{errors} non-202 answers in the overhead test")
    refused = overload.latencies.get(503, [])
    accepted = overload.latencies.get(202, [])
    other = overload.count() - len(refused) - len(accepted)
    answered = overload.count()
    print(
        f"\n## Overload: {10 * drain:,.0f} submits/s offered for {args.seconds:.0f} s, 10x the {drain:,.0f} "
        f"jobs/s one worker drains ({args.worker_concurrency} slots x {args.job_ms:.0f} ms jobs), "
        f"queue bound {args.max_depth}\n"
    )
    print("| metric | value |\n|---|---:|")
    print(f"| requests answered | {answered:,} ({answered / overload.elapsed:,.0f}/s) |")
    print(f"| 503 share | {len(refused) / max(1, answered):.1%} |")
    print(f"| 503 latency p50 / p99 ms | {pct(refused, 50):.2f} / {pct(refused, 99):.2f} |")
    print(f"| accepted (202) | {len(accepted):,} ({len(accepted) / overload.elapsed:,.0f}/s) |")
    print(f"| accepted latency p50 / p99 ms | {pct(accepted, 50):.2f} / {pct(accepted, 99):.2f} |")
    print(f"| 503 without a valid Retry-After | {overload.bad_retry_after} |")
    print(f"| other statuses | {other} |")
    print(f"| API RSS before / after MiB | {rss_before:.1f} / {rss_after:.1f} |")


if __name__ == "__main__":
    main()
