"""The drainer: republishes what outboxes hold, then acknowledges it in Redis.

Each round claims one batch per outbox (expired leases first), publishes the batch with
confirms, acks what RabbitMQ confirmed and releases or buries the rest. A drainer killed
at any point leaves its leases to expire; any other drainer then claims them again.

Run it with ``python -m outbox.drain``; ``--help`` lists the options.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import msgspec
import redis.exceptions as redis_errors

from outbox.errors import (
    BrokerError,
    OutboxConfigError,
    RecordDecodeError,
    StoreError,
    StoreFullError,
    StoreReadOnlyError,
    StoreUnavailableError,
)
from outbox.partitions import covers
from outbox.rabbitmq import (
    DEFAULT_MAX_MESSAGE_BYTES,
    ConfirmingPublisher,
    PublishStatus,
    RabbitMqConnector,
    check_max_message_bytes,
)
from outbox.records import OutboxRecord, decode_record
from outbox.store import (
    DEFAULT_MAX_ATTEMPTS,
    Claim,
    Lease,
    Outbox,
    discover_outboxes,
    registered_outboxes,
)

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 500
DEFAULT_LEASE_MS = 30_000
# A message that failed by itself (unroutable, too large) waits this long before its next try.
DEFAULT_RETRY_DELAY_MS = 1_000
# Maximum lease and retry delay. Longer values are mistakes that would hide messages for days.
_DAY_MS = 86_400_000
_IDLE_WAIT_MIN_S = 0.05
_IDLE_WAIT_MAX_S = 0.5
_BACKOFF_MIN_S = 0.5
_BACKOFF_MAX_S = 30.0
# The outbox registry is read this often, the whole keyspace scanned far less often.
_READ_REGISTRY_EVERY_S = 1.0
_SCAN_KEYSPACE_EVERY_S = 60.0
# An outbox whose keys Redis rejects is reported at most this often.
_BROKEN_REPORT_EVERY_S = 60.0
# Maximum time blocked in Redis while waiting for entries; a stop request waits at most this.
_BLOCK_S = 1.0


@dataclass
class DrainCounts:
    """Counts of the work one drainer did since it started."""

    published: int = 0
    failed: int = 0
    dead_lettered: int = 0
    lost_leases: int = 0

    def add(self, other: DrainCounts) -> None:
        self.published += other.published
        self.failed += other.failed
        self.dead_lettered += other.dead_lettered
        self.lost_leases += other.lost_leases


@dataclass
class DrainSettings:
    """Settings of a drainer's claims and retries; see ``python -m outbox.drain --help``."""

    batch_size: int = DEFAULT_BATCH_SIZE
    lease_ms: int = DEFAULT_LEASE_MS
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    retry_delay_ms: int = DEFAULT_RETRY_DELAY_MS
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    outboxes: Sequence[str] = field(default_factory=tuple)
    # petisco's Redis lists moved into outboxes of the same name before every round.
    petisco_keys: Sequence[str] = field(default_factory=tuple)

    def check(self) -> None:
        if not 1 <= self.batch_size <= 10_000:
            raise OutboxConfigError(
                f"batch size must be between 1 and 10000, got {self.batch_size}"
            )
        if not 100 <= self.lease_ms <= _DAY_MS:
            raise OutboxConfigError(
                f"lease must be from 100 ms to one day ({_DAY_MS} ms), got {self.lease_ms}"
            )
        if self.max_attempts < 1:
            raise OutboxConfigError(f"max attempts must be at least 1, got {self.max_attempts}")
        if not 0 <= self.retry_delay_ms <= _DAY_MS:
            raise OutboxConfigError(
                f"retry delay must be from 0 to one day ({_DAY_MS} ms), got {self.retry_delay_ms}"
            )
        check_max_message_bytes(self.max_message_bytes)


