"""The messages of the benchmarks: real DomainEvents turned into outbox records."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator

from outbox import DomainEvent
from outbox.messages import encode
from outbox.records import OutboxRecord, encode_record, record_for

SERVICE = "orders"
MAX_MIXED_BYTES = 64 * 1024


class BenchOrderPlaced(DomainEvent):
    """An event shaped like a real one; ``note`` pads the JSON body to the wanted size."""

    order_id: str
    customer_id: str
    amount_cents: int
    currency: str
    note: str = ""


def _bare_event(index: int) -> BenchOrderPlaced:
    return BenchOrderPlaced(
        order_id=f"{index:012d}",
        customer_id=f"{index % 100_000:08d}",
        amount_cents=100_000 + index % 900_000,
        currency="EUR",
    )


_PADDING = "lorem ipsum dolor sit amet " * (MAX_MIXED_BYTES // 27 + 2)
_overhead: int | None = None


def body_overhead() -> int:
    """Bytes of the JSON body of an event with an empty note (ids and times have fixed widths)."""
    global _overhead
    if _overhead is None:
        _overhead = len(encode(_bare_event(0)))
    return _overhead


def event(index: int, body_bytes: int) -> BenchOrderPlaced:
    """Return a new event whose JSON body has ``body_bytes`` bytes (or the minimum)."""
    pad = max(0, body_bytes - body_overhead())
    bare = _bare_event(index)
    bare.note = _PADDING[:pad]
    return bare


def fixed_sizes(count: int, body_bytes: int) -> list[int]:
    return [body_bytes] * count


def mixed_sizes(count: int, *, seed: int = 20_240_601) -> list[int]:
    """Log-uniform body sizes from the smallest event to 64 KiB: mostly small, some large."""
    rng = random.Random(seed)
    low = math.log(body_overhead())
    high = math.log(MAX_MIXED_BYTES)
    return [int(math.exp(rng.uniform(low, high))) for _ in range(count)]


def records(organization: str, sizes: list[int], *, start: int = 0) -> list[OutboxRecord]:
    """Build the records RedisDomainEventBus stores for one event of each size."""
    return [
        record_for(event(start + index, size), organization=organization, service=SERVICE)
        for index, size in enumerate(sizes)
    ]


def payload_chunks(
    organization: str, count: int, body_bytes: int, *, chunk: int = 10_000
) -> Iterator[list[bytes]]:
    """Yield the stored entries of ``count`` events, ``chunk`` at a time, to fill big backlogs."""
    for start in range(0, count, chunk):
        size = min(chunk, count - start)
        yield [
            encode_record(record)
            for record in records(organization, fixed_sizes(size, body_bytes), start=start)
        ]
