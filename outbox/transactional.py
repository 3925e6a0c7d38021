"""Outbox-first buses: messages written in the same Redis transaction as the state they announce.

In fallback mode a message goes to RabbitMQ first and to Redis only when RabbitMQ fails.
Here every message goes to the outbox, inside the caller's MULTI/EXEC transaction when one
is given, so a state change and its message are committed together or not at all; the
drainer then publishes it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import redis.exceptions as redis_errors

from outbox.buses import _as_list, _expiration_ms, _records
from outbox.errors import OutboxConfigError
from outbox.messages import Command, DomainEvent, Message
from outbox.naming import REGISTRY_KEY, MessageKind, check_name_part, outbox_name
from outbox.records import encode_record
from outbox.store import DEFAULT_RETRY_FOR_S, Outbox

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedPush:
    """What a caller's own Lua script needs to store messages: ``LPUSH key payload...``.

    ``key`` must be passed in the script's KEYS; on Redis Cluster the script's other keys
    must share its hash tag, ``{outbox name}``.
    """

    key: str
    payloads: list[bytes]


class _TransactionalBus:
    kind: ClassVar[MessageKind]
    _message_type: ClassVar[type[Message]]

    def __init__(
        self,
        organization: str,
        service: str,
        redis: Any,
        *,
        retry_for_s: float = DEFAULT_RETRY_FOR_S,
    ) -> None:
        check_name_part("organization", organization)
        check_name_part("service", service)
        self.organization = organization
        self.service = service
        self.outbox = Outbox(
            redis, outbox_name(organization, service, self.kind), retry_for_s=retry_for_s
        )
        self._registered = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(outbox={self.outbox.name!r})"

    def prepare(
        self, messages: Message | Iterable[Message], *, expiration_s: float | None = None
    ) -> PreparedPush:
        """Encode messages for a caller's own Lua script; raises MessageError for bad messages."""
        items = _as_list(messages, self._message_type)
        records = _records(items, self.organization, self.service, _expiration_ms(expiration_s))
        self._register()
        return PreparedPush(self.outbox.keys.pending, [encode_record(r) for r in records])

    def _store(
        self,
        messages: Message | Iterable[Message],
        transaction: Any,
        expiration_s: float | None,
    ) -> None:
        prepared = self.prepare(messages, expiration_s=expiration_s)
        if not prepared.payloads:
            return
        if transaction is None:
            self.outbox.push(prepared.payloads)
            return
        _check_transaction(transaction)
        transaction.lpush(prepared.key, *prepared.payloads)

    def _register(self) -> None:
        # Runs outside the caller's transaction: the registry key is in another hash slot.
        if self._registered:
            return
        try:
            self.outbox.client.sadd(REGISTRY_KEY, self.outbox.name)
            self._registered = True
        except redis_errors.RedisError as exc:
            logger.debug("Registering outbox %s failed: %s", self.outbox.name, exc)


def _check_transaction(transaction: Any) -> None:
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
