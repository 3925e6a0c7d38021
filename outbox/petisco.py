"""petisco's bus interfaces on top of outbox: confirmed publishing with a Redis outbox.

A petisco 2.x service switches by importing its RabbitMQ buses from here instead of from
``petisco.extra.rabbitmq``::

    from outbox.petisco import RabbitMqCommandBus, RabbitMqDomainEventBus

The buses subclass petisco's ``DomainEventBus`` and ``CommandBus``, take petisco's own
``DomainEvent`` and ``Command`` instances, and publish the body petisco publishes
(``message.format_json()``) to the exchange and routing key petisco uses. Unlike
petisco's, they publish with confirms and ``mandatory``, set ``message_id``,
``content_type``, ``timestamp`` and ``type``, share one bus per configuration between
threads, and store what RabbitMQ does not confirm in a Redis outbox for
``python -m outbox.drain``.

Needs petisco: ``pip install 'redis-outbox[petisco]'``. ``import outbox`` never imports
this module.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar
from urllib.parse import quote

try:
    from petisco import Command, CommandBus, DomainEvent, DomainEventBus, Message
except ImportError as exc:
    raise ImportError(
        f"outbox.petisco needs petisco 2.x, which failed to import ({exc}); "
        "install it with: pip install 'redis-outbox[petisco]'",
        name=__name__,
    ) from exc

from outbox import buses, naming
from outbox.adopt import adopt_petisco_lists
from outbox.errors import MessageEncodeError, OutboxConfigError
from outbox.naming import MessageKind
from outbox.rabbitmq import DEFAULT_MAX_MESSAGE_BYTES, RabbitMqConnector
from outbox.records import OutboxRecord

__all__ = [
    "RabbitMqCommandBus",
    "RabbitMqDomainEventBus",
    "RedisCommandBus",
    "RedisDomainEventBus",
    "adopt_petisco_lists",
    "connector_from_environment",
    "petisco_record",
]

logger = logging.getLogger(__name__)

_KIND_OF_MESSAGE_TYPE: dict[str, MessageKind] = {"domain_event": "event", "command": "command"}


def petisco_record(message: Message, *, organization: str, service: str) -> OutboxRecord:
    """Build the record of a petisco message: the body, exchange and routing key petisco uses.

    The body is ``message.format_json()`` encoded as UTF-8, byte for byte what petisco's
    RabbitMQ buses publish. Raises MessageEncodeError, naming the message id, when
    petisco cannot format the message as JSON.
    """
    message_id = str(message.get_message_id())
    message_type = message.get_message_type()
    kind = _KIND_OF_MESSAGE_TYPE.get(message_type)
    if kind is None:
        raise MessageEncodeError(
            f"expected a petisco DomainEvent or Command, got {type(message).__name__} "
            f"{message_id!r} of type {message_type!r}"
        )
    try:
        body = message.format_json().encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise MessageEncodeError(
            f"cannot encode {type(message).__name__} {message_id!r} as JSON: {exc}; "
            "use attributes that petisco can serialize (str, int, float, bool, None, "
            "datetime, Uuid, value objects, pydantic models, lists and dicts of them)"
        ) from exc
    name = message.get_message_name()
    return OutboxRecord(
        exchange=naming.exchange_name(organization, service),
        routing_key=naming.routing_key(
            organization, service, version=message.get_message_version(), kind=kind, name=name
        ),
        body=body,
        message_id=message_id,
        type=name,
        timestamp_s=int(message.get_message_occurred_on().timestamp()),
    )


# Connecting the way petisco does


def connector_from_environment(environ: Mapping[str, str] | None = None) -> RabbitMqConnector:
    """Create a connector from the variables that petisco's RabbitMqConnector reads.

    Those are RABBITMQ_HOST (localhost), RABBITMQ_PORT (5672), RABBITMQ_USER and
    RABBITMQ_PASSWORD (guest) and RABBITMQ_HEARTBEAT (60 s), with the defaults of
    petisco 2.2.3 in brackets. Like petisco, it connects to the virtual host ``/``.
    """
    env = os.environ if environ is None else environ
    return _connector(
        host=env.get("RABBITMQ_HOST", "localhost"),
        port=env.get("RABBITMQ_PORT", "5672"),
        user=env.get("RABBITMQ_USER", "guest"),
        password=env.get("RABBITMQ_PASSWORD", "guest"),
        heartbeat=env.get("RABBITMQ_HEARTBEAT", "60"),
    )


def _connector(
    *, host: str, port: Any, user: str, password: str, heartbeat: Any
) -> RabbitMqConnector:
    url = f"amqp://{quote(user, safe='')}:{quote(password, safe='')}@{host}:{int(port)}/%2F"
    return RabbitMqConnector(url, heartbeat_s=int(heartbeat))


def _outbox_connector(connector: Any) -> RabbitMqConnector:
    if connector is None:
        return connector_from_environment()
    if isinstance(connector, RabbitMqConnector):
        return connector

    from petisco.extra.rabbitmq.shared.rabbitmq_connector import (
        RabbitMqConnector as PetiscoRabbitMqConnector,
    )

    if isinstance(connector, PetiscoRabbitMqConnector):
        return _connector(
            host=connector.host,
            port=connector.port,
            user=connector.user,
            password=connector.password,
            heartbeat=connector.heartbeat,
        )
    raise OutboxConfigError(
        f"expected an outbox.RabbitMqConnector, petisco's RabbitMqConnector or None, got "
        f"{type(connector).__name__}; a bus that publishes on another connection's channel "
        "cannot wait for its own confirms"
    )


# Fallbacks


def _outbox_fallback(fallback: Any, kind: MessageKind) -> buses.Fallback | None:
    """Return the outbox Redis bus that stores what RabbitMQ did not confirm."""
    if fallback is None:
        return None
    if isinstance(fallback, RedisDomainEventBus | RedisCommandBus):
        return fallback.store_bus
    if isinstance(fallback, buses.RedisDomainEventBus | buses.RedisCommandBus):
        return fallback

    from petisco.extra.redis.application.message.bus.redis_message_bus import RedisMessageBus

    if isinstance(fallback, RedisMessageBus):
        # petisco's own Redis bus: store in the service's outbox on the same Redis, where
        # the drainer finds it, instead of petisco's list.
        if kind == "event":
            return buses.RedisDomainEventBus(
                fallback.organization, fallback.service, fallback.redis_database
            )
        return buses.RedisCommandBus(
            fallback.organization, fallback.service, fallback.redis_database
        )
    raise OutboxConfigError(
        f"the fallback must be a Redis bus, got {type(fallback).__name__}; use "
        f"outbox.petisco.Redis{'DomainEvent' if kind == 'event' else 'Command'}Bus or "
        "petisco's, because other fallbacks can drop messages without telling the caller"
    )


# Shared RabbitMQ buses
#
# petisco's Container builds a new bus for every Container.get(DomainEventBus), and
# petisco's buses share one connection per exchange through their singleton connector.
# The buses here share likewise: one outbox bus, with its connection and lock, per
# configuration and process.


class _RecordPublishingBus(buses._RabbitMqBus[Any]):
    def send_records(self, records: list[OutboxRecord]) -> None:
        """Publish records; store those RabbitMQ does not confirm in the fallback."""
        self._send(records)


class _EventRecordBus(_RecordPublishingBus):
    kind: ClassVar[MessageKind] = "event"


class _CommandRecordBus(_RecordPublishingBus):
    kind: ClassVar[MessageKind] = "command"


_shared_buses: dict[tuple[Any, ...], _RecordPublishingBus] = {}
_shared_buses_lock = threading.Lock()


def _shared_bus(
    bus_type: type[_RecordPublishingBus],
    organization: str,
    service: str,
    connector: Any,
    fallback: Any,
    max_message_bytes: int,
    retry_interval_s: float,
) -> _RecordPublishingBus:
    outbox_connector = _outbox_connector(connector)
    outbox_fallback = _outbox_fallback(fallback, bus_type.kind)
    # A connector passed in is kept alive by the cached bus, so its id() stays unique.
    # A connector built here is identified by its URL.
    connector_key = (
        ("object", id(connector))
        if connector is outbox_connector
        else ("url", outbox_connector.url)
    )
    fallback_key = (
        None
        if outbox_fallback is None
        else (outbox_fallback.outbox.name, id(outbox_fallback.outbox.client))
    )
    key = (
        bus_type.kind,
        organization,
        service,
        connector_key,
        fallback_key,
        max_message_bytes,
        retry_interval_s,
    )
    # NOTE: callers that pass a new Redis client for every bus get a bus, and a RabbitMQ
    # connection, per client; the cache keeps them until the process exits.
    with _shared_buses_lock:
        bus = _shared_buses.get(key)
        if bus is None:
            bus = bus_type(
                organization,
                service,
                outbox_connector,
                fallback=outbox_fallback,
                max_message_bytes=max_message_bytes,
                retry_interval_s=retry_interval_s,
            )
            _shared_buses[key] = bus
            if outbox_fallback is None:
                destination = "raises BrokerError for what RabbitMQ does not confirm"
            else:
                destination = (
                    f"stores what RabbitMQ does not confirm in outbox {outbox_fallback.outbox.name}"
                )
            logger.info(
                "Created the %s bus for exchange %s at %s; it %s",
                bus_type.kind,
                naming.exchange_name(organization, service),
                outbox_connector.address,
                destination,
            )
        return bus


def _prepared(messages: Sequence[Message], meta: dict[str, Any]) -> list[Message]:
    # Like petisco's buses, these add the bus meta to each message in place.
    return [message.update_meta(meta) for message in messages]


class RabbitMqDomainEventBus(DomainEventBus):
    """petisco's DomainEventBus publishing with confirms, storing the rest in a Redis outbox.

    ``connector`` is an ``outbox.RabbitMqConnector``, petisco's ``RabbitMqConnector``
    (its host, port, user, password and heartbeat are used) or None for the RABBITMQ_*
    environment variables petisco reads. ``fallback`` is ``RedisDomainEventBus`` from
    this module or from outbox, petisco's own ``RedisDomainEventBus`` (then the events
    go to the outbox ``{organization}.{service}.events`` on its Redis), or None, when
    ``publish`` raises BrokerError for events RabbitMQ did not confirm.
    """

    def __init__(
        self,
        organization: str,
        service: str,
        connector: Any = None,
        fallback: Any = None,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        retry_interval_s: float = buses.DEFAULT_RETRY_INTERVAL_S,
    ) -> None:
        self.organization = organization
        self.service = service
        self.exchange_name = naming.exchange_name(organization, service)
        # petisco's consumer assigns its own connector here to publish on the consumer's
        # channel. This bus keeps its own connection, where it waits for its confirms.
        self.connector = connector
        self.fallback = fallback
        self._bus = _shared_bus(
            _EventRecordBus,
            organization,
            service,
            connector,
            fallback,
            max_message_bytes,
            retry_interval_s,
        )

    def publish(self, domain_event: DomainEvent | list[DomainEvent]) -> None:
        """Publish one DomainEvent or a list of them, with the meta set by ``with_meta``.

        Returns once RabbitMQ confirmed every event or the fallback stored the others.
        Raises TypeError, as petisco does, for an item that is not a DomainEvent, and
        MessageError, before sending anything, for an event that cannot be sent. Raises
        BrokerError without a fallback and PublishAndStoreError when the fallback fails too.
        """
        events = self._check_input(domain_event)
        for event in events:
            self._check_is_domain_event(event)
        meta = self.get_configured_meta()
        records = [
            petisco_record(event, organization=self.organization, service=self.service)
            for event in _prepared(events, meta)
        ]
        if records:
            self._bus.send_records(records)

    def close(self) -> None:
        """Close the connection to RabbitMQ; the next publish opens a new one."""
        self._bus.close()


class RabbitMqCommandBus(CommandBus):
    """petisco's CommandBus dispatching with confirms, storing the rest in a Redis outbox.

    Takes the same ``connector`` and ``fallback`` as :class:`RabbitMqDomainEventBus`,
    with command buses as fallbacks.
    """

    def __init__(
        self,
        organization: str,
        service: str,
        connector: Any = None,
        fallback: Any = None,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        retry_interval_s: float = buses.DEFAULT_RETRY_INTERVAL_S,
    ) -> None:
        self.organization = organization
        self.service = service
        self.exchange_name = naming.exchange_name(organization, service)
        # See RabbitMqDomainEventBus: petisco's consumer may replace this attribute.
        self.connector = connector
        self.fallback = fallback
        self._bus = _shared_bus(
            _CommandRecordBus,
            organization,
            service,
            connector,
            fallback,
            max_message_bytes,
            retry_interval_s,
        )

    def dispatch(self, command: Command | list[Command]) -> None:
        """Dispatch one Command or a list of them, with the meta set by ``with_meta``.

        Returns and raises as :meth:`RabbitMqDomainEventBus.publish` does.
        """
        commands = self._check_input(command)
        for item in commands:
            self._check_is_command(item)
        meta = self.get_configured_meta()
        records = [
            petisco_record(item, organization=self.organization, service=self.service)
            for item in _prepared(commands, meta)
        ]
        if records:
            self._bus.send_records(records)

    def close(self) -> None:
        """Close the connection to RabbitMQ; the next dispatch opens a new one."""
        self._bus.close()


class RedisDomainEventBus(DomainEventBus):
    """petisco's DomainEventBus storing events in the outbox ``{organization}.{service}.events``.

    The fallback of :class:`RabbitMqDomainEventBus`, and usable alone: the drainer
    publishes what it stores. ``redis_database`` is a ``redis.Redis`` or
    ``redis.cluster.RedisCluster`` created with ``decode_responses=False``.
    """

    def __init__(self, organization: str, service: str, redis_database: Any) -> None:
        self.organization = organization
        self.service = service
        self.redis_database = redis_database
        self.store_bus = buses.RedisDomainEventBus(organization, service, redis_database)

    def publish(self, domain_event: DomainEvent | list[DomainEvent]) -> None:
        """Store one DomainEvent or a list of them in one atomic push.

        Raises TypeError for an item that is not a DomainEvent, MessageError for an
        event that cannot be encoded and StoreError when Redis fails.
        """
        events = self._check_input(domain_event)
        for event in events:
            self._check_is_domain_event(event)
        meta = self.get_configured_meta()
        records = [
            petisco_record(event, organization=self.organization, service=self.service)
            for event in _prepared(events, meta)
        ]
        if records:
            self.store_bus.store(records)

    def close(self) -> None:
        """Do nothing: the Redis client belongs to the caller."""


class RedisCommandBus(CommandBus):
    """petisco's CommandBus storing commands in the outbox ``{organization}.{service}.commands``.

    Takes the same arguments as :class:`RedisDomainEventBus`.
    """

    def __init__(self, organization: str, service: str, redis_database: Any) -> None:
        self.organization = organization
        self.service = service
        self.redis_database = redis_database
        self.store_bus = buses.RedisCommandBus(organization, service, redis_database)

    def dispatch(self, command: Command | list[Command]) -> None:
        """Store one Command or a list of them in one atomic push.

        Raises as :meth:`RedisDomainEventBus.publish` does.
        """
        commands = self._check_input(command)
        for item in commands:
            self._check_is_command(item)
        meta = self.get_configured_meta()
        records = [
            petisco_record(item, organization=self.organization, service=self.service)
            for item in _prepared(commands, meta)
        ]
        if records:
            self.store_bus.store(records)

    def close(self) -> None:
        """Do nothing: the Redis client belongs to the caller."""
