"""A Redis connection kept for LPUSH, outside the client's connection pool.

For each command, redis-py takes a connection from its pool and checks its socket for
unread data. On loopback those checks took about as long as the LPUSH itself (see
docs/benchmarks.md). A bus that stores a message pushes on a connection of its own
instead, so a publish during a RabbitMQ outage costs little more than the LPUSH.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import redis
import redis.exceptions as redis_errors


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

    def lpush(self, key: str, payloads: Sequence[bytes]) -> int | None:
        """LPUSH and return the new length, or return None when another thread is pushing."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            connection = self._connection
            if connection is None:
                connection = self._connection = self._connection_class(**self._connection_kwargs)
            try:
                connection.send_command("LPUSH", key, *payloads)
                return int(connection.read_response())
            except redis_errors.ResponseError:
                # Redis replied with an error, and the reply was read whole.
                raise
            except BaseException:
                # An interruption between the send and the reply (KeyboardInterrupt, say)
                # leaves the reply unread, so the next push connects again.
                connection.disconnect()
                raise
        finally:
            self._lock.release()

    def forget(self) -> None:
        """Drop the connection and lock without touching the socket (in a forked child)."""
        self._lock = threading.Lock()
        self._connection = None


_by_pool: weakref.WeakKeyDictionary[Any, PushConnection] = weakref.WeakKeyDictionary()
_by_pool_lock = threading.Lock()


def push_connection(client: Any) -> PushConnection | None:
    """Return the push connection of a ``redis.Redis`` client's pool, or None.

    None for clients that keep one connection for all commands
    (``single_connection_client``), for cluster clients and for anything else that is
    not a ``redis.Redis``: they push through the client.
    """
    if not isinstance(client, redis.Redis) or client.connection is not None:
        return None
    pool = client.connection_pool
    connection_class = getattr(pool, "connection_class", None)
    connection_kwargs = getattr(pool, "connection_kwargs", None)
    if connection_class is None or not isinstance(connection_kwargs, dict):
        return None
    with _by_pool_lock:
        pusher = _by_pool.get(pool)
        if pusher is None:
            pusher = _by_pool[pool] = PushConnection(connection_class, connection_kwargs)
        return pusher


def _forget_after_fork() -> None:
    # A child must not write to its parent's sockets, and a lock held by one of the
    # parent's threads would never be released in the child.
    global _by_pool_lock
    _by_pool_lock = threading.Lock()
    for pusher in list(_by_pool.values()):
        pusher.forget()


os.register_at_fork(after_in_child=_forget_after_fork)
