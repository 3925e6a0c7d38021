"""The servers a benchmark run uses: a private redis-server and names on the local RabbitMQ."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pika
import redis

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """Return a loopback TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, *, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), timeout=0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {LOOPBACK}:{port} after {timeout_s} s")


class RedisServer:
    """A redis-server process of this run, on a free loopback port, keeping nothing on disk."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not installed; install it (apt-get install redis-server)"
            )
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="outbox-bench-redis-"))
        self.process: subprocess.Popen[bytes] | None = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                LOOPBACK,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port(self.port)
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host=LOOPBACK, port=self.port, decode_responses=False)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RabbitScope:
    """Exchanges and queues of this run on the shared RabbitMQ, deleted by :meth:`cleanup`.

    Each operation opens its own short BlockingConnection, so no idle connection has to
    survive the minutes between phases.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.run_id = uuid.uuid4().hex[:8]
        self.exchanges: list[str] = []
        self.queues: list[str] = []
        # Every name declared in this run, kept after cleanup for the report.
        self.declared: dict[str, list[str]] = {"exchanges": [], "queues": []}
        self._counter = 0

    def organization(self, what: str) -> str:
        """Return an organization name unique to this run; its exchange is deleted afterwards."""
        return f"outbox-bench-{self.run_id}-{what}"

    @contextlib.contextmanager
    def channel(self) -> Any:
        connection = pika.BlockingConnection(pika.URLParameters(self.url))
        try:
            yield connection.channel()
        finally:
            if connection.is_open:
                connection.close()

    def check(self) -> None:
        """Raise with a clear message when RabbitMQ does not respond."""
        try:
            with self.channel():
                pass
        except pika.exceptions.AMQPError as exc:
            raise RuntimeError(
                f"RabbitMQ at {self.url} does not respond ({type(exc).__name__}: {exc}); "
                "start it (rabbitmq-server -detached) or pass --amqp-url"
            ) from exc

    def bound_queue(self, exchange: str, *, max_length: int | None = None) -> str:
        """Declare the durable topic exchange and a new queue bound to it with '#'."""
        self._counter += 1
        queue = f"outbox-bench-{self.run_id}-q{self._counter}"
        arguments: dict[str, Any] = {}
        if max_length is not None:
            arguments = {"x-max-length": max_length, "x-overflow": "drop-head"}
        if exchange not in self.exchanges:
            self.exchanges.append(exchange)
            self.declared["exchanges"].append(exchange)
        self.queues.append(queue)
        self.declared["queues"].append(queue)
        with self.channel() as channel:
            channel.exchange_declare(exchange, exchange_type="topic", durable=True)
            channel.queue_declare(queue, durable=False, auto_delete=False, arguments=arguments)
            channel.queue_bind(queue, exchange, routing_key="#")
        return queue

    def depth(self, queue: str) -> int:
        with self.channel() as channel:
            return int(channel.queue_declare(queue, passive=True).method.message_count)

    def purge(self, queue: str) -> None:
        with self.channel() as channel:
            channel.queue_purge(queue)

    def cleanup(self) -> None:
        """Delete every queue and exchange this run declared."""
        if not self.queues and not self.exchanges:
            return
        with self.channel() as channel:
            for queue in self.queues:
                channel.queue_delete(queue)
            for exchange in self.exchanges:
                channel.exchange_delete(exchange)
        self.queues.clear()
        self.exchanges.clear()
