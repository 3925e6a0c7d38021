from __future__ import annotations

import pytest
import redis

from outbox import OutboxConfigError, OutboxDomainEventBus, RabbitMqConnector
from outbox.drain import Drainer, DrainSettings
from outbox.messages import DomainEvent
from outbox.records import decode_record


class CounterIncremented(DomainEvent):
    value: int


def stored_ids(client: redis.Redis, bus: OutboxDomainEventBus) -> list[str]:
    return [decode_record(p).message_id for p in client.lrange(bus.outbox.keys.pending, 0, -1)]


def test_committed_transaction_stores_write_and_event(redis_client):
    bus = OutboxDomainEventBus("acme", "counter", redis_client)
    event = CounterIncremented(value=1)

    with redis_client.pipeline(transaction=True) as pipe:
        pipe.incr("counter")
        bus.publish(event, transaction=pipe)
        pipe.execute()

    assert redis_client.get("counter") == b"1"
    assert stored_ids(redis_client, bus) == [event.id]


def test_discarded_transaction_stores_neither(redis_client):
    bus = OutboxDomainEventBus("acme", "counter", redis_client)

    with redis_client.pipeline(transaction=True) as pipe:
        pipe.incr("counter")
        bus.publish(CounterIncremented(value=1), transaction=pipe)
        pipe.reset()

    assert redis_client.get("counter") is None
    assert stored_ids(redis_client, bus) == []


def test_transaction_failing_on_watched_key_stores_neither(redis_client):
    bus = OutboxDomainEventBus("acme", "counter", redis_client)
    redis_client.set("counter", 5)

    with redis_client.pipeline(transaction=True) as pipe:
        pipe.watch("counter")
        current = int(pipe.get("counter"))
        redis_client.set("counter", 100)
        pipe.multi()
        pipe.set("counter", current + 1)
        bus.publish(CounterIncremented(value=current + 1), transaction=pipe)
        with pytest.raises(redis.WatchError):
            pipe.execute()

    assert redis_client.get("counter") == b"100"
    assert stored_ids(redis_client, bus) == []


def test_watching_pipeline_before_multi_is_rejected(redis_client):
    bus = OutboxDomainEventBus("acme", "counter", redis_client)
    with redis_client.pipeline(transaction=True) as pipe:
        pipe.watch("counter")
        with pytest.raises(OutboxConfigError, match="multi"):
            bus.publish(CounterIncremented(value=1), transaction=pipe)
    assert stored_ids(redis_client, bus) == []


def test_non_transactional_pipeline_is_rejected(redis_client):
    bus = OutboxDomainEventBus("acme", "counter", redis_client)
    with redis_client.pipeline(transaction=False) as pipe, pytest.raises(
        OutboxConfigError, match="transaction=True"
    ):
        bus.publish(CounterIncremented(value=1), transaction=pipe)


def test_publish_without_transaction_stores_at_once(redis_client):
    bus = OutboxDomainEventBus("acme", "counter", redis_client)
    event = CounterIncremented(value=1)
    bus.publish(event)
    assert stored_ids(redis_client, bus) == [event.id]


def test_caller_lua_script_stores_prepared_push_with_its_write(redis_client):
    bus = OutboxDomainEventBus("acme", "counter", redis_client)
    event = CounterIncremented(value=1)
    prepared = bus.prepare(event)
    script = redis_client.register_script(
        "redis.call('INCR', KEYS[1]); return redis.call('LPUSH', KEYS[2], unpack(ARGV))"
    )

    script(keys=["counter", prepared.key], args=prepared.payloads)

    assert redis_client.get("counter") == b"1"
    assert stored_ids(redis_client, bus) == [event.id]


def test_drainer_publishes_committed_events_in_commit_order(redis_client, rabbit, amqp_url):
    organization = rabbit.organization()
    queue = rabbit.bind_queue(f"{organization}.counter")
    bus = OutboxDomainEventBus(organization, "counter", redis_client)
    events = []
    for value in range(1, 51):
        with redis_client.pipeline(transaction=True) as pipe:
            pipe.incr(f"{organization}:counter")
            event = CounterIncremented(value=value)
            bus.publish(event, transaction=pipe)
            pipe.execute()
            events.append(event)
    drainer = Drainer(redis_client, RabbitMqConnector(amqp_url), DrainSettings(batch_size=7))

    drainer.drain_once()
    drainer.close()

    received = rabbit.consume_all(queue, expected=50)
    assert [p.message_id for _, p, _ in received] == [e.id for e in events]


def test_client_given_as_transaction_is_rejected(redis_client):
    bus = OutboxDomainEventBus("acme", "counter", redis_client)
    with pytest.raises(OutboxConfigError, match="must be a redis-py pipeline"):
        bus.publish(CounterIncremented(value=1), transaction=redis_client)
    assert stored_ids(redis_client, bus) == []


def test_prepared_push_unpacks_into_key_and_payloads(redis_client):
    bus = OutboxDomainEventBus("acme", "counter", redis_client)
    key, payloads = bus.prepare(CounterIncremented(value=1))
    assert key == bus.outbox.keys.pending
    assert len(payloads) == 1
