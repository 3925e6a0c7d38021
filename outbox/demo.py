"""The main job end to end, on local Redis and RabbitMQ: ``python -m outbox.demo``.

1. publishes events through a RabbitMQ bus whose broker address is a closed port, so
   every event lands in the Redis outbox;
2. drains the outbox with ``python -m outbox.drain --once`` into the real RabbitMQ;
3. consumes the events from a queue and checks every id arrived.

It uses an organization name unique to the run and deletes the exchange, the queue and
the outbox keys it created; it touches nothing else.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
import uuid

import pika
import redis

from outbox import RabbitMqConnector, RabbitMqDomainEventBus, RedisDomainEventBus
from outbox.messages import DomainEvent
from outbox.naming import REGISTRY_KEY, OutboxKeys


class UserCreated(DomainEvent):
    """The event the demo publishes."""

    user_id: str
    email: str


def closed_port() -> int:
    """Return a loopback port that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def ensure_services(redis_port: int, amqp_port: int) -> None:
    """Start redis-server or rabbitmq-server when installed and not running."""
    if not port_open(redis_port) and shutil.which("redis-server"):
        print(f"Starting redis-server on port {redis_port}")
        subprocess.run(
            [
                "redis-server",
                "--port",
                str(redis_port),
                "--bind",
                "127.0.0.1",
                "--daemonize",
                "yes",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    if not port_open(amqp_port) and shutil.which("rabbitmq-server"):
        print("Starting rabbitmq-server (this takes a few seconds)")
        subprocess.run(["rabbitmq-server", "-detached"], check=True, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while not (port_open(redis_port) and port_open(amqp_port)):
        if time.monotonic() > deadline:
            raise SystemExit(
                f"error: Redis on port {redis_port} or RabbitMQ on port {amqp_port} is not "
                "reachable; start them and run the demo again"
            )
        time.sleep(0.5)


def show_stats(redis_url: str, outbox: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "outbox", "stats", "--redis-url", redis_url, "--outbox", outbox],
        check=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m outbox.demo", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--count", type=int, default=10_000, help="events to publish (default %(default)s)"
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    args = parser.parse_args()

    redis_client = redis.Redis.from_url(args.redis_url)
    amqp = pika.URLParameters(args.amqp_url)
    ensure_services(redis_client.connection_pool.connection_kwargs.get("port", 6379), amqp.port)

    organization = f"demo-{uuid.uuid4().hex[:8]}"
    service = "registration"
    exchange = f"{organization}.{service}"
    queue = f"{exchange}.all"
    outbox_keys = OutboxKeys.for_outbox(f"{exchange}.events")

    connection = pika.BlockingConnection(amqp)
    channel = connection.channel()
    try:
        channel.exchange_declare(exchange, exchange_type="topic", durable=True)
        channel.queue_declare(queue, durable=True)
        channel.queue_bind(queue, exchange, routing_key="#")

        unreachable = RabbitMqConnector(f"amqp://guest:guest@127.0.0.1:{closed_port()}/%2F")
        bus = RabbitMqDomainEventBus(
            organization,
            service,
            unreachable,
            fallback=RedisDomainEventBus(organization, service, redis_client),
        )
        print(f"Publishing {args.count} events to {exchange} with RabbitMQ unreachable...")
        started = time.monotonic()
        ids = set()
        for number in range(args.count):
            event = UserCreated(user_id=f"user-{number}", email=f"user{number}@example.com")
            bus.publish(event)
            ids.add(event.id)
        print(f"  done in {time.monotonic() - started:.1f} s; the outbox now holds them:")
        show_stats(args.redis_url, outbox_keys.name)

        print(f"\nDraining with: python -m outbox.drain --once --outbox {outbox_keys.name}")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "outbox.drain",
                "--once",
                "--redis-url",
                args.redis_url,
                "--amqp-url",
                args.amqp_url,
                "--outbox",
                outbox_keys.name,
            ],
            check=True,
        )
        show_stats(args.redis_url, outbox_keys.name)

        received: dict[str, int] = {}
        while True:
            method, properties, _body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                break
            received[properties.message_id] = received.get(properties.message_id, 0) + 1
        missing = ids - received.keys()
        copies = sum(received.values()) - len(received)
        print(
            f"\nQueue {queue} received {sum(received.values())} messages: "
            f"{len(ids & received.keys())} of {len(ids)} ids, {len(missing)} missing, "
            f"{copies} duplicates"
        )
        return 0 if not missing else 1
    finally:
        channel.queue_delete(queue)
        channel.exchange_delete(exchange)
        connection.close()
        redis_client.delete(
            *(
                getattr(outbox_keys, part)
                for part in (
                    "pending",
                    "leased",
                    "tokens",
                    "payloads",
                    "attempts",
                    "errors",
                    "dead",
                    "sequence",
                )
            )
        )
        # The bus registered the outbox for drainers; the set goes away once empty.
        redis_client.srem(REGISTRY_KEY, outbox_keys.name)


if __name__ == "__main__":
    raise SystemExit(main())
