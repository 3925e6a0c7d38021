"""Connections to RabbitMQ and publishing with publisher confirms and ``mandatory``.

:class:`ConfirmingPublisher` drives a pika ``SelectConnection`` from the calling thread:
it sends a whole batch, then waits for the broker's confirms of all of it together,
which is many times faster than waiting for each confirm in turn. It is not
thread-safe; the buses guard theirs with a lock. pika errors are translated into
:mod:`outbox.errors` here and nowhere else.
"""

from __future__ import annotations

import enum
import logging
import re
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions
from pika.spec import Basic

from outbox import _fork
from outbox._sending import EagerSendConnection
from outbox.errors import (
    BrokerError,
    BrokerUnavailableError,
    ChannelClosedError,
    OutboxConfigError,
    PublishNackedError,
    PublishTimeoutError,
    UnroutableError,
)
from outbox.records import OutboxRecord

logger = logging.getLogger(__name__)

DEFAULT_AMQP_URL = "amqp://guest:guest@localhost:5672/%2F"
PERSISTENT_DELIVERY_MODE = 2
# RabbitMQ's own default for max_message_size since 3.8 (128 MiB); larger bodies close the channel.
DEFAULT_MAX_MESSAGE_BYTES = 128 * 1024 * 1024
# RabbitMQ caps max_message_size at 512 MiB, whatever value its configuration sets.
MAX_MESSAGE_BYTES_LIMIT = 512 * 1024 * 1024
_PRECONDITION_FAILED = 406
_NOT_FOUND = 404
_CLOSE_WAIT_S = 1.0
# Maximum timeout, one day: longer ones are mistakes and overflow when turned into milliseconds.
_MAX_TIMEOUT_S = 86_400
# Errors pika raises while it encodes one message, before sending any of it.
_UNSENDABLE = (
    pika.exceptions.ShortStringTooLong,
    pika.exceptions.UnsupportedAMQPFieldException,
    struct.error,
    TypeError,
    ValueError,
    OverflowError,
)
# Before a publish, a connection the ioloop has not read for this long is read first, so
# a close or block the broker sent meanwhile is seen. A connection read since is used as is.
_IDLE_CHECK_S = 0.05
# How RabbitMQ 3.10 words the 406 channel close for a body above max_message_size, for
# example "message size 4314 is larger than configured max size 4096".
# NOTE: a close worded otherwise counts as a broker failure, so the drainer retries that
# message without using up its attempts.
_MAX_SIZE_EXCEEDED = re.compile(r"message size \d+ is larger than (?:configured )?max size (\d+)")


class PublishStatus(enum.Enum):
    """The outcome of one published message."""

    CONFIRMED = "confirmed"
    RETURNED = "returned"
    # RabbitMQ closed the channel because of this message itself, so retrying cannot help.
    REJECTED = "rejected"
    NACKED = "nacked"
    FAILED = "failed"


@dataclass(frozen=True)
class PublishResult:
    """The outcome of one publish; ``error`` is set unless the status is CONFIRMED."""

    status: PublishStatus
    error: BrokerError | None = None

    @property
    def confirmed(self) -> bool:
        return self.status is PublishStatus.CONFIRMED


_CONFIRMED = PublishResult(PublishStatus.CONFIRMED)


