"""The drainer as a long-running process: waiting, expiry, discovery and metrics."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest

from outbox import OutboxConfigError, RabbitMqConnector, RedisDomainEventBus
from outbox.drain import Drainer, DrainSettings
from outbox.messages import DomainEvent
from outbox.store import Outbox, registered_outboxes
from tests.servers import free_port


class ParcelShipped(DomainEvent):
    parcel_id: str


@pytest.fixture
def running_drainer(redis_client, amqp_url) -> Iterator[Drainer]:
    drainer = Drainer(redis_client, RabbitMqConnector(amqp_url), DrainSettings(lease_ms=5000))
    thread = threading.Thread(target=drainer.run_forever, daemon=True)
    thread.start()
    yield drainer
    drainer.stopping.set()
    thread.join(timeout=10)
    drainer.close()


def test_daemon_picks_up_a_new_outbox_within_a_second(redis_client, rabbit, running_drainer):
    organization = rabbit.organization()
    queue = rabbit.bind_queue(f"{organization}.logistics")
    time.sleep(0.3)
    event = ParcelShipped(parcel_id="p1")

    RedisDomainEventBus(organization, "logistics", redis_client).publish(event)

    received = rabbit.consume_all(queue, expected=1, timeout_s=1.5)
    assert [p.message_id for _, p, _ in received] == [event.id]


def test_daemon_waiting_on_one_outbox_wakes_on_push(redis_client, rabbit, amqp_url):
    organization = rabbit.organization()
    queue = rabbit.bind_queue(f"{organization}.logistics")
    bus = RedisDomainEventBus(organization, "logistics", redis_client)
    settings = DrainSettings(outboxes=[bus.outbox.name])
    drainer = Drainer(redis_client, RabbitMqConnector(amqp_url), settings)
    thread = threading.Thread(target=drainer.run_forever, daemon=True)
    thread.start()
    try:
        time.sleep(1.2)
        event = ParcelShipped(parcel_id="p2")
        bus.publish(event)
        received = rabbit.consume_all(queue, expected=1, timeout_s=1.0)
    finally:
        drainer.stopping.set()
        thread.join(timeout=10)
        drainer.close()
    assert [p.message_id for _, p, _ in received] == [event.id]


def test_bus_registers_its_outbox_for_discovery(redis_client):
    RedisDomainEventBus("acme", "logistics", redis_client).publish(ParcelShipped(parcel_id="1"))
    assert registered_outboxes(redis_client) == ["acme.logistics.events"]


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "10", True, 2**33])
def test_invalid_expiration_is_rejected_before_storing(redis_client, bad):
    bus = RedisDomainEventBus("acme", "logistics", redis_client)
    with pytest.raises(OutboxConfigError, match="expiration_s"):
        bus.publish(ParcelShipped(parcel_id="1"), expiration_s=bad)
    assert redis_client.llen(bus.outbox.keys.pending) == 0


def test_remaining_time_to_live_is_published(redis_client, rabbit, amqp_url):
    organization = rabbit.organization()
    queue = rabbit.bind_queue(f"{organization}.logistics")
    RedisDomainEventBus(organization, "logistics", redis_client).publish(
        ParcelShipped(parcel_id="1"), expiration_s=60
    )
    drainer = Drainer(redis_client, RabbitMqConnector(amqp_url))

    drainer.drain_once()
    drainer.close()

    [(_, properties, _)] = rabbit.consume_all(queue, expected=1)
    assert 0 < int(properties.expiration) <= 60_000


def test_message_expired_in_the_outbox_is_dead_lettered_not_published(redis_client, rabbit, amqp_url):
    organization = rabbit.organization()
    queue = rabbit.bind_queue(f"{organization}.logistics")
    bus = RedisDomainEventBus(organization, "logistics", redis_client)
    bus.publish(ParcelShipped(parcel_id="1"), expiration_s=0.05)
    time.sleep(0.1)
    drainer = Drainer(redis_client, RabbitMqConnector(amqp_url))

    drainer.drain_once()
    drainer.close()

    assert rabbit.consume_all(queue, expected=0) == []
    [letter] = bus.outbox.dead_letters()
    assert "expired" in letter.reason


def test_with_meta_adds_meta_to_every_message(redis_client):
    from outbox.records import decode_record

    bus = RedisDomainEventBus("acme", "logistics", redis_client)
    bus.with_meta(correlation_id="c-9").publish(
        [ParcelShipped(parcel_id="1"), ParcelShipped(parcel_id="2")]
    )
    payloads = redis_client.lrange(bus.outbox.keys.pending, 0, -1)
    bodies = [decode_record(p).body for p in payloads]
    assert all(b'"meta":{"correlation_id":"c-9"}' in body for body in bodies)


def test_metrics_endpoint_reports_counts(redis_client, rabbit, amqp_url):
    organization = rabbit.organization()
    queue = rabbit.bind_queue(f"{organization}.logistics")
    bus = RedisDomainEventBus(organization, "logistics", redis_client)
    bus.publish([ParcelShipped(parcel_id=str(n)) for n in range(3)])
    drainer = Drainer(redis_client, RabbitMqConnector(amqp_url))
    port = free_port()
    drainer.serve_metrics(port, "127.0.0.1")

    drainer.drain_once()
    drainer.close()
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()

    name = bus.outbox.name
    assert f'outbox_published_total{{outbox="{name}"}} 3.0' in text
    assert f'outbox_pending{{outbox="{name}"}} 0.0' in text
    assert f'outbox_oldest_pending_age_seconds{{outbox="{name}"}} 0.0' in text
    assert "outbox_publish_seconds_count" in text
    assert len(rabbit.consume_all(queue, expected=3)) == 3


def test_oldest_pending_age_grows_while_nothing_drains(redis_client):
    from outbox.metrics import DrainMetrics

    bus = RedisDomainEventBus("acme", "logistics", redis_client)
    bus.publish(ParcelShipped(parcel_id="1"))
    time.sleep(0.05)
    metrics = DrainMetrics(lambda: [Outbox(redis_client, bus.outbox.name)])

    age = metrics.registry.get_sample_value(
        "outbox_oldest_pending_age_seconds", {"outbox": bus.outbox.name}
    )

    assert age is not None
    assert age >= 0.04


def test_daemon_survives_a_redis_restart(rabbit, amqp_url):
    from tests.servers import RedisServer

    server = RedisServer()
    try:
        client = server.client(socket_timeout=1, socket_connect_timeout=1)
        organization = rabbit.organization()
        queue = rabbit.bind_queue(f"{organization}.logistics")
        bus = RedisDomainEventBus(organization, "logistics", client, retry_for_s=0.2)
        drainer = Drainer(
            client, RabbitMqConnector(amqp_url), DrainSettings(outboxes=[bus.outbox.name])
        )
        drainer.outboxes()[0].retry_for_s = 0.2
        thread = threading.Thread(target=drainer.run_forever, daemon=True)
        thread.start()
        try:
            server.stop()
            time.sleep(1.5)
            server.start()
            event = ParcelShipped(parcel_id="after-restart")
            bus.publish(event)
            received = rabbit.consume_all(queue, expected=1, timeout_s=20)
            alive = thread.is_alive()
        finally:
            drainer.stopping.set()
            thread.join(timeout=10)
            drainer.close()
    finally:
        server.close()
    assert alive
    assert [p.message_id for _, p, _ in received] == [event.id]
