"""Commit-to-consumer latency of transactional mode, with the drainer in daemon mode.

Each message is committed with its state change in one MULTI/EXEC (OutboxDomainEventBus),
one at a time with a pause between commits, as on an idle system; a consumer records when
it receives each message id. The baseline is pika alone: the same bodies published with
confirms straight to the same queue, timed from the publish call to the consumer.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import pika
import redis

from bench.env import RabbitScope
from outbox import OutboxDomainEventBus, RabbitMqConnector
from outbox.drain import Drainer, DrainSettings
from outbox.messages import DomainEvent
from outbox.rabbitmq import properties_for
from outbox.records import record_for

# Pause between two commits: the drainer is idle and blocked in Redis when each one lands.
PAUSE_S = 0.02


class CounterChanged(DomainEvent):
    """The event committed with each counter change."""

    value: int


@dataclass
class Latency:
    """Median and 99th percentile of one side's commit-to-consumer times, in milliseconds."""

    name: str
    count: int
    median_ms: float
    p99_ms: float
    baseline_median_ms: float
    baseline_p99_ms: float

    def markdown_row(self) -> str:
        return (
            f"| {self.name} | {self.count:,} | {self.median_ms:.1f} ms | {self.p99_ms:.1f} ms | "
            f"{self.baseline_median_ms:.1f} ms | {self.baseline_p99_ms:.1f} ms |"
        )


MARKDOWN_HEADER = (
    "| figure | messages | median | p99 | pika alone: median | pika alone: p99 |\n"
    "| --- | ---: | ---: | ---: | ---: | ---: |"
)


class _Consumer:
    """Consumes a queue on its own connection and thread, recording arrival times by id."""

    def __init__(self, url: str, queue: str) -> None:
        self.arrived: dict[str, float] = {}
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(url, queue), daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the latency consumer did not start within 10 s")

    def _run(self, url: str, queue: str) -> None:
        connection = pika.BlockingConnection(pika.URLParameters(url))
        channel = connection.channel()

        def on_message(
            ch: object, method: object, properties: pika.BasicProperties, body: bytes
        ) -> None:
            self.arrived[properties.message_id] = time.perf_counter()

        channel.basic_consume(queue, on_message, auto_ack=True)
        self._ready.set()
        while not self._stop.is_set():
            connection.process_data_events(time_limit=0.01)
        connection.close()

    def wait_for(self, ids: list[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not all(i in self.arrived for i in ids):
            time.sleep(0.005)
        missing = [i for i in ids if i not in self.arrived]
        if missing:
            raise RuntimeError(f"{len(missing)} messages did not arrive within {timeout_s} s")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _quantiles(samples_ms: list[float]) -> tuple[float, float]:
    ordered = sorted(samples_ms)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return statistics.median(ordered), p99


def run(
    client: redis.Redis,
    rabbit: RabbitScope,
    amqp_url: str,
    *,
    count: int = 300,
    log: Callable[[str], None] = print,
) -> Latency:
    """Measure commit-to-consumer latency of ``count`` transactional messages and the baseline."""
    organization = rabbit.organization("latency")
    queue = rabbit.bound_queue(f"{organization}.counter")
    bus = OutboxDomainEventBus(organization, "counter", client)
    drainer = Drainer(
        client, RabbitMqConnector(amqp_url), DrainSettings(outboxes=[bus.outbox.name])
    )
    consumer = _Consumer(amqp_url, queue)
    thread = threading.Thread(target=drainer.run_forever, daemon=True)
    thread.start()
    try:
        time.sleep(1.2)  # the drainer is now idle, blocked on the empty pending list
        committed: dict[str, float] = {}
        for value in range(count):
            event = CounterChanged(value=value)
            with client.pipeline(transaction=True) as pipe:
                pipe.incr(f"{organization}:counter")
                bus.publish(event, transaction=pipe)
                pipe.execute()
            committed[event.id] = time.perf_counter()
            time.sleep(PAUSE_S)
        consumer.wait_for(list(committed), timeout_s=30)
        outbox_ms = [(consumer.arrived[i] - t) * 1000 for i, t in committed.items()]
    finally:
        drainer.stopping.set()
        thread.join(timeout=10)
        drainer.close()

    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    channel.confirm_delivery()
    published: dict[str, float] = {}
    try:
        for value in range(count):
            record = record_for(
                CounterChanged(value=value), organization=organization, service="counter"
            )
            started = time.perf_counter()
            channel.basic_publish(
                record.exchange,
                record.routing_key,
                record.body,
                properties_for(record),
                mandatory=True,
            )
            published[record.message_id] = started
            time.sleep(PAUSE_S)
        consumer.wait_for(list(published), timeout_s=30)
    finally:
        connection.close()
        consumer.stop()
    baseline_ms = [(consumer.arrived[i] - t) * 1000 for i, t in published.items()]

    median, p99 = _quantiles(outbox_ms)
    base_median, base_p99 = _quantiles(baseline_ms)
    log(
        f"  latency: transactional median {median:.1f} ms, p99 {p99:.1f} ms; "
        f"pika alone median {base_median:.1f} ms, p99 {base_p99:.1f} ms"
    )
    return Latency(
        "commit to consumer, transactional mode, daemon drainer",
        count,
        median,
        p99,
        base_median,
        base_p99,
    )
