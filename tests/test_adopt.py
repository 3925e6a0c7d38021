"""Moving petisco's Redis lists into outboxes: order, chunking, naming and failures."""

from __future__ import annotations

import dataclasses

import pytest
import redis
from redis.crc import key_slot

from outbox.adopt import MAX_CHUNK_SIZE, adopt, adopt_petisco_lists
from outbox.errors import OutboxConfigError, StoreError
from outbox.naming import REGISTRY_KEY, OutboxKeys
from outbox.store import Outbox


def push_like_petisco(client: redis.Redis, key: str, entries: list[bytes]) -> None:
    """LPUSH entries one call each, oldest first, as petisco's Redis buses do."""
    pipe = client.pipeline(transaction=False)
    for entry in entries:
        pipe.lpush(key, entry)
    pipe.execute()


def claim_payloads(outbox: Outbox) -> list[bytes]:
    claim = outbox.claim(batch_size=10_000, lease_ms=60_000)
    return [lease.payload for lease in claim.leases]


def test_adopt_moves_entries_oldest_first_across_chunks(redis_client):
    entries = [str(n).encode() for n in range(2_500)]
    push_like_petisco(redis_client, "events", entries)
    outbox = Outbox(redis_client, "events")

    moved = adopt(outbox, "events", chunk_size=1_000)

    assert moved == 2_500
    assert redis_client.exists("events") == 0
    assert claim_payloads(outbox) == entries


def test_adopt_puts_entries_after_those_already_pending(redis_client):
    outbox = Outbox(redis_client, "events")
    outbox.push([b"stored before"])
    push_like_petisco(redis_client, "events", [b"first", b"second"])

    adopt(outbox, "events", chunk_size=1)

    assert claim_payloads(outbox) == [b"stored before", b"first", b"second"]


def test_adopt_leaves_entries_pushed_while_it_runs(redis_client):
    push_like_petisco(redis_client, "events", [b"1", b"2", b"3"])
    outbox = Outbox(redis_client, "events")
    script = outbox._scripts["adopt"]

    def push_then_adopt(keys, args, **options):
        redis_client.lpush("events", b"pushed meanwhile")
        return script(keys=keys, args=args, **options)

    outbox._scripts["adopt"] = push_then_adopt

    moved = adopt(outbox, "events", chunk_size=1)

    # The first call saw 4 entries: the 3 above and the first one pushed meanwhile.
    assert moved == 4
    assert redis_client.lrange("events", 0, -1) == [b"pushed meanwhile"] * 3
    assert claim_payloads(outbox) == [b"1", b"2", b"3", b"pushed meanwhile"]


def test_adopt_of_missing_list_moves_nothing(redis_client):
    outbox = Outbox(redis_client, "events")

    assert adopt(outbox, "events") == 0
    assert outbox.stats().pending == 0


def test_adopt_reloads_script_after_script_flush(redis_client):
    outbox = Outbox(redis_client, "events")
    push_like_petisco(redis_client, "events", [b"one"])
    adopt(outbox, "events")
    push_like_petisco(redis_client, "events", [b"two"])
    redis_client.script_flush()

    assert adopt(outbox, "events") == 1
    assert claim_payloads(outbox) == [b"one", b"two"]


def test_adopt_of_non_list_key_raises(redis_client):
    redis_client.set("events", b"not a list")
    outbox = Outbox(redis_client, "events", retry_for_s=0)

    with pytest.raises(StoreError, match="WRONGTYPE"):
        adopt(outbox, "events")

    assert redis_client.get("events") == b"not a list"
    assert outbox.stats().pending == 0


@pytest.mark.parametrize("chunk_size", [0, MAX_CHUNK_SIZE + 1])
def test_adopt_rejects_chunk_size_out_of_range(redis_client, chunk_size):
    with pytest.raises(OutboxConfigError, match="chunk_size"):
        adopt(Outbox(redis_client, "events"), "events", chunk_size=chunk_size)


def test_adopt_petisco_lists_returns_entries_moved_per_outbox(redis_client):
    push_like_petisco(redis_client, "events", [b"e1", b"e2", b"e3"])

    moved = adopt_petisco_lists(redis_client)

    assert moved == {"events": 3, "commands": 0}
    assert claim_payloads(Outbox(redis_client, "events")) == [b"e1", b"e2", b"e3"]


def test_adopt_petisco_lists_registers_outboxes_it_filled(redis_client):
    push_like_petisco(redis_client, "commands", [b"c1"])

    adopt_petisco_lists(redis_client)

    assert redis_client.smembers(REGISTRY_KEY) == {b"commands"}


def test_adopt_petisco_lists_reads_configured_keys(redis_client):
    push_like_petisco(redis_client, "legacy-events", [b"e1"])
    push_like_petisco(redis_client, "events", [b"left alone"])

    moved = adopt_petisco_lists(redis_client, event_keys=["legacy-events"], command_keys=[])

    assert moved == {"legacy-events": 1}
    assert redis_client.lrange("events", 0, -1) == [b"left alone"]


def test_adopt_petisco_lists_counts_key_given_twice_once(redis_client):
    push_like_petisco(redis_client, "messages", [b"m1"])

    moved = adopt_petisco_lists(redis_client, event_keys=["messages"], command_keys=["messages"])

    assert moved == {"messages": 1}


@pytest.mark.parametrize("key", ["{app}:events", "my events", ""])
def test_adopt_petisco_lists_rejects_invalid_key(redis_client, key):
    with pytest.raises(OutboxConfigError, match="petisco list key"):
        adopt_petisco_lists(redis_client, event_keys=[key])


def test_adopt_petisco_lists_rejects_no_keys(redis_client):
    with pytest.raises(OutboxConfigError, match="no petisco list keys"):
        adopt_petisco_lists(redis_client, event_keys=[], command_keys=[])


@pytest.mark.parametrize("key", ["events", "commands", "legacy-events"])
def test_outbox_named_after_key_shares_its_cluster_slot(key):
    # One script may only touch keys of one Redis Cluster slot.
    keys = OutboxKeys.for_outbox(key)
    values = [value for field, value in dataclasses.asdict(keys).items() if field != "name"]

    assert {key_slot(value.encode()) for value in values} == {key_slot(key.encode())}
