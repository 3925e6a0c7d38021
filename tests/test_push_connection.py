"""Pushes on the connection an outbox keeps outside its client's pool.

Every server here is a redis-server process of the test, on a free loopback port.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from outbox import _push
from outbox.errors import StoreError, StoreUnavailableError
from outbox.store import Outbox, connect
from tests.servers import RedisServer, free_port

pytestmark = pytest.mark.slow

OUTBOX = "orders.events"


@pytest.fixture
def server() -> Iterator[RedisServer]:
    started = RedisServer()
    yield started
    started.close()


def pending(server: RedisServer, name: str = OUTBOX) -> list[bytes]:
    """Return the pending entries of an outbox, oldest first, read on a new client."""
    client = server.client()
    try:
        return list(reversed(client.lrange(f"outbox:{{{name}}}:pending", 0, -1)))
    finally:
        client.close()


def test_pushes_share_one_connection_per_pool(server: RedisServer) -> None:
    client = server.client()
    first = Outbox(client, OUTBOX)
    second = Outbox(client, "orders.commands")

    first.push([b"a"])
    second.push([b"b"])
    names = [entry["name"] for entry in server.client().client_list()]

    assert _push.push_connection(client) is _push.push_connection(client)
    assert first._pusher is second._pusher
    assert pending(server) == [b"a"]
    assert pending(server, "orders.commands") == [b"b"]
    assert len(names) == 2  # the push connection and the client listing the connections


def test_other_clients_get_no_push_connection(server: RedisServer) -> None:
    single = redis.Redis(host="127.0.0.1", port=server.port, single_connection_client=True)
    # Sentinel's pool queries the sentinels for the primary when it connects; nothing
    # listens on this port and nothing connects here.
    sentinel = Sentinel([("127.0.0.1", free_port())]).master_for("primary")

    assert _push.push_connection(single) is None
    assert _push.push_connection(sentinel) is None
    assert _push.push_connection(object()) is None
    Outbox(single, OUTBOX).push([b"a"])
    assert pending(server) == [b"a"]


def test_timed_out_reply_is_not_reused() -> None:
    # The reply of the timed-out push arrives later and must not be read as the next one's.
    server = RedisServer("--enable-debug-command", "yes")
    try:
        outbox = Outbox(connect(server.url, socket_timeout=0.2), OUTBOX, retry_for_s=0)
        outbox.push([b"warm-up"])
        sleeper = threading.Thread(
            target=lambda: server.client().execute_command("DEBUG", "SLEEP", "1")
        )
        sleeper.start()
        time.sleep(0.2)

        with pytest.raises(StoreUnavailableError):
            outbox.push([b"timed out"])
        sleeper.join()

        assert outbox.push([b"after"]) == 3
        assert pending(server) == [b"warm-up", b"timed out", b"after"]
    finally:
        server.close()


def test_interrupted_reply_is_not_reused(server: RedisServer) -> None:
    client = connect(server.url)
    outbox = Outbox(client, OUTBOX, retry_for_s=0)
    outbox.push([b"warm-up"])
    connection = outbox._pusher._connection
    read_response = connection.read_response

    def interrupted(*args: object, **kwargs: object) -> object:
        connection.read_response = read_response
        raise KeyboardInterrupt

    connection.read_response = interrupted
    with pytest.raises(KeyboardInterrupt):
        outbox.push([b"interrupted"])

    assert outbox.push([b"after"]) == 3
    assert pending(server) == [b"warm-up", b"interrupted", b"after"]


def test_killed_connection_push_stores_once(server: RedisServer) -> None:
    # Like redis-py's pool, the push connection checks an idle socket before using it,
    # so the first push after the kill succeeds without a retry.
    outbox = Outbox(connect(server.url), OUTBOX, retry_for_s=0)
    outbox.push([b"before"])
    killed = server.client().client_kill_filter(_type="normal", skipme=True)
    time.sleep(2 * _push.IDLE_CHECK_S)

    length = outbox.push([b"after"])

    assert killed >= 1
    assert length == 2
    assert pending(server) == [b"before", b"after"]


def test_push_after_server_restart_reconnects(server: RedisServer) -> None:
    outbox = Outbox(connect(server.url), OUTBOX, retry_for_s=10)
    outbox.push([b"before"])
    server.stop()
    server.start()

    assert outbox.push([b"after"]) == 1
    assert pending(server) == [b"after"]


def test_error_reply_keeps_connection_usable(server: RedisServer) -> None:
    client = connect(server.url)
    server.client().set(f"outbox:{{{OUTBOX}}}:pending", b"not a list")
    outbox = Outbox(client, OUTBOX, retry_for_s=0)
    other = Outbox(client, "orders.commands")

    with pytest.raises(StoreError, match="WRONGTYPE"):
        outbox.push([b"a"])

    assert other.push([b"b"]) == 1
    assert other.push([b"c"]) == 2


def test_concurrent_pushes_store_each_once(server: RedisServer) -> None:
    outbox = Outbox(connect(server.url), OUTBOX)
    threads = [
        threading.Thread(
            target=lambda thread=thread: [
                outbox.push([f"{thread}:{index}".encode()]) for index in range(300)
            ]
        )
        for thread in range(8)
    ]

    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    entries = pending(server)

    assert len(entries) == 8 * 300
    assert len(set(entries)) == 8 * 300
    for thread in range(8):
        mine = [entry for entry in entries if entry.startswith(f"{thread}:".encode())]
        assert mine == [f"{thread}:{index}".encode() for index in range(300)]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX only")
def test_forked_child_pushes_on_own_connection(server: RedisServer) -> None:
    outbox = Outbox(connect(server.url, retry=Retry(NoBackoff(), 0)), OUTBOX)
    outbox.push([b"before fork"])

    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child process
        code = 0
        try:
            for index in range(200):
                outbox.push([f"child {index}".encode()])
        except BaseException:
            code = 1
        os._exit(code)
    for index in range(200):
        outbox.push([f"parent {index}".encode()])
    _, status = os.waitpid(child, 0)
    entries = pending(server)

    assert os.waitstatus_to_exitcode(status) == 0
    assert len(entries) == 401
    assert [e for e in entries if e.startswith(b"parent ")] == [
        f"parent {index}".encode() for index in range(200)
    ]
    assert [e for e in entries if e.startswith(b"child ")] == [
        f"child {index}".encode() for index in range(200)
    ]
