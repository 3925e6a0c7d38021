"""The publisher's connection sends each message at once, and in full when the socket takes only part."""

from __future__ import annotations

import socket
from collections.abc import Sequence

import pytest

import outbox.rabbitmq
from outbox import RabbitMqConnector
from outbox._sending import JOIN_MAX_BYTES, EagerSendConnection, idle_plaintext_socket
from outbox.rabbitmq import ConfirmingPublisher, PublishStatus
from outbox.records import OutboxRecord


def _records(exchange: str, bodies: list[bytes]) -> list[OutboxRecord]:
    return [
        OutboxRecord(exchange=exchange, routing_key="parcel", body=body, message_id=f"m{n}")
        for n, body in enumerate(bodies)
    ]


def _connected_publisher(
    rabbit, amqp_url: str, *, send_buffer: int | None = None
) -> tuple[str, str, ConfirmingPublisher]:
    """Return an exchange, a queue bound to it and a publisher connected to the exchange.

    ``send_buffer`` sets the socket's SO_SNDBUF, so that larger messages are sent in part.
    """
    exchange = f"{rabbit.organization()}.shop"
    queue = rabbit.bind_queue(exchange)
    publisher = RabbitMqConnector(amqp_url).publisher()
    publisher.declare_exchange(exchange)
    if send_buffer is not None:
        sock = idle_plaintext_socket(publisher._connection._transport)
        assert sock is not None
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    return exchange, queue, publisher


def test_message_leaves_before_the_next_poll(rabbit, amqp_url):
    exchange, queue, publisher = _connected_publisher(rabbit, amqp_url)
    transport = publisher._connection._transport
    assert idle_plaintext_socket(transport) is not None

    publisher._channel.basic_publish(exchange=exchange, routing_key="parcel", body=b"now")
    buffered = transport.get_write_buffer_size()
    publisher.close()

    assert buffered == 0
    [(_, _, body)] = rabbit.consume_all(queue, expected=1)
    assert body == b"now"


def test_large_bodies_arrive_whole_in_order(rabbit, amqp_url):
    exchange, queue, publisher = _connected_publisher(rabbit, amqp_url, send_buffer=4096)
    # Joined messages larger than the send buffer, so each is sent in part and buffered.
    bodies = [bytes([n]) * (100_000 + n) for n in range(4)] + [b"small"]

    publisher._channel.basic_publish(exchange=exchange, routing_key="parcel", body=bodies[0])
    left_to_pika = publisher._connection._transport.get_write_buffer_size()
    results = publisher.publish(_records(exchange, bodies[1:]))
    publisher.close()

    assert left_to_pika > 0
    assert [result.status for result in results] == [PublishStatus.CONFIRMED] * 4
    received = rabbit.consume_all(queue, expected=5)
    assert [body for _, _, body in received] == bodies


def test_large_message_goes_to_pika_frame_by_frame(rabbit, amqp_url):
    exchange, queue, publisher = _connected_publisher(rabbit, amqp_url, send_buffer=4096)
    transport = publisher._connection._transport
    body = bytes(range(256)) * 4096

    publisher._channel.basic_publish(exchange=exchange, routing_key="parcel", body=body)
    # pika copies the rest of a chunk after each partial send, so no chunk may be large.
    largest_chunk = max(len(chunk) for chunk in transport._tx_buffers)
    [result] = publisher.publish(_records(exchange, [b"after"]))
    publisher.close()

    assert largest_chunk <= JOIN_MAX_BYTES
    assert result.status is PublishStatus.CONFIRMED
    assert [body for _, _, body in rabbit.consume_all(queue, expected=2)] == [body, b"after"]


def test_transports_other_than_plaintext_use_pikas_buffer():
    assert idle_plaintext_socket(None) is None
    assert idle_plaintext_socket(object()) is None


class Interrupted(Exception):
    """An exception a signal handler raises right after a message was sent."""


class InterruptedOnce(EagerSendConnection):
    """A connection that raises Interrupted once, right after it sent a whole message."""

    armed = True

    def _output_marshaled_frames(self, marshaled_frames: Sequence[bytes]) -> None:
        super()._output_marshaled_frames(marshaled_frames)
        if InterruptedOnce.armed and len(marshaled_frames) == 3:
            InterruptedOnce.armed = False
            raise Interrupted("raised after the message was sent")


def test_interrupted_publish_keeps_confirms_matched(rabbit, amqp_url, monkeypatch):
    exchange = f"{rabbit.organization()}.shop"
    queue = f"{exchange}.full"
    rabbit.queues.add(queue)
    rabbit.exchanges.add(exchange)
    with rabbit.channel() as channel:
        channel.exchange_declare(exchange, exchange_type="topic", durable=True)
        # The queue takes one message and nacks every later one.
        channel.queue_declare(queue, arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
        channel.queue_bind(queue, exchange, routing_key="#")
    monkeypatch.setattr(InterruptedOnce, "armed", True)
    monkeypatch.setattr(outbox.rabbitmq, "EagerSendConnection", InterruptedOnce)
    publisher = RabbitMqConnector(amqp_url).publisher()
    publisher.declare_exchange(exchange)
    [sent, refused] = _records(exchange, [b"sent", b"refused"])

    with pytest.raises(Interrupted):
        publisher.publish([sent])
    [result] = publisher.publish([refused])
    publisher.close()

    assert result.status is PublishStatus.NACKED
    assert [body for _, _, body in rabbit.consume_all(queue, expected=1)] == [b"sent"]


class InterruptedHandOff(EagerSendConnection):
    """A connection that raises Interrupted once, after a partial send and before buffering the rest."""

    armed = True

    def _adapter_emit_data(self, data: bytes) -> None:
        if InterruptedHandOff.armed:
            InterruptedHandOff.armed = False
            raise Interrupted("raised after a partial send, before the rest was buffered")
        super()._adapter_emit_data(data)


def test_torn_frame_closes_the_connection(rabbit, amqp_url, monkeypatch):
    monkeypatch.setattr(InterruptedHandOff, "armed", True)
    monkeypatch.setattr(outbox.rabbitmq, "EagerSendConnection", InterruptedHandOff)
    exchange, queue, publisher = _connected_publisher(rabbit, amqp_url, send_buffer=4096)
    torn_connection = publisher._connection
    # 0xCE ends an AMQP frame: on the torn connection these bytes would complete the
    # frame cut short, and RabbitMQ would route it with a body made of both messages.
    torn, filler = _records(exchange, [b"A" * 100_000, b"\xce" * 300_000])

    with pytest.raises(Interrupted):
        publisher.publish([torn])
    [result] = publisher.publish([filler])
    publisher.close()

    assert torn_connection.is_closed
    assert result.status is PublishStatus.CONFIRMED
    received = {
        properties.message_id: body for _, properties, body in rabbit.consume_all(queue, expected=1)
    }
    assert received == {filler.message_id: filler.body}
