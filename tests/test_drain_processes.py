"""The drainer as real processes: killed, stopped by signals, and racing SCRIPT FLUSH.

Each test stores a backlog in the private Redis with RedisDomainEventBus, runs
``python -m outbox.drain`` as subprocesses against it and the shared RabbitMQ, then reads
the bound queue and checks that every message id arrived, with copies only where a
drainer died holding a batch. Every wait is bounded, so a hang fails the test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pika
import pytest
import redis

from outbox import DomainEvent, Outbox, RedisDomainEventBus
from outbox.messages import CONTENT_TYPE
from outbox.naming import exchange_name
from outbox.store import OutboxStats

if TYPE_CHECKING:
    from tests.conftest import RabbitNames

pytestmark = pytest.mark.slow

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SERVICE = "drain-processes"
BACKLOG = 20_000
BATCH = 500
# Leases of a drainer that gets killed: short, so the next drainer need not wait 30 s
# for them to expire, and still many times longer than one batch takes.
DYING_LEASE_MS = 2_000
DEFAULT_LEASE_MS = 30_000
SHORT_LEASE_MS = 1_000
# Often enough that a flush lands between a script's reload and its call in every run.
FLUSH_EVERY_S = 0.005
PERSISTENT = 2
SUMMARY = re.compile(
    r"^published (?P<published>\d+), failed (?P<failed>\d+), dead-lettered (?P<dead>\d+), "
    r"still pending (?P<pending>\d+|unknown) \(",
    re.MULTILINE,
)
# Bounds of every wait; a drainer or server that hangs fails the test instead of CI.
PROGRESS_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 60.0
EXIT_TIMEOUT_S = 15.0
CONSUME_TIMEOUT_S = 60.0
# A queue that delivers nothing for this long after the last expected message is drained.
QUIET_S = 0.3
# The drainers have exited when the queue is read, so what is missing after this long
# of silence is not coming.
GIVE_UP_QUIET_S = 5.0
CLI_TIMEOUT_S = 30.0


class BacklogItemStored(DomainEvent):
    number: int


@dataclass
class Backlog:
    outbox: Outbox
    queue: str
    ids: list[str]


def store_backlog(client: redis.Redis, rabbit: RabbitNames, count: int = BACKLOG) -> Backlog:
    """Store ``count`` events in a fresh outbox whose exchange has a queue bound with ``#``."""
    organization = rabbit.organization()
    queue = rabbit.bind_queue(exchange_name(organization, SERVICE))
    bus = RedisDomainEventBus(organization, SERVICE, client)
    events = [BacklogItemStored(number=number) for number in range(count)]
    bus.publish(events)
    return Backlog(bus.outbox, queue, [event.id for event in events])


