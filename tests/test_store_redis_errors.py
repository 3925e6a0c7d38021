"""Each Redis error an outbox operation can meet, against redis-server processes of the test.

Every server here is started by the test on a free loopback port and stopped after it.
Replies that get lost after Redis ran a command come from a small TCP proxy, also on
loopback, that swallows one reply on request.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import redis
import redis.exceptions as redis_errors
from redis.backoff import NoBackoff
from redis.retry import Retry

from outbox._scripts import SCRIPT_NAMES, script_source
from outbox.errors import (
    StoreError,
    StoreFullError,
    StoreReadOnlyError,
    StoreUnavailableError,
)
from outbox.store import Outbox, connect, translate_error
from tests.servers import LOOPBACK, RedisServer

pytestmark = pytest.mark.slow

OUTBOX = "orders.events"
LIVE_LEASE_MS = 60_000

StartServer = Callable[..., RedisServer]


@pytest.fixture
def start_server() -> Iterator[StartServer]:
    """Start private redis-server processes with extra arguments; stop them after the test."""
    servers: list[RedisServer] = []

    def start(*extra_args: str) -> RedisServer:
        server = RedisServer(*extra_args)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def server_time_ms(client: redis.Redis) -> int:
    seconds, microseconds = client.time()
    return int(seconds) * 1000 + int(microseconds) // 1000


def wait_for(condition: Callable[[], bool], *, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition still false after {timeout_s} s")
        time.sleep(0.01)


# Mapping of redis-py errors


@pytest.mark.parametrize(
    ("error", "expected", "words"),
    [
        (redis_errors.OutOfMemoryError("command not allowed"), StoreFullError, "maxmemory"),
        (redis_errors.ReadOnlyError("You can't write"), StoreReadOnlyError, "primary"),
        (redis_errors.BusyLoadingError("loading"), StoreUnavailableError, "loading"),
        (redis_errors.ConnectionError("refused"), StoreUnavailableError, "cannot reach"),
        (redis_errors.TimeoutError("timed out"), StoreUnavailableError, "cannot reach"),
        (redis_errors.ResponseError("BUSY Redis is busy"), StoreUnavailableError, "busy"),
        (redis_errors.ResponseError("WRONGTYPE Operation"), StoreError, "WRONGTYPE"),
        (redis_errors.ResponseError("NOREPLICAS Not enough"), StoreUnavailableError, "min-replicas"),
        (redis_errors.ClusterDownError("The cluster is down"), StoreUnavailableError, "failing over"),
        (redis_errors.TryAgainError("Multiple keys"), StoreUnavailableError, "moving slots"),
        (redis_errors.MovedError("3999 127.0.0.1:6381"), StoreUnavailableError, "slot moved"),
        (redis_errors.SlotNotCoveredError("slot 1"), StoreUnavailableError, "no reachable primary"),
    ],
)
def test_translate_error_picks_most_specific_class(
    error: redis_errors.RedisError, expected: type[StoreError], words: str
) -> None:
    translated = translate_error(error, outbox=OUTBOX, operation="claim")

    assert type(translated) is expected
    assert OUTBOX in str(translated)
    assert "claim" in str(translated)
    assert words in str(translated)


def test_wrong_type_error_is_not_retried(start_server: StartServer) -> None:
    server = start_server()
    client = connect(server.url)
    outbox = Outbox(client, OUTBOX, retry_for_s=5)
    client.set(outbox.keys.pending, b"not a list")

    started = time.monotonic()
    with pytest.raises(StoreError, match="WRONGTYPE") as raised:
        outbox.push([b"a"])

    assert type(raised.value) is StoreError
    assert time.monotonic() - started < 1.0


# OOM: maxmemory reached with noeviction


def fill_until_full(client: redis.Redis, outbox: Outbox) -> int:
    """Store 2,000 entries of 1 KiB, then set maxmemory 16 KiB below the memory in use.

    Redis then rejects every write with OOM until something frees more than 16 KiB.
    Draining frees about 2 MiB, far more than the few hundred KiB that Redis keeps
    for itself after the first claim (measured with redis-server 7.0).
    """
    stored = 2_000
    outbox.push([b"x" * 1024] * stored)
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory", used - 16 * 1024)
    return stored


@pytest.fixture
def full_server(start_server: StartServer) -> RedisServer:
    return start_server("--maxmemory-policy", "noeviction")


def test_push_when_full_raises_store_full_error(full_server: RedisServer) -> None:
    client = connect(full_server.url)
    outbox = Outbox(client, OUTBOX, retry_for_s=0.5)
    fill_until_full(client, outbox)

    with pytest.raises(StoreFullError) as raised:
        outbox.push([b"one more"])

    message = str(raised.value)
    assert OUTBOX in message
    assert "out of memory" in message
    assert "raise maxmemory or drain the outbox" in message
    assert isinstance(raised.value.__cause__, redis_errors.OutOfMemoryError)


def test_push_when_full_keeps_stored_entries(full_server: RedisServer) -> None:
    client = connect(full_server.url)
    outbox = Outbox(client, OUTBOX, retry_for_s=0.5)
    stored = fill_until_full(client, outbox)

    with pytest.raises(StoreFullError):
        outbox.push([b"one more"])

    assert stored > 0
    assert outbox.stats().pending == stored


def test_large_push_when_full_stores_nothing(full_server: RedisServer) -> None:
    client = connect(full_server.url)
    outbox = Outbox(client, OUTBOX, retry_for_s=0.5)
    stored = fill_until_full(client, outbox)

    with pytest.raises(StoreFullError):
        outbox.push([b"y" * 10] * 2_500)

    assert outbox.stats().pending == stored


def test_out_of_memory_is_not_retried(full_server: RedisServer) -> None:
    client = connect(full_server.url)
    outbox = Outbox(client, OUTBOX, retry_for_s=5)
    fill_until_full(client, outbox)

    started = time.monotonic()
    with pytest.raises(StoreFullError):
        outbox.push([b"one more"])

    assert time.monotonic() - started < 1.0


def test_drainer_frees_memory_when_out_of_memory(full_server: RedisServer) -> None:
    # Draining is the fix that the StoreFullError message gives the operator, so
    # claim and ack must run while Redis rejects writes with OOM.
    client = connect(full_server.url)
    outbox = Outbox(client, OUTBOX, retry_for_s=0.5)
    stored = fill_until_full(client, outbox)

    claim = outbox.claim(batch_size=stored, lease_ms=LIVE_LEASE_MS)
    acked = outbox.ack(claim.leases)
    length = outbox.push([b"after draining"])

    assert len(claim.leases) == stored
    assert all(acked)
    assert length == 1


def test_release_and_bury_work_when_out_of_memory(full_server: RedisServer) -> None:
    client = connect(full_server.url)
    outbox = Outbox(client, OUTBOX, retry_for_s=0.5)
    fill_until_full(client, outbox)

    first, second, third = outbox.claim(batch_size=3, lease_ms=LIVE_LEASE_MS).leases

    assert outbox.extend([first], lease_ms=LIVE_LEASE_MS) == [True]
    assert outbox.release([first], refund=True, error="broker unreachable") == [True]
    assert outbox.bury([second, third], reason="poison") == [True, True]
    assert outbox.purge() == 2
    assert outbox.stats().dead == 0


def test_stats_work_when_out_of_memory(full_server: RedisServer) -> None:
    client = connect(full_server.url)
    outbox = Outbox(client, OUTBOX, retry_for_s=0.5)
    stored = fill_until_full(client, outbox)

    assert outbox.stats().pending == stored


# BUSY: another client runs a long script

# Spins on the server clock for ARGV[1] milliseconds, holding Redis the whole time.
BUSY_SCRIPT = """
local started = redis.call('TIME')
local start_us = started[1] * 1000000 + started[2]
local limit_us = tonumber(ARGV[1]) * 1000
while true do
  local now = redis.call('TIME')
  if now[1] * 1000000 + now[2] - start_us > limit_us then
    return 1
  end
