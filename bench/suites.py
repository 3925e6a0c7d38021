"""The benchmarks. Each measures outbox and its baseline in the same run, interleaved.

The machine is shared with RabbitMQ, Redis and whatever else runs on it, so its speed
drifts. Each benchmark therefore cuts its work into segments and runs the sides one after
the other on each segment, rotating which goes first; a side's rate is the messages of
all its segments over the sum of their times, and the spread of the per-segment ratios
shows how steady the machine was.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from bench import workload
from bench.env import LOOPBACK, RabbitScope, RedisServer, free_port
from bench.overlap import OverlappedDrainer
from bench.rawpika import BlockingConfirmPublisher, WindowedPublisher
from bench.report import Memory, Ratio
from outbox import Outbox, RabbitMqConnector, RabbitMqDomainEventBus, RedisDomainEventBus
from outbox.drain import Drainer, DrainSettings
from outbox.naming import outbox_name
from outbox.records import OutboxRecord, encode_record, record_for

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEASE_MS = 30_000
CONFIRM_TIMEOUT_S = 30.0
BODY_BYTES = 300


@dataclass
class Sizes:
    drain: int
    mixed: int
    redis: int
    bus: int
    bus_down: int
    memory_small: int
    memory_large: int


DEFAULT_SIZES = Sizes(
    drain=100_000,
    mixed=20_000,
    redis=100_000,
    bus=10_000,
    bus_down=20_000,
    memory_small=100_000,
    memory_large=1_000_000,
)
QUICK_SIZES = Sizes(
    drain=2_000,
    mixed=400,
    redis=2_000,
    bus=200,
    bus_down=500,
    memory_small=1_000,
    memory_large=5_000,
)


@dataclass
class Context:
    amqp_url: str
    server: RedisServer
    redis: redis.Redis
    rabbit: RabbitScope
    batch_size: int
    sizes: Sizes
    log: Callable[[str], None]
    overlap_prototype: bool = False


Side = Callable[[int, int], float]
"""Runs one side on messages [start, end) and returns the seconds it took."""


def interleave(
    sides: dict[str, Side],
    count: int,
    segment: int,
    *,
    between: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Run every side on each segment of ``count``, rotating the order; return their times."""
    names = list(sides)
    times: dict[str, list[float]] = {name: [] for name in names}
    for number, start in enumerate(range(0, count, segment)):
        end = min(count, start + segment)
        shift = number % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(sides[name](start, end))
        if between is not None:
            between()
    return times


def _segments(count: int, segment: int) -> list[int]:
    return [min(segment, count - start) for start in range(0, count, segment)]


def _rate(count: int, times: Sequence[float]) -> float:
    return count / sum(times)


def _segment_rates(count: int, segment: int, times: Sequence[float]) -> list[float]:
    return [round(n / t, 1) for n, t in zip(_segments(count, segment), times, strict=True)]


def _segment_size(count: int, batch: int) -> int:
    """One batch a segment: the sides take turns batch by batch."""
    return min(count, batch)


def _every(rounds: int, action: Callable[[], None]) -> Callable[[], None]:
    """Return a callable that runs ``action`` on every ``rounds``-th call."""
    calls = [0]

    def maybe() -> None:
        calls[0] += 1
        if calls[0] % rounds == 0:
            action()

    return maybe


def _check_depth(ctx: Context, queue: str, expected: int, what: str) -> None:
    depth = ctx.rabbit.depth(queue)
    if depth != expected:
        raise RuntimeError(f"{what}: the queue holds {depth} messages, expected {expected}")


# 1. Drain


def new_drainer(ctx: Context, name: str) -> Drainer:
    connector = RabbitMqConnector(ctx.amqp_url, confirm_timeout_s=CONFIRM_TIMEOUT_S)
    return Drainer(ctx.redis, connector, DrainSettings(batch_size=ctx.batch_size, outboxes=[name]))


