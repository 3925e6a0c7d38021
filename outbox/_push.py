"""A Redis connection kept for LPUSH, outside the client's connection pool.

For each command, redis-py takes a connection from its pool and checks its socket for
unread data. On loopback those checks took about as long as the LPUSH itself (see
docs/benchmarks.md). A bus that stores a message pushes on a connection of its own
instead, so a publish during a RabbitMQ outage costs little more than the LPUSH.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any

import redis
import redis.exceptions as redis_errors

from outbox import _fork

# A connection unused for longer is checked as redis-py's pool checks its connections
# before a push. A busy connection is used as it is.
IDLE_CHECK_S = 0.05


class PushConnection:
    """One connection for the pushes of every outbox that shares a connection pool.

    It is made like the pool's own connections, from the pool's ``connection_class`` and
    ``connection_kwargs``, so it has the same address, credentials, TLS and timeouts. It
    is opened at the first push and closed when the pool is garbage collected. A thread that
    finds it busy pushes through the client instead, so no thread waits for it.
    """

    def __init__(self, connection_class: type, connection_kwargs: dict[str, Any]) -> None:
        self._connection_class = connection_class
        self._connection_kwargs = dict(connection_kwargs)
        self._lock = threading.Lock()
        self._connection: Any = None
        self._connected = False
        self._used_at = 0.0

    def lpush(self, key: str, payloads: Sequence[bytes]) -> int | None:
        """LPUSH and return the new length, or return None when another thread is pushing."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            connection = self._connection
            if connection is None:
                connection = self._connection = self._connection_class(**self._connection_kwargs)
            try:
                if not self._connected:
                    connection.connect()
                    self._connected = True
                elif time.monotonic() - self._used_at > IDLE_CHECK_S:
                    _reconnect_if_stale(connection)
                connection.send_command("LPUSH", key, *payloads)
                length = int(connection.read_response())
            except BaseException:
                # After an interruption between the send and the reply (KeyboardInterrupt,
                # say) the reply is still unread. After an error reply such as READONLY the
                # server may have changed roles. Either way the next push connects again.
                self._connected = False
                connection.disconnect()
                raise
            self._used_at = time.monotonic()
            return length
        finally:
            self._lock.release()

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._connection = None
        self._connected = False


def _reconnect_if_stale(connection: Any) -> None:
    # The checks redis-py's pool makes before each command: data waiting on an idle
    # connection, or a socket the server closed (idle timeout, restart, CLIENT KILL).
    try:
        stale = connection.can_read()
    except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError):
        stale = True
    if stale:
        connection.disconnect()
        connection.connect()


_PLAIN_POOLS = (redis.ConnectionPool, redis.BlockingConnectionPool)
_by_pool: weakref.WeakKeyDictionary[Any, PushConnection] = weakref.WeakKeyDictionary()
_by_pool_lock = threading.Lock()


def push_connection(client: Any) -> PushConnection | None:
    """Return the push connection of a ``redis.Redis`` client's pool, or None.

    None for clients that keep one connection for all commands
    (``single_connection_client``), for pools other than ``ConnectionPool`` and
    ``BlockingConnectionPool`` (Sentinel's, say), for cluster clients and for anything
    else that is not a ``redis.Redis``: they push through the client.
    """
    if not isinstance(client, redis.Redis) or client.connection is not None:
        return None
    pool = client.connection_pool
    if type(pool) not in _PLAIN_POOLS:
        # Other pools, such as Sentinel's, choose the server when they hand out a connection.
        return None
    with _by_pool_lock:
        pusher = _by_pool.get(pool)
        if pusher is None:
            pusher = PushConnection(pool.connection_class, pool.connection_kwargs)
            _by_pool[pool] = pusher
            _fork.reset_after_fork(pusher)
        return pusher


def _after_fork_in_child() -> None:
    global _by_pool_lock
    _by_pool_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
