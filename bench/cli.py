"""``python -m bench``: run the benchmarks, print a markdown table, optionally write JSON."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from types import FrameType

from bench import suites, workload
from bench.env import RabbitScope, RedisServer
from bench.report import Results, machine

SUITE_NAMES = ("drain", "drain-mixed", "redis", "bus", "latency", "memory", "cluster")
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure outbox against raw pika and redis-py baselines in one run.",
    )
    p.add_argument("--quick", action="store_true", help="small sizes, one run each: a smoke run")
    p.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help=f"run only these benchmarks, repeatable or comma-separated: {', '.join(SUITE_NAMES)}",
    )
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument(
        "--memory-large",
        action="store_true",
        help="also measure the drainer's peak RSS on 1,000,000 messages (about 5 minutes more on 2 cores)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=500,
        help="drainer batch size and the baselines' confirm window and pipeline length "
        "(default %(default)s, the drainer's default)",
    )
    p.add_argument(
        "--amqp-url",
        default=os.environ.get("OUTBOX_TEST_AMQP_URL", DEFAULT_AMQP_URL),
        help="RabbitMQ to publish to (env OUTBOX_TEST_AMQP_URL; default %(default)s)",
    )
    p.add_argument(
        "--overlap-prototype",
        action="store_true",
        help="also run bench/overlap.py, a what-if drainer that overlaps the Redis claim and "
        "ack with RabbitMQ's confirms, interleaved with the drain benchmarks",
    )
    p.add_argument(
        "--profile",
        metavar="FILE",
        help="also drain 100,000 messages (quick: 2,000) under cProfile, print the top "
        "functions to stderr and save the stats to FILE",
    )
    return p


def _selected(only: Sequence[str] | None) -> list[str]:
    if not only:
        return list(SUITE_NAMES)
    names = [name.strip() for item in only for name in item.split(",") if name.strip()]
    unknown = [name for name in names if name not in SUITE_NAMES]
    if unknown:
        raise SystemExit(
            f"error: unknown benchmark {', '.join(unknown)}; choose from {', '.join(SUITE_NAMES)}"
        )
    return [name for name in SUITE_NAMES if name in names]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _raise_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    # Turn SIGTERM into SystemExit so the finally blocks delete queues and stop Redis.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    selected = _selected(args.only)
    if not 1 <= args.batch_size <= 10_000:
        raise SystemExit("error: --batch-size must be between 1 and 10000")
    sizes = suites.QUICK_SIZES if args.quick else suites.DEFAULT_SIZES

    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)

    results = Results(
        settings={
            "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
            "batch_size": args.batch_size,
            "quick": args.quick,
            "benchmarks": selected,
            "sizes": vars(sizes),
        }
    )
    info = machine()
    _log(
        f"python -m bench: {info['cpus']} CPUs, Python {info['python']}, {info['date']}; "
        f"batch {args.batch_size}"
    )
    rabbit = RabbitScope(args.amqp_url)
    try:
        rabbit.check()
        server = RedisServer()
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    started = time.monotonic()
    try:
        with server:
            client = server.client()
            results.settings["redis_port"] = server.port
            ctx = suites.Context(
                amqp_url=args.amqp_url,
                server=server,
                redis=client,
                rabbit=rabbit,
                batch_size=args.batch_size,
                sizes=sizes,
                log=_log,
                overlap_prototype=args.overlap_prototype,
            )
            for name in selected:
                phase_started = time.monotonic()
                _log(f"{name} ...")
                client.flushdb()
                if name == "drain":
                    results.ratios += suites.drain(
                        ctx,
                        label="drain",
                        sizes=workload.fixed_sizes(sizes.drain, suites.BODY_BYTES),
                        with_cli=True,
                    )
                elif name == "drain-mixed":
                    results.ratios += suites.drain(
                        ctx,
                        label="drain-mixed",
                        sizes=workload.mixed_sizes(sizes.mixed),
                        with_cli=False,
                    )
                elif name == "redis":
                    results.ratios += suites.redis_side(ctx)
                elif name == "bus":
                    results.ratios += suites.bus(ctx)
                elif name == "latency":
                    from bench import latency

                    results.latencies.append(
                        latency.run(
                            ctx.redis,
                            ctx.rabbit,
                            ctx.amqp_url,
                            count=50 if args.quick else 300,
                            log=_log,
                        )
                    )
                elif name == "cluster":
                    from bench import cluster

                    results.ratios += cluster.run(
                        ctx.amqp_url, quick=args.quick, batch_size=args.batch_size, log=_log
                    )
                elif name == "memory":
                    # --quick always measures both sizes, both small.
                    results.memory += suites.memory(ctx, large=args.memory_large or args.quick)
                _log(f"{name} done in {time.monotonic() - phase_started:.0f} s")
            if args.profile:
                client.flushdb()
                phases, stats = suites.profile(ctx, args.profile, 2_000 if args.quick else 100_000)
                _log(phases)
                stats.stream = sys.stderr
                stats.sort_stats("tottime").print_stats(25)
                stats.sort_stats("cumulative").print_stats(40)
            client.close()
    finally:
        try:
            rabbit.cleanup()
        except Exception as exc:
            _log(
                f"warning: deleting this run's queues and exchanges failed: {exc}; "
                f"delete these by hand: {rabbit.queues + rabbit.exchanges}"
            )
        results.settings["rabbitmq_names_deleted"] = rabbit.declared
    _log(f"all done in {time.monotonic() - started:.0f} s")
    print(results.markdown(), flush=True)
    if args.json:
        results.write_json(args.json)
    return 0
