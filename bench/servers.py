"""The broker servers: resetting the bench's own state on them, and measuring what they spend.

A probe reads, for one server, the CPU time it has used and (where the server counts them) the
operations it has served, so a measurement can divide their deltas by the jobs it ran:

- redis: CPU from `INFO cpu`, commands per name from `INFO commandstats`. Both are server-wide:
  other clients of the same server (tests running beside the bench) add to them.
- postgres: CPU of the backends connected to the bench's database (found by their process
  titles in /proc); operations are transactions (`xact_commit + xact_rollback` in
  `pg_stat_database` for that database), which a backend reports up to ~1 s late, hence `lag`.
- rabbitmq, nats: CPU of the server process (shared with anyone else using it); no operation
  counts (no management or monitoring port here).

Round trips are counted on the client side, the same way for every server and system: the
requests a process wrote are the data segments its TCP connections to the server sent
(`data_segs_out` of `ss -ti`; on loopback one request, or one pipeline, is one segment unless it
is over ~64 KB). Only connections open at both readings count in full: one opened in between
counts from zero, one closed in between is lost (rq's per-job work horses).

The servers are shared: nothing here stops or reconfigures them. Resets touch only what the
bench owns: its Redis DB, its PostgreSQL database, the RabbitMQ queues its systems declare (by
name) and its NATS KV buckets.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psutil

# -- resets ------------------------------------------------------------------------------------


def reset_redis(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


def _admin_dsn(postgres_url: str) -> str:
    """The same server and user, database `postgres` (to drop and create the bench's database)."""
    parts = urlsplit(postgres_url)
    return urlunsplit((parts.scheme, parts.netloc, "/postgres", "", ""))


def reset_postgres(postgres_url: str) -> None:
    """Drop the bench's database (disconnecting whoever is left in it) and create it empty."""
    import psycopg

    database = urlsplit(postgres_url).path.lstrip("/")
    if not database.replace("_", "").isalnum() or database in ("postgres", "template0", "template1"):
        raise ValueError(f"refusing to drop database {database!r}")
    with psycopg.connect(_admin_dsn(postgres_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{database}"')


def check_postgres(postgres_url: str) -> None:
    import psycopg

    with psycopg.connect(_admin_dsn(postgres_url), autocommit=True, connect_timeout=5) as conn:
        conn.execute("SELECT 1")


def reset_amqp(amqp_url: str, queues: tuple[str, ...], exchanges: tuple[str, ...] = ()) -> None:
    """Delete the named queues and exchanges (a missing one is fine)."""
    if not queues and not exchanges:
        return
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        for name in queues:
            channel.queue_delete(queue=name)
        for name in exchanges:
            channel.exchange_delete(exchange=name)
    finally:
        connection.close()


def check_amqp(amqp_url: str) -> None:
    import pika

    pika.BlockingConnection(pika.URLParameters(amqp_url)).close()


def reset_nats(nats_url: str, buckets: tuple[str, ...]) -> None:
    """Delete the named JetStream KV buckets and their ready streams `OFFLOAD_<bucket>` (missing
    ones are fine): the broker's own reset, offload.brokers.nats.delete_bucket."""
    from offload.brokers.nats import delete_bucket

    base = urlsplit(nats_url)._replace(query="").geturl()
    for bucket in buckets:
        if bucket.endswith("_drain") and bucket.removesuffix("_drain") in buckets:
            continue  # deleted with its bucket
        asyncio.run(delete_bucket(f"{base}?bucket={bucket}"))


# -- round trips ------------------------------------------------------------------------------

_PID = re.compile(r"pid=(\d+),")
_SEGS = re.compile(r"\bdata_segs_out:(\d+)")


def requests_written(pids: Iterable[int], ports: Iterable[int]) -> dict[int, int]:
    """Data segments sent so far by TCP connections of the processes `pids`, by server port."""
    pids, ports = set(pids), sorted(set(ports))
    out = dict.fromkeys(ports, 0)
    if not pids or not ports:
        return out
    where = " or ".join(f"dport = :{port}" for port in ports)
    done = subprocess.run(
        ["ss", "-tinpH", "state", "established", f"( {where} )"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    owners: set[int] = set()
    port = 0
    for line in done.stdout.splitlines():
        if not line.startswith((" ", "\t")):
            owners = {int(pid) for pid in _PID.findall(line)}
            fields = line.split()
            port = int(fields[3].rsplit(":", 1)[1]) if len(fields) > 3 else 0
            continue
        match = _SEGS.search(line)
        if match and owners & pids and port in out:
            out[port] += int(match.group(1))
    return out


def _port(url: str, default: int) -> int:
    return urlsplit(url).port or default


def server_ports(kinds: Iterable[str], env: dict[str, str] | os._Environ[str]) -> dict[str, int]:
    """kind -> the TCP port its server listens on."""
    urls = {
        "redis": (env.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/5"), 6379),
        "postgres": (env.get("BENCH_POSTGRES_URL", "postgresql://127.0.0.1:5432/x"), 5432),
        "rabbitmq": (env.get("BENCH_AMQP_URL", "amqp://127.0.0.1:5672/"), 5672),
        "nats": (env.get("BENCH_NATS_URL", "nats://127.0.0.1:4222"), 4222),
    }
    return {kind: _port(*urls[kind]) for kind in kinds}


# -- probes ------------------------------------------------------------------------------------


def _cpu(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def _find(match: Any) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if match(process.info["name"] or "", process.info["cmdline"] or []):
                found.append(process)
    return found


class Probe:
    kind = ""
    lag = 0.0  # seconds the server may take to count an operation

    def cpu_seconds(self) -> float:
        return 0.0

    def ops(self) -> dict[str, int] | None:
        """Operations served so far, by name; None if the server does not count them."""
        return None

    def close(self) -> None:
        pass


class RedisProbe(Probe):
    kind = "redis"

    def __init__(self, url: str) -> None:
        import redis

        self.client = redis.Redis.from_url(url)

    def cpu_seconds(self) -> float:
        info = self.client.info("cpu")
        return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])

    def ops(self) -> dict[str, int]:
        stats = self.client.info("commandstats")
        # keys look like "cmdstat_evalsha": {"calls": 12, ...}; INFO itself is left out
        return {
            key.removeprefix("cmdstat_"): int(value["calls"])
            for key, value in stats.items()
            if key != "cmdstat_info"
        }

    def close(self) -> None:
        self.client.close()


class PostgresProbe(Probe):
    kind = "postgres"
    lag = 1.2  # backends report their counters at most once a second (PGSTAT_MIN_INTERVAL)

    def __init__(self, url: str) -> None:
        import psycopg

        self.database = urlsplit(url).path.lstrip("/")
        self.conn = psycopg.connect(_admin_dsn(url), autocommit=True)

    def _backends(self) -> list[psutil.Process]:
        # process titles: "postgres: 15/main: <user> <database> 127.0.0.1(port) <state>"
        needle = f" {self.database} "
        return _find(lambda name, cmdline: needle in " ".join(cmdline) + " " and "postgres" in name)

    def cpu_seconds(self) -> float:
        return _cpu(self._backends())

    def ops(self) -> dict[str, int]:
        row = self.conn.execute(
            "SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = %s",
            (self.database,),
        ).fetchone()
        if row is None:
            return {"transactions": 0}
        return {"transactions": int(row[0]) + int(row[1])}

    def close(self) -> None:
        self.conn.close()


class ProcessProbe(Probe):
    """CPU of a server process found by name (RabbitMQ's beam.smp, nats-server)."""

    def __init__(self, kind: str, process_name: str) -> None:
        self.kind = kind
        self.processes = _find(lambda name, cmdline: name == process_name)

    def cpu_seconds(self) -> float:
        return _cpu(self.processes)


def probe(kind: str, env: dict[str, str] | None = None) -> Probe:
    env = os.environ if env is None else env  # type: ignore[assignment]
    if kind == "redis":
        return RedisProbe(env.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/5"))
    if kind == "postgres":
        return PostgresProbe(env.get("BENCH_POSTGRES_URL", "postgresql://root@127.0.0.1:5432/offload_bench"))
    if kind == "rabbitmq":
        return ProcessProbe(kind, "beam.smp")
    if kind == "nats":
        return ProcessProbe(kind, "nats-server")
    raise ValueError(f"unknown server {kind!r}")


class Probes:
    """Every server of one system, read together."""

    def __init__(self, kinds: tuple[str, ...] | list[str], env: dict[str, str] | None = None) -> None:
        self.probes = [probe(kind, env) for kind in kinds]
        self.ports = server_ports(kinds, os.environ if env is None else env)

    def requests(self, pids: Iterable[int]) -> dict[str, int]:
        """Requests (round trips) the processes `pids` have written so far, by server kind."""
        by_port = requests_written(pids, self.ports.values())
        return {kind: by_port[port] for kind, port in self.ports.items()}

    @property
    def lag(self) -> float:
        return max((p.lag for p in self.probes), default=0.0)

    @property
    def counts_ops(self) -> bool:
        return any(p.kind in ("redis", "postgres") for p in self.probes)

    def cpu_seconds(self) -> float:
        return sum(p.cpu_seconds() for p in self.probes)

    def background_rate(self, seconds: float = 0.5) -> float:
        """Operations per second the servers serve to others while the bench is idle (Redis
        counts server-wide; PostgreSQL's counts are the bench's database only, so 0)."""
        shared = [p for p in self.probes if p.kind == "redis"]
        if not shared:
            return 0.0
        before = [p.ops() or {} for p in shared]
        time.sleep(seconds)
        after = [p.ops() or {} for p in shared]
        return sum(sum(ops_delta(b, a).values()) for b, a in zip(before, after, strict=True)) / seconds

    def ops(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.probes:
            for name, calls in (p.ops() or {}).items():
                out[f"{p.kind}:{name}"] = calls
        return out

    def close(self) -> None:
        for p in self.probes:
            p.close()


def ops_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Operations served between two `Probes.ops()` readings, by name (non-zero only)."""
    delta = {name: calls - before.get(name, 0) for name, calls in after.items()}
    return {name: calls for name, calls in sorted(delta.items()) if calls > 0}