def drain_rounds(drainer: Drainer, count: int) -> float:
    """Run drainer rounds until ``count`` entries were handled; return the seconds taken."""
    handled = 0
    started = time.perf_counter()
    while handled < count:
        got = drainer.run_round()
        if got == 0:
            raise RuntimeError(f"the drainer found nothing after {handled} of {count} entries")
        handled += got
    return time.perf_counter() - started


@dataclass
class CliRun:
    published: int
    own_seconds: float
    wall_seconds: float
    output: str
    start_rss_kib: int = -1
    peak_rss_kib: int = -1

    @property
    def rate(self) -> float:
        return self.published / self.own_seconds if self.own_seconds else 0.0


_CLI_SUMMARY = re.compile(r"published (\d+), .*\(([\d.]+) s, ")
_CHILD_RSS = re.compile(r"RSS at start (-?\d+) kB, VmHWM (-?\d+) kB")


def run_cli_drain(ctx: Context, name: str, *, measure_memory: bool = False) -> CliRun:
    """Run ``python -m outbox.drain --once`` on one outbox and parse what it prints.

    With ``measure_memory``, the same main() runs under bench.drain_child, which also
    prints the process's peak RSS (VmHWM) when it is done.
    """
    module = "bench.drain_child" if measure_memory else "outbox.drain"
    command = [
        sys.executable, "-m", module, "--once",
        "--redis-url", ctx.server.url,
        "--amqp-url", ctx.amqp_url,
        "--outbox", name,
        "--batch-size", str(ctx.batch_size),
        "--confirm-timeout-s", str(CONFIRM_TIMEOUT_S),
        "--log-level", "WARNING",
    ]  # fmt: skip
    started = time.perf_counter()
    completed = subprocess.run(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False, cwd=_ROOT
    )
    wall = time.perf_counter() - started
    output = completed.stdout.decode("utf-8", "replace")
    match = _CLI_SUMMARY.search(output)
    if completed.returncode != 0 or match is None:
        raise RuntimeError(f"python -m {module} exited {completed.returncode}:\n{output[-2000:]}")
    run = CliRun(int(match.group(1)), float(match.group(2)), wall, output)
    if measure_memory:
        rss = _CHILD_RSS.search(output)
        if rss is None:
            raise RuntimeError(f"python -m {module} did not print its peak RSS:\n{output[-2000:]}")
        run.start_rss_kib, run.peak_rss_kib = int(rss.group(1)), int(rss.group(2))
    return run


def _whole_run(ctx: Context, queue: str, records: Sequence[OutboxRecord]) -> float:
    """Connect raw pika and publish all of ``records`` in one run; return the seconds it took."""
    publisher = WindowedPublisher(ctx.amqp_url, window=ctx.batch_size)
    try:
        seconds = publisher.open() + publisher.publish(records)
    finally:
        publisher.close()
    _check_depth(ctx, queue, len(records), "raw pika in one run")
    ctx.rabbit.purge(queue)
    return seconds


