"""outbox with petisco 2.x itself: its Redis lists drained, its decoding, its bus interfaces.

petisco is a test dependency in this venv. Plain ``petisco`` resolves beside our redis and
pika; only its ``redis`` and ``rabbitmq`` extras pin older versions (redis<5, pika==1.3.2),
and its buses need nothing from those extras but importable ``redis`` and ``pika``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from typing import Any

import pika
import pytest
from petisco import Command as PetiscoCommand
from petisco import DomainEvent as PetiscoDomainEvent
from petisco.extra.rabbitmq import RabbitMqConnector as PetiscoRabbitMqConnector
from petisco.extra.rabbitmq import RabbitMqDomainEventBus as PetiscoRabbitMqDomainEventBus
from petisco.extra.rabbitmq.application.message.formatter.rabbitmq_message_queue_name_formatter import (
    RabbitMqMessageQueueNameFormatter,
)
from petisco.extra.redis import RedisCommandBus as PetiscoRedisCommandBus
from petisco.extra.redis import RedisDomainEventBus as PetiscoRedisDomainEventBus

import outbox
from outbox import petisco as outbox_petisco
from outbox.adopt import adopt_petisco_lists
from outbox.drain import Drainer, DrainSettings
from outbox.errors import BrokerError, MessageEncodeError, OutboxConfigError
from outbox.store import Outbox
from tests.servers import free_port

SERVICE = "billing"


class InvoicePaid(PetiscoDomainEvent):
    invoice_id: str
    amount_cents: int


class SendReceipt(PetiscoCommand):
    invoice_id: str


class InvoiceWithPayload(PetiscoDomainEvent):
    payload: Any


class InvoiceRefunded(outbox.DomainEvent):
    invoice_id: str
    amount_cents: int


class PetiscoInvoiceRefunded(PetiscoDomainEvent):
    invoice_id: str
    amount_cents: int


def unreachable_connector() -> outbox.RabbitMqConnector:
    return outbox.RabbitMqConnector(
        f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F", connect_timeout_s=1.0
    )


def drain(redis_client, amqp_url: str, outboxes: list[str]) -> Drainer:
    drainer = Drainer(
        redis_client, outbox.RabbitMqConnector(amqp_url), DrainSettings(outboxes=outboxes)
    )
    finished = drainer.drain_once()
    drainer.close()
    assert finished
    return drainer


def invoices(count: int) -> list[InvoicePaid]:
    return [InvoicePaid(invoice_id=str(n), amount_cents=100 + n) for n in range(count)]


@pytest.fixture
def petisco_connector(monkeypatch, amqp_url):
    """petisco's singleton RabbitMqConnector aimed at the test RabbitMQ, restored afterwards."""
    parameters = pika.URLParameters(amqp_url)
    if parameters.virtual_host != "/":
        pytest.skip("petisco's RabbitMqConnector always connects to the virtual host /")
    connector = PetiscoRabbitMqConnector()
    monkeypatch.setattr(connector, "host", parameters.host)
    monkeypatch.setattr(connector, "port", str(parameters.port))
    monkeypatch.setattr(connector, "user", parameters.credentials.username)
    monkeypatch.setattr(connector, "password", parameters.credentials.password)
    monkeypatch.setattr(connector, "num_max_retries_connection", 1)
    monkeypatch.setattr(connector, "wait_seconds_retry", 0.0)
    yield connector
    connector.close_all()


# petisco's Redis lists, drained by outbox


def test_petisco_redis_lists_are_published_oldest_first(redis_client, rabbit, amqp_url):
    organization = rabbit.organization()
    queue = rabbit.bind_queue(f"{organization}.{SERVICE}")
    events = invoices(5)
    event_bus = PetiscoRedisDomainEventBus(organization, SERVICE, redis_client)
    event_bus.publish(events[:3])
    event_bus.with_meta({"correlation_id": "req-7"}).publish(events[3:])
    command = SendReceipt(invoice_id="0")
    PetiscoRedisCommandBus(organization, SERVICE, redis_client).dispatch(command)

    moved = adopt_petisco_lists(redis_client)
    drain(redis_client, amqp_url, list(moved))

    assert moved == {"events": 5, "commands": 1}
    received = rabbit.consume_all(queue, expected=6)
    event_deliveries = [d for d in received if ".event." in d[0].routing_key]
    command_deliveries = [d for d in received if ".command." in d[0].routing_key]
    assert [p.message_id for _, p, _ in event_deliveries] == [e.get_message_id() for e in events]
    assert {m.routing_key for m, _, _ in event_deliveries} == {
        f"{organization}.{SERVICE}.1.event.invoice_paid"
    }
    assert [m.routing_key for m, _, _ in command_deliveries] == [
        f"{organization}.{SERVICE}.1.command.send_receipt"
    ]
    assert {p.delivery_mode for _, p, _ in received} == {2}
    assert {p.content_type for _, p, _ in received} == {"application/json"}


