"""The Redis broker's commands on the event loop, without redis-py's per-command layer.

Every job costs a worker a share of a FETCH and a SETTLE script, and every async send an
ENQUEUE. Through `redis.asyncio.Redis.execute_command` each call also pays for a pool checkout
under an asyncio lock and Condition, a retry wrapper, observability hooks, a pure-Python command
packer and a task per write (asyncio.wait_for): about 150 µs of CPU per call on the bench
machine, plus ~1.5 µs per argument (a 20-job SETTLE has ~40). AsyncLink keeps redis-py for what
it does well, connecting (TLS, AUTH, SELECT, RESP version, Sentinel discovery) and reading
replies (its parser, hiredis where installed, which also turns error replies into its exception
classes), and does the rest itself: hiredis packs the command, it goes to the connection's
stream, and the connection's parser reads the reply. That is about a third of the CPU per call
(docs/brokers/redis.md, Benchmark).

It relies on two attributes redis-py's asyncio connections have had since redis-py 4.2 (the
aioredis merge), `_writer` (the asyncio StreamWriter) and `_parser`; `supported` checks for them
and RedisBroker falls back to the redis-py client when they are missing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, cast

import redis.asyncio as aioredis
from redis import exceptions as rex

pack_command: Callable[[tuple[Any, ...]], bytes] | None
try:
    import hiredis

    pack_command = hiredis.pack_command
except ImportError:  # redis-py without its [hiredis] extra: the connection's own packer
    pack_command = None


def supported(pool: aioredis.ConnectionPool) -> bool:
    """Whether this redis-py's connections have what AsyncLink uses."""
    conn = cast(Any, pool).make_connection()  # not connected: nothing to close
    return hasattr(conn, "_writer") and hasattr(conn, "_parser") and _peek(conn) is not None


class AsyncLink:
    """Connections made by a redis-py pool's factory (its class and arguments; the pool itself
    never hands them out), one command or pipeline at a time on each.

    An idle connection is taken from a list used as a stack (no lock: one event loop); at most
    the pool's max_connections are open, and a caller beyond that waits up to `wait` seconds for
    one to come back, like redis-py's BlockingConnectionPool. A connection whose reply was not
    read whole (a cancel, a timeout, a connection error) is dropped, never reused. Nothing is
    re-sent: a script whose reply was lost may have run, so the caller decides (as with the
    client, which has redis-py's retries turned off too).
    """

    def __init__(self, pool: aioredis.ConnectionPool, wait: float) -> None:
        self._pool = pool  # kept: a Sentinel pool's connections refer back to it
        self._max = pool.max_connections
        self._wait = wait
        self._timeout: float | None = pool.connection_kwargs.get("socket_timeout")
        self._idle: list[Any] = []  # redis.asyncio.connection.AbstractConnection (untyped)
        self._open = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    async def call(self, *args: Any) -> Any:
        """One command's reply; an error reply is raised as redis-py's exception for it."""
        [reply] = await self._exchange([args])
        if isinstance(reply, rex.ResponseError):
            raise reply
        return reply

    async def pipeline(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """The commands in one write, their replies in order; error replies are returned as
        exceptions (redis-py's pipeline with raise_on_error=False)."""
        return await self._exchange(commands)

    async def _exchange(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        conn = self._idle.pop() if self._idle else await self._take()
        keep = False
        try:
            if not conn.is_connected:
                await conn.connect()
            elif await _stale(conn):
                # Closed while idle (a server restart, an idle timeout), or holding bytes nobody
                # asked for: connect afresh, as redis-py's pool does before handing one out.
                await conn.disconnect()
                await conn.connect()
            if pack_command is not None:
                payload = b"".join([pack_command(tuple(c)) for c in commands])
            else:
                payload = b"".join(b"".join(conn.pack_command(*c)) for c in commands)
            conn._writer.write(payload)
            parser = conn._parser
            replies = []
            async with asyncio.timeout(self._timeout):
                for _ in commands:
                    replies.append(await parser.read_response())
            # A demoted primary (Sentinel failover): connect afresh next time, which asks the
            # Sentinels where the primary is now.
            keep = not any(isinstance(r, rex.ReadOnlyError) for r in replies)
            return replies
        except TimeoutError as exc:  # asyncio.timeout's, a builtin: redis-py's, as its client raises
            raise rex.TimeoutError(f"no reply from Redis within {self._timeout} s") from exc
        finally:
            if keep and not self._closed:
                self._idle.append(conn)
            else:
                self._open -= 1
                # Closed now, before the caller hears of the failure or the cancel (nowait: no
                # I/O, nothing to wait for): a BLPOP left blocked on the server would take the
                # next wake-up, and the FETCH queued behind it would lease jobs to nobody.
                with contextlib.suppress(Exception):
                    await conn.disconnect(nowait=True)
            if self._waiters:
                self._wake_one()

    async def _take(self) -> Any:
        """A connection when none is idle: a new one below max_connections, else the first
        given back within the wait."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait
        while True:
            if self._closed:
                raise rex.ConnectionError("the broker was closed")
            if self._idle:
                return self._idle.pop()
            if self._open < self._max:
                self._open += 1
                conn = cast(Any, self._pool).make_connection()
                try:
                    await conn.connect()
                except BaseException:
                    self._open -= 1
                    self._wake_one()
                    raise
                return conn
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise rex.ConnectionError(
                    f"all {self._max} connections to Redis stayed busy for {self._wait:g} s "
                    "(raise max_connections in the URL?)"
                )
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout(remaining):
                    await waiter
            except TimeoutError:
                pass
            finally:
                if not waiter.done():
                    waiter.cancel()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        self._open -= len(idle)
        for conn in idle:
            await conn.disconnect(nowait=True)
        self._wake_one()


async def _stale(conn: Any) -> bool:
    """No I/O: the parser looks at what the transport already read (EOF, or stray bytes)."""
    try:
        return bool(await cast(Any, _peek(conn))())
    except (rex.ConnectionError, OSError):
        return True


def _peek(conn: Any) -> Any:
    """The connection's "anything read but not asked for, or EOF?" check: can_read since
    redis-py 8 (which deprecates the older name), can_read_destructive before."""
    return getattr(conn, "can_read", None) or getattr(conn, "can_read_destructive", None)
