"""A RabbitMQ node private to the test session, for tests that stop, restart or alarm a broker.

The shared node (rabbit@localhost on 5672) is never touched. This node has its own name,
ports, data folder, configuration and Erlang cookie, and every ``rabbitmqctl`` call names
it with ``-n``. Because the cookie is private, the ``rabbitmqctl`` calls made here could not
even authenticate to another node.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pika
import pika.exceptions

from tests.servers import LOOPBACK

# The Debian package keeps the real scripts here. /usr/sbin/rabbitmq-server is a wrapper
# that switches to the rabbitmq user, whose home contains the shared node's cookie.
DEBIAN_SCRIPTS = Path("/usr/lib/rabbitmq/bin")
# The node's AMQP and distribution ports come from here. The range is below Linux's default
# ephemeral ports (32768-60999), so no outgoing connection takes a port while the broker
# application is stopped and start_app can bind it again. It also stays clear of the shared
# node's distribution port (25672) and of the ports rabbitmqctl listens on while it runs:
# 35672-35682 for the shared node, and this node's distribution port + 10000 to + 10010.
NODE_PORTS = range(20_000, 25_000)
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
CTL_TIMEOUT_S = 30.0
# A watermark this small trips the memory alarm on any machine.
ALARM_WATERMARK = "0.0000001"
NORMAL_WATERMARK = "0.4"


class RabbitNodeError(RuntimeError):
    """The private node failed to start or stop, or a rabbitmqctl command failed."""


def free_node_port(exclude: frozenset[int] = frozenset()) -> int:
    """Return a loopback port of NODE_PORTS that nothing is bound to right now."""
    for _ in range(200):
        port = random.choice(NODE_PORTS)
        if port in exclude:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                continue
            return port
    raise RabbitNodeError(
        f"no free loopback port found between {NODE_PORTS.start} and {NODE_PORTS.stop - 1}"
    )


def find_scripts() -> Path | None:
    """Return the folder of rabbitmq-server and rabbitmqctl, or None when RabbitMQ is not installed."""
    if (DEBIAN_SCRIPTS / "rabbitmq-server").exists():
        return DEBIAN_SCRIPTS
    found = shutil.which("rabbitmq-server")
    if found is None:
        return None
    scripts = Path(found).resolve().parent
    if scripts == Path("/usr/sbin"):
        # Another distribution's wrapper that switches users; see DEBIAN_SCRIPTS.
        return None
    return scripts


class RabbitNode:
    """A RabbitMQ node on free loopback ports, keeping its data and logs in ``directory``.

    :meth:`start` runs ``rabbitmq-server`` in the foreground as a child process whose
    standard input is a pipe from this process. When this process exits, even by SIGKILL,
    the pipe closes and the Erlang VM halts, so no beam process outlives the tests.
    """

    def __init__(self, scripts: Path, directory: Path, *, max_message_size: int) -> None:
        self.scripts = scripts
        self.directory = directory
        self.max_message_size = max_message_size
        self.name = f"outbox-test-{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_node_port()
        self.dist_port = free_node_port(exclude=frozenset({self.port}))
        self.process: subprocess.Popen[bytes] | None = None
        self.app_running = False
        self.alarm_raised = False
        self.env = self._environment()

    def __repr__(self) -> str:
        return f"RabbitNode({self.name!r}, port={self.port})"

    @property
    def amqp_url(self) -> str:
        return f"amqp://guest:guest@{LOOPBACK}:{self.port}/%2F"

    @property
    def output_file(self) -> Path:
        """Standard output and error of rabbitmq-server; the node's own log is under log/."""
        return self.directory / "rabbitmq-server.out"

    def _environment(self) -> dict[str, str]:
        directory = self.directory
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "enabled_plugins").write_text("[].\n")
        # An empty file in place of /etc/rabbitmq/rabbitmq-env.conf, which names the shared node.
        (directory / "rabbitmq-env.conf").write_text("")
        (directory / "rabbitmq.conf").write_text(f"max_message_size = {self.max_message_size}\n")
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("RABBITMQ_", "ERL_"))
        }
        env.update(
            {
                # A private HOME gives the node and its rabbitmqctl calls their own cookie.
                "HOME": str(directory),
                "RABBITMQ_CONF_ENV_FILE": str(directory / "rabbitmq-env.conf"),
                "RABBITMQ_NODENAME": self.name,
                "RABBITMQ_NODE_IP_ADDRESS": LOOPBACK,
                "RABBITMQ_NODE_PORT": str(self.port),
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_MNESIA_BASE": str(directory / "mnesia"),
                "RABBITMQ_LOG_BASE": str(directory / "log"),
                # rabbitmq-server adds the .conf suffix.
                "RABBITMQ_CONFIG_FILE": str(directory / "rabbitmq"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(directory / "enabled_plugins"),
                # The script then execs the VM in place of a shell that traps signals, and the
                # VM reads standard input, so it halts when the pipe from this process closes.
                "RABBITMQ_ALLOW_INPUT": "1",
                "ERL_EPMD_ADDRESS": LOOPBACK,
                "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            }
        )
        return env

    # The node process

    def start(self) -> float:
        """Start the node and wait until it accepts AMQP connections; return the seconds taken."""
        started = time.monotonic()
        with self.output_file.open("ab") as output:
            self.process = subprocess.Popen(
                [str(self.scripts / "rabbitmq-server")],
                env=self.env,
                cwd=self.directory,
                stdin=subprocess.PIPE,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_for_broker()
        except RabbitNodeError:
            self.stop()
            raise
        self.app_running = True
        return time.monotonic() - started

    def stop(self) -> None:
        """Stop the node with rabbitmqctl, or kill its process group when that fails."""
        process = self.process
        if process is None:
            return
        with contextlib.suppress(RabbitNodeError):
            self.ctl("stop", timeout_s=STOP_TIMEOUT_S)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=STOP_TIMEOUT_S)
        if process.stdin is not None:
            process.stdin.close()
        self.process = None
        self.app_running = False

    # rabbitmqctl

    def ctl(self, *args: str, timeout_s: float = CTL_TIMEOUT_S) -> str:
        """Run ``rabbitmqctl -n NODE args`` against this node only; return its output."""
        command = [str(self.scripts / "rabbitmqctl"), "-n", self.name, *args]
        try:
            done = subprocess.run(
                command,
                env=self.env,
                cwd=self.directory,
                capture_output=True,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise RabbitNodeError(
                f"rabbitmqctl {' '.join(args)} timed out after {timeout_s} s on node {self.name}"
            ) from exc
        if done.returncode != 0:
            raise RabbitNodeError(
                f"rabbitmqctl {' '.join(args)} failed on node {self.name} with exit status "
                f"{done.returncode}: {done.stderr.decode(errors='replace').strip()}"
            )
        return done.stdout.decode(errors="replace")

    def stop_app(self) -> None:
        """Stop the broker application; the node closes every AMQP connection and its port."""
        self.ctl("stop_app")
        self.app_running = False

    def start_app(self) -> None:
        """Start the broker application again and wait until it accepts AMQP connections."""
        self.ctl("start_app")
        self._wait_for_broker()
        self.app_running = True

    def raise_memory_alarm(self) -> None:
        """Trip the memory alarm, so the node blocks every connection that publishes."""
        self.ctl("set_vm_memory_high_watermark", ALARM_WATERMARK)
        self.alarm_raised = True

    def clear_memory_alarm(self) -> None:
        self.ctl("set_vm_memory_high_watermark", NORMAL_WATERMARK)
        self.alarm_raised = False

    def reset(self) -> None:
        """Start the broker application and clear the memory alarm where a test left them so."""
        if not self.app_running:
            self.start_app()
        if self.alarm_raised:
            self.clear_memory_alarm()

    # Waiting

    def _wait_for_broker(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RabbitNodeError(
                    f"RabbitMQ node {self.name} exited with status {self.process.returncode}; "
                    f"see {self.output_file} and {self.directory / 'log'}"
                )
            if self._accepts_amqp():
                return
            time.sleep(0.1)
        raise RabbitNodeError(
            f"RabbitMQ node {self.name} did not accept AMQP connections on port {self.port} "
            f"within {START_TIMEOUT_S} s; see {self.output_file} and {self.directory / 'log'}"
        )

    def _accepts_amqp(self) -> bool:
        try:
            socket.create_connection((LOOPBACK, self.port), timeout=0.5).close()
        except OSError:
            return False
        parameters = pika.URLParameters(self.amqp_url)
        parameters.connection_attempts = 1
        parameters.socket_timeout = 2
        parameters.stack_timeout = 5
        try:
            pika.BlockingConnection(parameters).close()
        except pika.exceptions.AMQPError:
            return False
        return True