class DrainerProcess:
    """One ``python -m outbox.drain`` subprocess; its stdout and stderr go to files."""

    def __init__(self, args: list[str], directory: Path, index: int) -> None:
        self.args = args
        self.stdout_path = directory / f"drainer-{index}.out"
        self.stderr_path = directory / f"drainer-{index}.err"
        env = {key: value for key, value in os.environ.items() if not key.startswith("OUTBOX_")}
        with self.stdout_path.open("wb") as stdout, self.stderr_path.open("wb") as stderr:
            self.popen = subprocess.Popen(
                args, cwd=PROJECT_ROOT, env=env, stdout=stdout, stderr=stderr
            )

    def running(self) -> bool:
        return self.popen.poll() is None

    def send(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def wait(self, timeout_s: float) -> int:
        """Wait for the exit status; fail the test when the drainer outlives ``timeout_s``."""
        try:
            return self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=EXIT_TIMEOUT_S)
            pytest.fail(f"drainer still ran after {timeout_s} s\n{self.output()}")

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def output(self) -> str:
        return f"command: {' '.join(self.args)}\nstdout:\n{self.stdout()}\nstderr:\n{self.stderr()}"

    def wait_for_log(self, text: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while text not in self.stderr():
            if time.monotonic() > deadline:
                pytest.fail(f"drainer did not log {text!r} within {timeout_s} s\n{self.output()}")
            if not self.running():
                pytest.fail(f"drainer exited before logging {text!r}\n{self.output()}")
            time.sleep(0.002)

    def summary(self) -> dict[str, str]:
        match = SUMMARY.search(self.stdout())
        return match.groupdict() if match else {}


class Drainers:
    """Starts drainers against the private Redis and RabbitMQ; kills leftovers afterwards."""

    def __init__(self, redis_url: str, amqp_url: str, directory: Path) -> None:
        self.redis_url = redis_url
        self.amqp_url = amqp_url
        self.directory = directory
        self.started: list[DrainerProcess] = []

    def start(
        self, outbox: Outbox, *, lease_ms: int, once: bool, batch_size: int = BATCH
    ) -> DrainerProcess:
        args = [
            sys.executable, "-m", "outbox.drain",
            "--redis-url", self.redis_url,
            "--amqp-url", self.amqp_url,
            "--outbox", outbox.name,
            "--batch-size", str(batch_size),
            "--lease-ms", str(lease_ms),
            *(["--once"] if once else []),
        ]  # fmt: skip
        process = DrainerProcess(args, self.directory, len(self.started))
        self.started.append(process)
        return process

    def run_once(self, outbox: Outbox, *, lease_ms: int) -> tuple[int, DrainerProcess]:
        """Run ``--once`` to its end; return its exit status and the process."""
        process = self.start(outbox, lease_ms=lease_ms, once=True)
        return process.wait(DRAIN_TIMEOUT_S), process

    def kill_leftovers(self) -> None:
        for process in self.started:
            if process.running():
                process.popen.kill()
                process.popen.wait(timeout=EXIT_TIMEOUT_S)


@pytest.fixture
def drainers(redis_url: str, amqp_url: str, tmp_path: Path) -> Iterator[Drainers]:
    started = Drainers(redis_url, amqp_url, tmp_path)
    yield started
    started.kill_leftovers()


def wait_for_stats(
    outbox: Outbox,
    process: DrainerProcess,
    condition: Callable[[OutboxStats], bool],
    what: str,
) -> OutboxStats:
    """Poll the outbox until ``condition`` holds; fail when the drainer exits or time runs out."""
    deadline = time.monotonic() + PROGRESS_TIMEOUT_S
    while True:
        stats = outbox.stats()
        if condition(stats):
            return stats
        if not process.running():
            pytest.fail(f"drainer exited before {what}; last {stats}\n{process.output()}")
        if time.monotonic() > deadline:
            pytest.fail(
                f"no {what} within {PROGRESS_TIMEOUT_S} s; last {stats}\n{process.output()}"
            )
        time.sleep(0.002)


def acked(stats: OutboxStats, backlog: int = BACKLOG) -> int:
    """Entries already gone from the outbox, that is published and acknowledged."""
    return backlog - stats.pending - stats.leased - stats.waiting - stats.dead


def freeze_holding_a_batch(outbox: Outbox, process: DrainerProcess) -> OutboxStats:
    """SIGSTOP the drainer at a moment it holds leases, after at least two batches were acked.

    Freezing first makes "mid-batch" certain: a drainer caught between an ack and its
    next claim is let go on and caught again.
    """
    deadline = time.monotonic() + PROGRESS_TIMEOUT_S
    while time.monotonic() < deadline:
        wait_for_stats(outbox, process, lambda s: acked(s) >= 2 * BATCH, "two batches acked")
        process.send(signal.SIGSTOP)
        # Let Redis run whatever the drainer sent before it froze.
        time.sleep(0.05)
        stats = outbox.stats()
        if stats.leased > 0:
            return stats
        process.send(signal.SIGCONT)
        time.sleep(0.003)
    pytest.fail(f"never caught the drainer holding leases\n{process.output()}")


@dataclass
class Received:
    """What the queue delivered: message ids with their counts, and bad properties."""

    counts: Counter[str]
    wrong_content_type: int
    not_persistent: int
    body_id_mismatch: int

    def missing(self, ids: list[str]) -> list[str]:
        return [message_id for message_id in ids if message_id not in self.counts]

    def unexpected(self, ids: list[str]) -> list[str]:
        expected = set(ids)
        return [message_id for message_id in self.counts if message_id not in expected]

    @property
    def copies(self) -> int:
        """Deliveries beyond the first of each message id."""
        return sum(count - 1 for count in self.counts.values())


def read_queue(rabbit: RabbitNames, queue: str, expected: int) -> list[tuple[Any, Any, bytes]]:
    """Read until ``expected`` messages arrived and the queue stayed quiet for a moment,
    or until it stayed quiet for GIVE_UP_QUIET_S with fewer.

    Does what ``rabbit.consume_all`` does with a push consumer instead of one basic.get
    per message, which reads 20,000 messages several times faster.
    """
    received: list[tuple[Any, Any, bytes]] = []
    deadline = time.monotonic() + CONSUME_TIMEOUT_S
    last_delivery = time.monotonic()
    connection = pika.BlockingConnection(pika.URLParameters(rabbit.url))
    try:
        channel = connection.channel()
        deliveries = channel.consume(queue, auto_ack=True, inactivity_timeout=QUIET_S)
        for method, properties, body in deliveries:
            now = time.monotonic()
            if method is not None:
                received.append((method, properties, body))
                last_delivery = now
            elif len(received) >= expected or now - last_delivery > GIVE_UP_QUIET_S:
                break
            if now > deadline:
                break
        channel.cancel()
    finally:
        if connection.is_open:
            connection.close()
    return received


def consume(rabbit: RabbitNames, queue: str, expected: int = BACKLOG) -> Received:
    counts: Counter[str] = Counter()
    wrong_content_type = not_persistent = body_id_mismatch = 0
    for _method, properties, body in read_queue(rabbit, queue, expected):
        counts[properties.message_id] += 1
        wrong_content_type += properties.content_type != CONTENT_TYPE
        not_persistent += properties.delivery_mode != PERSISTENT
        body_id_mismatch += json.loads(body)["data"]["id"] != properties.message_id
    return Received(counts, wrong_content_type, not_persistent, body_id_mismatch)


def counts_of(stats: OutboxStats) -> dict[str, int]:
    return {
        "pending": stats.pending,
        "leased": stats.leased,
        "waiting": stats.waiting,
        "dead": stats.dead,
        "expired": stats.expired,
    }


EMPTY = {"pending": 0, "leased": 0, "waiting": 0, "dead": 0, "expired": 0}


def test_killed_drainer_loses_nothing(
    redis_client: redis.Redis, rabbit: RabbitNames, drainers: Drainers
) -> None:
    backlog = store_backlog(redis_client, rabbit)
    dying = drainers.start(backlog.outbox, lease_ms=DYING_LEASE_MS, once=False)

    frozen = freeze_holding_a_batch(backlog.outbox, dying)
    dying.send(signal.SIGKILL)
    killed_status = dying.wait(EXIT_TIMEOUT_S)
    time.sleep(0.1)  # whatever the socket still held reaches Redis
    left = backlog.outbox.stats()

    assert killed_status == -signal.SIGKILL
    assert frozen.leased > 0, "the kill did not land mid-batch"
    assert acked(left) > 0, "nothing was published before the kill"
    assert left.pending > 0, "the backlog was finished before the kill"
    # At most three batches: one being acked, one waiting for its confirms, and one
    # claimed ahead that was never published.
    assert left.leased <= 3 * BATCH, f"the killed drainer held more than three batches: {left}"
    status, finisher = drainers.run_once(backlog.outbox, lease_ms=SHORT_LEASE_MS)
    assert status == 0, finisher.output()
    received = consume(rabbit, backlog.queue)
    assert received.missing(backlog.ids) == []
    assert received.unexpected(backlog.ids) == []
    assert received.copies <= left.leased, f"{received.copies} copies, {left.leased} in flight"
    assert received.wrong_content_type == 0
    assert received.not_persistent == 0
    assert received.body_id_mismatch == 0
    assert counts_of(backlog.outbox.stats()) == EMPTY


def test_script_flush_while_draining_publishes_each_message_once(
    redis_url: str, redis_client: redis.Redis, rabbit: RabbitNames, drainers: Drainers
) -> None:
    backlog = store_backlog(redis_client, rabbit)
    stop = threading.Event()
    flushes: list[float] = []
    errors: list[BaseException] = []

    def flush_scripts() -> None:
        flusher = redis.Redis.from_url(redis_url, socket_timeout=5)
        try:
            while not stop.is_set():
                flusher.script_flush()
                flushes.append(time.monotonic())
                stop.wait(FLUSH_EVERY_S)
        except BaseException as exc:  # reported by the asserts below
            errors.append(exc)
        finally:
            flusher.close()

    flusher = threading.Thread(target=flush_scripts, name="script-flush", daemon=True)
    flusher.start()
    try:
        status, drainer = drainers.run_once(backlog.outbox, lease_ms=DEFAULT_LEASE_MS)
    finally:
        stop.set()
        flusher.join(timeout=EXIT_TIMEOUT_S)

    assert errors == []
    assert not flusher.is_alive()
    assert len(flushes) >= 5, f"only {len(flushes)} SCRIPT FLUSH ran while draining"
    assert status == 0, drainer.output()
    received = consume(rabbit, backlog.queue)
    assert received.missing(backlog.ids) == []
    assert received.unexpected(backlog.ids) == []
    assert received.copies == 0
    assert counts_of(backlog.outbox.stats()) == EMPTY


def test_sigterm_stops_drainer_after_its_batch_without_copies(
    redis_client: redis.Redis, rabbit: RabbitNames, drainers: Drainers
) -> None:
    backlog = store_backlog(redis_client, rabbit)
    stopping = drainers.start(backlog.outbox, lease_ms=DEFAULT_LEASE_MS, once=False)

    frozen = freeze_holding_a_batch(backlog.outbox, stopping)
    # Delivered the moment the drainer runs again: in the middle of its batch.
    stopping.send(signal.SIGTERM)
    stopping.send(signal.SIGCONT)
    stopped_status = stopping.wait(EXIT_TIMEOUT_S)
    left = backlog.outbox.stats()
    first = stopping.summary()

    assert stopped_status == 0, stopping.output()
    assert "Received SIGTERM" in stopping.stderr()
    assert first != {}, f"no summary line\n{stopping.output()}"
    assert frozen.leased > 0, "SIGTERM did not land mid-batch"
    assert left.leased == 0, f"the stopped drainer left its batch leased: {left}"
    assert left.pending + left.waiting > 0, "the backlog was finished before SIGTERM"
    assert first["pending"] == str(left.unfinished)
    assert int(first["published"]) == acked(left)
    status, finisher = drainers.run_once(backlog.outbox, lease_ms=SHORT_LEASE_MS)
    assert status == 0, finisher.output()
    second = finisher.summary()
    assert int(first["published"]) + int(second.get("published", -1)) == BACKLOG
    received = consume(rabbit, backlog.queue)
    assert received.missing(backlog.ids) == []
    assert received.unexpected(backlog.ids) == []
    assert received.copies == 0
    assert counts_of(backlog.outbox.stats()) == EMPTY


def test_second_sigterm_exits_at_once_and_loses_nothing(
    redis_client: redis.Redis, rabbit: RabbitNames, drainers: Drainers
) -> None:
    backlog = store_backlog(redis_client, rabbit)
    dying = drainers.start(backlog.outbox, lease_ms=DYING_LEASE_MS, once=False)

    freeze_holding_a_batch(backlog.outbox, dying)
    # With writes paused the drainer cannot ack or release its batch, so the first
    # SIGTERM cannot end in a graceful exit before the second one arrives.
    redis_client.execute_command("CLIENT", "PAUSE", 10_000, "WRITE")
    try:
        dying.send(signal.SIGCONT)
        dying.send(signal.SIGTERM)
        dying.wait_for_log("Received SIGTERM", timeout_s=EXIT_TIMEOUT_S)
        second_signal_at = time.monotonic()
        dying.send(signal.SIGTERM)
        dying_status = dying.wait(EXIT_TIMEOUT_S)
        exit_s = time.monotonic() - second_signal_at
    finally:
        redis_client.execute_command("CLIENT", "UNPAUSE")
    time.sleep(0.1)  # whatever the socket still held reaches Redis
    left = backlog.outbox.stats()

    assert dying_status != 0, dying.output()
    assert exit_s < 2.0, f"the drainer took {exit_s:.1f} s to exit after the second SIGTERM"
    assert left.leased > 0, f"the drainer exited without holding its batch: {left}"
    assert left.leased <= 3 * BATCH, f"the drainer held more than three batches: {left}"
    assert left.pending > 0, "the backlog was finished before the signals"
    status, finisher = drainers.run_once(backlog.outbox, lease_ms=SHORT_LEASE_MS)
    assert status == 0, finisher.output()
    received = consume(rabbit, backlog.queue)
    assert received.missing(backlog.ids) == []
    assert received.unexpected(backlog.ids) == []
    assert received.copies <= left.leased, f"{received.copies} copies, {left.leased} in flight"
    assert counts_of(backlog.outbox.stats()) == EMPTY


def run_cli(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("OUTBOX_")}
    return subprocess.run(
        [sys.executable, "-m", "outbox", *args, "--redis-url", redis_url],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )


def test_cli_reports_drained_outbox_as_empty_json(
    redis_url: str, redis_client: redis.Redis, rabbit: RabbitNames, drainers: Drainers
) -> None:
    count = 2_000
    backlog = store_backlog(redis_client, rabbit, count)
    before = run_cli(redis_url, "stats", "--json")
    status, drainer = drainers.run_once(backlog.outbox, lease_ms=SHORT_LEASE_MS)
    after = run_cli(redis_url, "stats", "--json")
    dead = run_cli(redis_url, "dead", "list", "--json")

    assert before.returncode == 0, before.stderr
    assert json.loads(before.stdout)["total"]["pending"] == count
    assert status == 0, drainer.output()
    assert after.returncode == 0, after.stderr
    assert json.loads(after.stdout)["total"] == {"pending": 0, "leased": 0, "waiting": 0, "dead": 0}
    assert dead.returncode == 0, dead.stderr
    assert json.loads(dead.stdout) == []
