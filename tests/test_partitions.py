from __future__ import annotations

import logging
import subprocess
import sys
import zlib

import pytest
import redis

from outbox import (
    OutboxConfigError,
    OutboxDomainEventBus,
    PartialStoreError,
    PublishAndStoreError,
    RabbitMqConnector,
    RabbitMqDomainEventBus,
    RedisDomainEventBus,
)
from outbox.drain import Drainer, DrainSettings
from outbox.messages import DomainEvent
from outbox.naming import REGISTRY_KEY
from outbox.partitions import (
    MAX_PARTITIONS,
    base_name,
    covers,
    partition_index,
    partition_names,
)
from outbox.records import decode_record
from outbox.store import Outbox
from tests.servers import free_port

PARTITIONS = 3


class CartChanged(DomainEvent):
    cart_id: str
    step: int = 0


def unreachable_connector() -> RabbitMqConnector:
    return RabbitMqConnector(f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F", connect_timeout_s=1)


def key_in_partition(index: int, partitions: int = PARTITIONS) -> str:
    """Return a cart id whose messages go to partition ``index``."""
    for candidate in range(10_000):
        key = f"cart-{candidate}"
        if partition_index(key, partitions) == index:
            return key
    raise AssertionError(f"no key found for partition {index}")


def cart_bus(client: redis.Redis, organization: str = "acme", **options: object) -> RedisDomainEventBus:
    return RedisDomainEventBus(
        organization,
        "shop",
        client,
        partitions=PARTITIONS,
        partition_key=lambda message: message.cart_id,  # type: ignore[attr-defined]
        **options,  # type: ignore[arg-type]
    )


def stored_ids(client: redis.Redis, outbox: Outbox) -> list[str]:
    """Return the message ids of an outbox's pending entries, oldest first."""
    payloads = client.lrange(outbox.keys.pending, 0, -1)
    return [decode_record(payload).message_id for payload in reversed(payloads)]


# Names and the choice of partition


def test_partition_names_keep_the_name_for_one_partition():
    assert partition_names("acme.shop.events", 1) == ["acme.shop.events"]
    assert partition_names("acme.shop.events", 3) == [
        "acme.shop.events#0",
        "acme.shop.events#1",
        "acme.shop.events#2",
    ]


@pytest.mark.parametrize("bad", [0, -1, MAX_PARTITIONS + 1, 2.0, True, "3"])
def test_partition_count_out_of_range_is_rejected(bad):
    with pytest.raises(OutboxConfigError, match="partitions must be an integer"):
        partition_names("acme.shop.events", bad)


def test_base_name_strips_only_a_numeric_suffix():
    assert base_name("acme.shop.events#12") == "acme.shop.events"
    assert base_name("acme.shop.events") == "acme.shop.events"
    assert base_name("acme.shop.events#x") == "acme.shop.events#x"
    assert base_name("acme.shop.events#01") == "acme.shop.events#01"
    assert base_name("a#1#2") == "a#1"


def test_covers_the_outbox_and_its_partitions_only():
    assert covers("acme.shop.events", "acme.shop.events")
    assert covers("acme.shop.events", "acme.shop.events#7")
    assert not covers("acme.shop.events", "acme.shop.events.old#1")
    assert not covers("acme.shop.events", "acme.shop.commands#1")


def test_partition_index_is_crc32_of_the_utf8_key():
    assert partition_index("cart-42", 8) == zlib.crc32(b"cart-42") % 8
    assert partition_index("caf\u00e9", 5) == zlib.crc32("caf\u00e9".encode()) % 5


def test_partition_index_is_the_same_in_another_process():
    # Python's hash() of a str changes between processes; the partition must not.
    code = "from outbox.partitions import partition_index; print(partition_index('cart-42', 16))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(other.stdout) == partition_index("cart-42", 16)


# Redis buses


def test_one_partition_keeps_the_outbox_name(redis_client):
    bus = RedisDomainEventBus("acme", "shop", redis_client, partitions=1)
    event = CartChanged(cart_id="c1")

    bus.publish(event)

    assert [outbox.name for outbox in bus.outboxes] == ["acme.shop.events"]
    assert bus.outbox.name == "acme.shop.events"
    assert stored_ids(redis_client, bus.outbox) == [event.id]
    assert redis_client.smembers(REGISTRY_KEY) == {b"acme.shop.events"}


def test_one_key_stays_in_order_in_one_partition(redis_client):
    bus = cart_bus(redis_client)
    keys = [key_in_partition(index) for index in range(PARTITIONS)]
    events = [CartChanged(cart_id=keys[step % PARTITIONS], step=step) for step in range(30)]

    bus.publish(events)

    for index, outbox in enumerate(bus.outboxes):
        expected = [event.id for event in events if event.cart_id == keys[index]]
        assert stored_ids(redis_client, outbox) == expected
    assert redis_client.llen(bus.outbox.keys.pending) == 0


def test_each_partition_registers_once_it_stores(redis_client):
    bus = cart_bus(redis_client)

    bus.publish([CartChanged(cart_id=key_in_partition(0)), CartChanged(cart_id=key_in_partition(2))])

    assert redis_client.smembers(REGISTRY_KEY) == {b"acme.shop.events#0", b"acme.shop.events#2"}


def test_default_partition_key_is_the_message_id(redis_client):
    bus = RedisDomainEventBus("acme", "shop", redis_client, partitions=PARTITIONS)
    events = [CartChanged(cart_id="same") for _ in range(60)]

    bus.publish(events)

    for index, outbox in enumerate(bus.outboxes):
        expected = [e.id for e in events if partition_index(e.id, PARTITIONS) == index]
        assert stored_ids(redis_client, outbox) == expected
    assert all(redis_client.llen(outbox.keys.pending) > 0 for outbox in bus.outboxes)


def test_partition_key_returning_no_str_is_rejected(redis_client):
    bus = RedisDomainEventBus(
        "acme", "shop", redis_client, partitions=PARTITIONS, partition_key=lambda message: 7  # type: ignore[arg-type,return-value]
    )

    with pytest.raises(OutboxConfigError, match="partition_key must return a str, got int"):
        bus.publish(CartChanged(cart_id="c1"))


def test_failed_partition_raises_partial_store_error(redis_client):
    bus = cart_bus(redis_client)
    first = CartChanged(cart_id=key_in_partition(0))
    second = CartChanged(cart_id=key_in_partition(1))
    # A string where the pending list belongs makes LPUSH fail with WRONGTYPE.
    redis_client.set(bus.outboxes[1].keys.pending, b"not a list")

    with pytest.raises(PartialStoreError) as raised:
        bus.publish([first, second])

    assert raised.value.stored_message_ids == [first.id]
    assert raised.value.unstored_message_ids == [second.id]
    assert "WRONGTYPE" in str(raised.value.__cause__)
    assert stored_ids(redis_client, bus.outboxes[0]) == [first.id]


def test_first_partition_failure_raises_store_error(redis_client):
    bus = cart_bus(redis_client)
    redis_client.set(bus.outboxes[0].keys.pending, b"not a list")

    with pytest.raises(Exception) as raised:
        bus.publish([CartChanged(cart_id=key_in_partition(0)), CartChanged(cart_id=key_in_partition(1))])

    assert not isinstance(raised.value, PartialStoreError)
    assert redis_client.llen(bus.outboxes[1].keys.pending) == 0


def test_rabbitmq_bus_reports_a_partial_store(redis_client):
    fallback = cart_bus(redis_client)
    bus = RabbitMqDomainEventBus("acme", "shop", unreachable_connector(), fallback=fallback)
    redis_client.set(fallback.outboxes[1].keys.pending, b"not a list")

    with pytest.raises(PublishAndStoreError) as raised:
        bus.publish([CartChanged(cart_id=key_in_partition(0)), CartChanged(cart_id=key_in_partition(1))])

    assert "1 of them were stored, the other 1 were not" in str(raised.value)
    assert isinstance(raised.value.store_error, PartialStoreError)


def test_rabbitmq_bus_passes_messages_to_a_partitioned_fallback(redis_client):
    fallback = cart_bus(redis_client)
    bus = RabbitMqDomainEventBus("acme", "shop", unreachable_connector(), fallback=fallback)
    event = CartChanged(cart_id=key_in_partition(2))

    bus.publish(event)

    assert stored_ids(redis_client, fallback.outboxes[2]) == [event.id]


def test_wait_without_replicas_logs_warning(redis_client, caplog):
    bus = RedisDomainEventBus("acme", "shop", redis_client, wait_replicas=1, wait_timeout_ms=50)
    event = CartChanged(cart_id="c1")

    with caplog.at_level(logging.WARNING, logger="outbox.partitions"):
        bus.publish(event)

    assert stored_ids(redis_client, bus.outbox) == [event.id]
    [warning] = [r for r in caplog.records if r.name == "outbox.partitions"]
    assert "Only 0 of 1 replicas acknowledged 1 messages of outbox acme.shop.events" in warning.message
    assert "stored on the primary" in warning.message


def test_wait_keeps_a_large_push_atomic(redis_client):
    bus = RedisDomainEventBus("acme", "shop", redis_client, wait_replicas=1, wait_timeout_ms=20)
    events = [CartChanged(cart_id=str(n)) for n in range(2500)]

    bus.publish(events)

    assert stored_ids(redis_client, bus.outbox) == [event.id for event in events]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"wait_replicas": -1}, "wait_replicas must not be negative"),
        ({"wait_replicas": 1, "wait_timeout_ms": 0}, "wait_timeout_ms must be at least 1"),
        ({"wait_replicas": 1, "wait_timeout_ms": 5000}, "not below the Redis client's socket timeout"),
    ],
)
def test_invalid_wait_options_are_rejected(redis_url, options, message):
    client = redis.Redis.from_url(redis_url, socket_timeout=2.0)

    with pytest.raises(OutboxConfigError, match=message):
        RedisDomainEventBus("acme", "shop", client, **options)