class RabbitMqConnector:
    """Settings for connecting to RabbitMQ; each :meth:`publisher` opens its own connection.

    Every wait is bounded: ``connect_timeout_s`` covers the TCP connect and the AMQP
    handshake, ``confirm_timeout_s`` the wait for the confirms of one batch, and
    ``blocked_connection_timeout_s`` how long pika keeps a connection that a memory or
    disk alarm blocked before it closes it.
    """

    def __init__(
        self,
        url: str = DEFAULT_AMQP_URL,
        *,
        connect_timeout_s: float = 2.0,
        confirm_timeout_s: float = 5.0,
        blocked_connection_timeout_s: float = 10.0,
        heartbeat_s: int = 60,
        connection_name: str = "outbox",
    ) -> None:
        for option, value in (
            ("connect_timeout_s", connect_timeout_s),
            ("confirm_timeout_s", confirm_timeout_s),
            ("blocked_connection_timeout_s", blocked_connection_timeout_s),
        ):
            if not 0 < value <= _MAX_TIMEOUT_S:
                raise OutboxConfigError(
                    f"{option} must be more than 0 and at most {_MAX_TIMEOUT_S} seconds, "
                    f"got {value}"
                )
        scheme = url.partition("://")[0] if "://" in url else ""
        if scheme not in ("amqp", "amqps"):
            raise OutboxConfigError(
                f"invalid AMQP URL {_redact(url)!r}: expected amqp://user:password@host:port/vhost "
                "(or amqps://)"
            )
        try:
            parameters = pika.URLParameters(url)
        except (ValueError, TypeError, IndexError) as exc:
            raise OutboxConfigError(
                f"invalid AMQP URL {_redact(url)!r}: {exc}; "
                "expected amqp://user:password@host:port/vhost"
            ) from exc
        parameters.connection_attempts = 1
        parameters.socket_timeout = connect_timeout_s
        parameters.stack_timeout = connect_timeout_s
        parameters.blocked_connection_timeout = blocked_connection_timeout_s
        parameters.heartbeat = heartbeat_s
        parameters.client_properties = {"connection_name": connection_name}
        self.url = url
        self.parameters = parameters
        self.connect_timeout_s = connect_timeout_s
        self.confirm_timeout_s = confirm_timeout_s

    def __repr__(self) -> str:
        return f"RabbitMqConnector({_redact(self.url)!r})"

    @property
    def address(self) -> str:
        """Host and port, for messages and logs; never includes credentials."""
        return f"{self.parameters.host}:{self.parameters.port}"

    def publisher(self) -> ConfirmingPublisher:
        """Return a publisher that connects on first use."""
        return ConfirmingPublisher(self)


def check_max_message_bytes(value: int, option: str = "max_message_bytes") -> None:
    """Raise OutboxConfigError unless ``value`` is a body size RabbitMQ can accept."""
    if not 1 <= value <= MAX_MESSAGE_BYTES_LIMIT:
        raise OutboxConfigError(
            f"{option} must be from 1 to {MAX_MESSAGE_BYTES_LIMIT} (512 MiB, RabbitMQ's limit), "
            f"got {value}"
        )


def _redact(url: str) -> str:
    scheme, separator, rest = url.partition("://")
    if "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}{separator}{user}:***@{host}"