def test_drained_petisco_records_decode_with_petisco(redis_client, rabbit, amqp_url):
    organization = rabbit.organization()
    queue = rabbit.bind_queue(f"{organization}.{SERVICE}")
    [event] = invoices(1)
    PetiscoRedisDomainEventBus(organization, SERVICE, redis_client).with_meta(
        {"correlation_id": "req-7"}
    ).publish(event)
    command = SendReceipt(invoice_id="0")
    PetiscoRedisCommandBus(organization, SERVICE, redis_client).dispatch(command)

    drain(redis_client, amqp_url, list(adopt_petisco_lists(redis_client)))

    bodies = {
        m.routing_key.split(".")[-2]: body for m, _, body in rabbit.consume_all(queue, expected=2)
    }
    decoded_event = InvoicePaid.from_format(bodies["event"])
    decoded_command = SendReceipt.from_format(bodies["command"])
    assert decoded_event == event
    assert decoded_event.get_message_id() == event.get_message_id()
    assert decoded_event.get_message_name() == "invoice.paid"
    assert decoded_event.get_message_attributes() == {"invoice_id": "0", "amount_cents": 100}
    assert decoded_event.get_message_meta() == {"correlation_id": "req-7"}
    assert decoded_command == command
    assert json.loads(bodies["event"]) == json.loads(event.format_json())


def test_petisco_rabbitmq_bus_fallback_list_is_drained(
    redis_client, rabbit, amqp_url, petisco_connector, monkeypatch
):
    organization = rabbit.organization()
    queue = rabbit.bind_queue(f"{organization}.{SERVICE}")
    monkeypatch.setattr(petisco_connector, "port", str(free_port()))
    events = invoices(2)
    bus = PetiscoRabbitMqDomainEventBus(
        organization,
        SERVICE,
        petisco_connector,
        fallback=PetiscoRedisDomainEventBus(organization, SERVICE, redis_client),
    )

    bus.publish(events)

    assert redis_client.llen("events") == 2
    drain(redis_client, amqp_url, list(adopt_petisco_lists(redis_client)))
    received = rabbit.consume_all(queue, expected=2)
    decoded = [InvoicePaid.from_format(body) for _, _, body in received]
    assert decoded == events


def test_unparseable_petisco_entries_are_dead_lettered(redis_client, rabbit, amqp_url):
    organization = rabbit.organization()
    queue = rabbit.bind_queue(f"{organization}.{SERVICE}")
    first, last = invoices(2)
    petisco_bus = PetiscoRedisDomainEventBus(organization, SERVICE, redis_client)
    petisco_bus.publish(first)
    redis_client.lpush("events", b"not json", b'{"organization": "acme"}')
    petisco_bus.publish(last)

    drain(redis_client, amqp_url, list(adopt_petisco_lists(redis_client)))

    received = rabbit.consume_all(queue, expected=2)
    assert [p.message_id for _, p, _ in received] == [
        first.get_message_id(),
        last.get_message_id(),
    ]
    dead = Outbox(redis_client, "events").dead_letters()
    assert sorted(letter.payload for letter in dead) == [b"not json", b'{"organization": "acme"}']
    assert all(letter.reason.startswith("cannot decode entry") for letter in dead)


# outbox's own messages, read by petisco


def test_outbox_bus_messages_decode_with_petisco(redis_client, rabbit, amqp_url):
    organization = rabbit.organization()
    queue = rabbit.bind_queue(f"{organization}.{SERVICE}")
    event = InvoiceRefunded(invoice_id="9", amount_cents=250)
    bus = outbox.RabbitMqDomainEventBus(organization, SERVICE, outbox.RabbitMqConnector(amqp_url))

    bus.with_meta(correlation_id="req-9").publish(event)
    bus.close()

    [(method, properties, body)] = rabbit.consume_all(queue, expected=1)
    decoded = PetiscoInvoiceRefunded.from_format(body)
    assert method.routing_key == f"{organization}.{SERVICE}.1.event.invoice_refunded"
    assert decoded.get_message_id() == event.id == properties.message_id
    assert decoded.get_message_name() == "invoice.refunded"
    assert decoded.get_message_type() == "domain_event"
    assert decoded.get_message_attributes() == {"invoice_id": "9", "amount_cents": 250}
    assert decoded.get_message_meta() == {"correlation_id": "req-9"}
    assert decoded.get_message_occurred_on() == event.occurred_on


# outbox.petisco: petisco's bus interfaces backed by outbox


