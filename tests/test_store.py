"""Behaviour of outbox.store.Outbox against the private Redis of the test session."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

from outbox.errors import OutboxConfigError
from outbox.store import MAX_BATCH_SIZE, Lease, Outbox, discover_outboxes

LIVE_LEASE_MS = 60_000


def server_time_ms(client: redis.Redis) -> int:
    seconds, microseconds = client.time()
    return int(seconds) * 1000 + int(microseconds) // 1000


def wait_for_server_time(client: redis.Redis, target_ms: int) -> None:
    """Sleep until the Redis clock reaches ``target_ms``, so deadlines up to it have passed."""
    while server_time_ms(client) < target_ms:
        time.sleep(0.001)


def expire(client: redis.Redis, outbox: Outbox, leases: list[Lease]) -> None:
    """Let leases run out: shorten them to 1 ms and wait until the Redis clock passes that."""
    assert all(outbox.extend(leases, lease_ms=1))
    wait_for_server_time(client, server_time_ms(client) + 2)


def snapshot(client: redis.Redis, outbox: Outbox) -> dict[str, Any]:
    """Read every key of an outbox, so a test can show that a call changed nothing."""
    keys = outbox.keys
    return {
        "pending": client.lrange(keys.pending, 0, -1),
        "leased": client.zrange(keys.leased, 0, -1, withscores=True),
        "tokens": client.hgetall(keys.tokens),
        "payloads": client.hgetall(keys.payloads),
        "attempts": client.hgetall(keys.attempts),
        "errors": client.hgetall(keys.errors),
        "dead": client.zrange(keys.dead, 0, -1, withscores=True),
        "sequence": client.get(keys.sequence),
    }


def entry_keys(client: redis.Redis) -> list[bytes]:
    """Return the keys that hold entries; the id sequence stays so that ids are never reused."""
    return [key for key in client.keys("*") if not key.endswith(b":seq")]


@pytest.fixture
def outbox(redis_client: redis.Redis) -> Outbox:
    return Outbox(redis_client, "orders.events", max_attempts=3, retry_for_s=0.5)


def claim_live(outbox: Outbox, batch_size: int = 100) -> list[Lease]:
    return outbox.claim(batch_size=batch_size, lease_ms=LIVE_LEASE_MS).leases


# Claim order and attempts


def test_claim_returns_entries_in_push_order(outbox: Outbox) -> None:
    outbox.push([b"first"])
    outbox.push([b"second", b"third"])
    outbox.push([b"fourth"])

    payloads = [lease.payload for lease in claim_live(outbox)]

    assert payloads == [b"first", b"second", b"third", b"fourth"]


def test_claim_takes_at_most_batch_size(outbox: Outbox) -> None:
    outbox.push([b"a", b"b", b"c"])

    first = claim_live(outbox, batch_size=2)
    second = claim_live(outbox, batch_size=2)

    assert [lease.payload for lease in first] == [b"a", b"b"]
    assert [lease.payload for lease in second] == [b"c"]


def test_claim_of_empty_outbox_returns_no_leases(outbox: Outbox) -> None:
    claim = outbox.claim(batch_size=10, lease_ms=LIVE_LEASE_MS)

    assert claim.leases == []
    assert claim.dead_lettered == 0


def test_claim_reports_redis_server_time(redis_client: redis.Redis, outbox: Outbox) -> None:
    before = server_time_ms(redis_client)
    claim = outbox.claim(batch_size=1, lease_ms=LIVE_LEASE_MS)
    after = server_time_ms(redis_client)

    assert before <= claim.server_time_ms <= after


def test_claim_gives_one_new_token_per_call(outbox: Outbox) -> None:
    outbox.push([b"a", b"b", b"c"])

    first = claim_live(outbox, batch_size=2)
    second = claim_live(outbox, batch_size=2)

    assert len({lease.token for lease in first}) == 1
    assert first[0].token != second[0].token


def test_claim_leaves_live_leases_alone(outbox: Outbox) -> None:
    outbox.push([b"a"])
    claim_live(outbox)

    assert claim_live(outbox) == []


def test_claim_takes_expired_leases_before_new_entries(
    redis_client: redis.Redis, outbox: Outbox
) -> None:
    outbox.push([b"old"])
    expire(redis_client, outbox, claim_live(outbox))
    outbox.push([b"new"])

    payloads = [lease.payload for lease in claim_live(outbox, batch_size=1)]

    assert payloads == [b"old"]


def test_claim_takes_expired_leases_oldest_deadline_first(
    redis_client: redis.Redis, outbox: Outbox
) -> None:
    outbox.push([b"a", b"b"])
    first, second = claim_live(outbox)
    expire(redis_client, outbox, [second])
    expire(redis_client, outbox, [first])

    payloads = [lease.payload for lease in claim_live(outbox)]

    assert payloads == [b"b", b"a"]


def test_claim_keeps_entry_id_when_reclaiming(redis_client: redis.Redis, outbox: Outbox) -> None:
    outbox.push([b"a"])
    (lease,) = claim_live(outbox)
    expire(redis_client, outbox, [lease])

    (again,) = claim_live(outbox)

    assert again.entry_id == lease.entry_id
    assert again.token != lease.token


def test_claim_counts_attempts(redis_client: redis.Redis, outbox: Outbox) -> None:
    outbox.push([b"a"])

    attempts = []
    for _ in range(3):
        leases = claim_live(outbox)
        attempts.append(leases[0].attempts)
        expire(redis_client, outbox, leases)

    assert attempts == [1, 2, 3]


def test_claim_dead_letters_expired_entry_after_max_attempts(
    redis_client: redis.Redis, outbox: Outbox
) -> None:
    outbox.push([b"a"])
    for _ in range(3):
        expire(redis_client, outbox, claim_live(outbox))

    claim = outbox.claim(batch_size=10, lease_ms=LIVE_LEASE_MS)
    (dead,) = outbox.dead_letters()

    assert claim.leases == []
    assert claim.dead_lettered == 1
    assert dead.payload == b"a"
    assert dead.attempts == 3
    assert dead.reason == (
        "gave up after 3 attempts; last error: lease expired before the drainer acknowledged it"
    )


def test_claim_dead_letters_with_last_release_error(outbox: Outbox) -> None:
    outbox.push([b"a"])
    for attempt in range(3):
        outbox.release(claim_live(outbox), error=f"unroutable, try {attempt + 1}")

    claim = outbox.claim(batch_size=10, lease_ms=LIVE_LEASE_MS)
    (dead,) = outbox.dead_letters()

    assert claim.dead_lettered == 1
    assert dead.reason == "gave up after 3 attempts; last error: unroutable, try 3"


def test_claim_fills_batch_after_dead_letters(outbox: Outbox) -> None:
    outbox.push([b"poison"])
    for _ in range(3):
        outbox.release(claim_live(outbox), error="cannot decode")
    outbox.push([b"good"])

    claim = outbox.claim(batch_size=1, lease_ms=LIVE_LEASE_MS)

    assert claim.dead_lettered == 1
    assert [lease.payload for lease in claim.leases] == [b"good"]


# Ack, extend, release and bury


def test_ack_deletes_entry(redis_client: redis.Redis, outbox: Outbox) -> None:
    outbox.push([b"a"])

    statuses = outbox.ack(claim_live(outbox))

    assert statuses == [True]
    assert entry_keys(redis_client) == []


def test_ack_reports_each_lease(outbox: Outbox) -> None:
    outbox.push([b"a", b"b"])
    first, second = claim_live(outbox)
    outbox.ack([first])

    assert outbox.ack([first, second]) == [False, True]


def test_ack_of_no_leases_returns_empty_list(outbox: Outbox) -> None:
    assert outbox.ack([]) == []


def test_ack_with_stale_token_changes_nothing(redis_client: redis.Redis, outbox: Outbox) -> None:
    outbox.push([b"a"])
    (stale,) = claim_live(outbox)
    expire(redis_client, outbox, [stale])
    claim_live(outbox)
    before = snapshot(redis_client, outbox)

    statuses = outbox.ack([stale])

    assert statuses == [False]
    assert snapshot(redis_client, outbox) == before


def test_ack_after_lease_expired_changes_nothing(redis_client: redis.Redis, outbox: Outbox) -> None:
    # No drainer has claimed the entry again yet, but the lease is over, so its holder
    # must not act on it any more, because another drainer may be publishing it.
    outbox.push([b"a"])
    claim = outbox.claim(batch_size=1, lease_ms=1)
    wait_for_server_time(redis_client, claim.server_time_ms + 2)
    before = snapshot(redis_client, outbox)

    statuses = outbox.ack(claim.leases)

    assert statuses == [False]
    assert snapshot(redis_client, outbox) == before


def test_ack_of_released_lease_changes_nothing(redis_client: redis.Redis, outbox: Outbox) -> None:
    outbox.push([b"a"])
    leases = claim_live(outbox)
    outbox.release(leases)
    before = snapshot(redis_client, outbox)

    statuses = outbox.ack(leases)

    assert statuses == [False]
    assert snapshot(redis_client, outbox) == before


def test_ack_with_unknown_entry_id_returns_false(outbox: Outbox) -> None:
    assert outbox.ack([Lease("404", "1", 1, b"")]) == [False]


def test_extend_keeps_lease_from_expiring(redis_client: redis.Redis, outbox: Outbox) -> None:
    outbox.push([b"a"])
    claim = outbox.claim(batch_size=1, lease_ms=500)

    statuses = outbox.extend(claim.leases, lease_ms=LIVE_LEASE_MS)
    wait_for_server_time(redis_client, claim.server_time_ms + 510)

    assert statuses == [True]
    assert claim_live(outbox) == []
    assert outbox.ack(claim.leases) == [True]


def test_extend_sets_deadline_from_server_clock(redis_client: redis.Redis, outbox: Outbox) -> None:
    outbox.push([b"a"])
    leases = claim_live(outbox)

    before = server_time_ms(redis_client)
    outbox.extend(leases, lease_ms=5_000)
    after = server_time_ms(redis_client)
    deadline = redis_client.zscore(outbox.keys.leased, leases[0].entry_id)

    assert deadline is not None
    assert before + 5_000 <= deadline <= after + 5_000


def test_extend_with_stale_token_changes_nothing(redis_client: redis.Redis, outbox: Outbox) -> None:
    outbox.push([b"a"])
    (stale,) = claim_live(outbox)
    expire(redis_client, outbox, [stale])
    claim_live(outbox)
    before = snapshot(redis_client, outbox)

    statuses = outbox.extend([stale], lease_ms=LIVE_LEASE_MS)

    assert statuses == [False]
    assert snapshot(redis_client, outbox) == before


def test_extend_after_lease_expired_changes_nothing(
    redis_client: redis.Redis, outbox: Outbox
) -> None:
    outbox.push([b"a"])
    claim = outbox.claim(batch_size=1, lease_ms=1)
    wait_for_server_time(redis_client, claim.server_time_ms + 2)
    before = snapshot(redis_client, outbox)

    statuses = outbox.extend(claim.leases, lease_ms=LIVE_LEASE_MS)

    assert statuses == [False]
    assert snapshot(redis_client, outbox) == before


def test_release_makes_entry_claimable_at_once(outbox: Outbox) -> None:
    outbox.push([b"a"])
    (lease,) = claim_live(outbox)

    statuses = outbox.release([lease])
    (again,) = claim_live(outbox)

    assert statuses == [True]
    assert again.entry_id == lease.entry_id
    assert again.payload == b"a"


def test_release_without_refund_uses_attempt(outbox: Outbox) -> None:
    outbox.push([b"a"])
    outbox.release(claim_live(outbox))

    (again,) = claim_live(outbox)

    assert again.attempts == 2


def test_release_with_refund_keeps_attempt(outbox: Outbox) -> None:
    outbox.push([b"a"])
    outbox.release(claim_live(outbox), refund=True)

    (again,) = claim_live(outbox)

    assert again.attempts == 1


def test_release_with_refund_never_dead_letters(outbox: Outbox) -> None:
    outbox.push([b"a"])
    for _ in range(10):
        outbox.release(claim_live(outbox), refund=True, error="broker unreachable")

    claim = outbox.claim(batch_size=1, lease_ms=LIVE_LEASE_MS)

    assert claim.dead_lettered == 0
    assert [lease.attempts for lease in claim.leases] == [1]


def test_release_with_delay_is_not_claimable_before_delay(
    redis_client: redis.Redis, outbox: Outbox
) -> None:
    outbox.push([b"a"])
    leases = claim_live(outbox)
    released_at = server_time_ms(redis_client)
    outbox.release(leases, delay_ms=300)

    early = claim_live(outbox)
    early_time = server_time_ms(redis_client)
    wait_for_server_time(redis_client, released_at + 302)
    late = claim_live(outbox)

    assert early_time < released_at + 300
    assert early == []
    assert [lease.payload for lease in late] == [b"a"]


def test_release_stores_error(redis_client: redis.Redis, outbox: Outbox) -> None:
    outbox.push([b"a"])
    (lease,) = claim_live(outbox)

    outbox.release([lease], error="exchange not found")

    assert redis_client.hget(outbox.keys.errors, lease.entry_id) == b"exchange not found"


def test_release_with_stale_token_changes_nothing(
    redis_client: redis.Redis, outbox: Outbox
) -> None:
    outbox.push([b"a"])
    (stale,) = claim_live(outbox)
    expire(redis_client, outbox, [stale])
    claim_live(outbox)
    before = snapshot(redis_client, outbox)

    statuses = outbox.release([stale], refund=True, error="late")

    assert statuses == [False]
    assert snapshot(redis_client, outbox) == before


def test_release_after_lease_expired_changes_nothing(
    redis_client: redis.Redis, outbox: Outbox
) -> None:
    outbox.push([b"a"])
    claim = outbox.claim(batch_size=1, lease_ms=1)
    wait_for_server_time(redis_client, claim.server_time_ms + 2)
    before = snapshot(redis_client, outbox)

    statuses = outbox.release(claim.leases, refund=True, error="late")

    assert statuses == [False]
    assert snapshot(redis_client, outbox) == before


def test_release_twice_changes_nothing_the_second_time(
    redis_client: redis.Redis, outbox: Outbox
) -> None:
    outbox.push([b"a"])
    leases = claim_live(outbox)
    outbox.release(leases, refund=True)
    before = snapshot(redis_client, outbox)

    statuses = outbox.release(leases, refund=True)

    assert statuses == [False]
    assert snapshot(redis_client, outbox) == before


def test_bury_moves_entry_to_dead_letters_with_reason(outbox: Outbox) -> None:
    outbox.push([b"a"])
    (lease,) = claim_live(outbox)

    statuses = outbox.bury([lease], reason="body is not valid msgpack")
    dead = outbox.dead_letter(lease.entry_id)

    assert statuses == [True]
    assert dead is not None
    assert dead.reason == "body is not valid msgpack"
    assert dead.payload == b"a"
    assert dead.attempts == 1
    assert claim_live(outbox) == []


def test_bury_requires_reason(outbox: Outbox) -> None:
    outbox.push([b"a"])
    leases = claim_live(outbox)

    with pytest.raises(OutboxConfigError, match="reason"):
        outbox.bury(leases, reason="")


def test_bury_with_stale_token_changes_nothing(redis_client: redis.Redis, outbox: Outbox) -> None:
    outbox.push([b"a"])
    (stale,) = claim_live(outbox)
    expire(redis_client, outbox, [stale])
    claim_live(outbox)
    before = snapshot(redis_client, outbox)

    statuses = outbox.bury([stale], reason="too late")

    assert statuses == [False]
    assert snapshot(redis_client, outbox) == before


def test_bury_after_lease_expired_changes_nothing(
    redis_client: redis.Redis, outbox: Outbox
) -> None:
    outbox.push([b"a"])
    claim = outbox.claim(batch_size=1, lease_ms=1)
    wait_for_server_time(redis_client, claim.server_time_ms + 2)
    before = snapshot(redis_client, outbox)

    statuses = outbox.bury(claim.leases, reason="too late")

    assert statuses == [False]
    assert snapshot(redis_client, outbox) == before


def test_ack_extend_release_and_bury_split_large_batches(outbox: Outbox) -> None:
    outbox.push([b"%d" % index for index in range(2_500)])
    leases = outbox.claim(batch_size=2_500, lease_ms=LIVE_LEASE_MS).leases
    first, second, third = leases[:800], leases[800:1_700], leases[1_700:]

    assert outbox.extend(leases, lease_ms=LIVE_LEASE_MS) == [True] * 2_500
    assert outbox.bury(first, reason="poison") == [True] * 800
    assert outbox.release(second, refund=True) == [True] * 900
    assert outbox.ack(third) == [True] * 800
    assert outbox.ack(leases) == [False] * 2_500


# Dead-letter administration


def bury_all(outbox: Outbox, payloads: list[bytes]) -> list[str]:
    outbox.push(payloads)
    leases = claim_live(outbox, batch_size=len(payloads))
    outbox.bury(leases, reason="poison")
    return [lease.entry_id for lease in leases]


def test_dead_letters_lists_oldest_first(outbox: Outbox) -> None:
    first = bury_all(outbox, [b"a"])
    second = bury_all(outbox, [b"b"])

    listed = [dead.entry_id for dead in outbox.dead_letters()]

    assert listed == first + second


def test_dead_letters_pages_with_offset_and_count(outbox: Outbox) -> None:
    ids = bury_all(outbox, [b"a", b"b", b"c"])

    page = [dead.entry_id for dead in outbox.dead_letters(offset=1, count=1)]

    assert page == ids[1:2]


def test_dead_letter_of_unknown_id_returns_none(outbox: Outbox) -> None:
    assert outbox.dead_letter("404") is None


def test_requeue_by_id_gives_entry_fresh_attempts(outbox: Outbox) -> None:
    keep, requeue = bury_all(outbox, [b"keep", b"requeue"])

    moved = outbox.requeue([requeue])
    (lease,) = claim_live(outbox)

    assert moved == 1
    assert lease.entry_id == requeue
    assert lease.payload == b"requeue"
    assert lease.attempts == 1
    assert [dead.entry_id for dead in outbox.dead_letters()] == [keep]


def test_requeue_skips_ids_that_are_not_dead_letters(outbox: Outbox) -> None:
    (dead,) = bury_all(outbox, [b"a"])
    outbox.push([b"live"])
    (live,) = claim_live(outbox)

    moved = outbox.requeue(["404", live.entry_id, dead])

    assert moved == 1


def test_requeue_all_takes_every_dead_letter(outbox: Outbox) -> None:
    bury_all(outbox, [b"%d" % index for index in range(2_100)])

    moved = outbox.requeue()
    stats = outbox.stats()

    assert moved == 2_100
    assert stats.dead == 0
    assert stats.waiting == 2_100


def test_requeued_entry_is_claimed_before_new_entries(outbox: Outbox) -> None:
    bury_all(outbox, [b"requeued"])
    outbox.push([b"new"])
    outbox.requeue()

    payloads = [lease.payload for lease in claim_live(outbox, batch_size=1)]

    assert payloads == [b"requeued"]


def test_purge_by_id_deletes_only_that_dead_letter(
    redis_client: redis.Redis, outbox: Outbox
) -> None:
    keep, purge = bury_all(outbox, [b"keep", b"purge"])

    purged = outbox.purge([purge, "404"])

    assert purged == 1
    assert [dead.entry_id for dead in outbox.dead_letters()] == [keep]
    assert redis_client.hexists(outbox.keys.payloads, purge) == 0
    assert redis_client.hexists(outbox.keys.attempts, purge) == 0
    assert redis_client.hexists(outbox.keys.errors, purge) == 0


def test_purge_skips_entries_that_are_not_dead_letters(outbox: Outbox) -> None:
    outbox.push([b"live"])
    (live,) = claim_live(outbox)

    purged = outbox.purge([live.entry_id])

    assert purged == 0
    assert outbox.ack([live]) == [True]


def test_purge_all_deletes_every_dead_letter(redis_client: redis.Redis, outbox: Outbox) -> None:
    bury_all(outbox, [b"%d" % index for index in range(2_100)])

    purged = outbox.purge()

    assert purged == 2_100
    assert entry_keys(redis_client) == []


# Stats


def test_stats_counts_each_state(redis_client: redis.Redis, outbox: Outbox) -> None:
    outbox.push([b"dead", b"waiting", b"expired", b"live", b"pending-1", b"pending-2"])
    dead, waiting, expired, _live = claim_live(outbox, batch_size=4)
    outbox.bury([dead], reason="poison")
    outbox.release([waiting], delay_ms=LIVE_LEASE_MS)
    expire(redis_client, outbox, [expired])

    stats = outbox.stats()

    assert stats.name == "orders.events"
    assert stats.pending == 2
    assert stats.leased == 2
    assert stats.waiting == 1
    assert stats.dead == 1
    assert stats.expired == 1
    assert stats.unfinished == 5
    assert abs(stats.server_time_ms - server_time_ms(redis_client)) < 1_000


def test_stats_of_empty_outbox_is_all_zero(outbox: Outbox) -> None:
    stats = outbox.stats()

    assert stats[1:6] == (0, 0, 0, 0, 0)


# Large backlogs


@pytest.mark.slow
def test_claim_reclaims_10000_expired_leases(redis_client: redis.Redis, outbox: Outbox) -> None:
    outbox.push([b"%d" % index for index in range(MAX_BATCH_SIZE)])
    first = outbox.claim(batch_size=MAX_BATCH_SIZE, lease_ms=1)
    wait_for_server_time(redis_client, first.server_time_ms + 2)

    second = outbox.claim(batch_size=MAX_BATCH_SIZE, lease_ms=LIVE_LEASE_MS)

    assert len(second.leases) == MAX_BATCH_SIZE
    assert {lease.entry_id for lease in second.leases} == {lease.entry_id for lease in first.leases}
    assert {lease.attempts for lease in second.leases} == {2}
    assert outbox.ack(second.leases) == [True] * MAX_BATCH_SIZE


@pytest.mark.slow
def test_claim_takes_10000_pending_entries(outbox: Outbox) -> None:
    payloads = [b"%05d" % index for index in range(MAX_BATCH_SIZE)]

    length = outbox.push(payloads)
    claim = outbox.claim(batch_size=MAX_BATCH_SIZE, lease_ms=LIVE_LEASE_MS)

    assert length == MAX_BATCH_SIZE
    assert [lease.payload for lease in claim.leases] == payloads
    assert outbox.stats().pending == 0


def test_claim_rejects_batch_size_out_of_range(outbox: Outbox) -> None:
    for batch_size in (0, MAX_BATCH_SIZE + 1):
        with pytest.raises(OutboxConfigError, match="batch_size"):
            outbox.claim(batch_size=batch_size, lease_ms=LIVE_LEASE_MS)


def test_claim_rejects_lease_ms_below_one(outbox: Outbox) -> None:
    with pytest.raises(OutboxConfigError, match="lease_ms"):
        outbox.claim(batch_size=1, lease_ms=0)


def test_release_rejects_negative_delay(outbox: Outbox) -> None:
    with pytest.raises(OutboxConfigError, match="delay_ms"):
        outbox.release([], delay_ms=-1)


# Payloads and clients


PAYLOADS = [
    b"",
    b"\x00",
    b"\x00\xff\x00",
    bytes(range(256)),
    b"\xc3\x28 invalid utf-8",
    b"\r\n$-1\r\n",
    "zürich ✓".encode(),
    b"x" * 1_000_000,
]


def test_payloads_of_arbitrary_bytes_survive(outbox: Outbox) -> None:
    outbox.push(PAYLOADS)

    leases = claim_live(outbox)

    assert [lease.payload for lease in leases] == PAYLOADS


def test_empty_payload_survives_release_and_dead_letters(outbox: Outbox) -> None:
    outbox.push([b""])
    outbox.release(claim_live(outbox))
    (lease,) = claim_live(outbox)
    outbox.bury([lease], reason="empty")

    dead = outbox.dead_letter(lease.entry_id)

    assert lease.payload == b""
    assert dead is not None
    assert dead.payload == b""


def test_push_of_no_payloads_returns_pending_length(outbox: Outbox) -> None:
    outbox.push([b"a", b"b"])

    assert outbox.push([]) == 2


def test_push_of_large_batch_keeps_order_across_chunks(outbox: Outbox) -> None:
    payloads = [b"%d" % index for index in range(2_500)]

    outbox.push(payloads)
    leases = outbox.claim(batch_size=2_500, lease_ms=LIVE_LEASE_MS).leases

    assert [lease.payload for lease in leases] == payloads


def test_decoding_client_is_rejected(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)

    with pytest.raises(OutboxConfigError, match="decode_responses=False"):
        Outbox(client, "orders.events")

    client.close()


def test_outbox_name_with_brace_is_rejected(redis_client: redis.Redis) -> None:
    with pytest.raises(OutboxConfigError, match="not allowed"):
        Outbox(redis_client, "orders}{events")


def test_max_attempts_below_one_is_rejected(redis_client: redis.Redis) -> None:
    with pytest.raises(OutboxConfigError, match="max_attempts"):
        Outbox(redis_client, "orders.events", max_attempts=0)


def test_outboxes_do_not_share_entries(redis_client: redis.Redis) -> None:
    orders = Outbox(redis_client, "orders.events")
    invoices = Outbox(redis_client, "invoices.events")
    orders.push([b"order"])

    assert claim_live(invoices) == []
    assert [lease.payload for lease in claim_live(orders)] == [b"order"]


def test_discover_outboxes_lists_outboxes_with_entries(redis_client: redis.Redis) -> None:
    Outbox(redis_client, "orders.events").push([b"a"])
    Outbox(redis_client, "invoices.commands").push([b"b"])
    Outbox(redis_client, "empty.events")
    redis_client.set("unrelated", b"1")

    assert discover_outboxes(redis_client) == ["invoices.commands", "orders.events"]


# Script cache loss


def test_every_operation_works_after_script_flush(
    redis_client: redis.Redis, outbox: Outbox
) -> None:
    outbox.push([b"ack", b"extend", b"release", b"bury"])

    redis_client.script_flush()
    ack, extend, release, bury = claim_live(outbox)
    redis_client.script_flush()
    assert outbox.ack([ack]) == [True]
    redis_client.script_flush()
    assert outbox.extend([extend], lease_ms=LIVE_LEASE_MS) == [True]
    redis_client.script_flush()
    assert outbox.release([release]) == [True]
    redis_client.script_flush()
    assert outbox.bury([bury], reason="poison") == [True]
    redis_client.script_flush()
    assert outbox.stats().dead == 1
    redis_client.script_flush()
    assert outbox.requeue() == 1
    redis_client.script_flush()
    requeued = claim_live(outbox, batch_size=1)
    outbox.bury(requeued, reason="poison")
    redis_client.script_flush()
    assert outbox.purge() == 1


def test_outbox_created_before_script_flush_still_claims(redis_client: redis.Redis) -> None:
    outbox = Outbox(redis_client, "orders.events")
    outbox.push([b"a"])
    claim_live(outbox)
    outbox.push([b"b"])

    redis_client.script_flush()
    leases = claim_live(outbox)

    assert [lease.payload for lease in leases] == [b"b"]


def test_outboxes_on_one_client_survive_script_flush_together(redis_client: redis.Redis) -> None:
    orders = Outbox(redis_client, "orders.events")
    invoices = Outbox(redis_client, "invoices.events")
    orders.push([b"order"])
    invoices.push([b"invoice"])

    redis_client.script_flush()

    assert [lease.payload for lease in claim_live(orders)] == [b"order"]
    assert [lease.payload for lease in claim_live(invoices)] == [b"invoice"]


def test_script_flush_between_reload_and_evalsha_still_runs_the_script(redis_client):
    outbox = Outbox(redis_client, "flush.race.events")
    outbox.push([b"entry"])
    load = redis_client.script_load

    def load_then_flush(script):
        sha = load(script)
        redis_client.script_flush()
        return sha

    redis_client.script_load = load_then_flush
    redis_client.script_flush()

    claim = outbox.claim(batch_size=1, lease_ms=1000)

    assert [lease.payload for lease in claim.leases] == [b"entry"]


def test_ack_listing_one_lease_twice_acknowledges_it_once(redis_client):
    outbox = Outbox(redis_client, "twice.events")
    outbox.push([b"entry"])
    [lease] = outbox.claim(batch_size=1, lease_ms=60_000).leases

    assert outbox.ack([lease, lease]) == [True, False]