class ConfirmingPublisher:
    """One connection and one channel in confirm mode, reopened when either closes."""

    def __init__(self, connector: RabbitMqConnector) -> None:
        self.connector = connector
        self._connection: EagerSendConnection | None = None
        self._channel: Any = None
        self._connection_error: BaseException | None = None
        self._channel_error: ChannelClosedError | None = None
        self._blocked_reason: str | None = None
        # Set after a connection blocked mid-batch, until a publish is confirmed again.
        self._probing = False
        self._declared: set[str] = set()
        self._next_tag = 0
        self._waiting: dict[int, int] = {}
        self._results: list[PublishResult | None] = []
        self._batch: Sequence[OutboxRecord] = ()
        # The time the ioloop last read the connection. connect() reads an idle one first.
        self._polled_at = 0.0
        _fork.reset_after_fork(self)

    # Connection management

    @property
    def is_open(self) -> bool:
        return (
            self._connection is not None
            and self._connection.is_open
            and self._channel is not None
            and self._channel.is_open
        )

    def connect(self) -> None:
        """Open the connection and a confirm-mode channel unless they are open.

        Raises BrokerUnavailableError when RabbitMQ cannot be reached in time.
        """
        try:
            if self._connection is not None and time.monotonic() - self._polled_at > _IDLE_CHECK_S:
                self._pump(0.0)
            if self.is_open:
                return
            if self._connection is not None and self._connection.is_open:
                self._open_channel()
                return
            self._discard_connection()
            self._open_connection()
            self._open_channel()
        except pika.exceptions.AMQPError as exc:
            # pika raises when the broker closes the connection between two steps of opening it.
            self._discard_connection()
            raise BrokerUnavailableError(
                f"connecting to RabbitMQ at {self.connector.address} failed: {_describe(exc)}"
            ) from exc

    def close(self) -> None:
        """Close the connection; pending confirms are abandoned."""
        connection = self._connection
        if connection is None:
            return
        if connection.is_open:
            try:
                connection.close()
                self._run_until(lambda: connection.is_closed, _CLOSE_WAIT_S)
            except pika.exceptions.AMQPError:
                pass
        self._discard_connection()

    def _after_fork(self) -> None:
        # The connection's socket and epoll belong to the parent: a forked child drops them
        # without closing them and opens its own connection at its first publish.
        self._connection = None
        self._channel = None
        self._declared = set()
        self._blocked_reason = None
        self._probing = False
        self._waiting = {}

    def _discard_connection(self, *, abort_reason: str | None = None) -> None:
        """Close the connection and forget it; with ``abort_reason``, without a close frame."""
        connection = self._connection
        self._connection = None
        self._channel = None
        self._declared.clear()
        self._blocked_reason = None
        if connection is not None:
            ioloop = connection.ioloop
            if not connection.is_closed:
                try:
                    if abort_reason is not None:
                        connection.abort(abort_reason)
                    else:
                        connection.close()
                    self._run_loop_until(ioloop, lambda: connection.is_closed, _CLOSE_WAIT_S)
                except pika.exceptions.AMQPError:
                    pass
            _close_ioloop(ioloop)

    def _open_connection(self) -> None:
        opened: list[bool] = []
        failure: list[BaseException] = []
        self._connection_error = None

        def on_open(_connection: Any) -> None:
            opened.append(True)

        def on_open_error(_connection: Any, error: BaseException | str) -> None:
            failure.append(error if isinstance(error, BaseException) else RuntimeError(error))

        connection = EagerSendConnection(
            self.connector.parameters,
            on_open_callback=on_open,
            on_open_error_callback=on_open_error,
            on_close_callback=self._on_connection_closed,
        )
        # The ioloop is driven step by step from _run_until instead of by ioloop.start().
        connection.ioloop.activate_poller()
        connection.add_on_connection_blocked_callback(self._on_blocked)
        connection.add_on_connection_unblocked_callback(self._on_unblocked)
        self._connection = connection
        done = self._run_until(
            lambda: bool(opened or failure), self.connector.connect_timeout_s + 1
        )
        if opened:
            logger.debug("Connected to RabbitMQ at %s", self.connector.address)
            return
        cause = failure[0] if failure else TimeoutError("connect timed out")
        self._connection = None
        try:
            if not connection.is_closed:
                connection.close()
        except pika.exceptions.AMQPError:
            pass
        _close_ioloop(connection.ioloop)
        reason = "timed out" if not done else f"failed: {_describe(cause)}"
        raise BrokerUnavailableError(
            f"connecting to RabbitMQ at {self.connector.address} {reason}; "
            "check that it is running and that the URL and credentials are right"
        ) from cause

    def _open_channel(self) -> None:
        assert self._connection is not None
        ready: list[bool] = []
        self._channel_error = None

        def on_channel_open(channel: Any) -> None:
            self._channel = channel
            channel.add_on_close_callback(self._on_channel_closed)
            channel.add_on_return_callback(self._on_return)
            channel.confirm_delivery(
                ack_nack_callback=self._on_confirm, callback=lambda _frame: ready.append(True)
            )

        self._channel = None
        self._next_tag = 0
        self._connection.channel(on_open_callback=on_channel_open)
        if not self._run_until(
            lambda: bool(ready) or self._lost(), self.connector.connect_timeout_s
        ):
            self._discard_connection()
            raise BrokerUnavailableError(
                f"opening a channel on RabbitMQ at {self.connector.address} timed out"
            )
        if not ready:
            error = self._failure()
            self._discard_connection()
            raise BrokerUnavailableError(
                f"opening a channel on RabbitMQ at {self.connector.address} failed: {error}"
            )

    def _lost(self) -> bool:
        return (
            self._connection is None
            or self._connection.is_closed
            or (self._channel is not None and self._channel.is_closed)
        )

    def _failure(self) -> BrokerError:
        if self._channel_error is not None:
            return self._channel_error
        if self._connection_error is not None:
            return BrokerUnavailableError(
                f"the connection to RabbitMQ at {self.connector.address} was lost: "
                f"{_describe(self._connection_error)}"
            )
        return BrokerUnavailableError(
            f"the connection to RabbitMQ at {self.connector.address} is closed"
        )

    # Exchanges

    def declare_exchange(self, exchange: str) -> None:
        """Declare a durable topic exchange once per connection.

        An exchange that already exists with other arguments is used as it is. Raises
        ChannelClosedError when RabbitMQ refuses the declare (access refused, say), and
        BrokerUnavailableError when it does not reply in time or the connection is lost.
        """
        if exchange in self._declared or exchange == "":
            return
        self.connect()
        declared: list[bool] = []
        try:
            self._channel.exchange_declare(
                exchange=exchange,
                exchange_type="topic",
                durable=True,
                callback=lambda _frame: declared.append(True),
            )
        except pika.exceptions.AMQPError as exc:
            self._discard_connection()
            raise BrokerUnavailableError(
                f"declaring exchange {exchange!r} on RabbitMQ at {self.connector.address} "
                f"failed: {_describe(exc)}"
            ) from exc
        if not self._run_until(
            lambda: bool(declared) or self._lost(), self.connector.confirm_timeout_s
        ):
            self._discard_connection()
            raise BrokerUnavailableError(
                f"declaring exchange {exchange!r} on RabbitMQ at {self.connector.address} "
                f"timed out after {self.connector.confirm_timeout_s} s"
            )
        if declared:
            self._declared.add(exchange)
            return
        error = self._failure()
        if isinstance(error, ChannelClosedError) and error.reply_code == _PRECONDITION_FAILED:
            logger.warning(
                "Exchange %s exists with other arguments than a durable topic exchange; "
                "publishing to it as it is: %s",
                exchange,
                error,
            )
            self._declared.add(exchange)
            self.connect()
            return
        raise error

    # Publishing

    def publish(
        self,
        records: Sequence[OutboxRecord],
        *,
        keepalive: Callable[[], None] | None = None,
        keepalive_interval_s: float = 1.0,
    ) -> list[PublishResult]:
        """Publish records with ``mandatory`` and wait for their confirms together.

        While waiting, ``keepalive`` is called every ``keepalive_interval_s`` seconds; the
        drainer renews its leases there. Returns one result per record, in order. Raises
        BrokerUnavailableError, having sent nothing, when no connection can be opened.
        Any exception that escapes closes the connection; the next call opens a new one.
        """
        try:
            return self._publish(
                records, keepalive=keepalive, keepalive_interval_s=keepalive_interval_s
            )
        except BaseException:
            # An exception raised inside pika, such as one from a signal handler, can leave
            # a message sent but not counted, or a frame sent in part. Either would corrupt
            # what follows on this connection, so it is closed without another byte.
            self._discard_connection(abort_reason="an exception interrupted a publish")
            raise
        finally:
            self._batch = ()
            self._results = []

    def _publish(
        self,
        records: Sequence[OutboxRecord],
        *,
        keepalive: Callable[[], None] | None,
        keepalive_interval_s: float,
    ) -> list[PublishResult]:
        if not records:
            return []
        if self._probing and len(records) > 1:
            # The last batch failed on a blocked connection: send one message first, so a
            # connection blocked again holds one message that may arrive twice, not a batch.
            first = self.publish(
                records[:1], keepalive=keepalive, keepalive_interval_s=keepalive_interval_s
            )
            answered = first[0].status in (PublishStatus.RETURNED, PublishStatus.REJECTED)
            if first[0].confirmed or answered:
                # The broker returned or rejected the probe, so it reads the connection again.
                self._probing = False
                return first + self.publish(
                    records[1:], keepalive=keepalive, keepalive_interval_s=keepalive_interval_s
                )
            held_back = PublishResult(
                PublishStatus.FAILED,
                BrokerUnavailableError(
                    f"not sent: RabbitMQ at {self.connector.address} did not confirm the message "
                    f"sent first after a blocked connection ({first[0].error})"
                ),
            )
            return first + [held_back] * (len(records) - 1)
        self.connect()
        if self._blocked_reason is not None:
            blocked = BrokerUnavailableError(
                f"RabbitMQ at {self.connector.address} blocks publishing: {self._blocked_reason}"
            )
            return [PublishResult(PublishStatus.FAILED, blocked) for _ in records]
        refused: dict[str, ChannelClosedError] = {}
        for record in records:
            exchange = record.exchange
            if exchange not in self._declared and exchange not in refused:
                try:
                    self.declare_exchange(exchange)
                except ChannelClosedError as exc:
                    # Only this exchange is refused; the channel opens again for the others.
                    refused[exchange] = exc
                    self.connect()
        if refused:
            return self._publish_without(
                records, refused, keepalive=keepalive, keepalive_interval_s=keepalive_interval_s
            )

        self._batch = records
        self._results = [None] * len(records)
        self._waiting = {}
        try:
            for index, record in enumerate(records):
                try:
                    self._channel.basic_publish(
                        exchange=record.exchange,
                        routing_key=record.routing_key,
                        body=record.body,
                        properties=properties_for(record),
                        mandatory=True,
                    )
                except _UNSENDABLE as exc:
                    # pika encodes all frames of a message before it sends any, so nothing
                    # of this one was sent. The message itself is at fault, not the broker.
                    hint = (
                        " (exchange, routing key, message id and type must each fit in 255 bytes)"
                        if isinstance(exc, pika.exceptions.ShortStringTooLong)
                        else ""
                    )
                    self._results[index] = PublishResult(
                        PublishStatus.REJECTED,
                        BrokerError(
                            f"message {record.message_id!r} cannot be sent as AMQP: "
                            f"{_describe(exc)}{hint}"
                        ),
                    )
                    continue
                self._next_tag += 1
                self._waiting[self._next_tag] = index
        except pika.exceptions.AMQPError as exc:
            self._fail_waiting(
                BrokerUnavailableError(f"publishing to RabbitMQ failed: {_describe(exc)}")
            )

        finished = self._run_until(
            lambda: not self._waiting or self._lost() or self._blocked_reason is not None,
            self.connector.confirm_timeout_s,
            every=(keepalive, keepalive_interval_s) if keepalive is not None else None,
        )
        if self._waiting:
            if finished and not self._lost() and self._blocked_reason is not None:
                # A blocked connection is not read by RabbitMQ, so no confirm comes before
                # the alarm clears. The connection is kept and its unblock read later.
                self._probing = True
                self._fail_waiting(
                    BrokerUnavailableError(
                        f"RabbitMQ at {self.connector.address} blocked the connection before "
                        f"confirming {len(self._waiting)} of {len(records)} messages: "
                        f"{self._blocked_reason}; they may still be routed once it unblocks"
                    )
                )
            elif not finished:
                error: BrokerError = PublishTimeoutError(
                    f"RabbitMQ at {self.connector.address} confirmed {len(records) - len(self._waiting)}"
                    f" of {len(records)} messages within {self.connector.confirm_timeout_s} s; "
                    "the others may or may not have been routed"
                )
                self._fail_waiting(error)
                # The connection's state is unknown now; start the next batch on a new one.
                self._discard_connection()
            else:
                self._reject_oversized()
                self._fail_waiting(self._failure())
        results = [
            result or PublishResult(PublishStatus.FAILED, self._failure())
            for result in self._results
        ]
        if self._probing and any(result.confirmed for result in results):
            self._probing = False
        return results

    def _publish_without(
        self,
        records: Sequence[OutboxRecord],
        refused: dict[str, ChannelClosedError],
        **publish_options: Any,
    ) -> list[PublishResult]:
        """Publish the records whose exchange was declared; fail the others with its error."""
        sendable = [index for index, record in enumerate(records) if record.exchange not in refused]
        sent = self.publish([records[index] for index in sendable], **publish_options)
        by_index = dict(zip(sendable, sent, strict=True))
        return [
            by_index[index]
            if index in by_index
            else PublishResult(PublishStatus.FAILED, refused[record.exchange])
            for index, record in enumerate(records)
        ]

    def _reject_oversized(self) -> None:
        """Mark the waiting messages above the max_message_size that closed the channel as REJECTED.

        The others keep no result, so _fail_waiting fails them as broker failures.
        """
        error = self._channel_error
        if error is None or error.reply_code != _PRECONDITION_FAILED:
            return
        match = _MAX_SIZE_EXCEEDED.search(str(error))
        if match is None:
            return
        max_size = int(match.group(1))
        for index in self._waiting.values():
            if len(self._batch[index].body) > max_size:
                self._results[index] = PublishResult(PublishStatus.REJECTED, error)

    def _fail_waiting(self, error: BrokerError) -> None:
        for index in self._waiting.values():
            if self._results[index] is None:
                self._results[index] = PublishResult(PublishStatus.FAILED, error)
        self._waiting.clear()

    # Callbacks, run by the ioloop inside _run_until

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        tag = method.delivery_tag
        if method.multiple:
            # Tags are handed out in order, so the waiting tags up to ``tag`` are the
            # oldest ones; walking from the front keeps a batch's confirms linear.
            tags = []
            for waiting_tag in self._waiting:
                if waiting_tag > tag:
                    break
                tags.append(waiting_tag)
        else:
            tags = [tag]
        for delivery_tag in tags:
            index = self._waiting.pop(delivery_tag, None)
            if index is None:
                continue
            if isinstance(method, Basic.Nack):
                self._results[index] = PublishResult(
                    PublishStatus.NACKED,
                    PublishNackedError(
                        f"RabbitMQ rejected message {self._batch[index].message_id!r} with "
                        "basic.nack (a queue may be full or the broker short of resources)"
                    ),
                )
            elif self._results[index] is None:
                self._results[index] = _CONFIRMED

    def _on_return(self, _channel: Any, method: Any, properties: Any, _body: bytes) -> None:
        # RabbitMQ sends basic.return before the basic.ack of the same message, so the
        # returned message is one still waiting; the first match in publish order is it.
        for tag in sorted(self._waiting):
            index = self._waiting[tag]
            record = self._batch[index]
            if (
                self._results[index] is None
                and record.message_id == properties.message_id
                and record.routing_key == method.routing_key
                and record.exchange == method.exchange
            ):
                self._results[index] = PublishResult(
                    PublishStatus.RETURNED,
                    UnroutableError(
                        f"RabbitMQ returned message {record.message_id!r}: no queue is bound to "
                        f"exchange {record.exchange!r} for routing key {record.routing_key!r} "
                        f"({method.reply_code} {method.reply_text}); bind a queue to receive it"
                    ),
                )
                return

    def _on_channel_closed(self, _channel: Any, reason: BaseException) -> None:
        code = getattr(reason, "reply_code", 0)
        text = getattr(reason, "reply_text", str(reason))
        if code in (0, 200):
            return
        if code == _NOT_FOUND:
            self._declared.clear()
        self._channel_error = ChannelClosedError(
            f"RabbitMQ closed the channel: {code} {text}", reply_code=code
        )
        logger.warning(
            "RabbitMQ at %s closed the channel: %s %s", self.connector.address, code, text
        )

    def _on_connection_closed(self, _connection: Any, reason: BaseException) -> None:
        self._connection_error = reason
        if not isinstance(reason, pika.exceptions.ConnectionClosedByClient):
            logger.warning(
                "Connection to RabbitMQ at %s closed: %s", self.connector.address, _describe(reason)
            )

    def _on_blocked(self, _connection: Any, frame: Any) -> None:
        self._blocked_reason = getattr(frame.method, "reason", "") or "connection blocked"
        logger.warning(
            "RabbitMQ at %s blocked the connection: %s",
            self.connector.address,
            self._blocked_reason,
        )

    def _on_unblocked(self, _connection: Any, _frame: Any) -> None:
        self._blocked_reason = None
        logger.info("RabbitMQ at %s unblocked the connection", self.connector.address)

    # Driving the ioloop

    def _pump(self, timeout_s: float) -> None:
        """Process whatever the broker already sent, waiting at most ``timeout_s``."""
        self._run_until(lambda: False, timeout_s)

    def _run_until(
        self,
        done: Callable[[], bool],
        timeout_s: float,
        every: tuple[Callable[[], None], float] | None = None,
    ) -> bool:
        if self._connection is None:
            return done()
        try:
            return self._run_loop_until(self._connection.ioloop, done, timeout_s, every)
        finally:
            self._polled_at = time.monotonic()

    @staticmethod
    def _run_loop_until(
        ioloop: Any,
        done: Callable[[], bool],
        timeout_s: float,
        every: tuple[Callable[[], None], float] | None = None,
    ) -> bool:
        """Run the ioloop until ``done()`` is true; return False when ``timeout_s`` passed first.

        ``every`` is a callback and its interval in seconds, called while waiting.
        """
        start = time.monotonic()
        deadline = start + timeout_s
        next_call = start + every[1] if every is not None else float("inf")
        polled = False
        # A timer at the deadline, or at the next call of ``every``, bounds the poller's
        # wait. It is set again only after it fired or a call of ``every`` moved it.
        timer: Any = None
        fired: list[bool] = []
        try:
            while not done():
                now = time.monotonic()
                if every is not None and now >= next_call:
                    every[0]()
                    next_call = now + every[1]
                    if timer is not None and not fired:
                        ioloop.remove_timeout(timer)
                    timer = None
                # Poll at least once, even with a timeout of 0, because _pump(0.0) must read
                # what the broker already sent, such as the close of an idle connection.
                # Otherwise the publisher keeps using a connection that is gone.
                if now >= deadline and polled:
                    return False
                if timer is None or fired:
                    fired.clear()
                    remaining = max(0.0, min(deadline, next_call) - now)
                    timer = ioloop.call_later(remaining, lambda: fired.append(True))
                ioloop.poll()
                ioloop.process_timeouts()
                polled = True
            return True
        finally:
            if timer is not None and not fired:
                ioloop.remove_timeout(timer)


def _close_ioloop(ioloop: Any) -> None:
    ioloop.deactivate_poller()
    ioloop.close()


def properties_for(record: OutboxRecord) -> pika.BasicProperties:
    """Return the AMQP properties of a record: message id, content type, persistence and more."""
    return pika.BasicProperties(
        message_id=record.message_id,
        content_type=record.content_type,
        delivery_mode=PERSISTENT_DELIVERY_MODE,
        timestamp=record.timestamp_s,
        type=record.type,
        headers=record.headers,
        expiration=str(record.expiration_ms) if record.expiration_ms is not None else None,
    )


def _describe(error: BaseException | str) -> str:
    if isinstance(error, str):
        return error
    error = _root_cause(error)
    text = str(error) or repr(error)
    return f"{type(error).__name__}: {text}"


def _root_cause(error: BaseException) -> BaseException:
    """Unwrap pika's connection-workflow errors down to the socket or protocol error."""
    for _ in range(10):
        nested = getattr(error, "exceptions", None)
        if nested:
            error = nested[-1]
            continue
        inner = getattr(error, "exception", None)
        if isinstance(inner, BaseException):
            error = inner
            continue
        if error.args and isinstance(error.args[0], BaseException):
            error = error.args[0]
            continue
        break
    return error