def drain(ctx: Context, *, label: str, sizes: list[int], with_cli: bool) -> list[Ratio]:
    """The Drainer against raw pika publishing the same records with the same confirm window."""
    count = len(sizes)
    batch = ctx.batch_size
    segment = _segment_size(count, batch)
    organization = ctx.rabbit.organization(label)
    records = workload.records(organization, sizes)
    payloads = [encode_record(record) for record in records]
    outbox = RedisDomainEventBus(organization, workload.SERVICE, ctx.redis).outbox
    queue = ctx.rabbit.bound_queue(records[0].exchange)
    mean_body = sum(len(record.body) for record in records) / count
    outbox.push(payloads)

    drainer = new_drainer(ctx, outbox.name)
    lockstep = WindowedPublisher(ctx.amqp_url, window=batch)
    sliding = WindowedPublisher(ctx.amqp_url, window=batch, sliding=True)
    overlapped: OverlappedDrainer | None = None
    try:
        # Connecting is timed on both sides: the drainer connects in its first round.
        opened = {"lockstep": lockstep.open(), "sliding": sliding.open()}

        def side(publisher: WindowedPublisher, name: str) -> Side:
            def run(start: int, end: int) -> float:
                return publisher.publish(records[start:end]) + opened.pop(name, 0.0)

            return run

        sides: dict[str, Side] = {
            "drainer": lambda start, end: drain_rounds(drainer, end - start),
            "lockstep": side(lockstep, "lockstep"),
            "sliding": side(sliding, "sliding"),
        }
        if ctx.overlap_prototype:
            twin = Outbox(ctx.redis, f"{outbox.name}-overlap")
            twin.push(payloads)
            prototype = OverlappedDrainer(ctx.redis, ctx.amqp_url, twin.name, batch_size=batch)
            overlapped = prototype
            sides["overlap"] = lambda start, end: prototype.drain(end - start)
        times = interleave(
            sides,
            count,
            segment,
            # Purging now and then keeps the queue short without costing a purge per round.
            between=_every(20, lambda: ctx.rabbit.purge(queue)),
        )
        if drainer.unfinished() != 0 or drainer.counts.published != count:
            raise RuntimeError(f"the drainer left entries behind: {drainer.counts}")
        if drainer.counts.failed:
            raise RuntimeError(f"the drainer failed to publish: {drainer.counts}")
    finally:
        drainer.close()
        lockstep.close()
        sliding.close()
        if overlapped is not None:
            overlapped.close()
    rates = {name: _rate(count, t) for name, t in times.items()}
    per_segment = {name: _segment_rates(count, segment, t) for name, t in times.items()}
    ctx.log(
        f"  {label}: drainer {rates['drainer']:,.0f} msg/s, pika lockstep "
        f"{rates['lockstep']:,.0f} msg/s, pika sliding {rates['sliding']:,.0f} msg/s"
    )
    what = f"{count:,} msgs, JSON body {mean_body:,.0f} B mean"
    if label == "drain-mixed":
        what += f" ({min(sizes):,}-{max(sizes):,} B, log-uniform)"
    what += f"; {len(_segments(count, segment))} interleaved segments of {segment:,} (1 batch)"
    results = [
        Ratio(
            name=label,
            subject=f"Drainer, batch {batch}",
            rate=rates["drainer"],
            baseline=f"pika, {batch} then wait for their confirms",
            baseline_rate=rates["lockstep"],
            count=count,
            notes=what,
            runs=per_segment["drainer"],
            baseline_runs=per_segment["lockstep"],
        ),
        Ratio(
            name=f"{label} vs sliding window",
            subject=f"Drainer, batch {batch}",
            rate=rates["drainer"],
            baseline=f"pika, sliding window of {batch}",
            baseline_rate=rates["sliding"],
            count=count,
            notes="informational: raw pika keeping up to the window unconfirmed at any "
            "time, a ceiling for a drainer that overlaps its batches",
            runs=per_segment["drainer"],
            baseline_runs=per_segment["sliding"],
        ),
    ]
    if "overlap" in times:
        ctx.log(f"  {label}: overlap prototype {rates['overlap']:,.0f} msg/s")
        results.append(
            Ratio(
                name=f"{label}, overlap prototype",
                subject="bench.overlap.OverlappedDrainer",
                rate=rates["overlap"],
                baseline=f"pika, {batch} then wait for their confirms",
                baseline_rate=rates["lockstep"],
                count=count,
                notes="what-if, not outbox code: claims batch k+1 and acks batch k in a "
                "helper thread while batch k waits for its confirms",
                runs=per_segment["overlap"],
                baseline_runs=per_segment["lockstep"],
            )
        )
    if with_cli:
        # The command sends all of the backlog into one queue without a purge in between,
        # which makes RabbitMQ slower as the queue grows. Its baseline is raw pika sending
        # all of it the same way, once before and once after the command.
        ctx.rabbit.purge(queue)
        whole = [_whole_run(ctx, queue, records)]
        outbox.push(payloads)
        cli = run_cli_drain(ctx, outbox.name)
        if cli.published != count:
            raise RuntimeError(f"python -m outbox.drain published {cli.published} of {count}")
        _check_depth(ctx, queue, count, "python -m outbox.drain")
        ctx.rabbit.purge(queue)
        whole.append(_whole_run(ctx, queue, records))
        raw_rate = _rate(2 * count, whole)
        ctx.log(
            f"  {label}: python -m outbox.drain --once {cli.rate:,.0f} msg/s, "
            f"pika in one run {raw_rate:,.0f} msg/s"
        )
        results.append(
            Ratio(
                name=f"{label}, CLI",
                subject="python -m outbox.drain --once",
                rate=cli.rate,
                baseline=f"pika, {batch} then wait, all messages in one run",
                baseline_rate=raw_rate,
                count=count,
                notes="the rate the command prints (its own clock, connect included); "
                f"{cli.wall_seconds:.1f} s wall with start-up. The baseline connects and "
                "publishes the same messages into the same empty queue, once before and "
                "once after the command",
                runs=[round(cli.rate, 1)],
                baseline_runs=[round(count / seconds, 1) for seconds in whole],
            )
        )
    ctx.rabbit.purge(queue)
    return results


