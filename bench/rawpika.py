"""The pika baselines, written with pika alone: no outbox code between the records and pika.

Both publish each record with the properties the outbox gives it (message id, content
type, persistent delivery, timestamp, type, headers, expiration) and ``mandatory``.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Sequence
from typing import Any

import pika
from pika.adapters.select_connection import SelectConnection
from pika.spec import Basic

from outbox.records import OutboxRecord


def _properties(record: OutboxRecord) -> pika.BasicProperties:
    return pika.BasicProperties(
        message_id=record.message_id,
        content_type=record.content_type,
        delivery_mode=2,
        timestamp=record.timestamp_s,
        type=record.type,
        headers=record.headers,
        expiration=str(record.expiration_ms) if record.expiration_ms is not None else None,
    )


class WindowedPublisher:
    """Publishes records on one SelectConnection in confirm mode with a window of ``window``.

    ``sliding=False`` (the drainer's pattern): send ``window`` messages, wait until all of
    them are confirmed, send the next ``window``. ``sliding=True``: keep up to ``window``
    messages unconfirmed at any time, sending another as soon as one is confirmed.
    :meth:`publish` can be called again and again on the same connection; the ioloop runs
    (``ioloop.start()``) while a call lasts and stops when its last message is confirmed.
    """

    def __init__(self, url: str, *, window: int, sliding: bool = False) -> None:
        self.parameters = pika.URLParameters(url)
        self.window = window
        self.sliding = sliding
        self.acked = 0
        self.nacked = 0
        self._records: Sequence[OutboxRecord] = ()
        self._sent = 0
        self._done = 0
        self._next_tag = 0
        self._unconfirmed: collections.deque[int] = collections.deque()
        self._channel: Any = None
        self._connection: SelectConnection | None = None
        self._error: BaseException | str | None = None

    def open(self) -> float:
        """Connect and put a channel in confirm mode; return the seconds it took."""
        started = time.perf_counter()
        self._connection = SelectConnection(
            self.parameters,
            on_open_callback=self._on_open,
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_closed,
        )
        self._connection.ioloop.start()
        self._raise_error()
        return time.perf_counter() - started

    def publish(self, records: Sequence[OutboxRecord]) -> float:
        """Publish every record and wait for all confirms; return the seconds it took."""
        assert self._connection is not None and self._channel is not None
        self._records = records
        self._sent = 0
        self._done = 0
        started = time.perf_counter()
        self._send()
        self._connection.ioloop.start()
        elapsed = time.perf_counter() - started
        self._raise_error()
        if self._done != len(records):
            raise RuntimeError(f"raw pika: {self._done} of {len(records)} confirmed")
        return elapsed

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and connection.is_open:
            connection.close()
            connection.ioloop.start()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"raw pika baseline failed: {self._error}")
        if self.nacked:
            raise RuntimeError(f"raw pika baseline: RabbitMQ nacked {self.nacked} messages")

    def _on_open(self, connection: Any) -> None:
        connection.channel(on_open_callback=self._on_channel)

    def _on_open_error(self, connection: Any, error: BaseException | str) -> None:
        self._error = error
        connection.ioloop.stop()

    def _on_closed(self, connection: Any, reason: BaseException) -> None:
        if self._connection is not None and self._error is None:
            self._error = reason
        connection.ioloop.stop()

    def _on_channel(self, channel: Any) -> None:
        self._channel = channel
        channel.confirm_delivery(ack_nack_callback=self._on_confirm, callback=self._on_confirm_mode)

    def _on_confirm_mode(self, _frame: Any) -> None:
        assert self._connection is not None
        self._connection.ioloop.stop()

    def _send(self) -> None:
        records = self._records
        if self.sliding:
            room = self.window - len(self._unconfirmed)
        else:
            room = self.window if not self._unconfirmed else 0
        end = min(len(records), self._sent + room)
        publish = self._channel.basic_publish
        unconfirmed = self._unconfirmed
        for index in range(self._sent, end):
            record = records[index]
            publish(
                record.exchange,
                record.routing_key,
                record.body,
                properties=_properties(record),
                mandatory=True,
            )
            self._next_tag += 1
            unconfirmed.append(self._next_tag)
        self._sent = end

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        tag = method.delivery_tag
        unconfirmed = self._unconfirmed
        done = 0
        if method.multiple:
            while unconfirmed and unconfirmed[0] <= tag:
                unconfirmed.popleft()
                done += 1
        elif unconfirmed and unconfirmed[0] == tag:
            unconfirmed.popleft()
            done = 1
        else:
            unconfirmed.remove(tag)
            done = 1
        if isinstance(method, Basic.Nack):
            self.nacked += done
        else:
            self.acked += done
        self._done += done
        if self._done == len(self._records):
            assert self._connection is not None
            self._connection.ioloop.stop()
            return
        self._send()


class BlockingConfirmPublisher:
    """One message per call on a BlockingConnection in confirm mode: publish, wait, return."""

    def __init__(self, url: str) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()

    def publish(self, record: OutboxRecord) -> None:
        # With confirm_delivery, basic_publish returns once RabbitMQ confirmed the message
        # and raises UnroutableError or NackError otherwise.
        self.channel.basic_publish(
            record.exchange,
            record.routing_key,
            record.body,
            properties=_properties(record),
            mandatory=True,
        )

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()
