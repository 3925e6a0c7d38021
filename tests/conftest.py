from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pika
import pytest
import redis
from hypothesis import HealthCheck, settings

from tests.servers import session_redis_url

settings.register_profile(
    "dev", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow],
    derandomize=False, print_blob=True,
)
settings.register_profile(
    "soak", max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck)
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))

AMQP_URL = os.environ.get("OUTBOX_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
RUN_ID = uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a Redis server private to this test session."""
    with session_redis_url() as url:
        yield url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client of the private Redis, emptied before each test; the server holds only test data."""
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    yield client
    client.close()


class RabbitNames:
    """Creates exchange and queue names unique to this run and deletes them afterwards."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.exchanges: set[str] = set()
        self.queues: set[str] = set()
        self.counter = 0

    def organization(self) -> str:
        """Return an organization name unique to the run; its exchanges are deleted afterwards."""
        self.counter += 1
        return f"outbox-test-{RUN_ID}-{self.counter}"

    def track_exchange(self, name: str) -> str:
        self.exchanges.add(name)
        return name

    def bind_queue(self, exchange: str, binding_key: str = "#") -> str:
        """Declare the topic exchange and a queue bound to it; return the queue name."""
        self.counter += 1
        queue = f"outbox-test-{RUN_ID}-q{self.counter}"
        self.exchanges.add(exchange)
        self.queues.add(queue)
        with self.channel() as channel:
            channel.exchange_declare(exchange, exchange_type="topic", durable=True)
            channel.queue_declare(queue, durable=False, auto_delete=False)
            channel.queue_bind(queue, exchange, routing_key=binding_key)
        return queue

    def channel(self) -> Any:
        connection = pika.BlockingConnection(pika.URLParameters(self.url))
        return _ClosingChannel(connection)

    def consume_all(self, queue: str, *, expected: int, timeout_s: float = 30.0) -> list[Any]:
        """Read messages from a queue until ``expected`` arrived and the queue stays empty briefly."""
        import time

        received: list[Any] = []
        with self.channel() as channel:
            deadline = time.monotonic() + timeout_s
            quiet_since: float | None = None
            while time.monotonic() < deadline:
                method, properties, body = channel.basic_get(queue, auto_ack=True)
                if method is None:
                    if len(received) >= expected:
                        quiet_since = quiet_since or time.monotonic()
                        if time.monotonic() - quiet_since > 0.3:
                            break
                    time.sleep(0.01)
                    continue
                quiet_since = None
                received.append((method, properties, body))
        return received

    def cleanup(self) -> None:
        with self.channel() as channel:
            for queue in self.queues:
                channel.queue_delete(queue)
            for exchange in self.exchanges:
                channel.exchange_delete(exchange)


class _ClosingChannel:
    def __init__(self, connection: pika.BlockingConnection) -> None:
        self.connection = connection

    def __enter__(self) -> Any:
        return self.connection.channel()

    def __exit__(self, *exc: object) -> None:
        if self.connection.is_open:
            self.connection.close()


@pytest.fixture
def rabbit() -> Iterator[RabbitNames]:
    """Names on the shared RabbitMQ unique to this run, deleted after the test."""
    names = RabbitNames(AMQP_URL)
    yield names
    names.cleanup()


@pytest.fixture(scope="session")
def amqp_url() -> str:
    return AMQP_URL
