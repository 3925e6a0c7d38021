"""Partitioned outboxes: one outbox split into N outboxes, each with its own hash tag.

All keys of one outbox share one hash tag, so on Redis Cluster one outbox lives on one
primary. With ``partitions=N`` (N > 1) a bus stores its messages in the outboxes
``{name}#0`` .. ``{name}#N-1`` instead of ``{name}``. Each has its own hash tag, so the
cluster spreads them over its primaries, and any number of drainers share them through
the same leases. A message goes to partition ``crc32(partition_key(message)) % N``, so
the messages of one key stay in one partition, which the drainer publishes in order.
"""

from __future__ import annotations

import logging
import re
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import redis.exceptions as redis_errors

from outbox.errors import OutboxConfigError, PartialStoreError, StoreError
from outbox.messages import Message
from outbox.naming import REGISTRY_KEY
from outbox.records import OutboxRecord, encode_record
from outbox.store import DEFAULT_RETRY_FOR_S, Outbox

logger = logging.getLogger(__name__)

PARTITION_SEPARATOR = "#"
# Redis Cluster has 16384 hash slots, so more partitions cannot spread any further.
MAX_PARTITIONS = 16_384
DEFAULT_WAIT_TIMEOUT_MS = 1_000

PartitionKey = Callable[[Message], str]

_PARTITION_NAME = re.compile(r"^(?P<base>.+)#(?P<index>0|[1-9][0-9]*)$")


def partition_names(name: str, partitions: int) -> list[str]:
    """Return the outboxes of ``name`` split into ``partitions``: ``[name]`` for one partition."""
    check_partitions(partitions)
    if partitions == 1:
        return [name]
    return [f"{name}{PARTITION_SEPARATOR}{index}" for index in range(partitions)]


def base_name(name: str) -> str:
    """Return the outbox a partition belongs to: ``acme.shop.events#3`` -> ``acme.shop.events``.

    A name without a partition suffix is returned unchanged.
    """
    match = _PARTITION_NAME.match(name)
    return match.group("base") if match else name


def covers(name: str, outbox: str) -> bool:
    """Return True when draining ``name`` includes ``outbox``: the same outbox or a partition of it."""
    return outbox == name or base_name(outbox) == name


def partition_index(key: str, partitions: int) -> int:
    """Return the partition of ``key``: CRC-32 of its UTF-8 bytes modulo ``partitions``.

    CRC-32 gives the same partition in every process and Python version, unlike ``hash``.
    """
    return zlib.crc32(key.encode("utf-8")) % partitions


def check_partitions(partitions: int) -> None:
    valid = isinstance(partitions, int) and not isinstance(partitions, bool)
    if not valid or not 1 <= partitions <= MAX_PARTITIONS:
        raise OutboxConfigError(
            f"partitions must be an integer between 1 and {MAX_PARTITIONS}, got {partitions!r}"
        )