def test_petisco_record_matches_petisco_body_and_routing_key():
    [event] = invoices(1)

    record = outbox_petisco.petisco_record(event, organization="acme", service=SERVICE)

    assert record.body == event.format_json().encode()
    assert record.routing_key == RabbitMqMessageQueueNameFormatter.format(
        event, exchange_name=f"acme.{SERVICE}"
    )
    assert record.exchange == f"acme.{SERVICE}"
    assert record.message_id == event.get_message_id()
    assert record.type == "invoice.paid"
    assert record.timestamp_s == int(event.get_message_occurred_on().timestamp())


def test_outbox_petisco_buses_are_petisco_buses():
    from petisco import CommandBus, DomainEventBus

    assert issubclass(outbox_petisco.RabbitMqDomainEventBus, DomainEventBus)
    assert issubclass(outbox_petisco.RedisDomainEventBus, DomainEventBus)
    assert issubclass(outbox_petisco.RabbitMqCommandBus, CommandBus)
    assert issubclass(outbox_petisco.RedisCommandBus, CommandBus)


def test_swapped_bus_publishes_what_petisco_publishes(rabbit, amqp_url, petisco_connector):
    organization = rabbit.organization()
    queue = rabbit.bind_queue(f"{organization}.{SERVICE}")
    [event] = invoices(1)
    petisco_bus = PetiscoRabbitMqDomainEventBus(organization, SERVICE, petisco_connector)
    swapped_bus = outbox_petisco.RabbitMqDomainEventBus(organization, SERVICE, petisco_connector)

    petisco_bus.publish(event)
    petisco_bus.close()
    swapped_bus.publish(event)
    swapped_bus.close()

    [(petisco_method, _, petisco_body), (method, properties, body)] = rabbit.consume_all(
        queue, expected=2
    )
    assert body == petisco_body
    assert method.exchange == petisco_method.exchange == f"{organization}.{SERVICE}"
    assert method.routing_key == petisco_method.routing_key
    assert properties.message_id == event.get_message_id()
    assert properties.content_type == "application/json"
    assert properties.delivery_mode == 2
    assert properties.type == "invoice.paid"
    assert properties.timestamp == int(event.get_message_occurred_on().timestamp())


def test_swapped_command_bus_dispatches_list_with_meta(rabbit, amqp_url):
    # petisco 2.2.3's RabbitMqCommandBus closes its channel after the first command of a
    # list, so the others fail; every command of the list must arrive here.
    organization = rabbit.organization()
    queue = rabbit.bind_queue(f"{organization}.{SERVICE}")
    commands = [SendReceipt(invoice_id="4"), SendReceipt(invoice_id="5")]
    bus = outbox_petisco.RabbitMqCommandBus(
        organization, SERVICE, outbox.RabbitMqConnector(amqp_url)
    )

    bus.with_meta({"correlation_id": "req-4"}).dispatch(commands)
    bus.close()

    received = rabbit.consume_all(queue, expected=2)
    assert [m.routing_key for m, _, _ in received] == [
        f"{organization}.{SERVICE}.1.command.send_receipt"
    ] * 2
    assert [p.message_id for _, p, _ in received] == [c.get_message_id() for c in commands]
    assert [body for _, _, body in received] == [c.format_json().encode() for c in commands]
    decoded = SendReceipt.from_format(received[0][2])
    assert decoded.get_message_meta() == {"correlation_id": "req-4"}


def test_swapped_bus_stores_events_while_rabbitmq_is_unreachable(redis_client, rabbit, amqp_url):
    organization = rabbit.organization()
    queue = rabbit.bind_queue(f"{organization}.{SERVICE}")
    events = invoices(3)
    bus = outbox_petisco.RabbitMqDomainEventBus(
        organization,
        SERVICE,
        unreachable_connector(),
        fallback=outbox_petisco.RedisDomainEventBus(organization, SERVICE, redis_client),
    )

    bus.publish(events)
    bus.close()

    outbox_name = f"{organization}.{SERVICE}.events"
    assert Outbox(redis_client, outbox_name).stats().pending == 3
    drain(redis_client, amqp_url, [outbox_name])
    received = rabbit.consume_all(queue, expected=3)
    assert [body for _, _, body in received] == [e.format_json().encode() for e in events]
    assert [p.message_id for _, p, _ in received] == [e.get_message_id() for e in events]


def test_swapped_bus_turns_petisco_redis_fallback_into_outbox(redis_client, rabbit):
    organization = rabbit.organization()
    commands = [SendReceipt(invoice_id=str(n)) for n in range(2)]
    bus = outbox_petisco.RabbitMqCommandBus(
        organization,
        SERVICE,
        unreachable_connector(),
        fallback=PetiscoRedisCommandBus(organization, SERVICE, redis_client),
    )

    bus.dispatch(commands)
    bus.close()

    assert redis_client.exists("commands") == 0
    assert Outbox(redis_client, f"{organization}.{SERVICE}.commands").stats().pending == 2


