"""Redis Cluster support: creating a cluster client and reaching the primary that owns a key.

Every outbox operation passes its keys in ``KEYS`` and keeps them in one hash slot, so a
``redis.cluster.RedisCluster`` client routes it like any other keyed command. Only
``WAIT`` needs the owning primary itself: it counts the replicas that acknowledged the writes
of the connection it runs on, so the push and its ``WAIT`` must share one connection to
that primary.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.exceptions as redis_errors
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from outbox.errors import OutboxConfigError, StoreUnavailableError


def is_cluster_client(client: Any) -> bool:
    """Return True for a ``redis.cluster.RedisCluster`` client."""
    return isinstance(client, RedisCluster)


def connect_cluster(url: str, **options: Any) -> RedisCluster:
    """Create a Redis Cluster client from the URL of any one node, with the outbox's settings.

    The client reads the cluster's nodes and slots at once and finds the other nodes
    itself. Its own retries are off, as in :func:`outbox.store.connect`, so
    ``Outbox.retry_for_s`` alone bounds how long an operation retries; redirects after
    a failover (``MOVED``) are still followed. Raises OutboxConfigError when the node
    runs without cluster mode, and StoreUnavailableError when no node can be reached.
    """
    options.setdefault("retry", Retry(NoBackoff(), 0))
    options.setdefault("socket_timeout", 5.0)
    options.setdefault("socket_connect_timeout", 2.0)
    try:
        return RedisCluster.from_url(url, decode_responses=False, **options)
    except redis_errors.RedisClusterException as exc:
        if _runs_standalone(url):
            raise OutboxConfigError(
                f"Redis at {_redact(url)} runs without cluster mode; use it without the "
                "cluster option"
            ) from exc
        raise StoreUnavailableError(
            f"cannot reach the Redis Cluster at {_redact(url)}: {exc}; check that it is running"
        ) from exc


def _runs_standalone(url: str) -> bool:
    probe = redis.Redis.from_url(url, socket_connect_timeout=2.0, socket_timeout=2.0)
    try:
        return not cluster_enabled(probe)
    except redis_errors.RedisError:
        return False
    finally:
        probe.close()


def cluster_enabled(client: redis.Redis) -> bool:
    """Return True when the server a standalone client talks to runs in cluster mode."""
    info = client.info("cluster")
    return bool(int(info.get("cluster_enabled", 0)))


def primary_client(client: Any, key: str) -> redis.Redis:
    """Return a client of the primary that owns ``key``: the client itself unless it is a cluster.

    The cluster's slot table may be out of date after a failover; the caller then gets
    ``MOVED`` and calls :func:`refresh_slots` before it tries again.
    """
    if not is_cluster_client(client):
        return client  # type: ignore[no-any-return]
    try:
        node = client.get_node_from_key(key)
    except redis_errors.SlotNotCoveredError as exc:
        # Happens while a failed primary is replaced; a retry finds the new one.
        refresh_slots(client)
        raise redis_errors.ClusterDownError(f"no primary serves the slot of {key}: {exc}") from exc
    if node.redis_connection is None:
        raise redis_errors.ConnectionError(f"no connection to the primary {node.name} of {key}")
    return node.redis_connection  # type: ignore[no-any-return]


def refresh_slots(client: Any) -> None:
    """Read the slot table of a cluster client again, after ``MOVED`` from a node client."""
    if is_cluster_client(client):
        client.nodes_manager.initialize()


def _redact(url: str) -> str:
    scheme, separator, rest = url.partition("://")
    if "@" not in rest:
        return url
    return f"{scheme}{separator}***@{rest.rpartition('@')[2]}"
