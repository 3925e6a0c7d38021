"""Buses that publish domain events and commands.

:class:`RabbitMqDomainEventBus` and :class:`RabbitMqCommandBus` publish with confirms and
``mandatory``; whatever RabbitMQ does not confirm goes to their ``fallback``, a
:class:`RedisDomainEventBus` or :class:`RedisCommandBus` that stores it in a Redis outbox
for ``python -m outbox.drain`` to republish.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import msgspec
import redis.exceptions as redis_errors

from outbox import _fork
from outbox.errors import (
    BrokerError,
    BrokerUnavailableError,
    MessageEncodeError,
    MessageTooLargeError,
    OutboxConfigError,
    OutboxError,
    PartialStoreError,
    PublishAndStoreError,
    PublishTimeoutError,
)
from outbox.messages import Command, DomainEvent, Message
from outbox.naming import MessageKind, check_name_part, outbox_name
from outbox.partitions import DEFAULT_WAIT_TIMEOUT_MS, PartitionedOutbox, PartitionKey
from outbox.rabbitmq import (
    DEFAULT_MAX_MESSAGE_BYTES,
    ConfirmingPublisher,
    PublishResult,
    PublishStatus,
    RabbitMqConnector,
    check_max_message_bytes,
)
from outbox.records import OutboxRecord, record_for
from outbox.store import DEFAULT_RETRY_FOR_S, Outbox

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)
DEFAULT_RETRY_INTERVAL_S = 5.0
# Publish errors that open the circuit breaker.
_OUTAGE_ERRORS = (BrokerUnavailableError, PublishTimeoutError)
# Redis errors after which a push may have been stored or not.
_UNKNOWN_OUTCOME = (redis_errors.ConnectionError, redis_errors.TimeoutError)
# RabbitMQ accepts per-message TTLs up to 2^32 - 1 milliseconds.
_MAX_EXPIRATION_MS = 2**32 - 1


class Fallback(Protocol):
    """The store of a RabbitMQ bus for the messages RabbitMQ did not confirm."""

    kind: ClassVar[MessageKind]
    outbox: Outbox

    def store(
        self, records: Sequence[OutboxRecord], messages: Sequence[Message] | None = None
    ) -> None: ...


def _as_list(message_or_messages: M | Iterable[M], expected: type[M]) -> list[M]:
    items: list[Any]
    if isinstance(message_or_messages, Message):
        items = [message_or_messages]
    elif isinstance(message_or_messages, Iterable) and not isinstance(
        message_or_messages, str | bytes
    ):
        items = list(message_or_messages)
    else:
        items = [message_or_messages]
    for item in items:
        if not isinstance(item, expected):
            raise MessageEncodeError(
                f"expected {expected.__name__} instances, got {type(item).__name__}; "
                f"declare messages as subclasses of outbox.{expected.__name__}"
            )
    return items


def _with_meta(messages: list[M], meta: dict[str, Any]) -> list[M]:
    if not meta:
        return messages
    return [message.with_meta(**meta) for message in messages]


def _expiration_ms(expiration_s: float | None) -> int | None:
    """Convert a per-message TTL in seconds to the whole milliseconds AMQP expects."""
    if expiration_s is None:
        return None
    valid = isinstance(expiration_s, int | float) and not isinstance(expiration_s, bool)
    if not valid or not math.isfinite(expiration_s) or expiration_s <= 0:
        raise OutboxConfigError(
            f"expiration_s must be a positive number of seconds, got {expiration_s!r}"
        )
    milliseconds = round(expiration_s * 1000)
    if milliseconds < 1 or milliseconds > _MAX_EXPIRATION_MS:
        raise OutboxConfigError(
            f"expiration_s must be between 0.001 and {_MAX_EXPIRATION_MS // 1000} seconds, "
            f"got {expiration_s!r}"
        )
    return milliseconds


def _records(
    messages: Sequence[Message], organization: str, service: str, expiration_ms: int | None
) -> list[OutboxRecord]:
    records = [record_for(m, organization=organization, service=service) for m in messages]
    if expiration_ms is None:
        return records
    return [msgspec.structs.replace(r, expiration_ms=expiration_ms) for r in records]


def service_outbox(
    redis: Any,
    organization: str,
    service: str,
    kind: MessageKind,
    **options: Any,
) -> PartitionedOutbox:
    """Return the outbox of one service's events or commands, after checking both names.

    ``options`` are PartitionedOutbox's keyword options (partitions, partition_key, ...).
    """
    check_name_part("organization", organization)
    check_name_part("service", service)
    return PartitionedOutbox(redis, outbox_name(organization, service, kind), **options)


class MetaView(Generic[M]):
    """A bus that adds the same meta to every message it publishes or dispatches."""

    def __init__(self, bus: Any, meta: dict[str, Any]) -> None:
        self._bus = bus
        self._meta = meta

    def with_meta(self, **meta: Any) -> MetaView[M]:
        return MetaView(self._bus, {**self._meta, **meta})

    def publish(
        self, event_or_events: M | Iterable[M], *, expiration_s: float | None = None
    ) -> None:
        self._bus._send_messages(event_or_events, self._meta, expiration_s)

    def dispatch(
        self, command_or_commands: M | Iterable[M], *, expiration_s: float | None = None
    ) -> None:
        self._bus._send_messages(command_or_commands, self._meta, expiration_s)


class _RedisBus(Generic[M]):
    """Stores messages in the outbox of a service, or in its partitions.

    ``redis`` is a ``redis.Redis`` or ``redis.cluster.RedisCluster`` client. With
    ``partitions`` > 1 the messages go to the outboxes ``{outbox}#0`` ..
    ``{outbox}#N-1``, chosen by CRC-32 of ``partition_key(message)`` (default: the
    message id), so the messages of one key keep their order. ``outboxes`` lists the
    outboxes written to and ``outbox`` is the one named after the service.
    ``wait_replicas`` > 0 waits after each push until that many replicas of the primary
    acknowledged it, for up to ``wait_timeout_ms``, and logs a WARNING when fewer did.

    NOTE: with partitions > 1 a list of messages is one atomic push per partition, not
    one in all: when a later partition fails, PartialStoreError names what was stored.
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
        wait_replicas: int = 0,
        wait_timeout_ms: int = DEFAULT_WAIT_TIMEOUT_MS,
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
            wait_replicas=wait_replicas,
            wait_timeout_ms=wait_timeout_ms,
        )
        self.outbox = self.partitioned.base
        self.outboxes = self.partitioned.outboxes

    def __repr__(self) -> str:
        return f"{type(self).__name__}(outbox={self.outbox.name!r})"

    def with_meta(self, **meta: Any) -> MetaView[M]:
        """Return a view of this bus that adds ``meta`` to every message, such as a correlation id."""
        return MetaView(self, meta)

    def _send_messages(
        self, messages: M | Iterable[M], meta: dict[str, Any], expiration_s: float | None
    ) -> None:
        items = _with_meta(_as_list(messages, self._message_type), meta)
        expiration_ms = _expiration_ms(expiration_s)
        self.store(_records(items, self.organization, self.service, expiration_ms), items)

    def store(
        self, records: Sequence[OutboxRecord], messages: Sequence[Message] | None = None
    ) -> None:
        """Store records in one atomic push per partition, oldest first out.

        ``messages`` are the messages of ``records`` in the same order, needed only
        when the bus has a ``partition_key``.
        """
        self.partitioned.store(records, messages)
        if logger.isEnabledFor(logging.DEBUG):
            for record in records:
                logger.debug("Stored message %s in outbox %s", record.message_id, self.outbox.name)


