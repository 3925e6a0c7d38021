"""Brokers that refuse, vanish, block or close channels, on a RabbitMQ node private to the session.

Every test that stops, restarts or alarms a broker does so on the private node of
``rabbit_node``; the shared node on 5672 is never touched. Redis is the private server of
the ``redis_client`` fixture, or a redis-server a test starts itself.
"""

from __future__ import annotations

import contextlib
import faulthandler
import itertools
import logging
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pika
import pika.exceptions
import pytest
import redis

from outbox import (
    BrokerUnavailableError,
    MessageTooLargeError,
    PublishAndStoreError,
    RabbitMqConnector,
    RabbitMqDomainEventBus,
    RedisDomainEventBus,
    StoreFullError,
    StoreUnavailableError,
)
from outbox.drain import Drainer, DrainSettings
from outbox.messages import DomainEvent
from outbox.naming import exchange_name, outbox_name, routing_key
from outbox.rabbitmq import PublishStatus
from outbox.records import OutboxRecord, decode_record, record_for
from outbox.store import Outbox, connect
from tests.rabbit_node import RabbitNode, find_scripts, free_node_port
from tests.servers import LOOPBACK, RedisServer

SERVICE = "shipping"
# The private node's max_message_size; the default of RabbitMQ 3.10 is 128 MiB.
MAX_MESSAGE_SIZE = 4096
CONNECT_TIMEOUT_S = 1.0
CONFIRM_TIMEOUT_S = 2.0
BLOCKED_CONNECTION_TIMEOUT_S = 5.0
RETRY_INTERVAL_S = 0.3
# Slack for scheduling and the 1 s the publisher may spend closing a broken connection.
MARGIN_S = 1.5
# A test still running after this long is stuck, so faulthandler dumps every stack and exits.
HANG_LIMIT_S = 90.0
RUN_ID = uuid.uuid4().hex[:8]
# Numbers the organizations and queues of the run, so no two tests share a name.
_name_numbers = itertools.count(1)

logger = logging.getLogger(__name__)


class ParcelShipped(DomainEvent):
    parcel_id: str
    note: str = ""


# Fixtures


@pytest.fixture(scope="session")
def rabbit_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    """A RabbitMQ node started once for the session and stopped at its end, even after failures.

    Its data and logs stay in pytest's temporary folder, which keeps the last three runs.
    """
    scripts = find_scripts()
    if scripts is None:
        pytest.skip("rabbitmq-server is not installed (apt-get install rabbitmq-server)")
    directory = tmp_path_factory.mktemp("rabbit-node")
    node = RabbitNode(scripts, directory, max_message_size=MAX_MESSAGE_SIZE)
    try:
        seconds = node.start()
        logger.info("Started RabbitMQ node %s in %.1f s", node.name, seconds)
        yield node
    finally:
        node.stop()


