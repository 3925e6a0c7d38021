"""The publisher's connection sends each message at once, and in full when the socket takes only part."""

from __future__ import annotations

import socket
from collections.abc import Sequence

import pytest

import outbox.rabbitmq
from outbox import RabbitMqConnector
from outbox._sending import EagerSendConnection, idle_plaintext_socket
from outbox.rabbitmq import PublishStatus
from outbox.records import OutboxRecord


def _records(exchange: str, bodies: list[bytes]) -> list[OutboxRecord]:
    return [
        OutboxRecord(exchange=exchange, routing_key="parcel", body=body, message_id=f"m{n}")
        for n, body in enumerate(bodies)
    ]


def test_message_leaves_before_the_next_poll(rabbit, amqp_url):
    exchange = f"{rabbit.organization()}.shop"
    queue = rabbit.bind_queue(exchange)
    publisher = RabbitMqConnector(amqp_url).publisher()
    publisher.declare_exchange(exchange)
    transport = publisher._connection._transport
    assert idle_plaintext_socket(transport) is not None

    publisher._channel.basic_publish(exchange=exchange, routing_key="parcel", body=b"now")
    buffered = transport.get_write_buffer_size()
    publisher.close()

    assert buffered == 0
    [(_, _, body)] = rabbit.consume_all(queue, expected=1)
    assert body == b"now"


def test_large_bodies_arrive_whole_in_order(rabbit, amqp_url):
    exchange = f"{rabbit.organization()}.shop"
    queue = rabbit.bind_queue(exchange)
    publisher = RabbitMqConnector(amqp_url).publisher()
    publisher.declare_exchange(exchange)
    sock = idle_plaintext_socket(publisher._connection._transport)
    assert sock is not None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    bodies = [bytes([n]) * (300_000 + n) for n in range(4)] + [b"small"]

    publisher._channel.basic_publish(exchange=exchange, routing_key="parcel", body=bodies[0])
    left_to_pika = publisher._connection._transport.get_write_buffer_size()
    results = publisher.publish(_records(exchange, bodies[1:]))
    publisher.close()

    assert left_to_pika > 0
    assert [result.status for result in results] == [PublishStatus.CONFIRMED] * 4
    received = rabbit.consume_all(queue, expected=5)
    assert [body for _, _, body in received] == bodies


def test_transports_other_than_plaintext_use_pikas_buffer():
    assert idle_plaintext_socket(None) is None
    assert idle_plaintext_socket(object()) is None


class Interrupted(Exception):
    """An exception a signal handler raises right after a message was sent."""


class InterruptedOnce(EagerSendConnection):
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
        channel.queue_declare(
            queue, arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
        )
        channel.queue_bind(queue, exchange, routing_key="#")
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