end
"""


@contextlib.contextmanager
def busy_server(server: RedisServer, *, busy_ms: int) -> Iterator[None]:
    """Run a script that keeps Redis busy for ``busy_ms`` and wait until Redis reports BUSY."""
    busy_client = server.client()
    runner = threading.Thread(target=busy_client.eval, args=(BUSY_SCRIPT, 0, busy_ms))
    runner.start()
    probe = server.client(retry=Retry(NoBackoff(), 0))

    def reports_busy() -> bool:
        try:
            probe.ping()
        except redis_errors.ResponseError as exc:
            return str(exc).startswith("BUSY")
        return False

    try:
        wait_for(reports_busy, timeout_s=5)
        yield
    finally:
        runner.join()
        busy_client.close()
        probe.close()


def test_operation_retries_until_busy_script_ends(start_server: StartServer) -> None:
    server = start_server("--busy-reply-threshold", "100")
    outbox = Outbox(connect(server.url), OUTBOX, retry_for_s=10)
    outbox.push([b"a"])

    with busy_server(server, busy_ms=1_500):
        started = time.monotonic()
        claim = outbox.claim(batch_size=10, lease_ms=LIVE_LEASE_MS)
        waited = time.monotonic() - started

    assert [lease.payload for lease in claim.leases] == [b"a"]
    assert waited > 0.5


def test_busy_server_raises_after_retry_for_s(
    start_server: StartServer,
) -> None:
    server = start_server("--busy-reply-threshold", "100")
    outbox = Outbox(connect(server.url), OUTBOX, retry_for_s=0.3)
    outbox.push([b"a"])

    with busy_server(server, busy_ms=1_500):
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError, match="busy running another script"):
            outbox.claim(batch_size=10, lease_ms=LIVE_LEASE_MS)
        waited = time.monotonic() - started

    assert 0.1 < waited < 1.3
    assert outbox.stats().pending == 1


def test_push_retries_until_busy_script_ends(start_server: StartServer) -> None:
    server = start_server("--busy-reply-threshold", "100")
    outbox = Outbox(connect(server.url), OUTBOX, retry_for_s=10)

    with busy_server(server, busy_ms=1_000):
        length = outbox.push([b"a"])

    assert length == 1


# READONLY: the client points at a replica


@pytest.fixture
def replica(start_server: StartServer) -> tuple[RedisServer, RedisServer]:
    """Start a primary holding two pending entries and a replica that has synced them."""
    # Without the default 5 s delay the replica starts its first sync at once.
    primary = start_server("--repl-diskless-sync-delay", "0")
    replica = start_server()
    Outbox(connect(primary.url), OUTBOX).push([b"a", b"b"])
    replica_client = replica.client()
    replica_client.replicaof(LOOPBACK, primary.port)
    wait_for(lambda: replica_client.llen(f"outbox:{{{OUTBOX}}}:pending") == 2)
    replica_client.close()
    return primary, replica


def test_push_to_replica_raises_store_read_only_error(
    replica: tuple[RedisServer, RedisServer],
) -> None:
    _, replica_server = replica
    outbox = Outbox(connect(replica_server.url), OUTBOX, retry_for_s=0.3)

    started = time.monotonic()
    with pytest.raises(StoreReadOnlyError, match="point the client at the primary") as raised:
        outbox.push([b"c"])
    waited = time.monotonic() - started

    assert OUTBOX in str(raised.value)
    assert 0.1 < waited < 1.3


@pytest.mark.parametrize("operation", ["claim", "requeue", "purge"])
def test_scripts_on_replica_raise_store_read_only_error(
    replica: tuple[RedisServer, RedisServer], operation: str
) -> None:
    _, replica_server = replica
    outbox = Outbox(connect(replica_server.url), OUTBOX, retry_for_s=0.3)
    calls: dict[str, Callable[[], object]] = {
        "claim": lambda: outbox.claim(batch_size=1, lease_ms=LIVE_LEASE_MS),
        "requeue": outbox.requeue,
        "purge": outbox.purge,
    }

    with pytest.raises(StoreReadOnlyError):
        calls[operation]()


def test_stats_work_on_replica(replica: tuple[RedisServer, RedisServer]) -> None:
    _, replica_server = replica
    outbox = Outbox(connect(replica_server.url), OUTBOX, retry_for_s=0.3)

    stats = outbox.stats()

    assert stats.pending == 2


def test_read_only_replica_changes_nothing(replica: tuple[RedisServer, RedisServer]) -> None:
    primary, replica_server = replica
    outbox = Outbox(connect(replica_server.url), OUTBOX, retry_for_s=0.1)

    with pytest.raises(StoreReadOnlyError):
        outbox.claim(batch_size=10, lease_ms=LIVE_LEASE_MS)

    assert Outbox(connect(primary.url), OUTBOX).stats().pending == 2


# LOADING: the server is loading its data set at start-up


@pytest.fixture
def loading_server(start_server: StartServer) -> RedisServer:
    """Return a server that restarts with about 1 s of LOADING and two outbox entries.

    ``key-load-delay`` makes redis-server sleep 5 ms per key while it loads the RDB
    file, and a small ``loading-process-events-interval-bytes`` makes it reply to
    other clients with LOADING between keys instead of blocking them.
    """
    server = start_server(
        "--key-load-delay", "5000", "--loading-process-events-interval-bytes", "1024"
    )
    client = server.client()
    Outbox(client, OUTBOX).push([b"a", b"b"])
    pipe = client.pipeline(transaction=False)
    for index in range(200):
        pipe.set(f"filler:{index}", b"f" * 2048)
    pipe.execute()
    client.save()
    client.close()
    server.stop()
    server.start()
    return server


def test_loading_server_raises_after_retry_for_s(
    loading_server: RedisServer,
) -> None:
    outbox = Outbox(connect(loading_server.url), OUTBOX, retry_for_s=0.2)

    with pytest.raises(StoreUnavailableError, match="loading its data set"):
        outbox.claim(batch_size=10, lease_ms=LIVE_LEASE_MS)


def test_operation_retries_until_loading_ends(loading_server: RedisServer) -> None:
    outbox = Outbox(connect(loading_server.url), OUTBOX, retry_for_s=10)

    claim = outbox.claim(batch_size=10, lease_ms=LIVE_LEASE_MS)

    assert [lease.payload for lease in claim.leases] == [b"a", b"b"]


# Connection failures: the server is killed and restarted


def test_stopped_server_raises_after_retry_for_s(
    start_server: StartServer,
) -> None:
    server = start_server()
    outbox = Outbox(connect(server.url), OUTBOX, retry_for_s=0.5)
    outbox.push([b"a"])
    server.stop()

    started = time.monotonic()
    with pytest.raises(StoreUnavailableError, match="cannot reach Redis") as raised:
        outbox.push([b"b"])
    waited = time.monotonic() - started

    assert OUTBOX in str(raised.value)
    assert isinstance(raised.value.__cause__, redis_errors.ConnectionError)
    assert 0.2 < waited < 1.5


def test_outbox_works_again_after_server_restart(start_server: StartServer) -> None:
    server = start_server()
    outbox = Outbox(connect(server.url), OUTBOX, retry_for_s=0.2)
    outbox.push([b"before"])
    server.stop()
    with pytest.raises(StoreUnavailableError):
        outbox.claim(batch_size=1, lease_ms=LIVE_LEASE_MS)

    server.start()
    length = outbox.push([b"after"])
    claim = outbox.claim(batch_size=10, lease_ms=LIVE_LEASE_MS)

    assert length == 1
    assert [lease.payload for lease in claim.leases] == [b"after"]


def test_operation_survives_quick_server_restart(
    start_server: StartServer,
) -> None:
    server = start_server()
    outbox = Outbox(connect(server.url), OUTBOX, retry_for_s=10)
    outbox.push([b"a"])
    server.stop()
    restarter = threading.Timer(0.5, server.start)
    restarter.start()

    try:
        length = outbox.push([b"b"])
    finally:
        restarter.join()

    assert length == 1


def test_kill_between_claim_and_ack_keeps_entry(
    start_server: StartServer,
) -> None:
    # The append-only file with fsync on every write keeps the lease across the kill.
    server = start_server("--appendonly", "yes", "--appendfsync", "always")
    outbox = Outbox(connect(server.url), OUTBOX, retry_for_s=0.2)
    outbox.push([b"a"])
    claim = outbox.claim(batch_size=1, lease_ms=200)
    leases = claim.leases
    server.stop()
    with pytest.raises(StoreUnavailableError):
        outbox.ack(leases)

    server.start()
    patient = Outbox(connect(server.url), OUTBOX, retry_for_s=5)
    wait_for(lambda: patient.stats().server_time_ms > claim.server_time_ms + 200)
    again = patient.claim(batch_size=1, lease_ms=LIVE_LEASE_MS).leases

    assert [lease.entry_id for lease in again] == [leases[0].entry_id]
    assert [lease.attempts for lease in again] == [2]


# Replies lost after Redis ran the command


class ReplyHoldingProxy:
    """A loopback TCP proxy in front of a redis-server that can swallow one reply.

    After :meth:`hold_next_reply`, the next bytes the server sends are dropped and that
    connection goes silent, so the client times out although Redis ran the command.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server((LOOPBACK, 0))
        self.port = int(self.listener.getsockname()[1])
        self.held_replies = 0
        self._armed = threading.Event()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def hold_next_reply(self) -> None:
        self._armed.set()

    def close(self) -> None:
        self.listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection((LOOPBACK, self.upstream_port))
            self._sockets += [downstream, upstream]
            threading.Thread(
                target=self._pump, args=(downstream, upstream, False), daemon=True
            ).start()
            threading.Thread(
                target=self._pump, args=(upstream, downstream, True), daemon=True
            ).start()

    def _pump(self, source: socket.socket, target: socket.socket, carries_replies: bool) -> None:
        holding = False
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                break
            if not data:
                break
            if carries_replies and not holding and self._armed.is_set():
                self._armed.clear()
                self.held_replies += 1
                holding = True
            if holding:
                continue
            try:
                target.sendall(data)
            except OSError:
                break
        for sock in (source, target):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def proxied_server(start_server: StartServer) -> Iterator[tuple[RedisServer, ReplyHoldingProxy]]:
    server = start_server()
    proxy = ReplyHoldingProxy(server.port)
    yield server, proxy
    proxy.close()