class RedisDomainEventBus(_RedisBus[DomainEvent]):
    """Stores domain events in the outbox ``{organization}.{service}.events``."""

    kind: ClassVar[MessageKind] = "event"
    _message_type: ClassVar[type[Message]] = DomainEvent

    def publish(
        self,
        event_or_events: DomainEvent | Iterable[DomainEvent],
        *,
        expiration_s: float | None = None,
    ) -> None:
        """Store one event or a list of events in one atomic push (one per partition).

        ``expiration_s`` is a per-message TTL in seconds, counted from now.
        """
        self._send_messages(event_or_events, {}, expiration_s)


class RedisCommandBus(_RedisBus[Command]):
    """Stores commands in the outbox ``{organization}.{service}.commands``."""

    kind: ClassVar[MessageKind] = "command"
    _message_type: ClassVar[type[Message]] = Command

    def dispatch(
        self,
        command_or_commands: Command | Iterable[Command],
        *,
        expiration_s: float | None = None,
    ) -> None:
        """Store one command or a list of commands in one atomic push (one per partition).

        ``expiration_s`` is a per-message TTL in seconds, counted from now.
        """
        self._send_messages(command_or_commands, {}, expiration_s)


class _RabbitMqBus(Generic[M]):
    kind: ClassVar[MessageKind]
    _message_type: ClassVar[type[Message]]

    def __init__(
        self,
        organization: str,
        service: str,
        connector: RabbitMqConnector | None = None,
        *,
        fallback: Fallback | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        retry_interval_s: float = DEFAULT_RETRY_INTERVAL_S,
    ) -> None:
        check_name_part("organization", organization)
        check_name_part("service", service)
        if fallback is not None and getattr(fallback, "kind", None) != self.kind:
            raise OutboxConfigError(
                f"the fallback of a {type(self).__name__} must store {self.kind}s, got "
                f"{type(fallback).__name__}; use Redis{'DomainEvent' if self.kind == 'event' else 'Command'}Bus"
            )
        check_max_message_bytes(max_message_bytes)
        if retry_interval_s < 0:
            raise OutboxConfigError(
                f"retry_interval_s must not be negative, got {retry_interval_s}"
            )
        self.organization = organization
        self.service = service
        self.connector = connector or RabbitMqConnector()
        self.fallback = fallback
        self.max_message_bytes = max_message_bytes
        self.retry_interval_s = retry_interval_s
        self._publisher: ConfirmingPublisher = self.connector.publisher()
        self._lock = threading.Lock()
        # Circuit breaker: while RabbitMQ is unreachable, publishes go straight to the
        # fallback until this monotonic time, instead of paying the connect timeout each time.
        self._skip_broker_until = 0.0
        self._outage: BrokerError | None = None
        _fork.reset_after_fork(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.organization!r}, {self.service!r}, {self.connector!r})"

    def _after_fork(self) -> None:
        # A publishing thread of the parent may have held the lock at the fork.
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the connection to RabbitMQ; the bus reconnects if it is used again."""
        with self._lock:
            self._publisher.close()

    def with_meta(self, **meta: Any) -> MetaView[M]:
        """Return a view of this bus that adds ``meta`` to every message, such as a correlation id."""
        return MetaView(self, meta)

    def _send_messages(
        self, messages: M | Iterable[M], meta: dict[str, Any], expiration_s: float | None
    ) -> None:
        items = _with_meta(_as_list(messages, self._message_type), meta)
        expiration_ms = _expiration_ms(expiration_s)
        if not items:
            return
        self._send(_records(items, self.organization, self.service, expiration_ms), items)

    def _send(self, records: list[OutboxRecord], messages: Sequence[Message] | None = None) -> None:
        for record in records:
            if len(record.body) > self.max_message_bytes:
                raise MessageTooLargeError(
                    f"message {record.message_id!r} has {len(record.body)} bytes, more than "
                    f"max_message_bytes={self.max_message_bytes}; send less data in it or raise "
                    "the limit (and RabbitMQ's max_message_size) together"
                )

        with self._lock:
            outage = self._outage
            if outage is not None and time.monotonic() < self._skip_broker_until:
                # The circuit breaker is open: nothing is sent, everything is stored.
                results = None
            else:
                results = self._publish(records)
        if results is None:
            failed, failed_messages = records, messages
        else:
            indexes = [index for index, result in enumerate(results) if not result.confirmed]
            if not indexes:
                return
            outage = results[indexes[0]].error
            failed = [records[index] for index in indexes]
            failed_messages = None if messages is None else [messages[index] for index in indexes]
        assert outage is not None
        self._store(failed, failed_messages, outage, len(records))

    def _store(
        self,
        records: list[OutboxRecord],
        messages: Sequence[Message] | None,
        publish_error: BrokerError,
        sent: int,
    ) -> None:
        """Store the records RabbitMQ did not confirm in the fallback, or raise."""
        if self.fallback is None:
            ids = ", ".join(record.message_id for record in records[:5])
            raise type(publish_error)(
                f"RabbitMQ did not confirm {len(records)} of {sent} messages ({ids}) "
                f"and the bus has no fallback: {publish_error}"
            ) from publish_error
        try:
            self.fallback.store(records, messages)
        except OutboxError as store_error:
            if isinstance(store_error, PartialStoreError):
                stored = (
                    f"{len(store_error.stored_message_ids)} of them were stored, the other "
                    f"{len(store_error.unstored_message_ids)} were not "
                    "(see unstored_message_ids of the store error)"
                )
            elif isinstance(store_error.__cause__, _UNKNOWN_OUTCOME):
                # A timeout or a lost connection can hide a push that Redis did store.
                stored = "they may or may not have been stored"
            else:
                stored = "nothing was stored"
            raise PublishAndStoreError(
                f"RabbitMQ did not confirm {len(records)} messages ({publish_error}) and storing "
                f"them in outbox {self.fallback.outbox.name!r} failed too ({store_error}); "
                f"{stored}, so publish them again once either service is back",
                publish_error=publish_error,
                store_error=store_error,
            ) from store_error
        # During an outage every publish is stored; the breaker logged it once already.
        level = logging.DEBUG if self._outage is not None else logging.WARNING
        if logger.isEnabledFor(level):
            logger.log(
                level,
                "Stored %d of %d messages in outbox %s because RabbitMQ did not confirm them: %s",
                len(records),
                sent,
                self.fallback.outbox.name,
                publish_error,
            )

    def _publish(self, records: list[OutboxRecord]) -> list[PublishResult]:
        """Publish to RabbitMQ, opening the circuit breaker when RabbitMQ is unavailable."""
        try:
            results = self._publisher.publish(records)
        except BrokerError as exc:
            if isinstance(exc, _OUTAGE_ERRORS):
                self._open_breaker(exc)
            return [PublishResult(PublishStatus.FAILED, exc) for _ in records]
        outage = None
        for result in results:
            # A broker that stops confirming is as good as down: without the breaker every
            # publish would wait confirm_timeout_s.
            if result.error is not None and isinstance(result.error, _OUTAGE_ERRORS):
                outage = result.error
                break
        if outage is not None:
            self._open_breaker(outage)
        elif self._outage is not None:
            logger.info(
                "RabbitMQ at %s confirms publishes again; the fallback is no longer used",
                self.connector.address,
            )
            self._outage = None
        return results

    def _open_breaker(self, error: BrokerError) -> None:
        if self._outage is None:
            if self.fallback is not None:
                action = f"storing messages in outbox {self.fallback.outbox.name}"
            else:
                action = "publishes raise BrokerError (the bus has no fallback)"
            logger.warning(
                "RabbitMQ at %s is unavailable; %s and retrying RabbitMQ every %.1f s: %s",
                self.connector.address,
                action,
                self.retry_interval_s,
                error,
            )
        self._outage = error
        self._skip_broker_until = time.monotonic() + self.retry_interval_s


class RabbitMqDomainEventBus(_RabbitMqBus[DomainEvent]):
    """Publishes domain events to the exchange ``{organization}.{service}``."""

    kind: ClassVar[MessageKind] = "event"
    _message_type: ClassVar[type[Message]] = DomainEvent

    def publish(
        self,
        event_or_events: DomainEvent | Iterable[DomainEvent],
        *,
        expiration_s: float | None = None,
    ) -> None:
        """Publish one event or a list of events.

        ``expiration_s`` is a per-message TTL in seconds, sent as AMQP ``expiration``.
        Returns once RabbitMQ confirmed every event or the fallback stored the others.
        Raises BrokerError without a fallback, PublishAndStoreError when the fallback
        fails too, and MessageError, before sending anything, for events that cannot be sent.
        """
        self._send_messages(event_or_events, {}, expiration_s)


class RabbitMqCommandBus(_RabbitMqBus[Command]):
    """Sends commands to the exchange ``{organization}.{service}``."""

    kind: ClassVar[MessageKind] = "command"
    _message_type: ClassVar[type[Message]] = Command

    def dispatch(
        self,
        command_or_commands: Command | Iterable[Command],
        *,
        expiration_s: float | None = None,
    ) -> None:
        """Send one command or a list of commands.

        ``expiration_s`` is a per-message TTL in seconds, sent as AMQP ``expiration``.
        Returns once RabbitMQ confirmed every command or the fallback stored the others.
        Raises as :meth:`RabbitMqDomainEventBus.publish` does.
        """
        self._send_messages(command_or_commands, {}, expiration_s)
