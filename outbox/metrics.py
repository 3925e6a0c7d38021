"""Prometheus metrics of the drainer, served by ``python -m outbox.drain --metrics-port``.

Counters are updated as the drainer works; the outbox gauges are read from Redis when
Prometheus scrapes, so they are as fresh as the scrape.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from outbox.errors import OutboxError
from outbox.records import decode_record
from outbox.store import Outbox

logger = logging.getLogger(__name__)

# Batch publish times range from a few milliseconds to the confirm timeout.
_PUBLISH_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class DrainMetrics:
    """Counters and histograms of one drainer, in their own registry."""

    def __init__(self, outboxes: Callable[[], list[Outbox]]) -> None:
        self.registry = CollectorRegistry()
        self.published = Counter(
            "outbox_published",
            "Messages published and confirmed by RabbitMQ.",
            ["outbox"],
            registry=self.registry,
        )
        self.failed = Counter(
            "outbox_failed",
            "Publishes that failed; kind is broker (attempt refunded) or message.",
            ["outbox", "kind"],
            registry=self.registry,
        )
        self.dead_lettered = Counter(
            "outbox_dead_lettered",
            "Entries moved to the dead letters.",
            ["outbox"],
            registry=self.registry,
        )
        self.lost_leases = Counter(
            "outbox_lost_leases",
            "Confirmed messages whose lease expired before the ack; they are published again.",
            ["outbox"],
            registry=self.registry,
        )
        self.publish_seconds = Histogram(
            "outbox_publish_seconds",
            "Time to publish one batch and receive all its confirms, in seconds.",
            ["outbox"],
            buckets=_PUBLISH_BUCKETS_S,
            registry=self.registry,
        )
        self.registry.register(_OutboxCollector(outboxes))

    def serve(self, port: int, address: str) -> None:
        """Serve ``/metrics`` over HTTP from a daemon thread."""
        start_http_server(port, addr=address, registry=self.registry)
        logger.info("Serving Prometheus metrics on %s:%d", address, port)


class _OutboxCollector(Collector):
    """Reads pending, leased, waiting and dead counts and the oldest pending age at scrape time."""

    def __init__(self, outboxes: Callable[[], list[Outbox]]) -> None:
        self._outboxes = outboxes

    def describe(self) -> list[Any]:
        # Describing nothing keeps registration from scraping Redis.
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauges = {
            state: GaugeMetricFamily(
                f"outbox_{state}", f"Entries {state} in the outbox.", labels=["outbox"]
            )
            for state in ("pending", "leased", "waiting", "dead")
        }
        oldest = GaugeMetricFamily(
            "outbox_oldest_pending_age_seconds",
            "Age of the oldest pending entry, from its store time to Redis server time.",
            labels=["outbox"],
        )
        for outbox in self._outboxes():
            try:
                stats = outbox.stats()
                tail = outbox.client.lindex(outbox.keys.pending, -1)
            except OutboxError as exc:
                logger.warning("Reading metrics of outbox %s failed: %s", outbox.name, exc)
                continue
            except Exception as exc:  # a scrape must not break on Redis errors
                logger.warning("Reading metrics of outbox %s failed: %s", outbox.name, exc)
                continue
            for state, gauge in gauges.items():
                gauge.add_metric([outbox.name], getattr(stats, state))
            oldest.add_metric([outbox.name], _age_s(tail, stats.server_time_ms))
        yield from gauges.values()
        yield oldest


def _age_s(entry: bytes | None, now_ms: int) -> float:
    if not entry:
        return 0.0
    try:
        stored_at_ms = decode_record(entry).stored_at_ms
    except OutboxError:
        return 0.0
    if stored_at_ms <= 0:
        return 0.0
    return max(0.0, (now_ms - stored_at_ms) / 1000)