@pytest.fixture(autouse=True)
def hang_guard() -> Iterator[None]:
    """Dump every thread's stack and exit if a test hangs, so CI never waits forever."""
    faulthandler.dump_traceback_later(HANG_LIMIT_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


class Broker:
    """Admin access to the private node for one test, and the exchanges and queues to delete after it."""

    def __init__(self, node: RabbitNode) -> None:
        self.node = node
        self.exchanges: set[str] = set()
        self.queues: set[str] = set()

    def organization(self) -> str:
        return f"faults-{RUN_ID}-{next(_name_numbers)}"

    @contextlib.contextmanager
    def channel(self) -> Iterator[Any]:
        parameters = pika.URLParameters(self.node.amqp_url)
        parameters.connection_attempts = 1
        parameters.socket_timeout = 5
        parameters.blocked_connection_timeout = 5
        connection = pika.BlockingConnection(parameters)
        try:
            yield connection.channel()
        finally:
            if connection.is_open:
                connection.close()

    def declare_exchange(
        self, exchange: str, *, exchange_type: str = "topic", durable: bool = True
    ) -> None:
        self.exchanges.add(exchange)
        with self.channel() as channel:
            channel.exchange_declare(exchange, exchange_type=exchange_type, durable=durable)

    def bind_queue(
        self,
        exchange: str,
        *,
        binding_key: str = "#",
        arguments: dict[str, Any] | None = None,
        exchange_type: str = "topic",
        durable_exchange: bool = True,
    ) -> str:
        """Declare the exchange and a durable queue bound to it; return the queue name.

        The queue is durable so that it survives stop_app and start_app.
        """
        queue = f"faults-{RUN_ID}-q{next(_name_numbers)}"
        self.queues.add(queue)
        self.declare_exchange(exchange, exchange_type=exchange_type, durable=durable_exchange)
        with self.channel() as channel:
            channel.queue_declare(queue, durable=True, arguments=arguments)
            channel.queue_bind(queue, exchange, routing_key=binding_key)
        return queue

    def rebind(self, queue: str, exchange: str, binding_key: str = "#") -> None:
        with self.channel() as channel:
            channel.queue_bind(queue, exchange, routing_key=binding_key)

    def delete_exchange(self, exchange: str) -> None:
        with self.channel() as channel:
            channel.exchange_delete(exchange)

    def exchange_exists(self, exchange: str) -> bool:
        with self.channel() as channel:
            try:
                channel.exchange_declare(exchange, passive=True)
            except pika.exceptions.ChannelClosedByBroker:
                return False
            return True

    def delete_queue(self, queue: str) -> None:
        with self.channel() as channel:
            channel.queue_delete(queue)

    def message_ids(self, queue: str, *, expected: int, timeout_s: float = 15.0) -> list[str]:
        """Take messages from a queue until ``expected`` arrived and it stays empty briefly."""
        ids: list[str] = []
        deadline = time.monotonic() + timeout_s
        quiet_since: float | None = None
        with self.channel() as channel:
            while time.monotonic() < deadline:
                method, properties, _body = channel.basic_get(queue, auto_ack=True)
                if method is not None:
                    ids.append(properties.message_id)
                    quiet_since = None
                    continue
                if len(ids) >= expected:
                    quiet_since = quiet_since or time.monotonic()
                    if time.monotonic() - quiet_since > 0.3:
                        break
                time.sleep(0.02)
        return ids

    def cleanup(self) -> None:
        with self.channel() as channel:
            for queue in self.queues:
                channel.queue_delete(queue)
            for exchange in self.exchanges:
                channel.exchange_delete(exchange)


@pytest.fixture
def broker(rabbit_node: RabbitNode) -> Iterator[Broker]:
    """The private node with its application running and no alarm, before and after the test."""
    rabbit_node.reset()
    names = Broker(rabbit_node)
    yield names
    rabbit_node.reset()
    names.cleanup()


class SwitchablePort:
    """A loopback port that refuses connections, accepts them and stays silent, or forwards them.

    It imitates a broker host that is down (nothing listens), one that never replies (the
    TCP handshake completes, then nothing), and the same host once the broker is back.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_node_port()
        self.mode = "refuse"
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def stay_silent(self) -> None:
        self.mode = "silent"
        self._listen()

    def forward(self) -> None:
        """Forward new connections to the target; connections accepted in silence are dropped."""
        self.mode = "forward"
        self._drop_connections()
        self._listen()

    def close(self) -> None:
        self.mode = "refuse"
        self._close_all()

    def _listen(self) -> None:
        if self._listener is not None:
            return
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((LOOPBACK, self.port))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                self._sockets.append(client)
            if self.mode == "forward":
                self._start_forwarding(client)

    def _start_forwarding(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection((LOOPBACK, self.target_port), timeout=2)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        with self._lock:
            self._sockets.append(upstream)
        for source, target in ((client, upstream), (upstream, client)):
            threading.Thread(target=_copy_until_closed, args=(source, target), daemon=True).start()

    def _drop_connections(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _close_all(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        self._drop_connections()


def _copy_until_closed(source: socket.socket, target: socket.socket) -> None:
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            target.sendall(data)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        target.shutdown(socket.SHUT_WR)


@pytest.fixture
def switchable_port(rabbit_node: RabbitNode) -> Iterator[SwitchablePort]:
    port = SwitchablePort(rabbit_node.port)
    yield port
    port.close()


# Helpers


def connector_for(url: str) -> RabbitMqConnector:
    return RabbitMqConnector(
        url,
        connect_timeout_s=CONNECT_TIMEOUT_S,
        confirm_timeout_s=CONFIRM_TIMEOUT_S,
        blocked_connection_timeout_s=BLOCKED_CONNECTION_TIMEOUT_S,
    )


def bus_for(
    url: str,
    organization: str,
    redis_client: redis.Redis,
    *,
    retry_interval_s: float = RETRY_INTERVAL_S,
) -> RabbitMqDomainEventBus:
    fallback = RedisDomainEventBus(organization, SERVICE, redis_client, retry_for_s=0.5)
    return RabbitMqDomainEventBus(
        organization,
        SERVICE,
        connector_for(url),
        fallback=fallback,
        retry_interval_s=retry_interval_s,
    )


def events(count: int, *, note: str = "") -> list[ParcelShipped]:
    return [ParcelShipped(parcel_id=str(n), note=note) for n in range(count)]


def outbox_of(redis_client: redis.Redis, organization: str) -> Outbox:
    return Outbox(redis_client, outbox_name(organization, SERVICE, "event"))


def stored(redis_client: redis.Redis, organization: str) -> list[OutboxRecord]:
    """Return the records waiting in the pending list of the organization's outbox, oldest first."""
    pending = outbox_of(redis_client, organization).keys.pending
    return [decode_record(payload) for payload in reversed(redis_client.lrange(pending, 0, -1))]


def stored_ids(redis_client: redis.Redis, organization: str) -> list[str]:
    return [record.message_id for record in stored(redis_client, organization)]


def attempts(redis_client: redis.Redis, organization: str) -> list[int]:
    key = outbox_of(redis_client, organization).keys.attempts
    return sorted(int(value) for value in redis_client.hvals(key))


def timed_publish(bus: RabbitMqDomainEventBus, event: ParcelShipped) -> float:
    started = time.monotonic()
    bus.publish(event)
    return time.monotonic() - started


def drainer_for(url: str, redis_client: redis.Redis, organization: str, **settings: Any) -> Drainer:
    options = {"outboxes": [outbox_name(organization, SERVICE, "event")], **settings}
    return Drainer(redis_client, connector_for(url), DrainSettings(**options))


# Channel closed by the broker


def test_deleted_exchange_falls_back_then_is_redeclared(broker, redis_client, caplog):
    caplog.set_level(logging.WARNING, logger="outbox")
    organization = broker.organization()
    exchange = exchange_name(organization, SERVICE)
    queue = broker.bind_queue(exchange)
    bus = bus_for(broker.node.amqp_url, organization, redis_client)
    first, missing, unbound, last = events(4)

    bus.publish(first)
    broker.delete_exchange(exchange)
    elapsed = timed_publish(bus, missing)
    bus.publish(unbound)
    exchange_redeclared = broker.exchange_exists(exchange)
    broker.rebind(queue, exchange)
    bus.publish(last)
    bus.close()

    assert elapsed < CONFIRM_TIMEOUT_S + MARGIN_S
    assert "404" in caplog.text
    assert "NOT_FOUND" in caplog.text
    assert exchange_redeclared
    assert stored_ids(redis_client, organization) == [missing.id, unbound.id]
    assert broker.message_ids(queue, expected=2) == [first.id, last.id]


def test_unroutable_message_is_stored_then_drained(broker, redis_client, caplog):
    caplog.set_level(logging.WARNING, logger="outbox")
    organization = broker.organization()
    exchange = exchange_name(organization, SERVICE)
    bus = bus_for(broker.node.amqp_url, organization, redis_client)
    [event] = events(1)

    bus.publish(event)
    bus.close()
    [record] = stored(redis_client, organization)
    queue = broker.bind_queue(exchange)
    drainer = drainer_for(broker.node.amqp_url, redis_client, organization)
    drained = drainer.drain_once(max_outage_s=5)
    drainer.close()

    assert "NO_ROUTE" in caplog.text
    assert record.message_id == event.id
    assert record.exchange == exchange
    assert record.routing_key == routing_key(
        organization, SERVICE, version=1, kind="event", name=ParcelShipped.message_name
    )
    assert drained
    assert broker.message_ids(queue, expected=1) == [event.id]


def test_nacked_messages_are_stored_and_refunded(broker, redis_client, caplog):
    caplog.set_level(logging.WARNING, logger="outbox")
    organization = broker.organization()
    exchange = exchange_name(organization, SERVICE)
    full_queue = broker.bind_queue(
        exchange, arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
    )
    bus = bus_for(broker.node.amqp_url, organization, redis_client)
    published = events(3)

    bus.publish(published)
    bus.close()
    nacked_ids = stored_ids(redis_client, organization)
    drainer = drainer_for(
        broker.node.amqp_url, redis_client, organization, max_attempts=2, retry_delay_ms=0
    )
    started = time.monotonic()
    drained_while_full = drainer.drain_once(max_outage_s=1.5)
    failing_s = time.monotonic() - started
    counts_while_full = (drainer.counts.published, drainer.counts.failed)
    attempts_while_full = attempts(redis_client, organization)
    stats_while_full = outbox_of(redis_client, organization).stats()
    broker.delete_queue(full_queue)
    queue = broker.bind_queue(exchange)
    drained = drainer.drain_once(max_outage_s=5)
    drainer.close()

    assert nacked_ids == [published[1].id, published[2].id]
    assert "basic.nack" in caplog.text
    assert not drained_while_full
    assert counts_while_full[0] == 0
    # The drainer waits 0.5 s, then 1 s, between rounds instead of retrying at once, so
    # 1.5 s leave room for about three rounds of two entries.
    assert 2 * 2 <= counts_while_full[1] <= 2 * 5
    assert failing_s < 1.5 + CONFIRM_TIMEOUT_S + MARGIN_S
    # Each round claimed both entries and refunded the attempt, so more rounds than
    # max_attempts dead-lettered nothing.
    assert attempts_while_full == [0, 0]
    assert stats_while_full.dead == 0
    assert stats_while_full.unfinished == 2
    assert drained
    assert sorted(broker.message_ids(queue, expected=2)) == sorted(nacked_ids)
    assert outbox_of(redis_client, organization).stats().unfinished == 0


@pytest.mark.parametrize(
    ("exchange_type", "durable"),
    [("direct", True), ("topic", False)],
    ids=["direct", "non-durable"],
)
def test_exchange_with_other_arguments_still_receives(
    broker, redis_client, caplog, exchange_type, durable
):
    caplog.set_level(logging.WARNING, logger="outbox")
    organization = broker.organization()
    exchange = exchange_name(organization, SERVICE)
    key = routing_key(organization, SERVICE, version=1, kind="event", name=ParcelShipped.message_name)
    queue = broker.bind_queue(
        exchange, binding_key=key, exchange_type=exchange_type, durable_exchange=durable
    )
    bus = bus_for(broker.node.amqp_url, organization, redis_client)
    published = events(2)

    bus.publish(published[0])
    bus.publish(published[1])
    bus.close()

    assert "406" in caplog.text
    assert "exists with other arguments" in caplog.text
    assert stored_ids(redis_client, organization) == []
    assert broker.message_ids(queue, expected=2) == [event.id for event in published]


# Blocked connections


def test_memory_alarm_falls_back_then_drains(broker, redis_client, caplog):
    caplog.set_level(logging.INFO, logger="outbox")
    organization = broker.organization()
    queue = broker.bind_queue(exchange_name(organization, SERVICE))
    bus = bus_for(broker.node.amqp_url, organization, redis_client)
    before, *during = events(4)
    after = ParcelShipped(parcel_id="after")

    bus.publish(before)
    broker.node.raise_memory_alarm()
    durations = [timed_publish(bus, event) for event in during]
    stored_during_alarm = stored_ids(redis_client, organization)
    drainer = drainer_for(broker.node.amqp_url, redis_client, organization)
    drained_during_alarm = drainer.drain_once(max_outage_s=1.0)
    published_during_alarm = drainer.counts.published
    attempts_during_alarm = attempts(redis_client, organization)
    broker.node.clear_memory_alarm()
    drained = drainer.drain_once(max_outage_s=10)
    drainer.close()
    time.sleep(RETRY_INTERVAL_S)
    bus.publish(after)
    bus.close()

    assert max(durations) < CONNECT_TIMEOUT_S + CONFIRM_TIMEOUT_S + MARGIN_S
    # RabbitMQ sends connection.blocked right after the first publish, so the bus stops
    # waiting for confirms and opens its breaker instead of waiting out the confirm timeout.
    assert sum(durations) < CONFIRM_TIMEOUT_S
    assert "blocked the connection" in caplog.text
    assert stored_during_alarm == [event.id for event in during]
    assert not drained_during_alarm
    assert published_during_alarm == 0
    assert attempts_during_alarm == [0, 0, 0]
    assert drained
    # A message blocked in flight may arrive twice, with the same id.
    received = broker.message_ids(queue, expected=5)
    assert set(received) == {before.id, *(event.id for event in during), after.id}
    assert outbox_of(redis_client, organization).stats().unfinished == 0


# Unreachable brokers


@pytest.mark.parametrize("fault", ["closed port", "silent host", "stopped app"])
def test_unreachable_broker_falls_back_then_reconnects(
    broker, redis_client, switchable_port, fault
):
    organization = broker.organization()
    queue = broker.bind_queue(exchange_name(organization, SERVICE))
    if fault == "stopped app":
        url = broker.node.amqp_url
        broker.node.stop_app()
    else:
        url = f"amqp://guest:guest@{LOOPBACK}:{switchable_port.port}/%2F"
        if fault == "silent host":
            switchable_port.stay_silent()
    bus = bus_for(url, organization, redis_client, retry_interval_s=1.0)
    first, second, third = events(3)

    first_s = timed_publish(bus, first)
    second_s = timed_publish(bus, second)
    if fault == "stopped app":
        broker.node.start_app()
    else:
        switchable_port.forward()
    time.sleep(1.0)
    third_s = timed_publish(bus, third)
    bus.close()

    assert first_s < CONNECT_TIMEOUT_S + CONFIRM_TIMEOUT_S + MARGIN_S
    # The open breaker sends the second publish straight to the fallback.
    assert second_s < 0.5
    assert third_s < CONNECT_TIMEOUT_S + CONFIRM_TIMEOUT_S
    assert stored_ids(redis_client, organization) == [first.id, second.id]
    assert broker.message_ids(queue, expected=1) == [third.id]


def test_restart_between_publishes_reconnects(broker, redis_client):
    organization = broker.organization()
    queue = broker.bind_queue(exchange_name(organization, SERVICE))
    bus = bus_for(broker.node.amqp_url, organization, redis_client)
    before, after = events(2)

    bus.publish(before)
    broker.node.stop_app()
    broker.node.start_app()
    after_s = timed_publish(bus, after)
    bus.close()

    # The broker closed the idle connection when it stopped. The bus reads that close
    # before publishing, so it opens a new connection instead of sending into the old one.
    assert stored_ids(redis_client, organization) == []
    assert after_s < CONNECT_TIMEOUT_S + CONFIRM_TIMEOUT_S
    assert broker.message_ids(queue, expected=2) == [before.id, after.id]


def test_stopped_app_with_stale_connection_falls_back(broker, redis_client):
    organization = broker.organization()
    broker.bind_queue(exchange_name(organization, SERVICE))
    bus = bus_for(broker.node.amqp_url, organization, redis_client)
    before, during = events(2)

    bus.publish(before)
    broker.node.stop_app()
    during_s = timed_publish(bus, during)
    bus.close()

    assert during_s < CONNECT_TIMEOUT_S + CONFIRM_TIMEOUT_S + MARGIN_S
    assert stored_ids(redis_client, organization) == [during.id]


def test_drainer_resumes_by_itself_after_restart(broker, redis_client, caplog):
    caplog.set_level(logging.INFO, logger="outbox")
    organization = broker.organization()
    queue = broker.bind_queue(exchange_name(organization, SERVICE))
    producer = RedisDomainEventBus(organization, SERVICE, redis_client)
    before = events(10, note="before")
    during = events(10, note="during")
    drainer = drainer_for(broker.node.amqp_url, redis_client, organization, max_attempts=2)
    thread = threading.Thread(target=drainer.run_forever, daemon=True)

    producer.publish(before)
    thread.start()
    received_before = broker.message_ids(queue, expected=len(before))
    broker.node.stop_app()
    producer.publish(during)
    # The drainer fails and backs off meanwhile, on the connection the broker closed.
    time.sleep(1.5)
    published_while_down = drainer.counts.published
    broker.node.start_app()
    received_during = broker.message_ids(queue, expected=len(during), timeout_s=20)
    drainer.stopping.set()
    thread.join(timeout=10)
    drainer.close()

    assert sorted(received_before) == sorted(event.id for event in before)
    assert published_while_down == len(before)
    assert sorted(received_during) == sorted(event.id for event in during)
    assert not thread.is_alive()
    assert "draining resumed" in caplog.text
    stats = outbox_of(redis_client, organization).stats()
    assert stats.unfinished == 0
    assert stats.dead == 0


# Both stores failing


@pytest.fixture
def stopped_redis() -> Iterator[redis.Redis]:
    server = RedisServer()
    client = connect(server.url, socket_timeout=1, socket_connect_timeout=1)
    server.stop()
    yield client
    client.close()
    server.close()


@pytest.fixture
def full_redis() -> Iterator[redis.Redis]:
    server = RedisServer("--maxmemory", "1", "--maxmemory-policy", "noeviction")
    client = connect(server.url, socket_timeout=1, socket_connect_timeout=1)
    yield client
    client.close()
    server.close()


@pytest.mark.parametrize(
    ("redis_fixture", "store_error", "outcome"),
    [
        ("stopped_redis", StoreUnavailableError, "may or may not have been stored"),
        ("full_redis", StoreFullError, "nothing was stored"),
    ],
    ids=["redis-stopped", "redis-full"],
)
def test_both_stores_failing_name_both_causes(request, redis_fixture, store_error, outcome):
    client = request.getfixturevalue(redis_fixture)
    organization = f"faults-{RUN_ID}-both"
    bus = bus_for(f"amqp://guest:guest@{LOOPBACK}:{free_node_port()}/%2F", organization, client)
    [event] = events(1)

    started = time.monotonic()
    with pytest.raises(PublishAndStoreError) as raised:
        bus.publish(event)
    elapsed = time.monotonic() - started

    error = raised.value
    assert isinstance(error.publish_error, BrokerUnavailableError)
    assert isinstance(error.store_error, store_error)
    assert "connecting to RabbitMQ" in str(error)
    assert "Redis push on outbox" in str(error)
    assert outcome in str(error)
    # Connect timeout for the broker, then retry_for_s=0.5 for Redis.
    assert elapsed < CONNECT_TIMEOUT_S + 0.5 + MARGIN_S


# Messages larger than the broker's max_message_size


def test_too_large_message_rejected_before_publishing(broker, redis_client):
    organization = broker.organization()
    queue = broker.bind_queue(exchange_name(organization, SERVICE))
    fallback = RedisDomainEventBus(organization, SERVICE, redis_client)
    bus = RabbitMqDomainEventBus(
        organization,
        SERVICE,
        connector_for(broker.node.amqp_url),
        fallback=fallback,
        max_message_bytes=MAX_MESSAGE_SIZE,
    )
    large = ParcelShipped(parcel_id="large", note="x" * MAX_MESSAGE_SIZE)
    small = ParcelShipped(parcel_id="small")

    with pytest.raises(MessageTooLargeError, match="max_message_bytes=4096"):
        bus.publish(large)
    bus.publish(small)
    bus.close()

    assert stored_ids(redis_client, organization) == []
    assert broker.message_ids(queue, expected=1) == [small.id]


@pytest.mark.parametrize(
    ("drainer_limit", "reason"),
    [
        (MAX_MESSAGE_SIZE, "more than the maximum of 4096"),
        (None, "406 PRECONDITION_FAILED - message size"),
    ],
    ids=["drainer-knows-limit", "broker-closes-channel"],
)
def test_oversized_record_is_dead_lettered(broker, redis_client, drainer_limit, reason):
    organization = broker.organization()
    queue = broker.bind_queue(exchange_name(organization, SERVICE))
    producer = RedisDomainEventBus(organization, SERVICE, redis_client)
    large = ParcelShipped(parcel_id="large", note="x" * MAX_MESSAGE_SIZE)
    small = ParcelShipped(parcel_id="small")
    producer.publish(large)
    producer.publish(small)
    settings: dict[str, Any] = {"max_attempts": 2, "retry_delay_ms": 0}
    if drainer_limit is not None:
        settings["max_message_bytes"] = drainer_limit
    drainer = drainer_for(broker.node.amqp_url, redis_client, organization, **settings)

    # Without the limit the drainer sends the large message, and the broker closes the
    # channel; the small one then goes out on a new channel.
    drained = drainer.drain_once(max_outage_s=5)
    drainer.close()

    outbox = outbox_of(redis_client, organization)
    [letter] = outbox.dead_letters()
    assert drained
    assert decode_record(letter.payload).message_id == large.id
    assert letter.attempts == 2
    assert reason in letter.reason
    assert drainer.counts.dead_lettered == 1
    assert broker.message_ids(queue, expected=1) == [small.id]
    assert outbox.stats().unfinished == 0


# A bus shared by threads


def test_threads_sharing_a_bus_through_an_outage_lose_nothing(broker, redis_client):
    organization = broker.organization()
    queue = broker.bind_queue(exchange_name(organization, SERVICE))
    bus = bus_for(broker.node.amqp_url, organization, redis_client, retry_interval_s=0.2)
    published: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    halfway = threading.Event()

    def publish_many(thread: int) -> None:
        for number in range(500):
            event = ParcelShipped(parcel_id=f"{thread}-{number}")
            try:
                bus.publish(event)
            except BaseException as exc:
                errors.append(exc)
                return
            with lock:
                published.append(event.id)
                if len(published) == 1_000:
                    halfway.set()

    threads = [threading.Thread(target=publish_many, args=(t,), daemon=True) for t in range(8)]
    for thread in threads:
        thread.start()
    assert halfway.wait(60), "the threads did not publish 1,000 events within 60 s"
    broker.node.stop_app()
    time.sleep(1.0)
    broker.node.start_app()
    for thread in threads:
        thread.join(timeout=120)
    bus.close()

    stored = stored_ids(redis_client, organization)
    received = broker.message_ids(queue, expected=len(published) - len(stored), timeout_s=30)
    assert errors == []
    assert len(published) == 8 * 500
    assert stored, "the outage sent nothing to the fallback"
    assert set(received) | set(stored) == set(published)
    assert len(received) == len(set(received)), "RabbitMQ received an event twice"
    assert len(stored) == len(set(stored)), "the fallback stored an event twice"
    # An event is both delivered and stored only when its publish was cut off before its
    # confirm, so the bus could not know it was routed: never more than one batch per thread.
    assert len(set(received) & set(stored)) <= 8


def test_retries_during_an_alarm_send_one_message_not_a_batch(broker, redis_client):
    organization = broker.organization()
    queue = broker.bind_queue(exchange_name(organization, SERVICE))
    published = events(40)
    RedisDomainEventBus(organization, SERVICE, redis_client).publish(published)
    drainer = drainer_for(broker.node.amqp_url, redis_client, organization, batch_size=40)

    broker.node.raise_memory_alarm()
    # pika closes a blocked connection after BLOCKED_CONNECTION_TIMEOUT_S, so the
    # drainer reconnects and retries at least once while the alarm lasts.
    drained_during_alarm = drainer.drain_once(max_outage_s=BLOCKED_CONNECTION_TIMEOUT_S + 4)
    broker.node.clear_memory_alarm()
    drained = drainer.drain_once(max_outage_s=10)
    drainer.close()

    received = broker.message_ids(queue, expected=40)
    assert not drained_during_alarm
    assert drained
    assert set(received) == {event.id for event in published}
    # The first batch went into the blocked connection whole; every retry after it sent
    # one message, so the copies stay below a second batch.
    assert len(received) - 40 < 40


# Brokers that fail between two steps of a connection


class FrameCutter:
    """A loopback proxy to the private node that cuts connections at one AMQP method.

    ``cut`` is the direction to watch (``"from_broker"`` or ``"to_broker"``), the method's
    class and method ids, and what to do once that frame has passed: ``"close"`` shuts both
    sockets, ``"silence"`` drops every later byte in both directions.
    """

    def __init__(self, target_port: int, direction: str, method: tuple[int, int], action: str):
        self.target_port = target_port
        self.direction = direction
        self.method = method
        self.action = action
        self.cuts = 0
        self._listener = socket.create_server((LOOPBACK, 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def amqp_url(self) -> str:
        return f"amqp://guest:guest@{LOOPBACK}:{self.port}/%2F"

    def close(self) -> None:
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection((LOOPBACK, self.target_port), timeout=5)
            upstream.settimeout(None)
            self._sockets += [client, upstream]
            silenced = threading.Event()
            for source, target, direction in (
                (client, upstream, "to_broker"),
                (upstream, client, "from_broker"),
            ):
                threading.Thread(
                    target=self._copy,
                    args=(source, target, direction, (client, upstream), silenced),
                    daemon=True,
                ).start()

    def _copy(
        self,
        source: socket.socket,
        target: socket.socket,
        direction: str,
        pair: tuple[socket.socket, socket.socket],
        silenced: threading.Event,
    ) -> None:
        watching = direction == self.direction
        # The client's protocol header (8 bytes) comes before its first frame.
        buffer = b""
        header = 8 if direction == "to_broker" else 0
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if silenced.is_set():
                    continue
                if not watching:
                    target.sendall(data)
                    continue
                buffer += data
                while True:
                    if header:
                        if len(buffer) < header:
                            break
                        target.sendall(buffer[:header])
                        buffer, header = buffer[header:], 0
                        continue
                    if len(buffer) < 7:
                        break
                    size = int.from_bytes(buffer[3:7], "big")
                    if len(buffer) < 7 + size + 1:
                        break
                    frame, buffer = buffer[: 8 + size], buffer[8 + size :]
                    target.sendall(frame)
                    ids = (int.from_bytes(frame[7:9], "big"), int.from_bytes(frame[9:11], "big"))
                    if frame[0] == 1 and ids == self.method:
                        self.cuts += 1
                        silenced.set()
                        if self.action == "close":
                            for sock in pair:
                                with contextlib.suppress(OSError):
                                    sock.shutdown(socket.SHUT_RDWR)
                        break
                if silenced.is_set():
                    buffer = b""
        except OSError:
            pass


CONNECTION_OPEN_OK = (10, 41)
EXCHANGE_DECLARE = (40, 10)
BASIC_PUBLISH = (60, 40)


@pytest.fixture
def frame_cutter(rabbit_node: RabbitNode) -> Iterator[Any]:
    cutters: list[FrameCutter] = []

    def start(direction: str, method: tuple[int, int], action: str) -> FrameCutter:
        cutter = FrameCutter(rabbit_node.port, direction, method, action)
        cutters.append(cutter)
        return cutter

    yield start
    for cutter in cutters:
        cutter.close()


def test_connection_closed_after_open_falls_back(broker, redis_client, frame_cutter):
    organization = broker.organization()
    broker.bind_queue(exchange_name(organization, SERVICE))
    cutter = frame_cutter("from_broker", CONNECTION_OPEN_OK, "close")
    bus = bus_for(cutter.amqp_url, organization, redis_client)
    event = events(1)[0]

    bus.publish(event)
    bus.close()

    assert cutter.cuts == 1
    assert stored_ids(redis_client, organization) == [event.id]


def test_silence_after_exchange_declare_falls_back(broker, redis_client, frame_cutter):
    organization = broker.organization()
    broker.bind_queue(exchange_name(organization, SERVICE))
    cutter = frame_cutter("to_broker", EXCHANGE_DECLARE, "silence")
    bus = bus_for(cutter.amqp_url, organization, redis_client)
    event = events(1)[0]

    publish_s = timed_publish(bus, event)
    bus.close()

    assert cutter.cuts == 1
    assert publish_s < CONFIRM_TIMEOUT_S + MARGIN_S
    assert stored_ids(redis_client, organization) == [event.id]


def test_drainer_keeps_attempts_when_open_is_cut(broker, redis_client, frame_cutter):
    organization = broker.organization()
    queue = broker.bind_queue(exchange_name(organization, SERVICE))
    producer = RedisDomainEventBus(organization, SERVICE, redis_client)
    stored_events = events(3)
    producer.publish(stored_events)
    cutter = frame_cutter("from_broker", CONNECTION_OPEN_OK, "close")

    cut_drainer = drainer_for(cutter.amqp_url, redis_client, organization, max_attempts=1)
    for _ in range(3):
        cut_drainer.run_round()
    cut_drainer.close()
    drainer = drainer_for(broker.node.amqp_url, redis_client, organization, max_attempts=1)
    drainer.run_round()
    drainer.close()

    assert cutter.cuts == 3
    assert outbox_of(redis_client, organization).stats().dead == 0
    assert broker.message_ids(queue, expected=3) == [event.id for event in stored_events]


def test_refused_exchange_declare_falls_back(broker, redis_client):
    # The user may configure (declare) the allowed organization's exchange only; RabbitMQ
    # refuses the other declare with 403 ACCESS_REFUSED and closes the channel.
    allowed, refused = broker.organization(), broker.organization()
    queue = broker.bind_queue(exchange_name(allowed, SERVICE))
    user = f"publisher-{RUN_ID}-{next(_name_numbers)}"
    broker.node.ctl("add_user", user, "secret")
    broker.node.ctl("set_permissions", "-p", "/", user, f"^{allowed}\\.", ".*", ".*")
    url = f"amqp://{user}:secret@{LOOPBACK}:{broker.node.port}/%2F"
    refused_event, allowed_event = events(2)
    try:
        refused_bus = bus_for(url, refused, redis_client)
        refused_bus.publish(refused_event)
        refused_bus.close()
        publisher = connector_for(url).publisher()
        results = publisher.publish(
            [
                record_for(refused_event, organization=refused, service=SERVICE),
                record_for(allowed_event, organization=allowed, service=SERVICE),
            ]
        )
        publisher.close()
    finally:
        broker.node.ctl("delete_user", user)

    assert stored_ids(redis_client, refused) == [refused_event.id]
    assert [result.status for result in results] == [PublishStatus.FAILED, PublishStatus.CONFIRMED]
    assert "ACCESS_REFUSED" in str(results[0].error)
    assert broker.message_ids(queue, expected=1) == [allowed_event.id]


def test_confirm_timeout_opens_the_breaker(broker, redis_client, frame_cutter):
    # The broker takes the connection, then never confirms: later publishes within
    # retry_interval_s go straight to Redis instead of each waiting for the timeout.
    organization = broker.organization()
    broker.bind_queue(exchange_name(organization, SERVICE))
    cutter = frame_cutter("to_broker", BASIC_PUBLISH, "silence")
    bus = bus_for(cutter.amqp_url, organization, redis_client, retry_interval_s=30)
    first, second = events(2)

    first_s = timed_publish(bus, first)
    second_s = timed_publish(bus, second)
    bus.close()

    assert cutter.cuts == 1
    assert CONFIRM_TIMEOUT_S <= first_s < CONFIRM_TIMEOUT_S + MARGIN_S
    assert second_s < 0.5
    assert stored_ids(redis_client, organization) == [first.id, second.id]
