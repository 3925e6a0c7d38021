"""Moving the lists that petisco's Redis buses write into outboxes, for the drainer to publish.

petisco 2.x's ``RedisDomainEventBus`` and ``RedisCommandBus`` LPUSH one JSON record per
message (``{"organization", "service", "message"}``) into the Redis keys ``events`` and
``commands``, and nothing in petisco reads them back. :func:`adopt_petisco_lists` moves
those records, oldest first, into the outboxes named after the keys. The drainer then
claims them like any other entry and rebuilds exchange and routing key from each record.
Entries that are not petisco records are moved too, and the drainer dead-letters them
with the reason when it claims them.

This module does not import petisco, so a drainer can adopt the lists without it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import redis.exceptions as redis_errors

from outbox.errors import OutboxConfigError
from outbox.naming import REGISTRY_KEY, check_name_part
from outbox.store import Outbox

logger = logging.getLogger(__name__)

PETISCO_EVENT_KEYS = ("events",)
PETISCO_COMMAND_KEYS = ("commands",)
# Entries per script call: one call copies at most this many entries through Lua's stack.
MAX_CHUNK_SIZE = 1_000


def adopt(outbox: Outbox, source_key: str, *, chunk_size: int = MAX_CHUNK_SIZE) -> int:
    """Move the entries of the Redis list ``source_key`` into ``outbox``; return how many moved.

    The oldest entries move first and keep their order, so the drainer publishes them
    oldest first. Each script call moves up to ``chunk_size`` entries atomically. Only
    the entries the list held at the first script call are moved, so a busy producer
    cannot keep the caller here. Later entries wait for the next call. Raises StoreError when
    Redis fails; the entries moved before the failure stay in the outbox.

    On Redis Cluster, ``source_key`` must hash to the slot of the outbox's keys. Naming
    the outbox after the key does that, as :func:`adopt_petisco_lists` does.
    """
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise OutboxConfigError(
            f"chunk_size must be between 1 and {MAX_CHUNK_SIZE}, got {chunk_size}"
        )
    if not isinstance(source_key, str) or not source_key:
        raise OutboxConfigError(f"source_key must be a non-empty string, got {source_key!r}")
    keys = [source_key, outbox.keys.pending]

    moved_total = 0
    remaining: int | None = None
    while remaining is None or remaining > 0:
        take = chunk_size if remaining is None else min(chunk_size, remaining)
        moved, left = (int(value) for value in outbox._script("adopt", keys, [take]))
        moved_total += moved
        if remaining is None:
            remaining = moved + left
        remaining -= moved
        if moved == 0 or left == 0:
            # Empty, or another caller moved the entries first.
            break
    return moved_total


def adopt_petisco_lists(
    redis: Any,
    *,
    event_keys: Iterable[str] = PETISCO_EVENT_KEYS,
    command_keys: Iterable[str] = PETISCO_COMMAND_KEYS,
    chunk_size: int = MAX_CHUNK_SIZE,
) -> dict[str, int]:
    """Move the records of petisco's Redis lists into outboxes; return entries moved per outbox.

    Each key's entries go to the outbox of the same name (``events`` to the outbox
    ``events``), whose keys ``outbox:{events}:*`` hash to the Redis Cluster slot of the
    key itself, so every move is one atomic script also on a cluster. The result has one
    item per key, 0 for empty or missing lists. ``redis`` is a ``redis.Redis`` or
    ``redis.cluster.RedisCluster`` created with ``decode_responses=False``.
    Raises OutboxConfigError for a key that cannot name an outbox and StoreError when
    Redis fails.
    """
    names = list(dict.fromkeys([*event_keys, *command_keys]))
    if not names:
        raise OutboxConfigError("no petisco list keys given; pass event_keys or command_keys")
    for name in names:
        check_name_part("petisco list key", name)

    moved_per_outbox: dict[str, int] = {}
    for name in names:
        outbox = Outbox(redis, name)
        moved = adopt(outbox, name, chunk_size=chunk_size)
        moved_per_outbox[name] = moved
        if moved:
            logger.info("Moved %d entries of petisco list %s into outbox %s", moved, name, name)
            _register(outbox)
    return moved_per_outbox


def _register(outbox: Outbox) -> None:
    # Lets drainers that read the outbox registry find the outbox without a keyspace scan.
    # The entries are moved already, so a failure here only delays their discovery.
    try:
        outbox.client.sadd(REGISTRY_KEY, outbox.name)
    except redis_errors.RedisError as exc:
        logger.debug("Registering outbox %s failed: %s", outbox.name, exc)
