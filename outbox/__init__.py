"""Lossless publishing to RabbitMQ, with a Redis outbox for what RabbitMQ cannot take."""

from outbox.buses import (
    RabbitMqCommandBus,
    RabbitMqDomainEventBus,
    RedisCommandBus,
    RedisDomainEventBus,
)
from outbox.errors import (
    BrokerError,
    BrokerUnavailableError,
    ChannelClosedError,
    MessageEncodeError,
    MessageError,
    MessageTooLargeError,
    OutboxConfigError,
    OutboxError,
    PartialStoreError,
    PublishAndStoreError,
    PublishNackedError,
    PublishTimeoutError,
    RecordDecodeError,
    StoreError,
    StoreFullError,
    StoreReadOnlyError,
    StoreUnavailableError,
    UnroutableError,
)
from outbox.messages import Command, DomainEvent, Message, UnknownMessage, decode, encode
from outbox.rabbitmq import RabbitMqConnector
from outbox.records import OutboxRecord
from outbox.store import Outbox
from outbox.transactional import OutboxCommandBus, OutboxDomainEventBus

__all__ = [
    "BrokerError",
    "BrokerUnavailableError",
    "ChannelClosedError",
    "Command",
    "DomainEvent",
    "Message",
    "MessageEncodeError",
    "MessageError",
    "MessageTooLargeError",
    "Outbox",
    "OutboxCommandBus",
    "OutboxConfigError",
    "OutboxDomainEventBus",
    "OutboxError",
    "OutboxRecord",
    "PartialStoreError",
    "PublishAndStoreError",
    "PublishNackedError",
    "PublishTimeoutError",
    "RabbitMqCommandBus",
    "RabbitMqConnector",
    "RabbitMqDomainEventBus",
    "RecordDecodeError",
    "RedisCommandBus",
    "RedisDomainEventBus",
    "StoreError",
    "StoreFullError",
    "StoreReadOnlyError",
    "StoreUnavailableError",
    "UnknownMessage",
    "UnroutableError",
    "decode",
    "encode",
]
