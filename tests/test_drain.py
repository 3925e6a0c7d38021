from __future__ import annotations

import json
import subprocess
import sys

import pytest

from outbox import RabbitMqConnector, RabbitMqDomainEventBus, RedisDomainEventBus
from outbox.drain import Drainer, DrainSettings
from outbox.messages import DomainEvent, encode
from outbox.records import OutboxRecord, encode_record
from outbox.store import Outbox
from tests.servers import free_port


class InvoiceSent(DomainEvent):
    invoice_id: str


def fill_outbox(redis_client, organization: str, count: int) -> list[InvoiceSent]:
    unreachable = RabbitMqConnector(f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F")
    bus = RabbitMqDomainEventBus(
        organization, "billing", unreachable,
        fallback=RedisDomainEventBus(organization, "billing", redis_client),
    )
    events = [InvoiceSent(invoice_id=str(n)) for n in range(count)]
    bus.publish(events)
    return events


def test_drain_republishes_every_message_once_with_its_id(redis_client, rabbit, amqp_url):
    organization = rabbit.organization()
    queue = rabbit.bind_queue(f"{organization}.billing")
    events = fill_outbox(redis_client, organization, 1200)
    drainer = Drainer(redis_client, RabbitMqConnector(amqp_url), DrainSettings(batch_size=500))

    finished = drainer.drain_once()
    drainer.close()

    received = rabbit.consume_all(queue, expected=len(events))
    assert finished
    assert [p.message_id for _, p, _ in received] == [e.id for e in events]
    assert {p.delivery_mode for _, p, _ in received} == {2}
    assert {p.content_type for _, p, _ in received} == {"application/json"}
    assert drainer.counts.published == 1200
    assert Outbox(redis_client, f"{organization}.billing.events").stats().unfinished == 0


def test_drain_publishes_the_body_unchanged(redis_client, rabbit, amqp_url):
    organization = rabbit.organization()
    queue = rabbit.bind_queue(f"{organization}.billing")
    [event] = fill_outbox(redis_client, organization, 1)
    drainer = Drainer(redis_client, RabbitMqConnector(amqp_url))

    drainer.drain_once()
    drainer.close()

    [(_, _, body)] = rabbit.consume_all(queue, expected=1)
    assert json.loads(body)["data"]["id"] == event.id
    assert json.loads(body)["data"]["attributes"] == {"invoice_id": "0"}


def test_undecodable_entries_are_dead_lettered_and_good_ones_published(redis_client, rabbit, amqp_url):
    organization = rabbit.organization()
    queue = rabbit.bind_queue(f"{organization}.billing")
    outbox = Outbox(redis_client, f"{organization}.billing.events")
    events = fill_outbox(redis_client, organization, 2)
    outbox.push([b"", b"{}", b"\x00garbage"])
    drainer = Drainer(redis_client, RabbitMqConnector(amqp_url))

    drainer.drain_once()
    drainer.close()

    received = rabbit.consume_all(queue, expected=2)
    assert sorted(p.message_id for _, p, _ in received) == sorted(e.id for e in events)
    dead = outbox.dead_letters()
    assert len(dead) == 3
    assert all(letter.reason.startswith("cannot decode entry") for letter in dead)


def test_unroutable_message_is_dead_lettered_after_max_attempts(redis_client, rabbit, amqp_url):
    organization = rabbit.organization()
    rabbit.track_exchange(f"{organization}.billing")
    [event] = fill_outbox(redis_client, organization, 1)
    settings = DrainSettings(max_attempts=2, retry_delay_ms=10)
    drainer = Drainer(redis_client, RabbitMqConnector(amqp_url), settings)

    assert drainer.drain_once()
    drainer.close()

    [letter] = Outbox(redis_client, f"{organization}.billing.events").dead_letters()
    assert "gave up after 2 attempts" in letter.reason
    assert "no queue is bound" in letter.reason
    assert event.id.encode() in letter.payload


def test_broker_outage_keeps_entries_and_refunds_attempts(redis_client, rabbit):
    organization = rabbit.organization()
    fill_outbox(redis_client, organization, 5)
    connector = RabbitMqConnector(f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F")
    drainer = Drainer(redis_client, connector, DrainSettings(max_attempts=1))

    finished = drainer.drain_once(max_outage_s=0.5)

    outbox = Outbox(redis_client, f"{organization}.billing.events")
    stats = outbox.stats()
    assert not finished
    assert stats.waiting == 5
    assert stats.dead == 0
    attempts = redis_client.hvals(outbox.keys.attempts)
    assert attempts == [b"0"] * 5


def test_oversized_stored_message_is_dead_lettered_after_its_attempts(redis_client, rabbit, amqp_url):
    organization = rabbit.organization()
    queue = rabbit.bind_queue(f"{organization}.billing")
    outbox = Outbox(redis_client, f"{organization}.billing.events")
    big = OutboxRecord(
        exchange=f"{organization}.billing", routing_key="k", body=b"x" * 5000, message_id="big"
    )
    outbox.push([encode_record(big)])
    [small] = fill_outbox(redis_client, organization, 1)
    settings = DrainSettings(max_attempts=2, retry_delay_ms=10, max_message_bytes=4096)
    drainer = Drainer(redis_client, RabbitMqConnector(amqp_url), settings)

    drainer.drain_once()
    drainer.close()

    [letter] = outbox.dead_letters()
    assert "5000 bytes" in letter.reason
    assert [p.message_id for _, p, _ in rabbit.consume_all(queue, expected=1)] == [small.id]


def test_drain_command_once_prints_summary(redis_url, redis_client, rabbit, amqp_url):
    organization = rabbit.organization()
    queue = rabbit.bind_queue(f"{organization}.billing")
    fill_outbox(redis_client, organization, 50)

    result = subprocess.run(
        [sys.executable, "-m", "outbox.drain", "--once", "--redis-url", redis_url,
         "--amqp-url", amqp_url, "--outbox", f"{organization}.billing.events"],
        capture_output=True, text=True, timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert "published 50, failed 0, dead-lettered 0, still pending 0" in result.stdout
    assert len(rabbit.consume_all(queue, expected=50)) == 50


def test_drain_command_rejects_invalid_batch_size(redis_url):
    result = subprocess.run(
        [sys.executable, "-m", "outbox.drain", "--once", "--redis-url", redis_url, "--batch-size", "0"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert "batch size must be between 1 and 10000" in result.stderr


def test_stats_command_prints_counts_as_json(redis_url, redis_client):
    fill_outbox(redis_client, "acme", 3)

    result = subprocess.run(
        [sys.executable, "-m", "outbox", "stats", "--json", "--redis-url", redis_url],
        capture_output=True, text=True, timeout=30,
    )

    document = json.loads(result.stdout)
    assert document["outboxes"]["acme.billing.events"]["pending"] == 3
    assert document["total"]["pending"] == 3


@pytest.mark.parametrize("action", ["requeue", "purge"])
def test_dead_command_requires_ids_or_all(redis_url, redis_client, action):
    Outbox(redis_client, "acme.billing.events").push([b""])
    result = subprocess.run(
        [sys.executable, "-m", "outbox", "dead", action, "--redis-url", redis_url,
         "--outbox", "acme.billing.events"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert "needs entry ids or --all" in result.stderr


def test_drain_command_from_petisco_publishes_petisco_lists(redis_url, redis_client, rabbit, amqp_url):
    organization = rabbit.organization()
    queue = rabbit.bind_queue(f"{organization}.billing")
    events = [InvoiceSent(invoice_id=str(n)) for n in range(3)]
    records = [
        json.dumps(
            {"organization": organization, "service": "billing", "message": json.loads(encode(e))}
        )
        for e in events
    ]
    redis_client.lpush("events", *records)
    redis_client.lpush("events", b"not json")

    result = subprocess.run(
        [sys.executable, "-m", "outbox.drain", "--once", "--from-petisco", "--redis-url", redis_url,
         "--amqp-url", amqp_url],
        capture_output=True, text=True, timeout=60,
    )

    assert result.returncode == 0, result.stderr
    received = rabbit.consume_all(queue, expected=3)
    assert [p.message_id for _, p, _ in received] == [e.id for e in events]
    assert [m.routing_key for m, _, _ in received] == [f"{organization}.billing.1.event.invoice_sent"] * 3
    assert redis_client.llen("events") == 0
    [letter] = Outbox(redis_client, "events").dead_letters()
    assert "cannot decode entry" in letter.reason


def test_outbox_with_broken_keys_does_not_stop_the_others(redis_client, rabbit, amqp_url, caplog):
    organization = rabbit.organization()
    queue = rabbit.bind_queue(f"{organization}.billing")
    events = fill_outbox(redis_client, organization, 20)
    broken = Outbox(redis_client, "broken.billing.events")
    redis_client.set(broken.keys.pending, "not a list")
    good = f"{organization}.billing.events"
    drainer = Drainer(
        redis_client, RabbitMqConnector(amqp_url), DrainSettings(outboxes=[broken.name, good])
    )

    finished = drainer.drain_once()
    drainer.close()

    assert finished
    received = rabbit.consume_all(queue, expected=20)
    assert [p.message_id for _, p, _ in received] == [e.id for e in events]
    assert "Skipping outbox broken.billing.events" in caplog.text
    assert redis_client.get(broken.keys.pending) == b"not a list"


def test_drainer_with_several_outboxes_claims_nothing_ahead(redis_client, rabbit, amqp_url):
    first, second = rabbit.organization(), rabbit.organization()
    for organization in (first, second):
        rabbit.bind_queue(f"{organization}.billing")
        fill_outbox(redis_client, organization, 30)
    names = [f"{first}.billing.events", f"{second}.billing.events"]
    drainer = Drainer(
        redis_client, RabbitMqConnector(amqp_url), DrainSettings(batch_size=10, outboxes=names)
    )

    drainer.run_round()
    drainer.settle_acks()
    stats = [Outbox(redis_client, name).stats() for name in names]
    drainer.close()

    assert [s.leased for s in stats] == [0, 0]
    assert [s.pending for s in stats] == [20, 20]


def test_drainer_with_one_outbox_claims_the_next_batch_ahead(redis_client, rabbit, amqp_url):
    organization = rabbit.organization()
    rabbit.bind_queue(f"{organization}.billing")
    fill_outbox(redis_client, organization, 30)
    name = f"{organization}.billing.events"
    drainer = Drainer(
        redis_client, RabbitMqConnector(amqp_url), DrainSettings(batch_size=10, outboxes=[name])
    )

    drainer.run_round()
    drainer.settle_acks()
    stats = Outbox(redis_client, name).stats()
    drainer.close()

    assert stats.leased == 10
    assert stats.pending == 10
    assert Outbox(redis_client, name).stats().waiting == 10


def test_record_pika_cannot_encode_is_dead_lettered(redis_client, rabbit, amqp_url):
    # A routing key over AMQP's 255 bytes fails the message alone: the others are published
    # once, and it uses its attempts instead of passing for a broker outage.
    organization = rabbit.organization()
    queue = rabbit.bind_queue(f"{organization}.billing")
    outbox = Outbox(redis_client, f"{organization}.billing.events")
    before = fill_outbox(redis_client, organization, 2)
    long_key = OutboxRecord(
        exchange=f"{organization}.billing", routing_key="k" * 300, body=b"{}", message_id="long"
    )
    outbox.push([encode_record(long_key)])
    after = fill_outbox(redis_client, organization, 2)
    settings = DrainSettings(max_attempts=2, retry_delay_ms=10)
    drainer = Drainer(redis_client, RabbitMqConnector(amqp_url), settings)

    drainer.drain_once()
    drainer.close()

    [letter] = outbox.dead_letters()
    received = [p.message_id for _, p, _ in rabbit.consume_all(queue, expected=4)]
    assert "255 bytes" in letter.reason
    assert sorted(received) == sorted(event.id for event in before + after)
