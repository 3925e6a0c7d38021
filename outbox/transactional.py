"""Outbox-first buses: messages written in the same Redis transaction as the state they announce.

In fallback mode a message goes to RabbitMQ first and to Redis only when RabbitMQ fails.
Here every message goes to the outbox, inside the caller's MULTI/EXEC transaction when one
is given, so a state change and its message are committed together or not at all; the
drainer then publishes it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, NamedTuple

from redis.client import Pipeline
from redis.cluster import ClusterPipeline

from outbox.buses import _as_list, _expiration_ms, _records, service_outbox
from outbox.errors import OutboxConfigError
from outbox.messages import Command, DomainEvent, Message
from outbox.naming import MessageKind
from outbox.partitions import PartitionKey
from outbox.records import encode_record
from outbox.store import DEFAULT_RETRY_FOR_S

logger = logging.getLogger(__name__)


class PreparedPush(NamedTuple):
    """The key and payloads a caller's own Lua script stores with ``LPUSH key payload...``.

    ``key`` must be passed in the script's KEYS; on Redis Cluster the script's other keys
    must share its hash tag, ``{outbox name}``.
    """

    key: str
    payloads: list[bytes]


class _TransactionalBus:
    """Writes messages to the outbox of a service, or to its partitions.

    ``partitions`` and ``partition_key`` work as for :class:`outbox.RedisDomainEventBus`.
    With partitions > 1 on Redis Cluster, a transaction can only hold messages of the
    partition in the slot of its other keys, since a cluster transaction stays in one slot.
    """

    kind: ClassVar[MessageKind]
    _message_type: ClassVar[type[Message]]

    def __init__(
        self,
        organization: str,
        service: str,
        redis: Any,
        *,
        retry_for_s: float = DEFAULT_RETRY_FOR_S,
        partitions: int = 1,
        partition_key: PartitionKey | None = None,
    ) -> None:
        self.organization = organization
        self.service = service
        self.partitioned = service_outbox(
            redis,
            organization,
            service,
            self.kind,
            partitions=partitions,
            partition_key=partition_key,
            retry_for_s=retry_for_s,
        )
        self.outbox = self.partitioned.base
        self.outboxes = self.partitioned.outboxes

    def __repr__(self) -> str:
        return f"{type(self).__name__}(outbox={self.outbox.name!r})"

    def prepare(
        self, messages: Message | Iterable[Message], *, expiration_s: float | None = None
    ) -> PreparedPush:
        """Encode messages for a caller's own Lua script; raises MessageError for bad messages.

        With partitions > 1 the messages must all fall into one partition, else this
        raises OutboxConfigError; :meth:`prepare_partitions` splits them instead.
        """
        prepared = self.prepare_partitions(messages, expiration_s=expiration_s)
        if len(prepared) > 1:
            raise OutboxConfigError(
                f"the messages go to {len(prepared)} partitions of outbox "
                f"{self.partitioned.name!r} ({', '.join(p.key for p in prepared)}); give them "
                "one partition key, or call prepare_partitions() and push each key"
            )
        if not prepared:
            return PreparedPush(self.outboxes[0].keys.pending, [])
        return prepared[0]

    def prepare_partitions(
        self, messages: Message | Iterable[Message], *, expiration_s: float | None = None
    ) -> list[PreparedPush]:
        """Encode messages for a caller's own Lua scripts, one PreparedPush per partition."""
        items = _as_list(messages, self._message_type)
        records = _records(items, self.organization, self.service, _expiration_ms(expiration_s))
        prepared: list[PreparedPush] = []
        for outbox, group in self.partitioned.group(records, items):
            # Registers outside the caller's transaction: the registry key is in another
            # hash slot.
            self.partitioned.register(outbox.name)
            prepared.append(PreparedPush(outbox.keys.pending, [encode_record(r) for r in group]))
        return prepared

    def _store(
        self,
        messages: Message | Iterable[Message],
        transaction: Any,
        expiration_s: float | None,
    ) -> None:
        if transaction is None:
            items = _as_list(messages, self._message_type)
            expiration_ms = _expiration_ms(expiration_s)
            self.partitioned.store(
                _records(items, self.organization, self.service, expiration_ms), items
            )
            return
        prepared = self.prepare_partitions(messages, expiration_s=expiration_s)
        if not prepared:
            return
        _check_transaction(transaction)
        for push in prepared:
            transaction.lpush(push.key, *push.payloads)


def _check_transaction(transaction: Any) -> None:
    # A client has a transaction() method too, so the pipeline type is checked first.
    if not isinstance(transaction, Pipeline | ClusterPipeline):
        raise OutboxConfigError(
            f"transaction must be a redis-py pipeline, got {type(transaction).__name__}; pass "
            "the pipeline from redis.pipeline(transaction=True) that holds your writes"
        )
    if not getattr(transaction, "transaction", False):
        raise OutboxConfigError(
            "the pipeline is not transactional; create it with redis.pipeline(transaction=True) "
            "so the messages commit together with your writes"
        )
    if getattr(transaction, "watching", False) and not getattr(
        transaction, "explicit_transaction", False
    ):
        raise OutboxConfigError(
            "the pipeline is watching keys but MULTI has not started, so the push would run "
            "at once; call pipe.multi() before publishing"
        )


class OutboxDomainEventBus(_TransactionalBus):
    """Writes domain events to the outbox ``{organization}.{service}.events`` only."""

    kind: ClassVar[MessageKind] = "event"
    _message_type: ClassVar[type[Message]] = DomainEvent

    def publish(
        self,
        event_or_events: DomainEvent | Iterable[DomainEvent],
        *,
        transaction: Any = None,
        expiration_s: float | None = None,
    ) -> None:
        """Store events for the drainer, inside ``transaction`` when given.

        ``transaction`` is a redis-py pipeline created with ``transaction=True`` (after
        ``multi()`` if it watches keys); the events are stored only if its EXEC commits.
        Without it, the events are stored at once.
        """
        self._store(event_or_events, transaction, expiration_s)


class OutboxCommandBus(_TransactionalBus):
    """Writes commands to the outbox ``{organization}.{service}.commands`` only."""

    kind: ClassVar[MessageKind] = "command"
    _message_type: ClassVar[type[Message]] = Command

    def dispatch(
        self,
        command_or_commands: Command | Iterable[Command],
        *,
        transaction: Any = None,
        expiration_s: float | None = None,
    ) -> None:
        """Store commands for the drainer, inside ``transaction`` when given (see publish)."""
        self._store(command_or_commands, transaction, expiration_s)


__all__: Sequence[str] = ("OutboxCommandBus", "OutboxDomainEventBus", "PreparedPush")
