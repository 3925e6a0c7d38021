"""Exceptions raised by outbox.

Every exception derives from :class:`OutboxError`::

    OutboxError
    ├── OutboxConfigError          invalid argument or option (also a ValueError)
    ├── MessageError               one message cannot be sent as it is
    │   ├── MessageEncodeError     the bus cannot encode the message
    │   ├── MessageTooLargeError   the body exceeds max_message_bytes
    │   └── RecordDecodeError      a stored outbox entry cannot be decoded
    ├── BrokerError                RabbitMQ did not confirm a publish
    │   ├── BrokerUnavailableError connect failed, connection lost or blocked
    │   ├── PublishTimeoutError    no confirm within confirm_timeout_s
    │   ├── PublishNackedError     RabbitMQ answered with basic.nack
    │   ├── UnroutableError        returned by RabbitMQ because of mandatory
    │   └── ChannelClosedError     the broker closed the channel (404, 406, ...)
    ├── StoreError                 Redis failed an outbox operation
    │   ├── StoreUnavailableError  connection failed or Redis is loading or busy
    │   ├── StoreFullError         Redis rejected a write with OOM
    │   ├── StoreReadOnlyError     Redis is a read-only replica
    │   └── PartialStoreError      a list spread over partitions was stored only in part
    └── PublishAndStoreError       RabbitMQ and the Redis fallback both failed

pika and redis-py errors are translated in ``outbox.rabbitmq`` and ``outbox.store``
and stay attached as ``__cause__``.
"""

from __future__ import annotations


class OutboxError(Exception):
    """Base class of every exception raised by outbox."""


class OutboxConfigError(OutboxError, ValueError):
    """An argument or command-line option is invalid."""


class MessageError(OutboxError):
    """One message cannot be published as it is; retrying will not help."""


class MessageEncodeError(MessageError):
    """The bus cannot encode a message to the wire format."""


class MessageTooLargeError(MessageError):
    """A message body is larger than the configured maximum."""


class RecordDecodeError(MessageError):
    """A stored outbox entry is not a record that outbox can republish."""


class BrokerError(OutboxError):
    """RabbitMQ did not confirm a publish."""


class BrokerUnavailableError(BrokerError):
    """RabbitMQ cannot be reached, the connection was lost, or it is blocked by an alarm."""


class PublishTimeoutError(BrokerError):
    """RabbitMQ did not confirm a publish in time; the outcome is unknown."""


class PublishNackedError(BrokerError):
    """RabbitMQ rejected a publish with basic.nack."""


class UnroutableError(BrokerError):
    """RabbitMQ returned a mandatory publish because no queue is bound for its routing key."""


class ChannelClosedError(BrokerError):
    """RabbitMQ closed the channel, for example because the exchange does not exist."""

    def __init__(self, message: str, *, reply_code: int = 0) -> None:
        super().__init__(message)
        self.reply_code = reply_code


class StoreError(OutboxError):
    """Redis failed an outbox operation."""


class StoreUnavailableError(StoreError):
    """Redis cannot be reached, timed out, or is loading or busy running a script."""


class StoreFullError(StoreError):
    """Redis rejected a write because it reached maxmemory."""


class StoreReadOnlyError(StoreError):
    """Redis rejected a write because the server is a read-only replica."""


class PartialStoreError(StoreError):
    """Some partitions stored their part of a list of messages, and one failed.

    The failure of the first partition that failed is the ``__cause__``.
    """

    def __init__(
        self, message: str, *, stored_message_ids: list[str], unstored_message_ids: list[str]
    ) -> None:
        super().__init__(message)
        self.stored_message_ids = stored_message_ids
        self.unstored_message_ids = unstored_message_ids


class PublishAndStoreError(OutboxError):
    """RabbitMQ did not confirm a message and the fallback failed to store it."""

    def __init__(self, message: str, *, publish_error: BaseException, store_error: BaseException):
        super().__init__(message)
        self.publish_error = publish_error
        self.store_error = store_error
