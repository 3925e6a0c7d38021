"""Buses that publish domain events and commands.

:class:`RabbitMqDomainEventBus` and :class:`RabbitMqCommandBus` publish with confirms and
``mandatory``; whatever RabbitMQ does not confirm goes to their ``fallback``, a
:class:`RedisDomainEventBus` or :class:`RedisCommandBus` that stores it in a Redis outbox
for ``python -m outbox.drain`` to republish.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from outbox.errors import (
    BrokerError,
    BrokerUnavailableError,
    MessageEncodeError,
    MessageTooLargeError,
    OutboxConfigError,
    OutboxError,
    PublishAndStoreError,
)
from outbox.messages import Command, DomainEvent, Message
from outbox.naming import MessageKind, check_name_part, outbox_name
from outbox.rabbitmq import (
    DEFAULT_MAX_MESSAGE_BYTES,
    ConfirmingPublisher,
    PublishResult,
    PublishStatus,
    RabbitMqConnector,
)
from outbox.records import OutboxRecord, encode_record, record_for
from outbox.store import DEFAULT_RETRY_FOR_S, Outbox

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)
DEFAULT_RETRY_INTERVAL_S = 5.0


class Fallback(Protocol):
    """Where a RabbitMQ bus stores the messages RabbitMQ did not confirm."""

    kind: ClassVar[MessageKind]
    outbox: Outbox

    def store(self, records: Sequence[OutboxRecord]) -> None: ...


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


class _RedisBus(Generic[M]):
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

    def __repr__(self) -> str:
        return f"{type(self).__name__}(outbox={self.outbox.name!r})"

    def _records(self, messages: list[M]) -> list[OutboxRecord]:
        return [
            record_for(message, organization=self.organization, service=self.service)
            for message in messages
        ]

    def store(self, records: Sequence[OutboxRecord]) -> None:
        """Store records in the outbox in one atomic push, oldest first out."""
        self.outbox.push([encode_record(record) for record in records])
        for record in records:
            logger.debug("Stored message %s in outbox %s", record.message_id, self.outbox.name)


class RedisDomainEventBus(_RedisBus[DomainEvent]):
    """Stores domain events in the outbox ``{organization}.{service}.events``."""

    kind: ClassVar[MessageKind] = "event"

    def publish(self, event_or_events: DomainEvent | Iterable[DomainEvent], **meta: Any) -> None:
        """Store one event or a list of events; ``meta`` is added to each event's meta."""
        events = _with_meta(_as_list(event_or_events, DomainEvent), meta)
        self.store(self._records(events))


class RedisCommandBus(_RedisBus[Command]):
    """Stores commands in the outbox ``{organization}.{service}.commands``."""

    kind: ClassVar[MessageKind] = "command"

    def dispatch(self, command_or_commands: Command | Iterable[Command], **meta: Any) -> None:
        """Store one command or a list of commands; ``meta`` is added to each command's meta."""
        commands = _with_meta(_as_list(command_or_commands, Command), meta)
        self.store(self._records(commands))


class _RabbitMqBus(Generic[M]):
    kind: ClassVar[MessageKind]

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
        if max_message_bytes < 1:
            raise OutboxConfigError(
                f"max_message_bytes must be at least 1, got {max_message_bytes}"
            )
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

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.organization!r}, {self.service!r}, {self.connector!r})"

    def close(self) -> None:
        """Close the connection to RabbitMQ; the bus reconnects if it is used again."""
        with self._lock:
            self._publisher.close()

    def _send(self, messages: list[M]) -> None:
        if not messages:
            return
        records = [
            record_for(message, organization=self.organization, service=self.service)
            for message in messages
        ]
        for record in records:
            if len(record.body) > self.max_message_bytes:
                raise MessageTooLargeError(
                    f"message {record.message_id!r} has {len(record.body)} bytes, more than "
                    f"max_message_bytes={self.max_message_bytes}; send less data in it or raise "
                    "the limit (and RabbitMQ's max_message_size) together"
                )

        with self._lock:
            results = self._publish(records)
        failed = [
            (record, result)
            for record, result in zip(records, results, strict=True)
            if not result.confirmed
        ]
        if not failed:
            return

        first_error = failed[0][1].error
        assert first_error is not None
        if self.fallback is None:
            ids = ", ".join(record.message_id for record, _ in failed[:5])
            raise type(first_error)(
                f"RabbitMQ did not confirm {len(failed)} of {len(records)} messages ({ids}) "
                f"and the bus has no fallback: {first_error}"
            ) from first_error
        try:
            self.fallback.store([record for record, _ in failed])
        except OutboxError as store_error:
            raise PublishAndStoreError(
                f"RabbitMQ did not confirm {len(failed)} messages ({first_error}) and storing "
                f"them in outbox {self.fallback.outbox.name!r} failed too ({store_error}); "
                "nothing was stored, so publish them again once either service is back",
                publish_error=first_error,
                store_error=store_error,
            ) from store_error
        log = logger.debug if self._outage is not None else logger.warning
        log(
            "Stored %d of %d messages in outbox %s because RabbitMQ did not confirm them: %s",
            len(failed),
            len(records),
            self.fallback.outbox.name,
            first_error,
        )

    def _publish(self, records: list[OutboxRecord]) -> list[PublishResult]:
        now = time.monotonic()
        if self._outage is not None and now < self._skip_broker_until:
            return [PublishResult(PublishStatus.FAILED, self._outage) for _ in records]
        try:
            results = self._publisher.publish(records)
        except BrokerUnavailableError as exc:
            self._open_breaker(exc)
            return [PublishResult(PublishStatus.FAILED, exc) for _ in records]
        outage = next(
            (
                result.error
                for result in results
                if isinstance(result.error, BrokerUnavailableError)
            ),
            None,
        )
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
            target = self.fallback.outbox.name if self.fallback is not None else "no fallback"
            logger.warning(
                "RabbitMQ at %s is unavailable, publishing to %s and retrying RabbitMQ every %.1f s: %s",
                self.connector.address,
                target,
                self.retry_interval_s,
                error,
            )
        self._outage = error
        self._skip_broker_until = time.monotonic() + self.retry_interval_s


class RabbitMqDomainEventBus(_RabbitMqBus[DomainEvent]):
    """Publishes domain events to the exchange ``{organization}.{service}``."""

    kind: ClassVar[MessageKind] = "event"

    def publish(self, event_or_events: DomainEvent | Iterable[DomainEvent], **meta: Any) -> None:
        """Publish one event or a list of events; ``meta`` is added to each event's meta.

        Returns once RabbitMQ confirmed every event or the fallback stored the others.
        Raises BrokerError without a fallback, PublishAndStoreError when the fallback
        fails too, and MessageError, before sending anything, for events that cannot be sent.
        """
        self._send(_with_meta(_as_list(event_or_events, DomainEvent), meta))


class RabbitMqCommandBus(_RabbitMqBus[Command]):
    """Sends commands to the exchange ``{organization}.{service}``."""

    kind: ClassVar[MessageKind] = "command"

    def dispatch(self, command_or_commands: Command | Iterable[Command], **meta: Any) -> None:
        """Send one command or a list of commands; ``meta`` is added to each command's meta.

        Returns once RabbitMQ confirmed every command or the fallback stored the others.
        Raises as :meth:`RabbitMqDomainEventBus.publish` does.
        """
        self._send(_with_meta(_as_list(command_or_commands, Command), meta))
