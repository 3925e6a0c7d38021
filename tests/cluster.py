"""Private Redis Clusters for the tests: redis-server processes in cluster mode on loopback ports."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis
from redis.cluster import RedisCluster

from tests.servers import LOOPBACK, free_port, wait_for_port

# A cluster node also listens on its port + 10000 for the cluster bus, so its port must
# leave room for that below 65536.
CLUSTER_BUS_PORT_OFFSET = 10_000

# Milliseconds a node may stay unreachable before the others mark it failed. Short, so a
# test detects a failure quickly, yet long enough that a loaded machine causes no false ones.
NODE_TIMEOUT_MS = 3_000


def free_cluster_port() -> int:
    """Return a free loopback port whose cluster bus port (port + 10000) is free too."""
    for _ in range(1000):
        port = free_port()
        bus_port = port + CLUSTER_BUS_PORT_OFFSET
        if bus_port > 65_535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((LOOPBACK, bus_port))
            except OSError:
                continue
        return port
    raise RuntimeError("found no free loopback port pair for a cluster node")


class ClusterNode:
    """One redis-server process in cluster mode, with its own port and directory."""

    def __init__(self, binary: str) -> None:
        self.port = free_cluster_port()
        self.directory = Path(tempfile.mkdtemp(prefix=f"outbox-cluster-{self.port}-"))
        self.process: subprocess.Popen[bytes] | None = subprocess.Popen(
            [
                binary,
                "--port", str(self.port),
                "--bind", LOOPBACK,
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def client(self) -> redis.Redis:
        """Return a plain client of this node alone, for CLUSTER and INFO commands."""
        return redis.Redis(host=LOOPBACK, port=self.port, socket_timeout=10)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            process.kill()
            process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


class RedisClusterServers:
    """A Redis Cluster of ``masters`` primaries, each with ``replicas`` replicas."""

    def __init__(self, *, masters: int = 3, replicas: int = 0) -> None:
        binary = shutil.which("redis-server")
        cli = shutil.which("redis-cli")
        if binary is None or cli is None:
            raise RuntimeError(
                "redis-server and redis-cli are needed for the cluster tests; "
                "install them (apt-get install redis-server)"
            )
        self.nodes: list[ClusterNode] = []
        try:
            for _ in range(masters * (1 + replicas)):
                self.nodes.append(ClusterNode(binary))
            for node in self.nodes:
                wait_for_port(node.port)
            subprocess.run(
                [
                    cli, "--cluster", "create",
                    *(node.address for node in self.nodes),
                    "--cluster-replicas", str(replicas),
                    "--cluster-yes",
                ],
                check=True,
                capture_output=True,
                timeout=60,
            )
            self.wait_until_ready(masters=masters, replicas=replicas)
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"redis://{self.nodes[0].address}/0"

    def client(self) -> RedisCluster:
        """Return a cluster client without decoding, as the outbox needs."""
        return RedisCluster(host=LOOPBACK, port=self.nodes[0].port, decode_responses=False)

    def node(self, port: int) -> ClusterNode:
        return next(node for node in self.nodes if node.port == port)

    def roles(self) -> dict[int, str]:
        """Return ``port -> "master" | "slave"`` as reported by the first reachable node."""
        for node in self.nodes:
            with contextlib.suppress(redis.RedisError), node.client() as client:
                return _roles(client.execute_command("CLUSTER NODES"))
        raise RuntimeError("no node of the cluster is reachable")

    def primary_of_slot(self, slot: int) -> int:
        """Return the port of the primary that serves ``slot``."""
        with self.nodes[0].client() as client:
            for start, end, primary, *_ in client.execute_command("CLUSTER SLOTS"):
                if start <= slot <= end:
                    return int(primary[1])
        raise RuntimeError(f"slot {slot} is not served by any node")

    def replicas_of(self, primary_port: int) -> list[int]:
        """Return the ports of the replicas of the primary on ``primary_port``."""
        with self.node(primary_port).client() as client:
            info = client.info("replication")
        count = int(info.get("connected_slaves", 0))
        return [int(info[f"slave{index}"]["port"]) for index in range(count)]

    def wait_until_ready(self, *, masters: int, replicas: int, timeout_s: float = 30.0) -> None:
        """Wait until every node reports the cluster ok and every replica is in sync."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self._ready(masters=masters, replicas=replicas):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the cluster was not ready after {timeout_s} s")
            time.sleep(0.1)

    def _ready(self, *, masters: int, replicas: int) -> bool:
        try:
            for node in self.nodes:
                with node.client() as client:
                    info = client.execute_command("CLUSTER INFO")
                    if str(info.get("cluster_state")) != "ok":
                        return False
                    if int(info.get("cluster_known_nodes", 0)) != len(self.nodes):
                        return False
                    replication = client.info("replication")
                    if replication["role"] == "slave" and (
                        replication.get("master_link_status") != "up"
                    ):
                        return False
            roles = self.roles()
        except redis.RedisError:
            return False
        primaries = sum(role == "master" for role in roles.values())
        return primaries == masters and len(roles) == masters * (1 + replicas)

    def failover(self, replica_port: int, *, timeout_s: float = 30.0) -> None:
        """Promote a replica with CLUSTER FAILOVER and wait until every node reports it as primary."""
        with self.node(replica_port).client() as client:
            client.execute_command("CLUSTER FAILOVER")
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(redis.RedisError):
                views = []
                for node in self.nodes:
                    with node.client() as client:
                        views.append(_roles(client.execute_command("CLUSTER NODES")))
                if all(view.get(replica_port) == "master" for view in views):
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the replica on port {replica_port} was not promoted after {timeout_s} s"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> RedisClusterServers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _roles(cluster_nodes: dict[str, dict[str, object]]) -> dict[int, str]:
    # redis-py parses CLUSTER NODES into ``"host:port" -> {"flags": "myself,master", ...}``.
    roles: dict[int, str] = {}
    for address, fields in cluster_nodes.items():
        port = int(address.rsplit(":", 1)[1])
        flags = str(fields["flags"]).split(",")
        roles[port] = "master" if "master" in flags else "slave"
    return roles


@contextlib.contextmanager
def redis_cluster(*, masters: int = 3, replicas: int = 0) -> Iterator[RedisClusterServers]:
    """Start a private cluster and stop every node afterwards, even when the block fails."""
    servers = RedisClusterServers(masters=masters, replicas=replicas)
    try:
        yield servers
    finally:
        servers.stop()
