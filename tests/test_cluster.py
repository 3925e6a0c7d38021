"""The outbox on a real Redis Cluster: redis-server processes started by tests/cluster.py."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from redis.cluster import RedisCluster

from outbox import RabbitMqConnector, RabbitMqDomainEventBus, RedisDomainEventBus
from outbox.cluster import connect_cluster
from outbox.drain import Drainer, DrainSettings
from outbox.messages import DomainEvent
from outbox.naming import REGISTRY_KEY
from outbox.partitions import partition_index
from outbox.records import OutboxRecord, encode_record
from outbox.store import Outbox, discover_outboxes, registered_outboxes
from tests.cluster import RedisClusterServers, redis_cluster
from tests.servers import free_port

pytestmark = pytest.mark.slow

PARTITIONS = 8


class ParcelScanned(DomainEvent):
    parcel_id: str


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterServers]:
    """Three primaries without replicas, shared by the tests of this module."""
    with redis_cluster(masters=3, replicas=0) as servers:
        yield servers


@pytest.fixture
def cluster_client(cluster: RedisClusterServers) -> Iterator[RedisCluster]:
    client = connect_cluster(cluster.url)
    yield client
    client.close()


def unreachable_connector() -> RabbitMqConnector:
    return RabbitMqConnector(f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F", connect_timeout_s=1)


def fill_partitions(
    client: RedisCluster, organization: str, count: int, **options: object
) -> tuple[RedisDomainEventBus, list[ParcelScanned]]:
    """Publish ``count`` events with RabbitMQ down, so all go to the partitioned fallback."""
    fallback = RedisDomainEventBus(
        organization,
        "parcels",
        client,
        partitions=PARTITIONS,
        partition_key=lambda message: message.parcel_id,  # type: ignore[attr-defined]
        **options,  # type: ignore[arg-type]
    )
    bus = RabbitMqDomainEventBus(organization, "parcels", unreachable_connector(), fallback=fallback)
    events = [ParcelScanned(parcel_id=f"parcel-{n % 97}") for n in range(count)]
    for start in range(0, count, 250):
        bus.publish(events[start : start + 250])
    return fallback, events


def drain_in_threads(drainers: list[Drainer]) -> list[bool]:
    """Run drain_once on every drainer at the same time; return what each returned."""
    finished: list[bool] = [False] * len(drainers)
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            finished[index] = drainers[index].drain_once(max_outage_s=20)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(drainers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    return finished


def test_partitions_spread_over_several_primaries(cluster, cluster_client):
    bus = RedisDomainEventBus("acme", "parcels", cluster_client, partitions=PARTITIONS)

    primaries = {
        cluster.primary_of_slot(cluster_client.keyslot(outbox.keys.pending))
        for outbox in bus.outboxes
    }

    assert len(primaries) > 1


def test_outbox_operations_run_on_the_cluster(cluster_client):
    outbox = Outbox(cluster_client, "acme.parcels.events#5")
    records = [
        encode_record(OutboxRecord(exchange="x", routing_key="k", body=b"{}", message_id=str(n)))
        for n in range(2500)
    ]

    # More than one LPUSH chunk: the push runs as a MULTI/EXEC transaction in one slot.
    assert outbox.push(records) == 2500
    claim = outbox.claim(batch_size=10, lease_ms=30_000)
    assert outbox.ack(claim.leases[:4]) == [True] * 4
    assert outbox.extend(claim.leases[4:], lease_ms=30_000) == [True] * 6
    assert outbox.release(claim.leases[4:6], refund=True, error="test") == [True, True]
    assert outbox.bury(claim.leases[6:], reason="test") == [True] * 4
    assert sorted(letter.entry_id for letter in outbox.dead_letters()) == sorted(
        lease.entry_id for lease in claim.leases[6:]
    )
    assert outbox.requeue([claim.leases[6].entry_id]) == 1
    assert outbox.purge() == 3
    stats = outbox.stats()
    assert (stats.pending, stats.leased, stats.waiting, stats.dead) == (2490, 0, 3, 0)


def test_scripts_reload_after_the_cluster_lost_them(cluster_client):
    outbox = Outbox(cluster_client, "acme.parcels.events#6")
    outbox.push([b"entry"])
    assert outbox.stats().pending == 1

    cluster_client.script_flush()  # runs on every primary

    assert cluster_client.script_exists(outbox._scripts["stats"].sha) == [False]
    assert outbox.stats().pending == 1
    assert len(outbox.claim(batch_size=1, lease_ms=1000).leases) == 1


def test_discovery_scans_every_primary(cluster, cluster_client):
    names = [f"acme.discovery.events#{index}" for index in range(PARTITIONS)]
    for name in names:
        Outbox(cluster_client, name).push([b"entry"])
    cluster_client.sadd(REGISTRY_KEY, "acme.registered.events")

    found = discover_outboxes(cluster_client)

    assert set(names) <= set(found)
    assert "acme.registered.events" in registered_outboxes(cluster_client)
    primaries = {cluster.primary_of_slot(cluster_client.keyslot(f"outbox:{{{n}}}:pending")) for n in names}
    assert len(primaries) > 1


def test_waiting_drainer_wakes_on_push(cluster_client, amqp_url):
    name = "acme.wakeup.events"
    outbox = Outbox(cluster_client, name)
    drainer = Drainer(cluster_client, RabbitMqConnector(amqp_url), DrainSettings(outboxes=[name]))
    pusher = threading.Timer(0.2, lambda: outbox.push([b"entry"]))

    started = time.monotonic()
    pusher.start()
    drainer.wait_for_entries(2.0)
    waited = time.monotonic() - started
    drainer.close()

    assert 0.15 < waited < 0.9
    assert outbox.stats().pending == 1


def test_two_drainers_publish_every_message(
    cluster, cluster_client, rabbit, amqp_url
):
    organization = rabbit.organization()
    queue = rabbit.bind_queue(f"{organization}.parcels")
    fallback, events = fill_partitions(cluster_client, organization, 3000)
    assert sum(outbox.stats().pending for outbox in fallback.outboxes) == 3000
    settings = DrainSettings(batch_size=50, outboxes=[f"{organization}.parcels.events"])
    # Each drainer has its own client, as separate processes would.
    drainers = [
        Drainer(connect_cluster(cluster.url), RabbitMqConnector(amqp_url), settings)
        for _ in range(2)
    ]

    finished = drain_in_threads(drainers)
    for drainer in drainers:
        drainer.close()
        drainer.redis.close()

    received = rabbit.consume_all(queue, expected=len(events))
    assert finished == [True, True]
    assert sorted(p.message_id for _, p, _ in received) == sorted(e.id for e in events)
    assert all(drainer.counts.published > 0 for drainer in drainers)
    assert sum(drainer.counts.published for drainer in drainers) == len(events)
    assert sum(outbox.stats().unfinished for outbox in fallback.outboxes) == 0


def test_messages_of_one_key_arrive_in_order(cluster_client, rabbit, amqp_url):
    organization = rabbit.organization()
    queue = rabbit.bind_queue(f"{organization}.parcels")
    _, events = fill_partitions(cluster_client, organization, 600)
    drainer = Drainer(
        cluster_client,
        RabbitMqConnector(amqp_url),
        DrainSettings(batch_size=40, outboxes=[f"{organization}.parcels.events"]),
    )

    assert drainer.drain_once()
    drainer.close()

    received = rabbit.consume_all(queue, expected=len(events))
    by_id = {event.id: event for event in events}
    arrived: dict[str, list[str]] = {}
    for _, properties, _ in received:
        event = by_id[properties.message_id]
        arrived.setdefault(event.parcel_id, []).append(event.id)
    for parcel_id, ids in arrived.items():
        assert ids == [e.id for e in events if e.parcel_id == parcel_id], parcel_id


def test_drain_command_drains_cluster_partitions(cluster, cluster_client, rabbit, amqp_url):
    organization = rabbit.organization()
    queue = rabbit.bind_queue(f"{organization}.parcels")
    _, events = fill_partitions(cluster_client, organization, 500)

    result = subprocess.run(
        [
            sys.executable, "-m", "outbox.drain", "--once",
            "--redis-cluster", "--redis-url", cluster.url,
            "--amqp-url", amqp_url,
            "--outbox", f"{organization}.parcels.events",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert "published 500," in result.stdout
    received = rabbit.consume_all(queue, expected=len(events))
    assert len(received) == len(events)


def test_stats_command_reads_the_cluster(cluster, cluster_client):
    Outbox(cluster_client, "acme.stats.events#1").push([b"a", b"b"])

    result = subprocess.run(
        [
            sys.executable, "-m", "outbox", "stats", "--json",
            "--redis-cluster", "--redis-url", cluster.url,
            "--outbox", "acme.stats.events#1",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode == 0, result.stderr
    assert '"pending":2' in result.stdout


def test_drain_command_without_cluster_option_names_it(cluster):
    result = subprocess.run(
        [sys.executable, "-m", "outbox.drain", "--once", "--redis-url", cluster.url],
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode == 2
    assert "runs in cluster mode; pass --redis-cluster" in result.stderr


def test_cluster_option_on_a_standalone_redis_is_rejected(redis_url):
    result = subprocess.run(
        [sys.executable, "-m", "outbox", "stats", "--redis-cluster", "--redis-url", redis_url],
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode == 2
    assert "runs without cluster mode" in result.stderr


def test_drainer_survives_replica_promotion(rabbit, amqp_url, caplog):
    organization = rabbit.organization()
    queue = rabbit.bind_queue(f"{organization}.parcels")
    with redis_cluster(masters=3, replicas=1) as servers:
        client = connect_cluster(servers.url)
        with caplog.at_level(logging.WARNING, logger="outbox.partitions"):
            fallback, events = fill_partitions(
                client, organization, 1500, wait_replicas=1, wait_timeout_ms=2000
            )
        assert not [r for r in caplog.records if r.name == "outbox.partitions"]
        drainer = Drainer(
            client,
            RabbitMqConnector(amqp_url),
            DrainSettings(batch_size=50, outboxes=[f"{organization}.parcels.events"]),
        )
        drainer.run_round()
        assert 0 < drainer.counts.published < len(events)

        # Promote the replica of the primary that serves the partition of parcel-0.
        target = fallback.outboxes[partition_index("parcel-0", PARTITIONS)]
        old_primary = servers.primary_of_slot(client.keyslot(target.keys.pending))
        [replica] = servers.replicas_of(old_primary)
        servers.failover(replica)
        assert servers.roles()[replica] == "master"
        with servers.node(replica).client() as promoted:
            # Redis 7 replicates what scripts wrote, not the scripts: the promoted node
            # replies NOSCRIPT until the outbox loads them again.
            assert promoted.script_exists(target._scripts["claim"].sha) == [False]

        more = [ParcelScanned(parcel_id="parcel-0") for _ in range(100)]
        with caplog.at_level(logging.WARNING, logger="outbox.store"):
            fallback.publish(more)
        # The push went to the old primary first, which replied MOVED, and was retried.
        retried = f"Redis push on outbox {target.name} failed, retrying"
        assert any(r.getMessage().startswith(retried) for r in caplog.records)
        finished = drainer.drain_once(max_outage_s=20)
        drainer.close()
        client.close()

    received = rabbit.consume_all(queue, expected=len(events) + len(more))
    assert finished
    assert sorted(p.message_id for _, p, _ in received) == sorted(e.id for e in events + more)

