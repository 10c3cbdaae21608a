"""Redis's blocking enqueue path: sync senders reach Redis without an event loop.

`RedisBroker.enqueue_blocking` sends the ENQUEUE script on these connections from the sender's
own thread: one round trip and no hand-off to the portal's loop, about a quarter of the CPU of a
one-job `task.send()` through the async client (docs/brokers/redis.md, Benchmark).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from redis import exceptions as rex
from redis.backoff import NoBackoff
from redis.retry import Retry

pack_command: Callable[[tuple[Any, ...]], bytes] | None
try:
    import hiredis

    pack_command = hiredis.pack_command
except ImportError:  # redis-py without its [hiredis] extra
    pack_command = None


class BlockingLink:
    """enqueue_blocking's connections to Redis: redis-py Connections (hiredis parser), no event loop.

    A sender takes an idle connection (or opens one), sends its commands, reads the replies and
    puts the connection back: a list used as a stack is the whole pool, safe across threads
    because list.pop and list.append are atomic. This skips what redis-py's own pool and command
    layer do per call (a poll of the socket, locks, retry and observability wrappers), about half
    the CPU of a one-job send. At most `max_connections` are in use at once (others wait, like
    the async client's pool); a forked child opens its own.
    """

    def __init__(
        self, pool: redis.ConnectionPool, wait: float, on_close: Callable[[], None] | None = None
    ) -> None:
        """Connections like `pool`'s (never opened by the pool itself: only its connection class
        and arguments are used; a Sentinel pool's connections ask the Sentinels where to go)."""
        self._pool = pool  # kept: a Sentinel pool's connections refer back to it
        self._on_close = on_close  # closes what else the link holds (a Sentinel client's sockets)
        self._wait = wait  # seconds a sender waits for a free connection
        self._connection_class = pool.connection_class
        self._connection_kwargs = pool.connection_kwargs
        self._max = pool.max_connections
        self._idle: list[Any] = []  # redis.connection.Connection (untyped)
        self._open = 0  # connections open (idle or in use): at most _max
        self._waiting = 0  # senders in _take's slow path
        self._freed = threading.Condition()  # a connection was given back or closed
        self._pid = os.getpid()
        self._closed = False

    @classmethod
    def from_url(cls, url: str, options: dict[str, Any], wait: float) -> BlockingLink:
        """For a redis:// or rediss:// URL: parses it and its options (TLS, auth, db, timeouts)
        once; it never opens anything."""
        pool = redis.ConnectionPool.from_url(
            url,
            **{name: value for name, value in options.items() if name != "timeout"},
            retry=Retry(NoBackoff(), 0),  # no silent re-sends, as for the async client
        )
        return cls(pool, wait)

    def run(self, send: Callable[[Any], Any]) -> Any:
        """`send(connection)` on a connection of this process, once more on a fresh one if a
        connection that sat idle turns out to be dead (closed by a restart or an idle timeout).

        That second try is safe for enqueue only: a batch whose first attempt ran is recognised
        by its job ids and not stored again.
        """
        if self._closed:
            raise rex.ConnectionError("the broker was closed")
        if self._pid != os.getpid():  # forked: the parent's sockets are not ours to use
            self._idle, self._open, self._waiting, self._pid = [], 0, 0, os.getpid()
            self._freed = threading.Condition()
        conn, fresh = self._take()
        keep = False
        try:
            try:
                reply = send(conn)
            except rex.ConnectionError:
                conn.disconnect()
                if fresh:
                    raise
                conn = self._connect()  # in the dead one's place
                reply = send(conn)
            keep = True
            return reply
        except rex.ResponseError:
            keep = True  # an error reply was read whole: the connection is fine
            raise
        finally:
            if keep and not self._closed:
                self._idle.append(conn)
                if self._waiting:
                    with self._freed:
                        self._freed.notify()
            else:
                conn.disconnect()  # a reply may still be on its way: never reuse it
                with self._freed:
                    self._open -= 1
                    self._freed.notify()

    def _take(self) -> tuple[Any, bool]:
        """An idle connection, else a new one (True: fresh) while fewer than max_connections are
        open, else the first one given back within the wait. The usual case (an idle one) takes
        no lock: a sender's whole overhead here is a list pop and append."""
        try:
            return self._idle.pop(), False
        except IndexError:
            pass
        with self._freed:
            # Counted before looking: a connection given back after the look sees the count and
            # notifies, so no wake-up is lost.
            self._waiting += 1
            try:
                deadline = time.monotonic() + self._wait
                while True:
                    try:
                        return self._idle.pop(), False
                    except IndexError:
                        pass
                    if self._open < self._max:
                        self._open += 1
                        break
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise rex.ConnectionError(f"no free connection within {self._wait:g} s")
                    self._freed.wait(remaining)
            finally:
                self._waiting -= 1
        try:
            return self._connect(), True
        except BaseException:
            with self._freed:
                self._open -= 1
                self._freed.notify()
            raise

    def _connect(self) -> Any:
        """A new connection, connected. Connecting first matters for a Sentinel-managed one: it
        asks the Sentinels for the primary's address in `connect()`, which sending a command on
        an unconnected connection would skip (and go to the default address instead)."""
        conn = self._connection_class(**self._connection_kwargs)
        try:
            conn.connect()
        except BaseException:
            conn.disconnect()
            raise
        return conn

    def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.disconnect()
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            on_close()


def command(conn: Any, *args: Any) -> Any:
    send(conn, *args)
    return conn.read_response()


def send(conn: Any, *args: Any) -> None:
    """Send a command without reading its reply (read it with conn.read_response())."""
    # hiredis packs str, bytes and numbers as they are; redis-py's packer checks every argument
    # first (~2 µs of a one-job send). Without hiredis, redis-py's.
    packed = [pack_command(args)] if pack_command is not None else conn.pack_command(*args)
    conn.send_packed_command(packed, check_health=False)


def evalsha(conn: Any, sha: str, script: str | bytes | memoryview, route: str, *args: Any) -> Any:
    """A script by its hash, loading it first if the server does not have it (NOSCRIPT)."""
    send(conn, "EVALSHA", sha, 1, route, *args)
    return evalsha_reply(conn, sha, script, route, *args)


def evalsha_reply(conn: Any, sha: str, script: str | bytes | memoryview, route: str, *args: Any) -> Any:
    """The reply to an EVALSHA already sent with these arguments; on NOSCRIPT the script is
    loaded and the call sent again (it did not run)."""
    try:
        return conn.read_response()
    except rex.NoScriptError:
        command(conn, "SCRIPT", "LOAD", script)
        return command(conn, "EVALSHA", sha, 1, route, *args)