# Who retries after the timeout: redis-py's own retry, or Outbox with a client that
# does not retry by itself (what outbox.store.connect creates).
RETRY_LAYERS = {
    "redis-py": {"retry": Retry(NoBackoff(), 3)},
    "outbox": {},
}


def proxied_outbox(proxy: ReplyHoldingProxy, retry_layer: str) -> Outbox:
    client = connect(proxy.url, socket_timeout=0.3, **RETRY_LAYERS[retry_layer])
    outbox = Outbox(client, OUTBOX, retry_for_s=5)
    # Opens the connections and loads every script, so the held reply is the one under test.
    for name in SCRIPT_NAMES:
        client.script_load(script_source(name))
    Outbox(client, f"{OUTBOX}.warm-up").push([b"opens the push connection"])
    return outbox


@pytest.mark.parametrize("retry_layer", RETRY_LAYERS)
def test_ack_after_lost_reply_reports_false(
    proxied_server: tuple[RedisServer, ReplyHoldingProxy], retry_layer: str
) -> None:
    server, proxy = proxied_server
    outbox = proxied_outbox(proxy, retry_layer)
    outbox.push([b"a"])
    leases = outbox.claim(batch_size=1, lease_ms=LIVE_LEASE_MS).leases

    proxy.hold_next_reply()
    statuses = outbox.ack(leases)
    direct = Outbox(server.client(), OUTBOX)

    assert proxy.held_replies == 1
    assert statuses == [False]
    assert direct.stats().unfinished == 0
    assert direct.stats().dead == 0