# Outbox-first buses


def test_transaction_stores_each_partition_in_the_same_commit(redis_client):
    bus = OutboxDomainEventBus(
        "acme", "shop", redis_client, partitions=PARTITIONS, partition_key=lambda m: m.cart_id  # type: ignore[attr-defined]
    )
    events = [CartChanged(cart_id=key_in_partition(index)) for index in range(PARTITIONS)]

    with redis_client.pipeline(transaction=True) as pipe:
        pipe.incr("carts")
        bus.publish(events, transaction=pipe)
        pipe.execute()

    assert redis_client.get("carts") == b"1"
    for index, outbox in enumerate(bus.outboxes):
        assert stored_ids(redis_client, outbox) == [events[index].id]


def test_prepare_rejects_messages_spanning_partitions(redis_client):
    bus = OutboxDomainEventBus(
        "acme", "shop", redis_client, partitions=PARTITIONS, partition_key=lambda m: m.cart_id  # type: ignore[attr-defined]
    )
    events = [CartChanged(cart_id=key_in_partition(0)), CartChanged(cart_id=key_in_partition(1))]

    with pytest.raises(OutboxConfigError, match="go to 2 partitions"):
        bus.prepare(events)
    prepared = bus.prepare_partitions(events)

    assert [push.key for push in prepared] == [
        bus.outboxes[0].keys.pending,
        bus.outboxes[1].keys.pending,
    ]
    assert bus.prepare(events[:1]).key == bus.outboxes[0].keys.pending