# 2. Redis side


def redis_side(ctx: Context) -> list[Ratio]:
    """Outbox.claim + Outbox.ack against pipelined LMOVE, batch by batch."""
    count = ctx.sizes.redis
    batch = ctx.batch_size
    segment = _segment_size(count, batch)
    organization = ctx.rabbit.organization("redis")
    outbox = Outbox(ctx.redis, outbox_name(organization, workload.SERVICE, "event"))
    payloads = [encode_record(r) for r in workload.records(organization, [BODY_BYTES] * count)]
    prefix = f"bench:{ctx.rabbit.run_id}"
    lists = {
        "lmove": (f"{prefix}:a", f"{prefix}:a:done"),
        "lrem": (f"{prefix}:b", f"{prefix}:b:doing"),
        "loop": (f"{prefix}:c", f"{prefix}:c:done"),
    }

    outbox.push(payloads)
    pipe = ctx.redis.pipeline(transaction=False)
    for source, _ in lists.values():
        for start in range(0, count, 1000):
            pipe.lpush(source, *payloads[start : start + 1000])
    pipe.execute()

    def claim_ack(start: int, end: int) -> float:
        wanted = end - start
        moved = 0
        started = time.perf_counter()
        while moved < wanted:
            claim = outbox.claim(batch_size=min(batch, wanted - moved), lease_ms=LEASE_MS)
            acked = outbox.ack(claim.leases)
            if not claim.leases or not all(acked):
                raise RuntimeError(f"claim/ack stalled after {start + moved} entries")
            moved += len(claim.leases)
        return time.perf_counter() - started

    def lmove(name: str, with_lrem: bool) -> Side:
        source, target = lists[name]

        def run(start: int, end: int) -> float:
            wanted = end - start
            moved = 0
            started = time.perf_counter()
            while moved < wanted:
                take = min(batch, wanted - moved)
                pipe = ctx.redis.pipeline(transaction=False)
                for _ in range(take):
                    pipe.lmove(source, target, "RIGHT", "LEFT")
                entries = pipe.execute()
                if with_lrem:
                    pipe = ctx.redis.pipeline(transaction=False)
                    for entry in entries:
                        pipe.lrem(target, -1, entry)
                    pipe.execute()
                moved += take
            return time.perf_counter() - started

        return run

    def lmove_loop(start: int, end: int) -> float:
        source, target = lists["loop"]
        started = time.perf_counter()
        for _ in range(end - start):
            if ctx.redis.lmove(source, target, "RIGHT", "LEFT") is None:
                raise RuntimeError(f"LMOVE found {source} empty")
        return time.perf_counter() - started

    times = interleave(
        {
            "outbox": claim_ack,
            "lmove": lmove("lmove", with_lrem=False),
            "lrem": lmove("lrem", with_lrem=True),
            "loop": lmove_loop,
        },
        count,
        segment,
    )
    if outbox.stats().unfinished or any(ctx.redis.llen(source) for source, _ in lists.values()):
        raise RuntimeError("entries were left behind")
    if ctx.redis.llen(lists["lrem"][1]):
        raise RuntimeError("LREM left entries in its processing list")
    ctx.redis.delete(*[key for pair in lists.values() for key in pair])
    rates = {name: _rate(count, t) for name, t in times.items()}
    per_segment = {name: _segment_rates(count, segment, t) for name, t in times.items()}
    ctx.log(
        f"  redis: claim+ack {rates['outbox']:,.0f}/s, LMOVE {rates['lmove']:,.0f}/s, "
        f"LMOVE+LREM {rates['lrem']:,.0f}/s, LMOVE loop {rates['loop']:,.0f}/s"
    )
    return [
        Ratio(
            name="redis",
            subject=f"Outbox.claim + Outbox.ack, batch {batch}",
            rate=rates["outbox"],
            baseline=f"{batch} LMOVE in one pipeline",
            baseline_rate=rates["lmove"],
            count=count,
            notes=f"2 round trips (claim script, ack script) per {batch} entries against 1 "
            f"pipeline of {batch} LMOVE RIGHT LEFT; {len(payloads[0])}-byte entries",
            runs=per_segment["outbox"],
            baseline_runs=per_segment["lmove"],
        ),
        Ratio(
            name="redis vs LMOVE+LREM",
            subject=f"Outbox.claim + Outbox.ack, batch {batch}",
            rate=rates["outbox"],
            baseline=f"{batch} LMOVE, then {batch} LREM, 2 pipelines",
            baseline_rate=rates["lrem"],
            count=count,
            notes="informational: the plain reliable-queue pattern, where LREM acks each "
            "entry, so both sides make 2 round trips per batch",
            runs=per_segment["outbox"],
            baseline_runs=per_segment["lrem"],
        ),
        Ratio(
            name="redis vs LMOVE loop",
            subject=f"Outbox.claim + Outbox.ack, batch {batch}",
            rate=rates["outbox"],
            baseline="one LMOVE call per entry",
            baseline_rate=rates["loop"],
            count=count,
            notes="informational: a loop of plain redis-py LMOVE calls, one round trip per entry, "
            "as code without pipelining moves entries",
            runs=per_segment["outbox"],
            baseline_runs=per_segment["loop"],
        ),
    ]


