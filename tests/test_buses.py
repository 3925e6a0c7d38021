from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator

import pytest
import redis

from outbox import (
    BrokerUnavailableError,
    MessageEncodeError,
    MessageTooLargeError,
    OutboxConfigError,
    PublishAndStoreError,
    RabbitMqCommandBus,
    RabbitMqConnector,
    RabbitMqDomainEventBus,
    RedisCommandBus,
    RedisDomainEventBus,
)
from outbox.messages import Command, DomainEvent
from outbox.records import decode_record
from tests.servers import free_port


class OrderPlaced(DomainEvent):
    order_id: str


class ShipOrder(Command):
    order_id: str


def unreachable_connector() -> RabbitMqConnector:
    return RabbitMqConnector(f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F", connect_timeout_s=1)


class SilentServer:
    """Accepts TCP connections on a loopback port and never sends a byte."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(connection)

    def close(self) -> None:
        self.sock.close()
        for connection in self.accepted:
            connection.close()


@pytest.fixture
def silent_server() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


def stored_records(client: redis.Redis, outbox: str) -> list:
    return [decode_record(p) for p in reversed(client.lrange(f"outbox:{{{outbox}}}:pending", 0, -1))]


def test_unreachable_broker_stores_events_in_fallback(redis_client):
    fallback = RedisDomainEventBus("acme", "shop", redis_client)
    bus = RabbitMqDomainEventBus("acme", "shop", unreachable_connector(), fallback=fallback)
    events = [OrderPlaced(order_id=str(n)) for n in range(3)]

    bus.publish(events)

    records = stored_records(redis_client, "acme.shop.events")
    assert [r.message_id for r in records] == [e.id for e in events]
    assert records[0].exchange == "acme.shop"
    assert records[0].routing_key == "acme.shop.1.event.order_placed"


def test_unreachable_broker_without_fallback_raises_naming_the_ids(redis_client):
    bus = RabbitMqDomainEventBus("acme", "shop", unreachable_connector())
    event = OrderPlaced(order_id="1")
    with pytest.raises(BrokerUnavailableError, match=event.id):
        bus.publish(event)


def test_healthy_broker_delivers_with_properties(redis_client, rabbit, amqp_url):
    organization = rabbit.organization()
    queue = rabbit.bind_queue(f"{organization}.shop")
    fallback = RedisDomainEventBus(organization, "shop", redis_client)
    bus = RabbitMqDomainEventBus(organization, "shop", RabbitMqConnector(amqp_url), fallback=fallback)
    event = OrderPlaced(order_id="7")

    bus.with_meta(correlation_id="req-1").publish(event)
    bus.close()

    [(method, properties, body)] = rabbit.consume_all(queue, expected=1)
    assert properties.message_id == event.id
    assert properties.content_type == "application/json"
    assert properties.delivery_mode == 2
    assert properties.type == "order.placed"
    assert properties.timestamp == int(event.occurred_on.timestamp())
    assert method.routing_key == f"{organization}.shop.1.event.order_placed"
    data = json.loads(body)["data"]
    assert data["attributes"] == {"order_id": "7"}
    assert data["meta"] == {"correlation_id": "req-1"}
    assert redis_client.llen(f"outbox:{{{organization}.shop.events}}:pending") == 0


def test_command_bus_dispatches_to_command_routing_key(redis_client, rabbit, amqp_url):
    organization = rabbit.organization()
    queue = rabbit.bind_queue(f"{organization}.shop")
    bus = RabbitMqCommandBus(
        organization, "shop", RabbitMqConnector(amqp_url),
        fallback=RedisCommandBus(organization, "shop", redis_client),
    )

    bus.dispatch([ShipOrder(order_id="1"), ShipOrder(order_id="2")])
    bus.close()

    received = rabbit.consume_all(queue, expected=2)
    assert [m.routing_key for m, _, _ in received] == [f"{organization}.shop.1.command.ship_order"] * 2


def test_unroutable_event_goes_to_fallback(redis_client, rabbit, amqp_url):
    organization = rabbit.organization()
    rabbit.track_exchange(f"{organization}.shop")
    fallback = RedisDomainEventBus(organization, "shop", redis_client)
    bus = RabbitMqDomainEventBus(organization, "shop", RabbitMqConnector(amqp_url), fallback=fallback)
    event = OrderPlaced(order_id="1")

    bus.publish(event)
    bus.close()

    assert [r.message_id for r in stored_records(redis_client, f"{organization}.shop.events")] == [event.id]


def test_wrong_message_type_is_rejected_before_anything_is_stored(redis_client):
    fallback = RedisDomainEventBus("acme", "shop", redis_client)
    bus = RabbitMqDomainEventBus("acme", "shop", unreachable_connector(), fallback=fallback)
    with pytest.raises(MessageEncodeError, match="DomainEvent"):
        bus.publish([OrderPlaced(order_id="1"), ShipOrder(order_id="2")])  # type: ignore[list-item]
    assert redis_client.llen("outbox:{acme.shop.events}:pending") == 0


def test_too_large_message_is_rejected_before_anything_is_stored(redis_client):
    fallback = RedisDomainEventBus("acme", "shop", redis_client)
    bus = RabbitMqDomainEventBus(
        "acme", "shop", unreachable_connector(), fallback=fallback, max_message_bytes=200
    )
    with pytest.raises(MessageTooLargeError, match="max_message_bytes=200"):
        bus.publish([OrderPlaced(order_id="1"), OrderPlaced(order_id="x" * 500)])
    assert redis_client.llen("outbox:{acme.shop.events}:pending") == 0


@pytest.mark.parametrize("max_message_bytes", [0, 512 * 1024 * 1024 + 1])
def test_max_message_bytes_out_of_range_rejected(max_message_bytes):
    with pytest.raises(OutboxConfigError, match="max_message_bytes must be from 1 to 536870912"):
        RabbitMqDomainEventBus(
            "acme", "shop", unreachable_connector(), max_message_bytes=max_message_bytes
        )


def test_fallback_of_the_other_kind_is_rejected(redis_client):
    with pytest.raises(OutboxConfigError, match="RedisDomainEventBus"):
        RabbitMqDomainEventBus(
            "acme", "shop", unreachable_connector(),
            fallback=RedisCommandBus("acme", "shop", redis_client),  # type: ignore[arg-type]
        )


def test_broker_and_redis_down_raise_error_naming_both():
    dead_redis = redis.Redis(port=free_port(), socket_connect_timeout=0.5)
    fallback = RedisDomainEventBus("acme", "shop", dead_redis, retry_for_s=0.2)
    bus = RabbitMqDomainEventBus("acme", "shop", unreachable_connector(), fallback=fallback)
    with pytest.raises(PublishAndStoreError) as raised:
        bus.publish(OrderPlaced(order_id="1"))
    message = str(raised.value)
    assert "RabbitMQ" in message
    assert "Redis" in message
    assert isinstance(raised.value.publish_error, BrokerUnavailableError)


def test_silent_broker_times_out_and_falls_back(redis_client, silent_server):
    connector = RabbitMqConnector(
        f"amqp://guest:guest@127.0.0.1:{silent_server.port}/%2F", connect_timeout_s=0.5
    )
    fallback = RedisDomainEventBus("acme", "shop", redis_client)
    bus = RabbitMqDomainEventBus("acme", "shop", connector, fallback=fallback)

    bus.publish(OrderPlaced(order_id="1"))

    assert redis_client.llen("outbox:{acme.shop.events}:pending") == 1


def test_open_breaker_skips_the_broker_until_retry_interval(redis_client, silent_server):
    connector = RabbitMqConnector(
        f"amqp://guest:guest@127.0.0.1:{silent_server.port}/%2F", connect_timeout_s=0.3
    )
    fallback = RedisDomainEventBus("acme", "shop", redis_client)
    bus = RabbitMqDomainEventBus("acme", "shop", connector, fallback=fallback, retry_interval_s=60)

    for n in range(5):
        bus.publish(OrderPlaced(order_id=str(n)))

    assert len(silent_server.accepted) == 1
    assert redis_client.llen("outbox:{acme.shop.events}:pending") == 5


def test_breaker_retries_the_broker_after_the_interval(redis_client, silent_server):
    connector = RabbitMqConnector(
        f"amqp://guest:guest@127.0.0.1:{silent_server.port}/%2F", connect_timeout_s=0.2
    )
    fallback = RedisDomainEventBus("acme", "shop", redis_client)
    bus = RabbitMqDomainEventBus("acme", "shop", connector, fallback=fallback, retry_interval_s=0)

    bus.publish(OrderPlaced(order_id="1"))
    bus.publish(OrderPlaced(order_id="2"))

    assert len(silent_server.accepted) == 2


def test_threads_sharing_a_bus_deliver_every_event_once(redis_client, rabbit, amqp_url):
    organization = rabbit.organization()
    queue = rabbit.bind_queue(f"{organization}.shop")
    fallback = RedisDomainEventBus(organization, "shop", redis_client)
    bus = RabbitMqDomainEventBus(organization, "shop", RabbitMqConnector(amqp_url), fallback=fallback)
    ids: list[str] = []
    errors: list[BaseException] = []

    def publish_many(thread: int) -> None:
        try:
            for n in range(100):
                event = OrderPlaced(order_id=f"{thread}-{n}")
                ids.append(event.id)
                bus.publish(event)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=publish_many, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    bus.close()

    assert errors == []
    received = [p.message_id for _, p, _ in rabbit.consume_all(queue, expected=800)]
    stored = [r.message_id for r in stored_records(redis_client, f"{organization}.shop.events")]
    assert sorted(received + stored) == sorted(ids)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX only")
def test_forked_child_publishes_on_own_connection(redis_client, rabbit, amqp_url):
    organization = rabbit.organization()
    queue = rabbit.bind_queue(f"{organization}.shop")
    fallback = RedisDomainEventBus(organization, "shop", redis_client)
    bus = RabbitMqDomainEventBus(organization, "shop", RabbitMqConnector(amqp_url), fallback=fallback)
    first = OrderPlaced(order_id="before fork")
    bus.publish(first)
    child_events = [OrderPlaced(order_id=f"child {n}") for n in range(100)]
    parent_events = [OrderPlaced(order_id=f"parent {n}") for n in range(100)]

    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child process
        code = 0
        try:
            for event in child_events:
                bus.publish(event)
        except BaseException:
            code = 1
        os._exit(code)
    for event in parent_events:
        bus.publish(event)
    _, status = os.waitpid(child, 0)
    bus.close()
    received = [p.message_id for _, p, _ in rabbit.consume_all(queue, expected=201)]

    assert os.waitstatus_to_exitcode(status) == 0
    assert stored_records(redis_client, f"{organization}.shop.events") == []
    assert sorted(received) == sorted(e.id for e in [first, *child_events, *parent_events])


def test_probe_answered_by_a_return_sends_the_rest_of_the_batch(rabbit, amqp_url):
    from outbox.rabbitmq import PublishStatus
    from outbox.records import OutboxRecord

    organization = rabbit.organization()
    exchange = f"{organization}.shop"
    queue = rabbit.bind_queue(exchange, binding_key="routed.#")
    records = [OutboxRecord(exchange=exchange, routing_key="nowhere", body=b"{}", message_id="lost")]
    records += [
        OutboxRecord(exchange=exchange, routing_key="routed.1", body=b"{}", message_id=f"m{n}")
        for n in range(3)
    ]
    publisher = RabbitMqConnector(amqp_url).publisher()
    # As after a batch that failed on a blocked connection.
    publisher._probing = True

    results = publisher.publish(records)
    publisher.close()

    assert [r.status for r in results] == [PublishStatus.RETURNED] + [PublishStatus.CONFIRMED] * 3
    assert [p.message_id for _, p, _ in rabbit.consume_all(queue, expected=3)] == ["m0", "m1", "m2"]