class Drainer:
    """Moves messages from Redis outboxes to RabbitMQ, one batch per outbox at a time."""

    def __init__(
        self,
        redis: Any,
        connector: RabbitMqConnector,
        settings: DrainSettings | None = None,
    ) -> None:
        self.redis = redis
        self.connector = connector
        self.settings = settings or DrainSettings()
        self.settings.check()
        # Leases are renewed while a batch waits for its confirms, not while the drainer
        # connects, so a lease shorter than a connect can expire before the publish.
        connect_ms = int(connector.connect_timeout_s * 2000)
        if self.settings.lease_ms <= connect_ms:
            logger.warning(
                "The lease (%d ms) is not longer than twice the connect timeout of %.1f s: leases "
                "can expire while the drainer reconnects to RabbitMQ, which uses up attempts; "
                "raise --lease-ms or lower --connect-timeout-s",
                self.settings.lease_ms,
                connector.connect_timeout_s,
            )
        self.counts = DrainCounts()
        self.stopping = threading.Event()
        self._publisher: ConfirmingPublisher = connector.publisher()
        self._outboxes: dict[str, Outbox] = {}
        self._scanned_at = float("-inf")
        self._registry_read_at = float("-inf")
        self._broker_down: BrokerError | None = None
        self._nacked: BrokerError | None = None
        self._recovering = False
        self._rounds = 0
        self.metrics: Any = None
        # A worker thread claims the next batch of an outbox while the current batch waits
        # for its confirms, and acks a batch while the next one publishes, so RabbitMQ
        # and Redis work at the same time.
        self._redis_worker: ThreadPoolExecutor | None = None
        self._prefetched: dict[str, tuple[float, Future[Claim]]] = {}
        self._acks: list[tuple[Outbox, list[Lease], Future[list[bool]]]] = []
        self._broken_reported: dict[str, float] = {}

    def close(self) -> None:
        """Finish background acks, release batches claimed ahead and close the connections."""
        try:
            self.settle_acks()
            self.release_prefetched()
        finally:
            if self._redis_worker is not None:
                self._redis_worker.shutdown(wait=True)
                self._redis_worker = None
            self._publisher.close()

    def release_prefetched(self) -> None:
        """Give back batches claimed ahead of time, with their attempts refunded."""
        while self._prefetched:
            name, (_, future) = self._prefetched.popitem()
            try:
                claim = future.result()
            except StoreError as exc:
                logger.warning("Claiming ahead on outbox %s failed: %s", name, exc)
                continue
            self._count_dead_lettered(self._outbox(name), claim.dead_lettered)
            if claim.leases:
                self._outbox(name).release(
                    claim.leases, refund=True, error="released unpublished by a stopping drainer"
                )

    def _prefetch(self, outbox: Outbox) -> None:
        if self.stopping.is_set() or outbox.name in self._prefetched:
            return
        future = self._worker().submit(
            outbox.claim, batch_size=self.settings.batch_size, lease_ms=self.settings.lease_ms
        )
        self._prefetched[outbox.name] = (time.monotonic(), future)

    def _claim(self, outbox: Outbox) -> Claim:
        """Return the batch claimed ahead for ``outbox``, renewed when it waited long, or claim now."""
        settings = self.settings
        entry = self._prefetched.pop(outbox.name, None)
        if entry is None:
            return outbox.claim(batch_size=settings.batch_size, lease_ms=settings.lease_ms)
        submitted, future = entry
        claim = future.result()
        waited_ms = (time.monotonic() - submitted) * 1000
        if claim.leases and waited_ms > settings.lease_ms / 3:
            kept = outbox.extend(claim.leases, lease_ms=settings.lease_ms)
            leases = [lease for lease, renewed in zip(claim.leases, kept, strict=True) if renewed]
            expired = len(claim.leases) - len(leases)
            if expired:
                self._count_lost(outbox, expired)
                logger.warning(
                    "%d leases of outbox %s claimed ahead expired before their turn; the next "
                    "claim takes them back",
                    expired,
                    outbox.name,
                )
            claim = claim._replace(leases=leases)
        return claim

    def _ack_in_background(self, outbox: Outbox, leases: list[Lease]) -> None:
        """Ack confirmed leases on the worker thread while the next batch publishes.

        The previous ack is finished first, so at most two published batches are unacked
        at any moment: the one being acked and the one being published.
        """
        self.settle_acks()
        self._acks.append((outbox, leases, self._worker().submit(outbox.ack, leases)))

    def settle_acks(self) -> None:
        """Wait for the acks running in the background and report leases that expired first."""
        while self._acks:
            outbox, leases, future = self._acks.pop(0)
            try:
                acked = future.result()
            except StoreError as exc:
                self._count_lost(outbox, len(leases))
                logger.warning(
                    "Acking %d published entries of outbox %s failed; they will be published "
                    "again when their leases expire: %s",
                    len(leases),
                    outbox.name,
                    exc,
                )
                continue
            lost = acked.count(False)
            if lost:
                self._count_lost(outbox, lost)
                logger.warning(
                    "%d leases of outbox %s expired before their ack; those messages will be "
                    "published again (same message_id)",
                    lost,
                    outbox.name,
                )

    def _report_broken(self, outbox: Outbox, error: StoreError) -> None:
        now = time.monotonic()
        if now - self._broken_reported.get(outbox.name, float("-inf")) < _BROKEN_REPORT_EVERY_S:
            return
        self._broken_reported[outbox.name] = now
        logger.error(
            "Skipping outbox %s, whose keys Redis rejects (reported again in %.0f s if it "
            "persists); fix or delete them: %s",
            outbox.name,
            _BROKEN_REPORT_EVERY_S,
            error,
        )

    def _count_lost(self, outbox: Outbox, count: int) -> None:
        self.counts.lost_leases += count
        if self.metrics is not None:
            self.metrics.lost_leases.labels(outbox.name).inc(count)

    def _worker(self) -> ThreadPoolExecutor:
        if self._redis_worker is None:
            self._redis_worker = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="outbox-redis"
            )
        return self._redis_worker

    def _count_dead_lettered(self, outbox: Outbox, count: int) -> None:
        if not count:
            return
        self.counts.dead_lettered += count
        if self.metrics is not None:
            self.metrics.dead_lettered.labels(outbox.name).inc(count)
        logger.warning(
            "Dead-lettered %d entries of outbox %s after %d attempts each",
            count,
            outbox.name,
            self.settings.max_attempts,
        )

    def serve_metrics(self, port: int, address: str = "0.0.0.0") -> None:
        """Serve Prometheus metrics on ``address:port`` while the drainer runs."""
        from outbox.metrics import DrainMetrics

        self.metrics = DrainMetrics(self.outboxes)
        self.metrics.serve(port, address)

    # Outboxes

    def outboxes(self, *, refresh: bool = False) -> list[Outbox]:
        """Return the outboxes to drain: the configured ones, else every one found in Redis.

        A configured outbox also covers its partitions (``{name}#0``, ``{name}#1``, ...)
        found in Redis, so producers can add partitions without restarting drainers.
        """
        configured: Sequence[str] = self.settings.outboxes
        for name in configured:
            self._outbox(name)
        try:
            found = self._find_outboxes(refresh=refresh)
        except StoreError as exc:
            if not configured:
                raise
            # The configured outboxes can still be drained; new partitions wait.
            logger.warning("Looking for partitions of the configured outboxes failed: %s", exc)
            found = []
        for name in found:
            if not configured or any(covers(base, name) for base in configured):
                self._outbox(name)
        return list(self._outboxes.values())

    def _find_outboxes(self, *, refresh: bool) -> list[str]:
        now = time.monotonic()
        if now - self._scanned_at > _SCAN_KEYSPACE_EVERY_S:
            self._scanned_at = now
            self._registry_read_at = now
            return discover_outboxes(self.redis)
        if refresh or now - self._registry_read_at > _READ_REGISTRY_EVERY_S:
            self._registry_read_at = now
            return registered_outboxes(self.redis)
        return []

    def _outbox(self, name: str) -> Outbox:
        if name not in self._outboxes:
            self._outboxes[name] = Outbox(self.redis, name, max_attempts=self.settings.max_attempts)
        return self._outboxes[name]

    def unfinished(self) -> int:
        """Count entries still pending, leased or waiting in the outboxes drained."""
        self.settle_acks()
        total = 0
        for outbox in self.outboxes(refresh=True):
            try:
                total += outbox.stats().unfinished
            except (StoreUnavailableError, StoreReadOnlyError, StoreFullError):
                raise
            except StoreError as exc:
                self._report_broken(outbox, exc)
        return total

    # Draining

    def drain_once(
        self,
        *,
        max_outage_s: float = 10.0,
        on_progress: Callable[[DrainCounts], None] | None = None,
    ) -> bool:
        """Drain until no outbox contains unfinished entries.

        Entries leased by other drainers are waited for: taken back when their lease
        expires, or left to their drainer when it acks them. Returns False when RabbitMQ
        kept failing for ``max_outage_s`` seconds; the entries then stay in the outboxes.
        """
        idle_wait = _IDLE_WAIT_MIN_S
        backoff = _BACKOFF_MIN_S
        outage_since: float | None = None
        while not self.stopping.is_set():
            published_before = self.counts.published
            handled = self.run_round()
            if on_progress is not None:
                on_progress(self.counts)
            # Nacks stop a one-off drain too when nothing else goes out, or a queue that
            # refuses every publish would keep it retrying forever.
            nothing_published = self.counts.published == published_before
            failure = self._broker_down or (self._nacked if nothing_published else None)
            if failure is not None:
                now = time.monotonic()
                outage_since = outage_since if outage_since is not None else now
                if now - outage_since >= max_outage_s:
                    logger.error(
                        "RabbitMQ kept failing for %.1f s, giving up: %s",
                        max_outage_s,
                        failure,
                    )
                    self.settle_acks()
                    self.release_prefetched()
                    return False
                logger.warning("RabbitMQ failed, retrying in %.1f s: %s", backoff, failure)
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX_S)
                continue
            outage_since = None
            backoff = _BACKOFF_MIN_S
            if handled:
                idle_wait = _IDLE_WAIT_MIN_S
                continue
            if self.unfinished() == 0:
                return True
            self.wait_for_entries(idle_wait)
            idle_wait = min(idle_wait * 2, _IDLE_WAIT_MAX_S)
        return True

    def run_forever(self) -> None:
        """Drain until :attr:`stopping` is set.

        While RabbitMQ or Redis is unavailable the drainer backs off, with jitter, up to
        _BACKOFF_MAX_S between tries, and logs each outage once when it starts and once
        when it ends.
        """
        idle_wait = _IDLE_WAIT_MIN_S
        backoff = _BACKOFF_MIN_S
        redis_error: StoreError | None = None
        while not self.stopping.is_set():
            try:
                published_before = self.counts.published
                handled = self.run_round()
            except StoreError as exc:
                if redis_error is None:
                    logger.warning(
                        "Redis is unavailable, retrying with backoff up to %.0f s: %s",
                        _BACKOFF_MAX_S,
                        exc,
                    )
                redis_error = exc
                self.stopping.wait(backoff * (0.5 + random.random() / 2))
                backoff = min(backoff * 2, _BACKOFF_MAX_S)
                continue
            if redis_error is not None:
                logger.info("Redis responds again; draining resumed")
                redis_error = None
            if self._broker_down is not None:
                if not self._recovering:
                    logger.warning(
                        "RabbitMQ is unavailable, retrying with backoff up to %.0f s: %s",
                        _BACKOFF_MAX_S,
                        self._broker_down,
                    )
                self._recovering = True
                self.stopping.wait(backoff * (0.5 + random.random() / 2))
                backoff = min(backoff * 2, _BACKOFF_MAX_S)
                continue
            if self._recovering and self.counts.published > published_before:
                logger.info("RabbitMQ confirms publishes again; draining resumed")
                self._recovering = False
            backoff = _BACKOFF_MIN_S
            if handled:
                idle_wait = _IDLE_WAIT_MIN_S
                continue
            self.wait_for_entries(idle_wait)
            idle_wait = min(idle_wait * 2, _IDLE_WAIT_MAX_S)

    def wait_for_entries(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for new entries, returning early when one arrives.

        With one outbox the wait blocks in Redis (BLMOVE of the pending list onto
        itself, which leaves the list unchanged) and wakes as soon as a producer pushes.
        With several, it sleeps ``timeout_s``, which stays at most _IDLE_WAIT_MAX_S.
        """
        try:
            outboxes = self.outboxes()
        except StoreError as exc:
            logger.debug("Looking for outboxes failed while idle: %s", exc)
            outboxes = []
        if len(outboxes) != 1:
            self.stopping.wait(timeout_s)
            return
        pending = outboxes[0].keys.pending
        try:
            self.redis.blmove(pending, pending, _BLOCK_S, "RIGHT", "RIGHT")
        except redis_errors.RedisError as exc:
            logger.debug("Waiting on outbox %s failed: %s", outboxes[0].name, exc)
            self.stopping.wait(timeout_s)

    def _adopt_petisco_lists(self) -> int:
        from outbox.adopt import adopt_petisco_lists

        moved = adopt_petisco_lists(
            self.redis, event_keys=self.settings.petisco_keys, command_keys=()
        )
        for name in moved:
            self._outbox(name)
        return sum(moved.values())

    def run_round(self) -> int:
        """Claim and process one batch of every outbox; return how many entries were handled.

        Each round starts one outbox further along, so no outbox is always served last,
        and a busy outbox gets one batch a round like the others.
        """
        handled = 0
        self._broker_down = None
        self._nacked = None
        if self.settings.petisco_keys:
            handled += self._adopt_petisco_lists()
        outboxes = self.outboxes()
        if outboxes:
            start = self._rounds % len(outboxes)
            outboxes = outboxes[start:] + outboxes[:start]
        self._rounds += 1
        for outbox in outboxes:
            if self.stopping.is_set() or self._broker_down is not None:
                break
            try:
                handled += self.drain_batch(outbox)
            except (StoreUnavailableError, StoreReadOnlyError, StoreFullError):
                raise
            except StoreError as exc:
                # An error of this outbox alone, such as a key of the wrong type: the
                # other outboxes keep draining.
                self._report_broken(outbox, exc)
        if self.stopping.is_set() or self._broker_down is not None:
            self.settle_acks()
            self.release_prefetched()
        return handled

    def drain_batch(self, outbox: Outbox) -> int:
        """Claim one batch of ``outbox`` and publish it; return the number of entries claimed."""
        claim = self._claim(outbox)
        self._count_dead_lettered(outbox, claim.dead_lettered)
        if not claim.leases:
            return claim.dead_lettered
        # A full batch suggests more entries wait; claim them while this batch publishes.
        # Only a drainer with one outbox does: with several, a batch claimed ahead would
        # wait a whole round for its turn and its leases could expire unpublished.
        full = len(claim.leases) >= self.settings.batch_size
        single = len(self._outboxes) == 1
        self._process(outbox, claim.leases, claim.server_time_ms, claim_ahead=full and single)
        return len(claim.leases) + claim.dead_lettered

    def _process(
        self, outbox: Outbox, leases: list[Lease], now_ms: int, *, claim_ahead: bool = False
    ) -> None:
        settings = self.settings
        sendable: list[tuple[Lease, OutboxRecord]] = []
        unpublishable: list[tuple[Lease, str]] = []
        too_large: list[tuple[Lease, str]] = []
        for lease in leases:
            try:
                record = decode_record(lease.payload)
            except RecordDecodeError as exc:
                unpublishable.append((lease, f"cannot decode entry: {exc}"))
                continue
            if record.expiration_ms is not None:
                # The TTL counts from when the producer stored the message, so the
                # broker gets only what is left of it.
                # NOTE: stored_at_ms comes from the producer's clock and now_ms from Redis's.
                left_ms = record.stored_at_ms + record.expiration_ms - now_ms
                if left_ms <= 0:
                    unpublishable.append(
                        (
                            lease,
                            f"message {record.message_id} expired {-left_ms} ms before it "
                            f"could be published (expiration {record.expiration_ms} ms)",
                        )
                    )
                    continue
                record = msgspec.structs.replace(record, expiration_ms=left_ms)
            if len(record.body) > settings.max_message_bytes:
                too_large.append(
                    (
                        lease,
                        f"message {record.message_id} has {len(record.body)} bytes, more "
                        f"than the maximum of {settings.max_message_bytes}",
                    )
                )
                continue
            sendable.append((lease, record))

        for lease, reason in unpublishable:
            # Decoding and expiry give the same result on every attempt, so the entry goes
            # straight to the dead letters.
            if outbox.bury([lease], reason=reason)[0]:
                self.counts.dead_lettered += 1
                if self.metrics is not None:
                    self.metrics.dead_lettered.labels(outbox.name).inc()
                logger.warning(
                    "Dead-lettered entry %s of outbox %s: %s", lease.entry_id, outbox.name, reason
                )
        if too_large:
            self._release_each(outbox, too_large, refund=False)

        if sendable:
            self._publish(outbox, sendable, claim_ahead=claim_ahead)

    def _publish(
        self,
        outbox: Outbox,
        sendable: list[tuple[Lease, OutboxRecord]],
        *,
        claim_ahead: bool = False,
    ) -> None:
        settings = self.settings
        leases = [lease for lease, _ in sendable]
        renew_every_s = settings.lease_ms / 3000

        def renew_leases() -> None:
            kept = outbox.extend(leases, lease_ms=settings.lease_ms)
            logger.debug("Renewed %d of %d leases of outbox %s", sum(kept), len(kept), outbox.name)
            # The batch claimed ahead waits for this one, so its leases are renewed too.
            ahead = self._prefetched.get(outbox.name)
            if ahead is not None and ahead[1].done() and ahead[1].exception() is None:
                ahead_leases = ahead[1].result().leases
                if ahead_leases:
                    outbox.extend(ahead_leases, lease_ms=settings.lease_ms)

        started = time.monotonic()
        if claim_ahead:
            self._prefetch(outbox)
        try:
            results = self._publisher.publish(
                [record for _, record in sendable],
                keepalive=renew_leases,
                keepalive_interval_s=renew_every_s,
            )
        except BrokerError as exc:
            # publish raises only BrokerUnavailableError; any other broker error is taken
            # as an outage too, so the batch keeps its attempts.
            self._broker_down = exc
            self._release_failed(outbox, leases, str(exc), refund=True)
            return
        if self.metrics is not None:
            self.metrics.publish_seconds.labels(outbox.name).observe(time.monotonic() - started)

        confirmed = [
            lease for (lease, _), result in zip(sendable, results, strict=True) if result.confirmed
        ]
        if confirmed:
            self.counts.published += len(confirmed)
            if self.metrics is not None:
                self.metrics.published.labels(outbox.name).inc(len(confirmed))
            self._ack_in_background(outbox, confirmed)
            for (lease, record), result in zip(sendable, results, strict=True):
                if result.confirmed:
                    logger.debug(
                        "Published message %s (entry %s of %s)",
                        record.message_id,
                        lease.entry_id,
                        outbox.name,
                    )

        by_message = [
            (lease, result)
            for (lease, _), result in zip(sendable, results, strict=True)
            if result.status in (PublishStatus.RETURNED, PublishStatus.REJECTED)
        ]
        if by_message:
            self._release_failed(
                outbox,
                [lease for lease, _ in by_message],
                str(by_message[0][1].error),
                refund=False,
            )

        # A nack comes from a queue that refused the message (a length limit with
        # reject-publish, say): the attempt is refunded, but only this outbox waits,
        # for --retry-delay-ms, so the others keep draining.
        nacked = [
            (lease, str(result.error))
            for (lease, _), result in zip(sendable, results, strict=True)
            if result.status is PublishStatus.NACKED
        ]
        if nacked:
            self._nacked = next(
                result.error for result in results if result.status is PublishStatus.NACKED
            )
            self._release_each(outbox, nacked, refund=True, delay_ms=settings.retry_delay_ms)

        by_broker = [
            (lease, result)
            for (lease, _), result in zip(sendable, results, strict=True)
            if result.status is PublishStatus.FAILED
        ]
        if by_broker:
            self._broker_down = by_broker[0][1].error
            self._release_failed(
                outbox, [lease for lease, _ in by_broker], str(by_broker[0][1].error), refund=True
            )

    def _release_failed(
        self, outbox: Outbox, leases: list[Lease], error: str, *, refund: bool
    ) -> None:
        self._release_each(outbox, [(lease, error) for lease in leases], refund=refund)

    def _release_each(
        self,
        outbox: Outbox,
        failures: list[tuple[Lease, str]],
        *,
        refund: bool,
        delay_ms: int | None = None,
    ) -> None:
        """Release failed entries, each with its own error; one release call per distinct error.

        Without ``delay_ms``, broker failures (refunded) are due at once, since the whole
        drainer backs off, and failures of the message wait --retry-delay-ms.
        """
        if delay_ms is None:
            delay_ms = 0 if refund else self.settings.retry_delay_ms
        by_error: dict[str, list[Lease]] = {}
        for lease, error in failures:
            by_error.setdefault(error, []).append(lease)
        for error, leases in by_error.items():
            outbox.release(leases, delay_ms=delay_ms, refund=refund, error=error)
        self.counts.failed += len(failures)
        if self.metrics is not None:
            kind = "broker" if refund else "message"
            self.metrics.failed.labels(outbox.name, kind).inc(len(failures))
        first_error = failures[0][1]
        if refund:
            logger.debug(
                "Released %d entries of outbox %s for a broker failure: %s",
                len(failures),
                outbox.name,
                first_error,
            )
            return
        logger.warning(
            "Publishing %d entries of outbox %s failed [%d/%d], retrying in %d ms; first error: %s",
            len(failures),
            outbox.name,
            max(lease.attempts for lease, _ in failures),
            self.settings.max_attempts,
            delay_ms,
            first_error,
        )
        for lease, error in failures:
            logger.debug("Entry %s of outbox %s failed: %s", lease.entry_id, outbox.name, error)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m outbox.drain``; return the exit status."""
    from outbox.cli import drain_command

    return drain_command(argv)


if __name__ == "__main__":
    raise SystemExit(main())
