"""Redis Cluster benchmarks: drainers sharing partitions, and what claim+ack costs on a cluster.

``run()`` starts a private three-primary cluster (tests/cluster.py) and a private single
Redis, and returns two figures as :class:`bench.report.Ratio`:

- ``cluster drainers``: two drainer processes against one, draining the same partitioned
  outbox into the local RabbitMQ; the ratio is the speed-up of the second drainer.
- ``cluster claim+ack``: Outbox.claim + Outbox.ack through a RedisCluster client against
  the same through a plain client of one redis-server. The ratio shows the cluster's
  per-message cost, and the notes give the microseconds per message of both.

``python -m bench.cluster [--quick]`` runs them alone and prints a markdown table.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bench import workload
from bench.env import RabbitScope, RedisServer
from bench.report import Ratio, Results
from outbox.cluster import connect_cluster
from outbox.drain import Drainer, DrainSettings
from outbox.naming import outbox_name
from outbox.partitions import PartitionedOutbox
from outbox.rabbitmq import RabbitMqConnector
from outbox.records import encode_record
from outbox.store import Outbox
from tests.cluster import redis_cluster

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
BODY_BYTES = 300
LEASE_MS = 30_000
CONFIRM_TIMEOUT_S = 30.0
# Seconds a drainer process may take to start and to drain before the run is abandoned.
WORKER_TIMEOUT_S = 300.0


@dataclass
class ClusterSizes:
    drain: int
    redis: int


DEFAULT_SIZES = ClusterSizes(drain=20_000, redis=50_000)
QUICK_SIZES = ClusterSizes(drain=2_000, redis=2_000)


def run(
    amqp_url: str = DEFAULT_AMQP_URL,
    *,
    quick: bool = False,
    batch_size: int = 500,
    partitions: int = 6,
    repeat: int = 2,
    log: Callable[[str], None] = print,
) -> list[Ratio]:
    """Run both cluster figures and return them; ``log`` gets one line per measured run."""
    sizes = QUICK_SIZES if quick else DEFAULT_SIZES
    rabbit = RabbitScope(amqp_url)
    rabbit.check()
    try:
        with redis_cluster(masters=3, replicas=0) as cluster:
            log(f"cluster of 3 primaries on {', '.join(n.address for n in cluster.nodes)}")
            ratios = [
                drainers_sharing_partitions(
                    cluster.url,
                    amqp_url,
                    rabbit,
                    count=sizes.drain,
                    batch_size=batch_size,
                    partitions=partitions,
                    repeat=repeat,
                    log=log,
                )
            ]
            with RedisServer() as single:
                ratios.append(
                    claim_ack_cost(
                        cluster.url,
                        single,
                        rabbit,
                        count=sizes.redis,
                        batch_size=batch_size,
                        repeat=repeat,
                        log=log,
                    )
                )
    finally:
        rabbit.cleanup()
    return ratios


# Drainers sharing partitions


def drainers_sharing_partitions(
    cluster_url: str,
    amqp_url: str,
    rabbit: RabbitScope,
    *,
    count: int,
    batch_size: int,
    partitions: int,
    repeat: int,
    log: Callable[[str], None],
) -> Ratio:
    """Two drainer processes against one on the same partitions of one outbox."""
    organization = rabbit.organization("cluster")
    name = outbox_name(organization, workload.SERVICE, "event")
    records = workload.records(organization, workload.fixed_sizes(count, BODY_BYTES))
    queue = rabbit.bound_queue(records[0].exchange)
    client = connect_cluster(cluster_url)
    producer = PartitionedOutbox(client, name, partitions=partitions)
    runs: dict[int, list[float]] = {1: [], 2: []}
    try:
        for attempt in range(repeat):
            # Alternate, so neither side always runs on a warmer broker.
            order = (1, 2) if attempt % 2 == 0 else (2, 1)
            for drainers in order:
                rabbit.purge(queue)
                producer.store(records)
                seconds, published = _run_drainers(
                    drainers, cluster_url, amqp_url, name, batch_size
                )
                depth = rabbit.depth(queue)
                if sum(published) != count or depth != count:
                    raise RuntimeError(
                        f"{drainers} drainers published {published} of {count} entries and the "
                        f"queue holds {depth}"
                    )
                runs[drainers].append(count / seconds)
                log(
                    f"  cluster drainers: {drainers} drainer(s) {count / seconds:,.0f} msg/s "
                    f"(each published {', '.join(f'{p:,}' for p in published)})"
                )
    finally:
        rabbit.purge(queue)
        client.close()
    return Ratio(
        name="cluster drainers",
        subject=f"2 drainer processes, {partitions} partitions",
        rate=max(runs[2]),
        baseline="1 drainer process, same partitions",
        baseline_rate=max(runs[1]),
        count=count,
        notes=f"3 primaries, batch {batch_size}, body {BODY_BYTES} B; best of {repeat} "
        f"alternating runs; {os.cpu_count()} CPUs for the drainers, the cluster and RabbitMQ",
        runs=[round(rate, 1) for rate in runs[2]],
        baseline_runs=[round(rate, 1) for rate in runs[1]],
    )


def _run_drainers(
    drainers: int, cluster_url: str, amqp_url: str, name: str, batch_size: int
) -> tuple[float, list[int]]:
    """Start ``drainers`` processes, let them drain together; return seconds and counts."""
    context = multiprocessing.get_context("spawn")
    ready = context.Queue()
    results = context.Queue()
    start = context.Event()
    processes = [
        context.Process(
            target=_drain_worker,
            args=(cluster_url, amqp_url, name, batch_size, ready, start, results),
        )
        for _ in range(drainers)
    ]
    for process in processes:
        process.start()
    try:
        for _ in processes:
            ready.get(timeout=WORKER_TIMEOUT_S)
        started = time.perf_counter()
        start.set()
        outcomes = [results.get(timeout=WORKER_TIMEOUT_S) for _ in processes]
        seconds = max(finished_at for _, finished_at in outcomes) - started
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
    return seconds, [published for published, _ in outcomes]


def _drain_worker(
    cluster_url: str,
    amqp_url: str,
    name: str,
    batch_size: int,
    ready: Any,
    start: Any,
    results: Any,
) -> None:
    """Body of one drainer process: connect, wait for the start signal, drain, report."""
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    drainer = Drainer(
        connect_cluster(cluster_url),
        RabbitMqConnector(amqp_url, confirm_timeout_s=CONFIRM_TIMEOUT_S),
        DrainSettings(batch_size=batch_size, lease_ms=LEASE_MS, outboxes=[name]),
    )
    try:
        drainer.outboxes(refresh=True)
        ready.put(True)
        start.wait()
        if not drainer.drain_once(max_outage_s=10.0):
            raise RuntimeError("RabbitMQ kept failing during the benchmark")
        results.put((drainer.counts.published, time.perf_counter()))
    finally:
        drainer.close()


# Redis side


def claim_ack_cost(
    cluster_url: str,
    single: RedisServer,
    rabbit: RabbitScope,
    *,
    count: int,
    batch_size: int,
    repeat: int,
    log: Callable[[str], None],
) -> Ratio:
    """Outbox.claim + Outbox.ack through a cluster client against a single redis-server."""
    organization = rabbit.organization("cluster-redis")
    name = outbox_name(organization, workload.SERVICE, "event")
    payloads = [
        encode_record(record)
        for record in workload.records(organization, workload.fixed_sizes(count, BODY_BYTES))
    ]
    cluster_client = connect_cluster(cluster_url)
    single_client = single.client()
    outboxes = {"cluster": Outbox(cluster_client, name), "single": Outbox(single_client, name)}
    runs: dict[str, list[float]] = {"cluster": [], "single": []}
    try:
        for attempt in range(repeat):
            order = ("cluster", "single") if attempt % 2 == 0 else ("single", "cluster")
            for side in order:
                seconds = _claim_ack(outboxes[side], payloads, batch_size)
                runs[side].append(count / seconds)
                log(
                    f"  cluster claim+ack: {side} {count / seconds:,.0f} msg/s, "
                    f"{seconds / count * 1e6:.1f} us per message"
                )
    finally:
        cluster_client.close()
        single_client.close()
    cluster_rate, single_rate = max(runs["cluster"]), max(runs["single"])
    return Ratio(
        name="cluster claim+ack",
        subject=f"Outbox.claim + ack via RedisCluster, batch {batch_size}",
        rate=cluster_rate,
        baseline="the same via redis.Redis on one redis-server",
        baseline_rate=single_rate,
        count=count,
        notes=f"{1e6 / cluster_rate:.1f} us per message on the cluster, "
        f"{1e6 / single_rate:.1f} us on one node; one outbox, so one primary serves it; "
        f"best of {repeat} alternating runs",
        runs=[round(rate, 1) for rate in runs["cluster"]],
        baseline_runs=[round(rate, 1) for rate in runs["single"]],
    )


def _claim_ack(outbox: Outbox, payloads: Sequence[bytes], batch_size: int) -> float:
    """Push ``payloads``, then claim and ack them batch by batch; return the seconds of the loop."""
    # Untimed warm-up: loading the scripts and opening connections (to every primary,
    # on a cluster) would otherwise count against the first side measured.
    outbox.push(payloads[:1])
    outbox.ack(outbox.claim(batch_size=1, lease_ms=LEASE_MS).leases)
    outbox.push(payloads)
    moved = 0
    started = time.perf_counter()
    while moved < len(payloads):
        claim = outbox.claim(batch_size=batch_size, lease_ms=LEASE_MS)
        acked = outbox.ack(claim.leases)
        if not claim.leases or not all(acked):
            raise RuntimeError(f"claim/ack stalled after {moved} of {len(payloads)} entries")
        moved += len(claim.leases)
    seconds = time.perf_counter() - started
    if outbox.stats().unfinished:
        raise RuntimeError(f"outbox {outbox.name} still contains entries after claim+ack")
    return seconds


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.cluster",
        description="Measure drainers sharing partitions and claim+ack on a private Redis Cluster.",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, one run each")
    parser.add_argument(
        "--amqp-url",
        default=os.environ.get("OUTBOX_TEST_AMQP_URL", DEFAULT_AMQP_URL),
        help="RabbitMQ to publish to (env OUTBOX_TEST_AMQP_URL; default %(default)s)",
    )
    parser.add_argument("--batch-size", type=int, default=500, help="default %(default)s")
    parser.add_argument(
        "--partitions", type=int, default=6, help="partitions of the drained outbox (default 6)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pika").setLevel(logging.CRITICAL)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    ratios = run(
        args.amqp_url,
        quick=args.quick,
        batch_size=args.batch_size,
        partitions=args.partitions,
        repeat=1 if args.quick else 2,
        log=log,
    )
    print(Results(ratios=ratios).markdown(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