@pytest.mark.parametrize("retry_layer", RETRY_LAYERS)
def test_claim_after_lost_reply_reclaims_later(
    proxied_server: tuple[RedisServer, ReplyHoldingProxy], retry_layer: str
) -> None:
    server, proxy = proxied_server
    outbox = proxied_outbox(proxy, retry_layer)
    outbox.push([b"a", b"b", b"c"])

    proxy.hold_next_reply()
    retried = outbox.claim(batch_size=2, lease_ms=2_000)
    wait_for(lambda: server_time_ms(server.client()) > retried.server_time_ms + 2_000)
    reclaimed = outbox.claim(batch_size=10, lease_ms=LIVE_LEASE_MS)

    assert proxy.held_replies == 1
    assert [lease.payload for lease in retried.leases] == [b"c"]
    assert sorted(lease.payload for lease in reclaimed.leases) == [b"a", b"b", b"c"]
    assert sorted(lease.attempts for lease in reclaimed.leases) == [2, 2, 2]


@pytest.mark.parametrize("retry_layer", RETRY_LAYERS)
def test_release_after_lost_reply_reports_false(
    proxied_server: tuple[RedisServer, ReplyHoldingProxy], retry_layer: str
) -> None:
    _, proxy = proxied_server
    outbox = proxied_outbox(proxy, retry_layer)
    outbox.push([b"a"])
    leases = outbox.claim(batch_size=1, lease_ms=LIVE_LEASE_MS).leases

    proxy.hold_next_reply()
    statuses = outbox.release(leases, refund=True)
    again = outbox.claim(batch_size=1, lease_ms=LIVE_LEASE_MS).leases

    assert proxy.held_replies == 1
    assert statuses == [False]
    assert [lease.entry_id for lease in again] == [leases[0].entry_id]
    assert [lease.attempts for lease in again] == [1]


@pytest.mark.parametrize("retry_layer", RETRY_LAYERS)
def test_push_after_lost_reply_stores_copy(
    proxied_server: tuple[RedisServer, ReplyHoldingProxy], retry_layer: str
) -> None:
    # Known and documented on Outbox.push: the drainer publishes both copies, which
    # carry the same message id, so consumers drop the second.
    _, proxy = proxied_server
    outbox = proxied_outbox(proxy, retry_layer)

    proxy.hold_next_reply()
    outbox.push([b"a"])
    leases = outbox.claim(batch_size=10, lease_ms=LIVE_LEASE_MS).leases

    assert proxy.held_replies == 1
    assert [lease.payload for lease in leases] == [b"a", b"a"]
