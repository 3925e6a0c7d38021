"""Command lines: ``python -m outbox.drain`` and ``python -m outbox stats | dead``.

Every option can also be set by an environment variable, named in its help text.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any, NoReturn

import msgspec
import redis.exceptions as redis_errors

from outbox import __name__ as package_name
from outbox.cluster import cluster_enabled, connect_cluster
from outbox.drain import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_LEASE_MS,
    DEFAULT_RETRY_DELAY_MS,
    DrainCounts,
    Drainer,
    DrainSettings,
)
from outbox.errors import OutboxConfigError, OutboxError
from outbox.rabbitmq import (
    DEFAULT_AMQP_URL,
    DEFAULT_MAX_MESSAGE_BYTES,
    RabbitMqConnector,
    check_max_message_bytes,
)
from outbox.records import decode_record
from outbox.store import DEFAULT_MAX_ATTEMPTS, Outbox, OutboxStats, connect, discover_outboxes

logger = logging.getLogger(__name__)

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _usage_error(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
_FALSE_WORDS = frozenset({"", "0", "false", "no", "off"})


def _env_flag(name: str) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if raw in _TRUE_WORDS:
        return True
    if raw in _FALSE_WORDS:
        return False
    _usage_error(
        f"environment variable {name} must be 1, true, yes or on (or 0, false, no, off), got {raw!r}"
    )


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        _usage_error(f"environment variable {name} must be an integer, got {raw!r}")


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        _usage_error(f"environment variable {name} must be a number, got {raw!r}")


def _positive_int(text: str) -> int:
    """Parse an argument that must be a whole number of 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _check_choices(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Check values that came from environment variables, which argparse does not check."""
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if action.choices is not None and value is not None and value not in action.choices:
            parser.error(
                f"argument {'/'.join(action.option_strings)}: invalid choice {value!r} "
                f"(choose from {', '.join(map(str, action.choices))})"
            )


def _add_redis_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis-url",
        default=_env("OUTBOX_REDIS_URL", DEFAULT_REDIS_URL),
        help="Redis that contains the outboxes (env OUTBOX_REDIS_URL; default %(default)s)",
    )
    parser.add_argument(
        "--redis-cluster",
        action="store_true",
        default=_env_flag("OUTBOX_REDIS_CLUSTER"),
        help="--redis-url is one node of a Redis Cluster; the other nodes are found from it "
        "(env OUTBOX_REDIS_CLUSTER=1)",
    )
    parser.add_argument(
        "--outbox",
        dest="outboxes",
        action="append",
        metavar="NAME",
        default=None,
        help="outbox to work on, repeatable or comma-separated (env OUTBOX_OUTBOXES; "
        "default: every outbox found in Redis)",
    )


def _add_logging_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        default=_env("OUTBOX_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="lowest level logged to stderr (env OUTBOX_LOG_LEVEL; default %(default)s)",
    )
    parser.add_argument(
        "--log-format",
        default=_env("OUTBOX_LOG_FORMAT", "text"),
        choices=["text", "json"],
        help="text lines, or one JSON object a line for log collectors "
        "(env OUTBOX_LOG_FORMAT; default %(default)s)",
    )


def redis_client(args: argparse.Namespace) -> Any:
    """Connect to the Redis of ``--redis-url``: a cluster client with ``--redis-cluster``.

    Raises OutboxConfigError when a standalone client reaches a cluster node, because
    every outbox outside that node's slots would fail with MOVED.
    """
    try:
        if args.redis_cluster:
            return connect_cluster(args.redis_url)
        client = connect(args.redis_url)
    except ValueError as exc:
        raise OutboxConfigError(
            f"invalid --redis-url (env OUTBOX_REDIS_URL) {_redact_url(args.redis_url)!r}: {exc}; "
            "expected redis://host:port/db, rediss://host:port/db or unix:///path/to/socket"
        ) from exc
    try:
        clustered = cluster_enabled(client)
    except redis_errors.RedisError as exc:
        # Redis may come up later; the drainer retries, and the mismatch shows then as MOVED.
        logger.debug("Checking the cluster mode of %s failed: %s", _redact_url(args.redis_url), exc)
        return client
    if clustered:
        client.close()
        raise OutboxConfigError(
            f"Redis at {_redact_url(args.redis_url)} runs in cluster mode; pass --redis-cluster "
            "(env OUTBOX_REDIS_CLUSTER=1)"
        )
    return client


def _outbox_names(args: argparse.Namespace) -> list[str]:
    """Return the outboxes of --outbox or OUTBOX_OUTBOXES; exit 2 when a name is empty."""
    if args.outboxes is not None:
        names = [name.strip() for given in args.outboxes for name in given.split(",")]
        source = "--outbox"
    else:
        from_env = os.environ.get("OUTBOX_OUTBOXES", "")
        if not from_env.strip():
            return []
        names, source = [name.strip() for name in from_env.split(",")], "OUTBOX_OUTBOXES"
    if not all(names):
        # An empty name must not widen the command to every outbox in Redis.
        _usage_error(
            f"{source} contains an empty outbox name ({', '.join(map(repr, names))}); "
            "give each outbox's name, or leave it out to work on every outbox found in Redis"
        )
    return names


def _petisco_keys(args: argparse.Namespace) -> list[str]:
    def keys(given: list[str] | None, variable: str, default: str) -> list[str]:
        if given:
            return given
        from_env = [key.strip() for key in os.environ.get(variable, "").split(",") if key.strip()]
        return from_env or [default]

    return [
        *keys(args.petisco_event_keys, "OUTBOX_PETISCO_EVENT_KEYS", "events"),
        *keys(args.petisco_command_keys, "OUTBOX_PETISCO_COMMAND_KEYS", "commands"),
    ]


class JsonLogFormatter(logging.Formatter):
    """Formats each record as one JSON object: time, level, logger, message, error."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return msgspec.json.encode(entry).decode()


def configure_logging(level: str, log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pika logs every failed connect attempt at ERROR with a traceback; outbox already
    # logs each failure once, with the reason.
    logging.getLogger("pika").setLevel(logging.CRITICAL if level != "DEBUG" else logging.INFO)


# python -m outbox.drain


def drain_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m outbox.drain",
        description="Republish the messages that Redis outboxes hold to RabbitMQ, with confirms.",
    )
    _add_redis_options(parser)
    parser.add_argument(
        "--amqp-url",
        default=_env("OUTBOX_AMQP_URL", DEFAULT_AMQP_URL),
        help="RabbitMQ to publish to (env OUTBOX_AMQP_URL; default %(default)s)",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        default=_env_flag("OUTBOX_ONCE"),
        help="drain until nothing is pending or leased, then exit (env OUTBOX_ONCE=1); "
        "without it the drainer runs until SIGTERM or SIGINT",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=_env_int("OUTBOX_BATCH_SIZE", DEFAULT_BATCH_SIZE),
        help="entries claimed and published together, 1-10000 "
        "(env OUTBOX_BATCH_SIZE; default %(default)s)",
    )
    parser.add_argument(
        "--lease-ms",
        type=int,
        default=_env_int("OUTBOX_LEASE_MS", DEFAULT_LEASE_MS),
        help="milliseconds a claimed entry stays leased before another drainer may take it; "
        "renewed while publishing (env OUTBOX_LEASE_MS; default %(default)s)",
    )
    parser.add_argument(
        "--max-attempts",
        type=int,
        default=_env_int("OUTBOX_MAX_ATTEMPTS", DEFAULT_MAX_ATTEMPTS),
        help="claims an entry may use on failures of its own before it is dead-lettered; "
        "broker outages do not count (env OUTBOX_MAX_ATTEMPTS; default %(default)s)",
    )
    parser.add_argument(
        "--retry-delay-ms",
        type=int,
        default=_env_int("OUTBOX_RETRY_DELAY_MS", DEFAULT_RETRY_DELAY_MS),
        help="milliseconds before retrying an entry that failed by itself, such as an "
        "unroutable message (env OUTBOX_RETRY_DELAY_MS; default %(default)s)",
    )
    parser.add_argument(
        "--max-message-bytes",
        type=int,
        default=_env_int("OUTBOX_MAX_MESSAGE_BYTES", DEFAULT_MAX_MESSAGE_BYTES),
        help="largest body published; larger ones fail and end as dead letters "
        "(env OUTBOX_MAX_MESSAGE_BYTES; default %(default)s, RabbitMQ's default max_message_size)",
    )
    parser.add_argument(
        "--confirm-timeout-s",
        type=float,
        default=_env_float("OUTBOX_CONFIRM_TIMEOUT_S", 10.0),
        help="seconds to wait for RabbitMQ to confirm one batch "
        "(env OUTBOX_CONFIRM_TIMEOUT_S; default %(default)s)",
    )
    parser.add_argument(
        "--connect-timeout-s",
        type=float,
        default=_env_float("OUTBOX_CONNECT_TIMEOUT_S", 5.0),
        help="seconds to wait for a connection to RabbitMQ "
        "(env OUTBOX_CONNECT_TIMEOUT_S; default %(default)s)",
    )
    parser.add_argument(
        "--max-outage-s",
        type=float,
        default=_env_float("OUTBOX_MAX_OUTAGE_S", 10.0),
        help="with --once: seconds RabbitMQ may keep failing before the drainer gives up "
        "and exits 1 (env OUTBOX_MAX_OUTAGE_S; default %(default)s)",
    )
    parser.add_argument(
        "--from-petisco",
        action="store_true",
        default=_env_flag("OUTBOX_FROM_PETISCO"),
        help="also drain the lists petisco's Redis buses write, moving their entries into "
        "outboxes of the same name before every round (env OUTBOX_FROM_PETISCO=1)",
    )
    parser.add_argument(
        "--petisco-event-key",
        dest="petisco_event_keys",
        action="append",
        metavar="KEY",
        default=None,
        help="with --from-petisco: list of petisco's domain events, repeatable "
        "(env OUTBOX_PETISCO_EVENT_KEYS, comma-separated; default events)",
    )
    parser.add_argument(
        "--petisco-command-key",
        dest="petisco_command_keys",
        action="append",
        metavar="KEY",
        default=None,
        help="with --from-petisco: list of petisco's commands, repeatable "
        "(env OUTBOX_PETISCO_COMMAND_KEYS, comma-separated; default commands)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=_env_int("OUTBOX_METRICS_PORT", 0),
        help="serve Prometheus metrics on this port; 0 serves none "
        "(env OUTBOX_METRICS_PORT; default %(default)s)",
    )
    parser.add_argument(
        "--metrics-address",
        default=_env("OUTBOX_METRICS_ADDRESS", "0.0.0.0"),
        help="address the metrics server listens on "
        "(env OUTBOX_METRICS_ADDRESS; default %(default)s)",
    )
    parser.add_argument(
        "--progress",
        choices=["auto", "always", "never"],
        default=_env("OUTBOX_PROGRESS", "auto"),
        help="with --once: show a progress line with count, rate and time left; auto shows it "
        "only when stderr is a terminal (env OUTBOX_PROGRESS; default %(default)s)",
    )
    _add_logging_options(parser)
    return parser


class ProgressLine:
    """One self-rewriting line on stderr: published so far, rate and estimated time left."""

    def __init__(self, total: int) -> None:
        self.total = max(total, 1)
        self.started = time.monotonic()
        self.last_drawn = 0.0

    def update(self, counts: DrainCounts, *, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.last_drawn < 0.2:
            return
        self.last_drawn = now
        done = counts.published + counts.dead_lettered
        elapsed = max(now - self.started, 1e-6)
        rate = counts.published / elapsed
        left = max(self.total - done, 0)
        eta = f"{left / rate:.0f} s left" if rate > 0 and left else "-"
        width = 30
        filled = min(width, int(width * done / self.total))
        bar = "#" * filled + "." * (width - filled)
        sys.stderr.write(f"\r[{bar}] {done}/{self.total}  {rate:,.0f} messages/s  {eta}   ")
        if final:
            sys.stderr.write("\n")
        sys.stderr.flush()


def drain_command(argv: Sequence[str] | None = None) -> int:
    parser = drain_parser()
    args = parser.parse_args(argv)
    _check_choices(parser, args)
    try:
        check_max_message_bytes(args.max_message_bytes, "--max-message-bytes")
    except OutboxConfigError as exc:
        parser.error(str(exc))
    if not (args.max_outage_s >= 0 and math.isfinite(args.max_outage_s)):
        parser.error(f"--max-outage-s must be a finite number, 0 or more, got {args.max_outage_s}")
    if not 0 <= args.metrics_port <= 65535:
        parser.error(
            f"--metrics-port must be a port from 1 to 65535, or 0, got {args.metrics_port}"
        )
    configure_logging(args.log_level, args.log_format)
    settings = DrainSettings(
        batch_size=args.batch_size,
        lease_ms=args.lease_ms,
        max_attempts=args.max_attempts,
        retry_delay_ms=args.retry_delay_ms,
        max_message_bytes=args.max_message_bytes,
        outboxes=_outbox_names(args),
        petisco_keys=_petisco_keys(args) if args.from_petisco else (),
    )
    try:
        connector = RabbitMqConnector(
            args.amqp_url,
            connect_timeout_s=args.connect_timeout_s,
            confirm_timeout_s=args.confirm_timeout_s,
            connection_name="outbox-drain",
        )
        drainer = Drainer(redis_client(args), connector, settings)
    except (OutboxConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OutboxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED

    _install_stop_handlers(drainer.stopping.set)
    started = time.monotonic()
    status = EXIT_OK
    try:
        names = ", ".join(outbox.name for outbox in drainer.outboxes(refresh=True)) or "none yet"
        logger.info(
            "Draining outboxes (%s) from %s to RabbitMQ at %s%s",
            names,
            _redact_url(args.redis_url),
            connector.address,
            " once" if args.once else "",
        )
        if args.metrics_port:
            try:
                drainer.serve_metrics(args.metrics_port, args.metrics_address)
            except OSError as exc:
                print(
                    f"error: cannot serve metrics on {args.metrics_address}:{args.metrics_port}: "
                    f"{exc}; check --metrics-address or choose another --metrics-port",
                    file=sys.stderr,
                )
                drainer.close()
                return EXIT_USAGE
        if args.once:
            show = args.progress == "always" or (args.progress == "auto" and sys.stderr.isatty())
            progress = ProgressLine(drainer.unfinished()) if show else None
            finished = drainer.drain_once(
                max_outage_s=args.max_outage_s,
                on_progress=progress.update if progress is not None else None,
            )
            if progress is not None:
                progress.update(drainer.counts, final=True)
            if not finished:
                status = EXIT_FAILED
        else:
            drainer.run_forever()
        remaining = drainer.unfinished()
    except OutboxError as exc:
        logger.error("Draining stopped: %s", exc)
        remaining = -1
        status = EXIT_FAILED
    finally:
        drainer.close()

    counts = drainer.counts
    elapsed = time.monotonic() - started
    pending = "unknown" if remaining < 0 else str(remaining)
    print(
        f"published {counts.published}, failed {counts.failed}, dead-lettered "
        f"{counts.dead_lettered}, still pending {pending} "
        f"({elapsed:.1f} s, {counts.published / elapsed if elapsed > 0 else 0:.0f} messages/s)",
        flush=True,
    )
    if args.once and remaining > 0 and status == EXIT_OK and not drainer.stopping.is_set():
        status = EXIT_FAILED
    return status


def _install_stop_handlers(stop: Callable[[], None]) -> None:
    received: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if received:
            # Second signal: leave now; the leases expire and another drainer takes them.
            os._exit(128 + signum)
        received.append(signum)
        logger.info(
            "Received %s, stopping after the batch in flight (send it again to exit at once)",
            signal.Signals(signum).name,
        )
        stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def _redact_url(url: str) -> str:
    scheme, separator, rest = url.partition("://")
    if "@" not in rest:
        return url
    _, _, host = rest.rpartition("@")
    return f"{scheme}{separator}***@{host}"


# python -m outbox stats | dead


def main_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m {package_name}",
        description="Inspect and manage Redis outboxes. Drain them with python -m outbox.drain.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    stats = commands.add_parser("stats", help="count pending, leased, waiting and dead entries")
    _add_redis_options(stats)
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")

    dead = commands.add_parser("dead", help="list, show, requeue or purge dead letters")
    dead_commands = dead.add_subparsers(dest="dead_command", required=True, metavar="ACTION")

    dead_list = dead_commands.add_parser("list", help="list dead letters, oldest first")
    _add_redis_options(dead_list)
    dead_list.add_argument(
        "--limit",
        type=_positive_int,
        default=100,
        help="maximum entries listed per outbox (default %(default)s)",
    )
    dead_list.add_argument("--json", action="store_true", help="print JSON instead of a table")

    dead_show = dead_commands.add_parser("show", help="show one dead letter with its message")
    _add_redis_options(dead_show)
    dead_show.add_argument("entry_id", metavar="ID")
    dead_show.add_argument("--json", action="store_true", help="print JSON")

    dead_requeue = dead_commands.add_parser(
        "requeue", help="give dead letters back to the drainers"
    )
    _add_redis_options(dead_requeue)
    dead_requeue.add_argument("entry_ids", metavar="ID", nargs="*")
    dead_requeue.add_argument("--all", action="store_true", help="requeue every dead letter")
    dead_requeue.add_argument("--json", action="store_true", help="print JSON")

    dead_purge = dead_commands.add_parser("purge", help="delete dead letters for good")
    _add_redis_options(dead_purge)
    dead_purge.add_argument("entry_ids", metavar="ID", nargs="*")
    dead_purge.add_argument("--all", action="store_true", help="purge every dead letter")
    dead_purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    dead_purge.add_argument("--json", action="store_true", help="print JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = main_parser().parse_args(argv)
    configure_logging("WARNING", "text")
    try:
        client = redis_client(args)
        names = _outbox_names(args)
        if names:
            _check_outboxes_exist(client, names, args.redis_url)
        else:
            names = discover_outboxes(client)
        outboxes = [Outbox(client, name) for name in names]
        if args.command == "stats":
            return _stats(outboxes, as_json=args.json)
        return _dead(args, outboxes)
    except (OutboxConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OutboxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:
        # The reader of the output went away, as `| head` does; that is not an error.
        sys.stderr.close()
        return EXIT_OK


def _check_outboxes_exist(client: Any, names: list[str], redis_url: str) -> None:
    """Exit 1 naming the outboxes that Redis has no trace of, so a mistyped name shows."""
    found = discover_outboxes(client)
    known = set(found) | {name.partition("#")[0] for name in found}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SystemExit(
            f"error: outbox {', '.join(map(repr, unknown))} not found in Redis at "
            f"{_redact_url(redis_url)} (outboxes found: {', '.join(found) or 'none'}); "
            "check the name"
        )


def _stats(outboxes: list[Outbox], *, as_json: bool) -> int:
    stats = [outbox.stats() for outbox in outboxes]
    if as_json:
        document = {
            "outboxes": {s.name: _stats_fields(s) for s in stats},
            "total": {
                field: sum(getattr(s, field) for s in stats)
                for field in ("pending", "leased", "waiting", "dead")
            },
        }
        print(msgspec.json.encode(document).decode())
        return EXIT_OK
    if not stats:
        print("no outboxes found")
        return EXIT_OK
    width = max(len("outbox"), *(len(s.name) for s in stats))
    print(f"{'outbox':<{width}}  {'pending':>9}  {'leased':>9}  {'waiting':>9}  {'dead':>9}")
    for s in stats:
        print(f"{s.name:<{width}}  {s.pending:>9}  {s.leased:>9}  {s.waiting:>9}  {s.dead:>9}")
    return EXIT_OK


def _stats_fields(stats: OutboxStats) -> dict[str, int]:
    return {
        "pending": stats.pending,
        "leased": stats.leased,
        "waiting": stats.waiting,
        "dead": stats.dead,
    }


def _single_outbox(outboxes: list[Outbox], action: str) -> Outbox:
    if len(outboxes) == 1:
        return outboxes[0]
    found = ", ".join(outbox.name for outbox in outboxes) or "none"
    raise SystemExit(
        f"error: dead {action} needs one outbox; pass --outbox NAME (outboxes found: {found})"
    )


def _dead(args: argparse.Namespace, outboxes: list[Outbox]) -> int:
    action = args.dead_command
    if action == "list":
        letters = []
        for outbox in outboxes:
            for letter in outbox.dead_letters(count=args.limit):
                letters.append({"outbox": outbox.name, **_letter_fields(letter)})
        if args.json:
            print(msgspec.json.encode(letters).decode())
        elif not letters:
            print("no dead letters")
        else:
            for item in letters:
                print(
                    f"{item['outbox']}  {item['id']:>8}  attempts {item['attempts']}  {item['reason']}"
                )
        return EXIT_OK

    outbox = _single_outbox(outboxes, action)
    if action == "show":
        found = outbox.dead_letter(args.entry_id)
        if found is None:
            print(
                f"error: entry {args.entry_id!r} is not a dead letter of outbox {outbox.name}",
                file=sys.stderr,
            )
            return EXIT_FAILED
        fields = {"outbox": outbox.name, **_letter_fields(found, with_message=True)}
        if args.json:
            print(msgspec.json.encode(fields).decode())
        else:
            for key, value in fields.items():
                print(f"{key}: {value}")
        return EXIT_OK

    if not args.entry_ids and not args.all:
        print(f"error: dead {action} needs entry ids or --all", file=sys.stderr)
        return EXIT_USAGE
    if args.entry_ids and args.all:
        print(f"error: dead {action} takes entry ids or --all, not both", file=sys.stderr)
        return EXIT_USAGE
    ids = None if args.all else list(args.entry_ids)
    if action == "purge" and not args.yes:
        what = "every dead letter" if ids is None else f"{len(ids)} dead letters"
        if not sys.stdin.isatty():
            print("error: purge deletes for good; pass --yes to confirm", file=sys.stderr)
            return EXIT_USAGE
        answer = input(f"Delete {what} of outbox {outbox.name} for good? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return EXIT_OK
    missing = [entry_id for entry_id in ids or [] if outbox.dead_letter(entry_id) is None]
    count = outbox.requeue(ids) if action == "requeue" else outbox.purge(ids)
    verb = "requeued" if action == "requeue" else "purged"
    if args.json:
        print(
            msgspec.json.encode({"outbox": outbox.name, verb: count, "not_found": missing}).decode()
        )
    else:
        print(f"{verb} {count} dead letters of outbox {outbox.name}")
    if missing:
        print(
            f"error: not dead letters of outbox {outbox.name}: {', '.join(missing)}; "
            "list them with: python -m outbox dead list",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return EXIT_OK


def _letter_fields(letter: Any, *, with_message: bool = False) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "id": letter.entry_id,
        "attempts": letter.attempts,
        "dead_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(letter.dead_at_ms / 1000)),
        "reason": letter.reason,
    }
    if with_message:
        try:
            record = decode_record(letter.payload)
            fields["message_id"] = record.message_id
            fields["exchange"] = record.exchange
            fields["routing_key"] = record.routing_key
            fields["body"] = record.body.decode("utf-8", "replace")
        except OutboxError:
            fields["payload"] = letter.payload.decode("utf-8", "backslashreplace")
    return fields