# Drainers


class RecordingDrainer(Drainer):
    """A drainer that records the outbox of every batch it claims."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.visits: list[str] = []

    def drain_batch(self, outbox: Outbox) -> int:
        self.visits.append(outbox.name)
        return super().drain_batch(outbox)


def test_configured_outbox_covers_its_registered_partitions(redis_client):
    bus = cart_bus(redis_client)
    bus.publish([CartChanged(cart_id=key_in_partition(index)) for index in range(PARTITIONS)])
    redis_client.sadd(REGISTRY_KEY, "acme.shop.events.archive#0", "acme.shop.commands#0")
    drainer = Drainer(
        redis_client, unreachable_connector(), DrainSettings(outboxes=["acme.shop.events"])
    )

    names = [outbox.name for outbox in drainer.outboxes(refresh=True)]
    drainer.close()

    assert sorted(names) == [
        "acme.shop.events",
        "acme.shop.events#0",
        "acme.shop.events#1",
        "acme.shop.events#2",
    ]


def test_each_round_starts_at_the_next_outbox(redis_client):
    for name in partition_names("acme.shop.events", PARTITIONS):
        redis_client.sadd(REGISTRY_KEY, name)
    drainer = RecordingDrainer(
        redis_client, unreachable_connector(), DrainSettings(outboxes=["acme.shop.events"])
    )
    count = len(drainer.outboxes(refresh=True))

    for _ in range(count):
        drainer.run_round()
    drainer.close()

    rounds = [drainer.visits[start : start + count] for start in range(0, len(drainer.visits), count)]
    assert len(rounds) == count
    assert sorted(round_[0] for round_ in rounds) == sorted(rounds[0])
    assert all(sorted(round_) == sorted(rounds[0]) for round_ in rounds)


def test_busy_partition_does_not_starve_the_others(redis_client, rabbit, amqp_url):
    organization = rabbit.organization()
    queue = rabbit.bind_queue(f"{organization}.shop")
    bus = cart_bus(redis_client, organization)
    busy, quiet = key_in_partition(0), [key_in_partition(1), key_in_partition(2)]
    drainer = Drainer(
        redis_client,
        RabbitMqConnector(amqp_url),
        DrainSettings(batch_size=50, outboxes=[f"{organization}.shop.events"]),
    )
    published_quiet = 0

    # The producer adds four batches a round to the busy partition, more than one round
    # drains, and one message to each quiet partition.
    for step in range(5):
        bus.publish([CartChanged(cart_id=busy, step=step) for _ in range(200)])
        bus.publish([CartChanged(cart_id=key, step=step) for key in quiet])
        published_quiet += len(quiet)
        drainer.run_round()
        assert redis_client.llen(bus.outboxes[1].keys.pending) == 0
        assert redis_client.llen(bus.outboxes[2].keys.pending) == 0
    drainer.close()

    # One batch a round went out; a batch claimed ahead was released unpublished on close.
    assert bus.outboxes[0].stats().unfinished == 5 * 200 - 5 * 50
    received = rabbit.consume_all(queue, expected=5 * 50 + published_quiet)
    assert len(received) == 5 * 50 + published_quiet