# 3. The bus


def bus(ctx: Context) -> list[Ratio]:
    return [*_bus_healthy(ctx), *_bus_down(ctx)]


def _events(count: int) -> list[workload.BenchOrderPlaced]:
    return [workload.event(index, BODY_BYTES) for index in range(count)]


def _timed_loop(call: Callable[[Any], None], items: Sequence[Any]) -> Side:
    def run(start: int, end: int) -> float:
        chunk = items[start:end]
        started = time.perf_counter()
        for item in chunk:
            call(item)
        return time.perf_counter() - started

    return run


def _bus_healthy(ctx: Context) -> list[Ratio]:
    count = ctx.sizes.bus
    segment = max(1, count // 20)
    organization = ctx.rabbit.organization("bus")
    queue = ctx.rabbit.bound_queue(f"{organization}.{workload.SERVICE}")
    events = _events(count)
    records: list[OutboxRecord] = [
        record_for(event, organization=organization, service=workload.SERVICE) for event in events
    ]
    fallback = RedisDomainEventBus(organization, workload.SERVICE, ctx.redis)
    event_bus = RabbitMqDomainEventBus(
        organization, workload.SERVICE, RabbitMqConnector(ctx.amqp_url), fallback=fallback
    )
    raw = BlockingConfirmPublisher(ctx.amqp_url)

    def encode(event: workload.BenchOrderPlaced) -> OutboxRecord:
        return record_for(event, organization=organization, service=workload.SERVICE)

    try:
        # Connect (and declare the exchange) before the clocks start, on both sides.
        event_bus.publish(events[0])
        raw.publish(records[0])
        ctx.rabbit.purge(queue)
        times = interleave(
            {
                "bus": _timed_loop(event_bus.publish, events),
                "raw": _timed_loop(raw.publish, records),
                "raw+encode": _timed_loop(lambda event: raw.publish(encode(event)), events),
            },
            count,
            segment,
        )
        _check_depth(ctx, queue, 3 * count, "bus with RabbitMQ up")
    finally:
        event_bus.close()
        raw.close()
    stored = fallback.outbox.stats().pending
    if stored:
        raise RuntimeError(f"the healthy bus stored {stored} events in its fallback")
    ctx.rabbit.purge(queue)
    rates = {name: _rate(count, t) for name, t in times.items()}
    ctx.log(
        f"  bus up: publish {rates['bus']:,.0f}/s, raw pika {rates['raw']:,.0f}/s, "
        f"raw pika with record_for {rates['raw+encode']:,.0f}/s"
    )
    segments = len(_segments(count, segment))
    return [
        Ratio(
            name="bus, RabbitMQ up",
            subject="RabbitMqDomainEventBus.publish(event)",
            rate=rates["bus"],
            baseline="pika BlockingConnection, confirm_delivery, basic_publish",
            baseline_rate=rates["raw"],
            count=count,
            notes="one message per call, each call returns after its confirm; the bus builds and "
            "encodes the record in the call, the baseline publishes bodies encoded beforehand; "
            f"{segments} interleaved segments",
            runs=_segment_rates(count, segment, times["bus"]),
            baseline_runs=_segment_rates(count, segment, times["raw"]),
        ),
        Ratio(
            name="bus, RabbitMQ up vs encoding baseline",
            subject="RabbitMqDomainEventBus.publish(event)",
            rate=rates["bus"],
            baseline="record_for(event), then the pika baseline",
            baseline_rate=rates["raw+encode"],
            count=count,
            notes="informational: the baseline also builds the record (JSON body) in the call, "
            "so the ratio shows the bus's own overhead",
            runs=_segment_rates(count, segment, times["bus"]),
            baseline_runs=_segment_rates(count, segment, times["raw+encode"]),
        ),
    ]


def _bus_down(ctx: Context) -> list[Ratio]:
    count = ctx.sizes.bus_down
    segment = max(1, count // 20)
    organization = ctx.rabbit.organization("down")
    events = _events(count)
    payloads = [
        encode_record(record_for(event, organization=organization, service=workload.SERVICE))
        for event in events
    ]
    closed_port = free_port()
    connector = RabbitMqConnector(
        f"amqp://guest:guest@{LOOPBACK}:{closed_port}/%2F", connect_timeout_s=1.0
    )
    fallback = RedisDomainEventBus(organization, workload.SERVICE, ctx.redis)
    event_bus = RabbitMqDomainEventBus(organization, workload.SERVICE, connector, fallback=fallback)
    key = f"bench:{ctx.rabbit.run_id}:lpush"
    encoded_key = f"bench:{ctx.rabbit.run_id}:encoded"
    direct_key = f"bench:{ctx.rabbit.run_id}:direct"
    pool = ctx.redis.connection_pool
    direct = pool.connection_class(**pool.connection_kwargs)

    def direct_lpush(payload: bytes) -> None:
        direct.send_command("LPUSH", direct_key, payload)
        direct.read_response()

    def encode(event: workload.BenchOrderPlaced) -> bytes:
        record = record_for(event, organization=organization, service=workload.SERVICE)
        return encode_record(record)

    try:
        # The first publish finds RabbitMQ down and opens the circuit breaker; later ones go
        # straight to Redis, but for a connect attempt every retry_interval_s (5 s).
        event_bus.publish(events[0])
        times = interleave(
            {
                "bus": _timed_loop(event_bus.publish, events),
                "lpush": _timed_loop(lambda payload: ctx.redis.lpush(key, payload), payloads),
                "encode+lpush": _timed_loop(
                    lambda event: ctx.redis.lpush(encoded_key, encode(event)), events
                ),
                "direct": _timed_loop(direct_lpush, payloads),
            },
            count,
            segment,
        )
    finally:
        event_bus.close()
        direct.disconnect()
    stored = fallback.outbox.stats().pending
    if stored != 1 + count:
        raise RuntimeError(f"the bus stored {stored} events, expected {1 + count}")
    for baseline_key in (key, encoded_key, direct_key):
        if ctx.redis.llen(baseline_key) != count:
            raise RuntimeError(f"a baseline stored {ctx.redis.llen(baseline_key)} of {count}")
    ctx.redis.delete(key, encoded_key, direct_key)
    rates = {name: _rate(count, t) for name, t in times.items()}
    ctx.log(
        f"  bus down: publish {rates['bus']:,.0f}/s, LPUSH {rates['lpush']:,.0f}/s, "
        f"encode + LPUSH {rates['encode+lpush']:,.0f}/s, "
        f"LPUSH on a connection of its own {rates['direct']:,.0f}/s"
    )
    segments = len(_segments(count, segment))
    return [
        Ratio(
            name="bus, RabbitMQ down",
            subject="RabbitMqDomainEventBus.publish(event), fallback",
            rate=rates["bus"],
            baseline="redis-py LPUSH of the same record bytes",
            baseline_rate=rates["lpush"],
            count=count,
            notes="one message per call; the AMQP URL points at a closed loopback port and the "
            "breaker is open after an untimed first call; the bus builds and encodes the record "
            "in the call, the baseline pushes bytes encoded beforehand; "
            f"{segments} interleaved segments",
            runs=_segment_rates(count, segment, times["bus"]),
            baseline_runs=_segment_rates(count, segment, times["lpush"]),
        ),
        Ratio(
            name="bus, RabbitMQ down vs encoding baseline",
            subject="RabbitMqDomainEventBus.publish(event), fallback",
            rate=rates["bus"],
            baseline="record_for + encode_record, then LPUSH",
            baseline_rate=rates["encode+lpush"],
            count=count,
            notes="informational: the baseline also builds and encodes the record in the call, "
            "so the ratio shows the bus's own overhead",
            runs=_segment_rates(count, segment, times["bus"]),
            baseline_runs=_segment_rates(count, segment, times["encode+lpush"]),
        ),
        Ratio(
            name="bus, RabbitMQ down vs LPUSH on a connection of its own",
            subject="RabbitMqDomainEventBus.publish(event), fallback",
            rate=rates["bus"],
            baseline="redis-py Connection.send_command LPUSH, outside the pool",
            baseline_rate=rates["direct"],
            count=count,
            notes="informational: the bus also stores on a connection outside redis-py's pool "
            "(outbox/_push.py). This baseline skips the same per-command pool checks, so the "
            "ratio shows the cost of building, encoding and routing the message",
            runs=_segment_rates(count, segment, times["bus"]),
            baseline_runs=_segment_rates(count, segment, times["direct"]),
        ),
    ]


# 4. Memory


def memory(ctx: Context, *, large: bool) -> list[Memory]:
    """Peak RSS of ``python -m outbox.drain --once`` draining a small and a large backlog."""
    counts = [ctx.sizes.memory_small] + ([ctx.sizes.memory_large] if large else [])
    runs: list[CliRun] = []
    for count in counts:
        ctx.redis.flushdb()
        organization = ctx.rabbit.organization(f"mem{count}")
        outbox = Outbox(ctx.redis, outbox_name(organization, workload.SERVICE, "event"))
        # A capped queue keeps the broker's memory flat whatever the backlog.
        ctx.rabbit.bound_queue(f"{organization}.{workload.SERVICE}", max_length=10_000)
        started = time.perf_counter()
        for chunk in workload.payload_chunks(organization, count, BODY_BYTES):
            outbox.push(chunk)
        ctx.log(f"  memory: stored {count:,} entries in {time.perf_counter() - started:.1f} s")
        run = run_cli_drain(ctx, outbox.name, measure_memory=True)
        if run.published != count:
            raise RuntimeError(f"python -m outbox.drain published {run.published} of {count}")
        ctx.log(
            f"  memory: drained {count:,} at {run.rate:,.0f} msg/s, "
            f"RSS {run.start_rss_kib / 1024:.1f} MiB at start, peak {run.peak_rss_kib / 1024:.1f} MiB"
        )
        runs.append(run)
    ctx.redis.flushdb()
    small = runs[0]
    big = runs[1] if large else None
    return [
        Memory(
            name="drainer peak RSS",
            small_count=counts[0],
            small_peak_mib=small.peak_rss_kib / 1024,
            large_count=counts[1] if big else None,
            large_peak_mib=big.peak_rss_kib / 1024 if big else None,
            small_rate=small.rate,
            large_rate=big.rate if big else None,
            notes="VmHWM of a process running python -m outbox.drain --once's main() "
            f"(bench.drain_child); its RSS after start-up was {small.start_rss_kib / 1024:.1f} "
            f"MiB; batch {ctx.batch_size}, {BODY_BYTES}-byte bodies",
        )
    ]


# Profiling


def _timed(counter: collections.Counter[str], key: str, function: Any) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            counter[key] += time.perf_counter() - started

    return wrapper


def profile(ctx: Context, path: str, count: int) -> tuple[str, Any]:
    """Drain ``count`` 300-byte messages twice: with phase timers, then under cProfile.

    Returns the phase breakdown as text and the pstats.Stats of the second run.
    """
    import cProfile
    import pstats

    organization = ctx.rabbit.organization("profile")
    records = workload.records(organization, [BODY_BYTES] * count)
    payloads = [encode_record(record) for record in records]
    outbox = RedisDomainEventBus(organization, workload.SERVICE, ctx.redis).outbox
    queue = ctx.rabbit.bound_queue(records[0].exchange)

    # Phase timers wrap the drainer's collaborators on this one instance only.
    phases: collections.Counter[str] = collections.Counter()
    outbox.push(payloads)
    drainer = new_drainer(ctx, outbox.name)
    timed_outbox = drainer.outboxes()[0]
    for method in ("claim", "ack", "extend", "release"):
        setattr(
            timed_outbox, method, _timed(phases, f"redis {method}", getattr(timed_outbox, method))
        )
    publisher = getattr(drainer, "_publisher", None)
    if publisher is not None:
        publisher.publish = _timed(phases, "rabbitmq publish (all)", publisher.publish)
        if hasattr(publisher, "_run_until"):
            publisher._run_until = _timed(
                phases, "rabbitmq wait (ioloop: send, confirms)", publisher._run_until
            )
    cpu = time.process_time()
    try:
        seconds = drain_rounds(drainer, count)
    finally:
        drainer.close()
    cpu = time.process_time() - cpu
    lines = [
        f"drainer phases, {count:,} messages in {seconds:.2f} s ({count / seconds:,.0f} msg/s), "
        f"drainer process CPU {cpu:.2f} s ({100 * cpu / seconds:.0f}% of one core):"
    ]
    accounted = sum(spent for phase, spent in phases.items() if "wait" not in phase)
    phases["other (decode, bookkeeping)"] = max(0.0, seconds - accounted)
    for phase, spent in sorted(phases.items()):
        lines.append(f"  {phase:42} {spent:6.2f} s  {100 * spent / seconds:5.1f}%")
    ctx.rabbit.purge(queue)

    outbox.push(payloads)
    drainer = new_drainer(ctx, outbox.name)
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        seconds = drain_rounds(drainer, count)
    finally:
        profiler.disable()
        drainer.close()
    ctx.rabbit.purge(queue)
    profiler.dump_stats(path)
    lines.append(f"under cProfile: {count / seconds:,.0f} msg/s; stats saved in {path}")
    return "\n".join(lines), pstats.Stats(profiler)
