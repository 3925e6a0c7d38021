"""The Redis outbox: push, claim, ack, extend, release, bury, stats and dead-letter admin.

Every state change is one Lua script from ``lua/``; the keys of one outbox share one
hash tag (see :class:`outbox.naming.OutboxKeys`), so the scripts also run on Redis
Cluster. redis-py errors are translated into :mod:`outbox.errors` here and nowhere else.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple, TypeVar
from urllib.parse import urlsplit

import redis
import redis.exceptions as redis_errors
from redis.backoff import NoBackoff
from redis.retry import Retry

from outbox import _push, _scripts
from outbox.cluster import primary_client, refresh_slots
from outbox.errors import (
    OutboxConfigError,
    StoreError,
    StoreFullError,
    StoreReadOnlyError,
    StoreUnavailableError,
)
from outbox.naming import KEY_PREFIX, REGISTRY_KEY, OutboxKeys, outbox_name_from_key

logger = logging.getLogger(__name__)

T = TypeVar("T")

MAX_BATCH_SIZE = 10_000
# Entries per script call for ack, extend, release and bury; keeps every call short.
ARGUMENT_CHUNK = 1_000
# Entries per LPUSH; one push call sends its chunks in a single MULTI/EXEC transaction.
PUSH_CHUNK = 1_000
DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_RETRY_FOR_S = 5.0
_FIRST_BACKOFF_S = 0.05
_MAX_BACKOFF_S = 1.0


class Lease(NamedTuple):
    """An entry leased to one drainer; ``token`` fences ack, extend, release and bury."""

    entry_id: str
    token: str
    attempts: int
    payload: bytes


class Claim(NamedTuple):
    """The reply of :meth:`Outbox.claim`."""

    leases: list[Lease]
    dead_lettered: int
    server_time_ms: int


class OutboxStats(NamedTuple):
    """Entry counts of one outbox at one moment of the Redis server clock."""

    name: str
    pending: int
    leased: int
    waiting: int
    dead: int
    expired: int
    server_time_ms: int

    @property
    def unfinished(self) -> int:
        """Entries that still have to be published: pending, leased or waiting."""
        return self.pending + self.leased + self.waiting


class DeadLetter(NamedTuple):
    """A dead-lettered entry with the reason it could not be published."""

    entry_id: str
    reason: str
    attempts: int
    dead_at_ms: int
    payload: bytes


def _is_decoding_client(client: Any) -> bool:
    get_kwargs = getattr(client, "get_connection_kwargs", None)
    if get_kwargs is None:
        return False
    return bool(get_kwargs().get("decode_responses"))


class Outbox:
    """One outbox in Redis: a pending list filled by producers and the lease tables of drainers.

    ``client`` is a ``redis.Redis`` or ``redis.cluster.RedisCluster`` created with
    ``decode_responses=False``. Operations that fail because Redis is unreachable,
    loading, busy with a script or read-only are retried for up to ``retry_for_s``
    seconds and then raise a :class:`StoreError` naming the outbox.

    Single pushes to a ``redis.Redis`` go on a connection that outboxes sharing a
    connection pool keep outside it (see :mod:`outbox._push`), without the pool's checks
    before each command.

    NOTE: a client that retries by itself stretches that bound by its own retries.
    ``redis.Redis(host=..., port=...)`` retries 10 times with backoff of up to 1 s by
    default (redis-py 8.2), so one attempt can take seconds. :func:`connect` creates a
    client without those retries.
    """

    def __init__(
        self,
        client: Any,
        name: str,
        *,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        retry_for_s: float = DEFAULT_RETRY_FOR_S,
    ) -> None:
        if _is_decoding_client(client):
            raise OutboxConfigError(
                f"outbox {name!r}: the Redis client decodes responses, which corrupts binary "
                "entries; create it with decode_responses=False"
            )
        if max_attempts < 1:
            raise OutboxConfigError(f"max_attempts must be at least 1, got {max_attempts}")
        if retry_for_s < 0:
            raise OutboxConfigError(f"retry_for_s must not be negative, got {retry_for_s}")
        self.client = client
        self.keys = OutboxKeys.for_outbox(name)
        self.name = name
        self.max_attempts = max_attempts
        self.retry_for_s = retry_for_s
        self._scripts = {
            script: _scripts.register(client, script) for script in _scripts.SCRIPT_NAMES
        }
        self._pusher = _push.push_connection(client)

    def __repr__(self) -> str:
        return f"Outbox({self.name!r})"

    # Producers

    def push(self, payloads: Sequence[bytes]) -> int:
        """Store entries at the head of the pending list, atomically; return the list's length.

        NOTE: when a push times out after Redis stored it, the retry stores it again. The
        drainer then publishes both copies, which carry the same message id.
        """
        if not payloads:
            return self._run("push", lambda: int(self.client.llen(self.keys.pending)))
        if len(payloads) <= PUSH_CHUNK:
            return self._run("push", lambda: self._lpush(payloads))

        def push_in_one_transaction() -> int:
            pipe = self.client.pipeline(transaction=True)
            for start in range(0, len(payloads), PUSH_CHUNK):
                pipe.lpush(self.keys.pending, *payloads[start : start + PUSH_CHUNK])
            return int(pipe.execute()[-1])

        return self._run("push", push_in_one_transaction)

    def _lpush(self, payloads: Sequence[bytes]) -> int:
        if self._pusher is not None:
            length = self._pusher.lpush(self.keys.pending, payloads)
            if length is not None:
                return length
        return int(self.client.lpush(self.keys.pending, *payloads))

    def push_and_wait(self, payloads: Sequence[bytes], *, replicas: int, timeout_ms: int) -> int:
        """Store entries as :meth:`push` does, then wait until ``replicas`` replicas have them.

        Runs ``WAIT replicas timeout_ms`` on the connection that pushed, on the primary
        that owns the outbox's slot, and returns how many replicas acknowledged the
        push. No error is raised when fewer replicas acknowledged in time: the entries are
        stored on the primary, and lost only if it fails before replicating them.
        """
        if replicas < 1:
            raise OutboxConfigError(f"replicas must be at least 1, got {replicas}")
        if timeout_ms < 1:
            # WAIT with a timeout of 0 blocks without limit until enough replicas acknowledge.
            raise OutboxConfigError(f"timeout_ms must be at least 1, got {timeout_ms}")
        if not payloads:
            return replicas

        def push_and_wait_once() -> int:
            node = primary_client(self.client, self.keys.pending)
            # One non-transactional pipeline runs on one connection, which WAIT needs;
            # MULTI and EXEC inside it keep a push of several chunks atomic.
            pipe: Any = node.pipeline(transaction=False)
            chunked = len(payloads) > PUSH_CHUNK
            if chunked:
                pipe.execute_command("MULTI")
            for start in range(0, len(payloads), PUSH_CHUNK):
                pipe.lpush(self.keys.pending, *payloads[start : start + PUSH_CHUNK])
            if chunked:
                pipe.execute_command("EXEC")
            pipe.wait(replicas, timeout_ms)
            try:
                return int(pipe.execute()[-1])
            except redis_errors.AskError:
                # MOVED (a subclass of ASK) after a failover: nothing was stored. Reading
                # the slot table again sends the next attempt to the new primary.
                refresh_slots(self.client)
                raise

        return self._run("push", push_and_wait_once)

    # Drainers

    def claim(self, *, batch_size: int, lease_ms: int) -> Claim:
        """Lease up to ``batch_size`` entries: expired leases first, then new entries in FIFO order.

        Entries whose expired lease already used ``max_attempts`` claims are dead-lettered
        instead; ``Claim.dead_lettered`` counts them.
        """
        if not 1 <= batch_size <= MAX_BATCH_SIZE:
            raise OutboxConfigError(
                f"batch_size must be between 1 and {MAX_BATCH_SIZE}, got {batch_size}"
            )
        if lease_ms < 1:
            raise OutboxConfigError(f"lease_ms must be at least 1, got {lease_ms}")
        k = self.keys
        reply = self._script(
            "claim",
            [k.pending, k.leased, k.tokens, k.payloads, k.attempts, k.errors, k.dead, k.sequence],
            [batch_size, lease_ms, self.max_attempts],
        )
        token = _text(reply[0])
        leases = [
            Lease(_text(reply[i]), token, int(reply[i + 1]), bytes(reply[i + 2]))
            for i in range(3, len(reply), 3)
        ]
        return Claim(leases, int(reply[2]), int(reply[1]))

    def ack(self, leases: Sequence[Lease]) -> list[bool]:
        """Delete acknowledged entries; False for each lease that is no longer current.

        A lease stops being current when its deadline passes on the Redis clock or when
        release, bury, ack or another claim replaced its token.
        """
        k = self.keys
        return self._per_lease(
            "ack", [k.leased, k.tokens, k.payloads, k.attempts, k.errors], [], leases
        )

    def extend(self, leases: Sequence[Lease], *, lease_ms: int) -> list[bool]:
        """Renew leases to now + ``lease_ms``; False for each lease that is no longer current.

        An expired lease cannot be renewed, so extend well before the deadline.
        """
        if lease_ms < 1:
            raise OutboxConfigError(f"lease_ms must be at least 1, got {lease_ms}")
        return self._per_lease("extend", [self.keys.leased, self.keys.tokens], [lease_ms], leases)

    def release(
        self,
        leases: Sequence[Lease],
        *,
        delay_ms: int = 0,
        refund: bool = False,
        error: str = "",
    ) -> list[bool]:
        """Give entries back for another claim after ``delay_ms``.

        ``refund=True`` does not count the claim as an attempt; use it for failures of the
        broker as a whole. False for each lease that is no longer current (token replaced
        or deadline passed).
        """
        if delay_ms < 0:
            raise OutboxConfigError(f"delay_ms must not be negative, got {delay_ms}")
        k = self.keys
        return self._per_lease(
            "release",
            [k.leased, k.tokens, k.attempts, k.errors],
            [delay_ms, 1 if refund else 0, error],
            leases,
        )

    def bury(self, leases: Sequence[Lease], *, reason: str) -> list[bool]:
        """Move entries to the dead letters with ``reason``; False for each stale lease."""
        if not reason:
            raise OutboxConfigError("bury needs a reason that tells an operator what went wrong")
        k = self.keys
        return self._per_lease("bury", [k.leased, k.tokens, k.errors, k.dead], [reason], leases)

    # Operators

    def stats(self) -> OutboxStats:
        """Count pending, leased, waiting, dead and expired entries."""
        k = self.keys
        reply = self._script("stats", [k.pending, k.leased, k.tokens, k.dead], [])
        return OutboxStats(self.name, *(int(value) for value in reply))

    def dead_letters(self, *, offset: int = 0, count: int = 100) -> list[DeadLetter]:
        """Return dead letters, oldest first."""
        ids = self._run(
            "list dead letters",
            lambda: self.client.zrange(self.keys.dead, offset, offset + count - 1, withscores=True),
        )
        return self._dead_letter_details([(_text(i), int(score)) for i, score in ids])

    def dead_letter(self, entry_id: str) -> DeadLetter | None:
        """Return one dead letter, or None when ``entry_id`` is not a dead letter."""
        score = self._run("show dead letter", lambda: self.client.zscore(self.keys.dead, entry_id))
        if score is None:
            return None
        found = self._dead_letter_details([(entry_id, int(score))])
        return found[0] if found else None

    def requeue(self, entry_ids: Iterable[str] | None = None) -> int:
        """Give dead letters back to the drainers with fresh attempts; all of them without ids."""
        k = self.keys
        return self._admin("requeue", [k.leased, k.attempts, k.errors, k.dead], entry_ids)

    def purge(self, entry_ids: Iterable[str] | None = None) -> int:
        """Delete dead letters for good; all of them without ids."""
        k = self.keys
        return self._admin("purge", [k.payloads, k.attempts, k.errors, k.dead], entry_ids)

    # Internals

    def _dead_letter_details(self, ids: list[tuple[str, int]]) -> list[DeadLetter]:
        if not ids:
            return []
        names = [entry_id for entry_id, _ in ids]

        def read() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            pipe.hmget(self.keys.errors, names)
            pipe.hmget(self.keys.attempts, names)
            pipe.hmget(self.keys.payloads, names)
            return list(pipe.execute())

        reasons, attempts, payloads = self._run("read dead letters", read)
        return [
            DeadLetter(
                entry_id, _text(reason or b""), int(tries or 0), dead_at, bytes(payload or b"")
            )
            for (entry_id, dead_at), reason, tries, payload in zip(
                ids, reasons, attempts, payloads, strict=True
            )
        ]

    def _admin(self, script: str, keys: list[str], entry_ids: Iterable[str] | None) -> int:
        total = 0
        if entry_ids is None:
            while True:
                moved = int(self._script(script, keys, [ARGUMENT_CHUNK]))
                total += moved
                if moved == 0:
                    return total
        for chunk in _chunks(list(entry_ids), ARGUMENT_CHUNK):
            total += int(self._script(script, keys, [ARGUMENT_CHUNK, *chunk]))
        return total

    def _per_lease(
        self, script: str, keys: list[str], head: list[Any], leases: Sequence[Lease]
    ) -> list[bool]:
        statuses: list[bool] = []
        for chunk in _chunks(list(leases), ARGUMENT_CHUNK):
            pairs = [value for lease in chunk for value in (lease.entry_id, lease.token)]
            reply = self._script(script, keys, [*head, *pairs])
            statuses.extend(int(status) == 1 for status in reply)
        return statuses

    def _script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        script = self._scripts[name]

        def call() -> Any:
            try:
                return script(keys=keys, args=args)
            except redis_errors.NoScriptError:
                # redis-py reloads a missing script once, but a SCRIPT FLUSH can land
                # between that reload and its EVALSHA; EVAL sends the source itself.
                return self.client.eval(script.script, len(keys), *keys, *args)

        return self._run(name, call)

    def _run(self, operation: str, call: Callable[[], T]) -> T:
        """Run one Redis call, retrying transient errors for up to ``retry_for_s`` seconds."""
        deadline = time.monotonic() + self.retry_for_s
        backoff = _FIRST_BACKOFF_S
        attempt = 0
        while True:
            attempt += 1
            try:
                return call()
            except (redis_errors.RedisError, redis_errors.RedisClusterException) as exc:
                error = translate_error(exc, outbox=self.name, operation=operation)
                transient = isinstance(error, StoreUnavailableError | StoreReadOnlyError)
                pause = min(backoff, _MAX_BACKOFF_S) * (0.5 + random.random() / 2)
                if not transient or time.monotonic() + pause > deadline:
                    raise error from exc
                logger.warning(
                    "Redis %s on outbox %s failed, retrying in %.2f s [%d]: %s",
                    operation,
                    self.name,
                    pause,
                    attempt,
                    exc,
                )
                time.sleep(pause)
                backoff *= 2


def translate_error(
    exc: redis_errors.RedisError | redis_errors.RedisClusterException,
    *,
    outbox: str,
    operation: str,
) -> StoreError:
    """Map a redis-py error to the most specific StoreError, with what to do about it."""
    where = (
        f"Redis {operation} failed"
        if outbox == "*"
        else f"Redis {operation} on outbox {outbox!r} failed"
    )
    if isinstance(exc, redis_errors.RedisClusterException):
        # Raised by a cluster client that reaches no node or finds a slot without a primary.
        return StoreUnavailableError(
            f"{where}: the Redis Cluster has no reachable primary for the outbox: {exc}; "
            "check that the cluster is up"
        )
    if isinstance(exc, redis_errors.OutOfMemoryError):
        return StoreFullError(
            f"{where}: Redis is out of memory (maxmemory reached): {exc}; "
            "raise maxmemory or drain the outbox"
        )
    if isinstance(exc, redis_errors.ReadOnlyError):
        return StoreReadOnlyError(
            f"{where}: the server is a read-only replica: {exc}; point the client at the primary"
        )
    if isinstance(exc, redis_errors.BusyLoadingError):
        return StoreUnavailableError(f"{where}: Redis is loading its data set: {exc}; retry later")
    if isinstance(exc, redis_errors.ConnectionError | redis_errors.TimeoutError):
        return StoreUnavailableError(
            f"{where}: cannot reach Redis: {exc}; check that it is running"
        )
    if isinstance(exc, redis_errors.ClusterDownError | redis_errors.TryAgainError):
        return StoreUnavailableError(
            f"{where}: the Redis Cluster is failing over or moving slots: {exc}; retry later"
        )
    if isinstance(exc, redis_errors.AskError):
        return StoreUnavailableError(
            f"{where}: the slot moved to another Redis Cluster node: {exc}; retry to follow it"
        )
    if isinstance(exc, redis_errors.ResponseError) and str(exc).startswith("NOREPLICAS"):
        return StoreUnavailableError(
            f"{where}: the primary has fewer replicas than min-replicas-to-write: {exc}; "
            "retry when a replica is back"
        )
    if isinstance(exc, redis_errors.ResponseError) and str(exc).startswith("BUSY"):
        return StoreUnavailableError(
            f"{where}: Redis is busy running another script: {exc}; retry later"
        )
    return StoreError(f"{where}: {exc}")


def registered_outboxes(client: Any) -> list[str]:
    """Return the outbox names that buses registered when they first stored an entry, sorted."""
    try:
        members = client.smembers(REGISTRY_KEY)
    except (redis_errors.RedisError, redis_errors.RedisClusterException) as exc:
        raise translate_error(exc, outbox="*", operation="read of the outbox registry") from exc
    return sorted(_text(member) for member in members)


def discover_outboxes(client: Any) -> list[str]:
    """Return the registered outboxes and those with pending, leased or dead keys, sorted.

    Scans the whole keyspace; drainers do so rarely and read the registry in between.
    """
    names: set[str] = set(registered_outboxes(client))
    try:
        for key in client.scan_iter(match=f"{KEY_PREFIX}:{{*}}:*", count=1000):
            name = outbox_name_from_key(_text(key))
            if name is not None:
                names.add(name)
    except (redis_errors.RedisError, redis_errors.RedisClusterException) as exc:
        raise translate_error(exc, outbox="*", operation="scan") from exc
    return sorted(names)


def connect(url: str, **options: Any) -> redis.Redis:
    """Create a redis-py client for ``url`` with the settings the outbox needs.

    redis-py's own retries are off, so ``Outbox.retry_for_s`` alone bounds how long an
    operation retries.
    """
    _check_database(url)
    options.setdefault("retry", Retry(NoBackoff(), 0))
    options.setdefault("socket_timeout", 5.0)
    options.setdefault("socket_connect_timeout", 2.0)
    options.setdefault("health_check_interval", 30)
    return redis.Redis.from_url(url, decode_responses=False, **options)


def _check_database(url: str) -> None:
    """Raise ValueError when the path of a redis:// or rediss:// URL is not a database number.

    redis-py ignores such a path, so ``redis://host/abc`` would silently use database 0.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        return
    database = parts.path.removeprefix("/")
    if database and not (database.isascii() and database.isdigit()):
        raise ValueError(
            f"the URL path {parts.path!r} is not a database number; write redis://host:port/0"
        )


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _chunks(items: list[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