def test_swapped_bus_without_fallback_raises_broker_error(rabbit):
    bus = outbox_petisco.RabbitMqDomainEventBus(
        rabbit.organization(), SERVICE, unreachable_connector()
    )

    with pytest.raises(BrokerError, match="no fallback"):
        bus.publish(invoices(1))
    bus.close()


def test_swapped_bus_rejects_fallback_that_can_drop_messages(rabbit):
    from petisco import NotImplementedDomainEventBus

    with pytest.raises(OutboxConfigError, match="fallback must be a Redis bus"):
        outbox_petisco.RabbitMqDomainEventBus(
            rabbit.organization(),
            SERVICE,
            unreachable_connector(),
            fallback=NotImplementedDomainEventBus(),
        )


def test_swapped_bus_rejects_non_events_like_petisco(redis_client):
    bus = outbox_petisco.RedisDomainEventBus("acme", SERVICE, redis_client)

    with pytest.raises(TypeError, match="only publishes DomainEvent"):
        bus.publish([SendReceipt(invoice_id="1")])


def test_unserializable_event_stores_nothing(redis_client):
    bus = outbox_petisco.RedisDomainEventBus("acme", SERVICE, redis_client)
    good = InvoiceWithPayload(payload={"ok": True})
    bad = InvoiceWithPayload(payload=object())

    with pytest.raises(MessageEncodeError, match=bad.get_message_id()):
        bus.publish([good, bad])

    assert Outbox(redis_client, f"acme.{SERVICE}.events").stats().pending == 0


def test_buses_of_one_configuration_share_connection(redis_client):
    connector = unreachable_connector()
    fallback = outbox_petisco.RedisDomainEventBus("acme", SERVICE, redis_client)

    first = outbox_petisco.RabbitMqDomainEventBus("acme", SERVICE, connector, fallback)
    second = outbox_petisco.RabbitMqDomainEventBus("acme", SERVICE, connector, fallback)
    other_service = outbox_petisco.RabbitMqDomainEventBus("acme", "shipping", connector, fallback)

    assert first._bus is second._bus
    assert first.with_meta({"correlation_id": "c"})._bus is first._bus
    assert other_service._bus is not first._bus


def test_threads_share_one_swapped_bus(rabbit, amqp_url):
    organization = rabbit.organization()
    queue = rabbit.bind_queue(f"{organization}.{SERVICE}")
    bus = outbox_petisco.RabbitMqDomainEventBus(
        organization, SERVICE, outbox.RabbitMqConnector(amqp_url)
    )
    batches = [invoices(25) for _ in range(4)]
    errors: list[BaseException] = []

    def publish_each(events: list[InvoicePaid]) -> None:
        try:
            for event in events:
                bus.publish(event)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=publish_each, args=(batch,)) for batch in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    bus.close()

    assert errors == []
    received = rabbit.consume_all(queue, expected=100)
    expected_ids = sorted(e.get_message_id() for batch in batches for e in batch)
    assert sorted(p.message_id for _, p, _ in received) == expected_ids


def test_connector_from_environment_reads_petisco_variables():
    connector = outbox_petisco.connector_from_environment(
        {
            "RABBITMQ_HOST": "rabbit.internal",
            "RABBITMQ_PORT": "5673",
            "RABBITMQ_USER": "app",
            "RABBITMQ_PASSWORD": "p@ss:/word",
            "RABBITMQ_HEARTBEAT": "30",
        }
    )

    assert connector.address == "rabbit.internal:5673"
    assert connector.parameters.credentials.username == "app"
    assert connector.parameters.credentials.password == "p@ss:/word"
    assert connector.parameters.virtual_host == "/"
    assert connector.parameters.heartbeat == 30


def test_connector_from_petisco_connector_uses_its_settings(petisco_connector):
    bus = outbox_petisco.RabbitMqDomainEventBus("acme", SERVICE, petisco_connector)

    assert bus._bus.connector.address == f"{petisco_connector.host}:{petisco_connector.port}"


# Importing without petisco


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_importing_outbox_does_not_import_petisco():
    result = run_python(
        "import sys, outbox, outbox.adopt, outbox.drain, outbox.cli\n"
        "loaded = [m for m in sys.modules if m == 'petisco' or m.startswith('petisco.')]\n"
        "assert loaded == [], loaded\n"
    )

    assert result.returncode == 0, result.stderr


def test_importing_outbox_petisco_without_petisco_names_the_extra():
    result = run_python("import sys\nsys.modules['petisco'] = None\nimport outbox.petisco\n")

    assert result.returncode != 0
    assert "ImportError: outbox.petisco needs petisco 2.x" in result.stderr
    assert "pip install 'redis-outbox[petisco]'" in result.stderr