class PartitionedOutbox:
    """The outboxes one bus writes to, and the choice of partition for each message.

    ``base`` is the outbox named after the service. With one partition it is the only
    outbox; with more, ``outboxes`` lists the partitions and ``base`` stays empty unless
    entries were stored before the split.
    """

    def __init__(
        self,
        client: Any,
        name: str,
        *,
        partitions: int = 1,
        partition_key: PartitionKey | None = None,
        retry_for_s: float = DEFAULT_RETRY_FOR_S,
        wait_replicas: int = 0,
        wait_timeout_ms: int = DEFAULT_WAIT_TIMEOUT_MS,
    ) -> None:
        if partition_key is not None and not callable(partition_key):
            raise OutboxConfigError(
                f"partition_key must be a function of the message, got {partition_key!r}"
            )
        _check_wait(client, wait_replicas, wait_timeout_ms)
        self.name = name
        self.outboxes = [
            Outbox(client, partition, retry_for_s=retry_for_s)
            for partition in partition_names(name, partitions)
        ]
        self.base = self.outboxes[0] if partitions == 1 else Outbox(client, name)
        self.partition_key = partition_key
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self._registered: set[str] = set()

    def __repr__(self) -> str:
        return f"PartitionedOutbox({self.name!r}, partitions={len(self.outboxes)})"

    @property
    def partitions(self) -> int:
        return len(self.outboxes)

    def group(
        self, records: Sequence[OutboxRecord], messages: Sequence[Message] | None = None
    ) -> list[tuple[Outbox, list[OutboxRecord]]]:
        """Split records by partition, keeping their order inside each, partitions in index order.

        ``messages`` are the messages of ``records`` in the same order. Only a
        ``partition_key`` needs them, because the default key is the message id.
        """
        if self.partitions == 1:
            return [(self.outboxes[0], list(records))] if records else []
        keys = self._keys(records, messages)
        by_index: dict[int, list[OutboxRecord]] = {}
        for record, key in zip(records, keys, strict=True):
            by_index.setdefault(partition_index(key, self.partitions), []).append(record)
        return [(self.outboxes[index], by_index[index]) for index in sorted(by_index)]

    def store(
        self, records: Sequence[OutboxRecord], messages: Sequence[Message] | None = None
    ) -> None:
        """Store each partition's records in one atomic push, partition after partition.

        Raises the StoreError of the push when a list goes to one partition. When it goes
        to several and one push fails, the pushes before it stay stored, and
        PartialStoreError names the stored and unstored message ids. The partitions after
        the failed one are not tried, so a Redis outage costs one ``retry_for_s``, not one
        per partition.
        """
        if len(self.outboxes) == 1:
            outbox = self.outboxes[0]
            self._push(outbox, records)
            self.register(outbox.name)
            return
        groups = self.group(records, messages)
        stored: list[str] = []
        for position, (outbox, group) in enumerate(groups):
            try:
                self._push(outbox, group)
            except StoreError as exc:
                if not stored:
                    raise
                unstored = [r.message_id for _, rest in groups[position:] for r in rest]
                raise PartialStoreError(
                    f"stored {len(stored)} of {len(records)} messages in outbox {self.name!r}, "
                    f"then partition {outbox.name!r} failed: {exc}; store the "
                    f"{len(unstored)} unstored messages again (unstored_message_ids)",
                    stored_message_ids=stored,
                    unstored_message_ids=unstored,
                ) from exc
            stored.extend(record.message_id for record in group)
            self.register(outbox.name)

    def _push(self, outbox: Outbox, records: Sequence[OutboxRecord]) -> None:
        payloads = [encode_record(record) for record in records]
        if self.wait_replicas == 0:
            outbox.push(payloads)
            return
        acknowledged = outbox.push_and_wait(
            payloads, replicas=self.wait_replicas, timeout_ms=self.wait_timeout_ms
        )
        if acknowledged < self.wait_replicas:
            logger.warning(
                "Only %d of %d replicas acknowledged %d messages of outbox %s within %d ms; "
                "they are stored on the primary and lost if it fails before replicating them "
                "(first message %s)",
                acknowledged,
                self.wait_replicas,
                len(records),
                outbox.name,
                self.wait_timeout_ms,
                records[0].message_id,
            )

    def _keys(
        self, records: Sequence[OutboxRecord], messages: Sequence[Message] | None
    ) -> list[str]:
        if self.partition_key is None:
            return [record.message_id for record in records]
        if messages is None or len(messages) != len(records):
            raise OutboxConfigError(
                f"outbox {self.name!r} picks partitions with partition_key, which needs the "
                "messages of the records; pass messages= in the same order as the records"
            )
        keys = [self.partition_key(message) for message in messages]
        for message, key in zip(messages, keys, strict=True):
            if not isinstance(key, str):
                raise OutboxConfigError(
                    f"partition_key must return a str, got {type(key).__name__} for "
                    f"message {message.id!r}"
                )
        return keys

    def register(self, name: str) -> None:
        """Add ``name`` to the outbox registry once, so drainers find it within a second.

        A failure is only logged: the drainer's keyspace scan finds the outbox later.
        """
        if name in self._registered:
            return
        try:
            self.base.client.sadd(REGISTRY_KEY, name)
            self._registered.add(name)
        except (redis_errors.RedisError, redis_errors.RedisClusterException) as exc:
            logger.debug("Registering outbox %s failed: %s", name, exc)


def _check_wait(client: Any, wait_replicas: int, wait_timeout_ms: int) -> None:
    if not isinstance(wait_replicas, int) or wait_replicas < 0:
        raise OutboxConfigError(f"wait_replicas must not be negative, got {wait_replicas!r}")
    if wait_replicas == 0:
        return
    if not isinstance(wait_timeout_ms, int) or wait_timeout_ms < 1:
        # WAIT with a timeout of 0 blocks without limit while replicas are missing.
        raise OutboxConfigError(f"wait_timeout_ms must be at least 1, got {wait_timeout_ms!r}")
    get_kwargs = getattr(client, "get_connection_kwargs", None)
    socket_timeout = get_kwargs().get("socket_timeout") if get_kwargs is not None else None
    if socket_timeout is not None and wait_timeout_ms >= socket_timeout * 1000:
        raise OutboxConfigError(
            f"wait_timeout_ms={wait_timeout_ms} is not below the Redis client's socket timeout "
            f"of {socket_timeout} s, so the client would give up on WAIT first; lower "
            "wait_timeout_ms or raise socket_timeout"
        )
