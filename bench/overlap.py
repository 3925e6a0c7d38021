"""A what-if prototype for ``--overlap-prototype``: a drainer that overlaps Redis and RabbitMQ.

The Drainer works in lockstep: claim batch k, publish it, wait for its confirms, ack it,
and only then claim batch k+1, so RabbitMQ idles during both Redis calls. This prototype
claims batch k+1 and acks batch k in one helper thread while the calling thread publishes
batch k and waits for its confirms (redis-py releases the GIL while it waits on the socket).
It measures what the proposal in docs/benchmarks.md could gain; it is not production code:
it neither releases nor buries what RabbitMQ did not confirm, it raises instead.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from outbox import Outbox, RabbitMqConnector
from outbox.records import decode_record
from outbox.store import Claim


class OverlappedDrainer:
    def __init__(
        self, redis: Any, amqp_url: str, outbox: str, *, batch_size: int, lease_ms: int = 30_000
    ) -> None:
        self.outbox = Outbox(redis, outbox)
        self.batch_size = batch_size
        self.lease_ms = lease_ms
        self.publisher = RabbitMqConnector(amqp_url, confirm_timeout_s=30.0).publisher()
        self.helper = ThreadPoolExecutor(1, thread_name_prefix="overlap-redis")
        self._next_claim: Future[Claim] | None = None
        self._last_ack: Future[list[bool]] | None = None

    def _claim(self) -> Future[Claim]:
        return self.helper.submit(
            self.outbox.claim, batch_size=self.batch_size, lease_ms=self.lease_ms
        )

    def drain(self, count: int) -> float:
        """Publish ``count`` entries (whole batches); return the seconds taken."""
        handled = 0
        started = time.perf_counter()
        if self._next_claim is None:
            self._next_claim = self._claim()
        while handled < count:
            leases = self._next_claim.result().leases
            if not leases:
                raise RuntimeError(f"the outbox ran dry after {handled} of {count} entries")
            # Batch k+1 is claimed while batch k is published and confirmed.
            self._next_claim = self._claim()
            results = self.publisher.publish([decode_record(lease.payload) for lease in leases])
            if not all(result.confirmed for result in results):
                raise RuntimeError("RabbitMQ did not confirm every message of a batch")
            # Batch k is acked while batch k+1 is published (the helper runs in order).
            self._last_ack = self.helper.submit(self.outbox.ack, leases)
            handled += len(leases)
        return time.perf_counter() - started

    def close(self) -> None:
        try:
            if self._last_ack is not None and not all(self._last_ack.result()):
                raise RuntimeError("some acks found their lease gone")
            if self._next_claim is not None:
                leftover = self._next_claim.result().leases
                if leftover:
                    self.outbox.release(leftover, refund=True)
        finally:
            self.helper.shutdown()
            self.publisher.close()
