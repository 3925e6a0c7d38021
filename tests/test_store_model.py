"""The Redis outbox against a plain Python model, driven by a Hypothesis state machine.

Producers push, three drainers claim, publish, ack, release, bury and crash, leases run
out under drainers that are still alive, Redis loses its script cache, and replies get
lost after Redis ran a script. After every step the outbox's Redis keys must hold
exactly what the model holds. At the end a full drain must leave every message acked or
dead. A message may be dead only when some attempt was used up by something other than a
broker-wide failure.

Time: a lease is either live (60 s, longer than any run) or runs out at once. Redis time
cannot be advanced, so a lease runs out by being shortened to 1 ms with extend and waiting
until the Redis clock has passed it, which is what waiting out lease_ms does.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
import redis.exceptions as redis_errors
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from outbox import store
from outbox.store import Claim, Lease, Outbox

MAX_ATTEMPTS = 3
LIVE_LEASE_MS = 60_000
SHORT_LEASE_MS = 1
DRAINERS = 3
# Bounds the final drain; each round claims up to 100 entries.
MAX_DRAIN_ROUNDS = 200

LEASE_EXPIRED = "lease expired before the drainer acknowledged it"
OUTCOMES = ("confirmed", "broker_failure", "message_failure", "message_buried", "unknown")


def server_time_ms(client: redis.Redis) -> int:
    seconds, microseconds = client.time()
    return int(seconds) * 1000 + int(microseconds) // 1000


def wait_for_server_time(client: redis.Redis, target_ms: int) -> None:
    while server_time_ms(client) < target_ms:
        pass


@dataclass(eq=False)
class Message:
    """The model's record of one pushed message."""

    number: int
    payload: bytes
    poison: bool
    state: str = "pending"
    entry_id: str | None = None
    # Token of the current lease; None while the entry waits in the leased set without
    # an owner (released or requeued).
    token: str | None = None
    live: bool = False
    attempts: int = 0
    copies: int = 0
    lost_leases: int = 0
    unknown_outcomes: int = 0
    # True once an attempt was used up by anything but a refunded release: a failure of
    # the message, a crash, a lease that ran out or a claim whose reply was lost.
    attempt_used_up: bool = False
    # The text Redis must store as the entry's last failure or dead-letter reason.
    error: str | None = None

    def holds(self, lease: Lease) -> bool:
        """Return True when ``lease`` is the message's current, unexpired lease."""
        return (
            self.state == "held"
            and self.entry_id == lease.entry_id
            and self.token == lease.token
            and self.live
        )

    def __repr__(self) -> str:
        return f"Message({self.number}, {self.state}, id={self.entry_id}, attempts={self.attempts})"


class ReplyLosingScript:
    """Wraps a registered script; when armed, runs it and then drops its reply once.

    Outbox gets a connection error after Redis ran the script and retries the same call,
    as it would after a network failure. The dropped reply stays in ``lost_replies`` so
    the model can account for what the first call did.
    """

    def __init__(self, registered: Any, observe: Callable[[], Any]) -> None:
        self.registered = registered
        # Outbox falls back to EVAL with this source when EVALSHA keeps missing.
        self.script = registered.script
        self.observe = observe
        self.armed = False
        # Each lost reply, with what ``observe`` returned right after the script ran.
        self.lost_replies: list[tuple[Any, Any]] = []

    def __call__(self, keys: list[str], args: list[Any], **options: Any) -> Any:
        reply = self.registered(keys=keys, args=args, **options)
        if self.armed:
            self.armed = False
            self.lost_replies.append((reply, self.observe()))
            raise redis_errors.ConnectionError("reply lost after Redis ran the script")
        return reply


class OutboxModel(RuleBasedStateMachine):
    """Pushes, claims and outcomes against one outbox, checked against plain Python state."""

    def __init__(self, client: redis.Redis) -> None:
        super().__init__()
        self.client = client
        OutboxModel.runs += 1
        self.outbox = Outbox(
            client, f"model.run{OutboxModel.runs}", max_attempts=MAX_ATTEMPTS, retry_for_s=5
        )
        self.losing = {
            name: ReplyLosingScript(self.outbox._scripts[name], self._dead_ids)
            for name in ("claim", "ack", "release")
        }
        self.outbox._scripts.update(self.losing)
        self.messages: list[Message] = []
        self.pending: deque[Message] = deque()
        self.by_id: dict[str, Message] = {}
        self.hands: list[list[Lease]] = [[] for _ in range(DRAINERS)]

    runs = 0

    # Producers

    def _push(self, drafts: list[tuple[bool, bytes, bool]]) -> None:
        batch = []
        for empty, noise, poison in drafts:
            number = len(self.messages)
            payload = b"" if empty else b"%06d|" % number + noise
            message = Message(number, payload, poison)
            self.messages.append(message)
            batch.append(message)

        length = self.outbox.push([message.payload for message in batch])

        self.pending.extend(batch)
        assert length == len(self.pending)

    @rule(empty=st.booleans(), noise=st.binary(max_size=12), poison=st.booleans())
    def push_one(self, empty: bool, noise: bytes, poison: bool) -> None:
        self._push([(empty, noise, poison)])

    @rule(
        drafts=st.lists(st.tuples(st.booleans(), st.binary(max_size=12), st.booleans()), max_size=5)
    )
    def push_batch(self, drafts: list[tuple[bool, bytes, bool]]) -> None:
        self._push(drafts)

    # Claims

    def _claimable(self) -> list[Message]:
        return [
            message
            for message in self.messages
            if message.state == "held" and (message.token is None or not message.live)
        ]

    def _dead_ids(self) -> set[str]:
        return {entry_id.decode() for entry_id in self.client.zrange(self.outbox.keys.dead, 0, -1)}

    def _apply_claim(
        self, claim: Claim, *, batch_size: int, live: bool, dead_after: set[str] | None = None
    ) -> None:
        """Check a claim's reply against the model, then record its leases.

        ``dead_after`` is the set of dead letters right after the claim ran; it is read
        from Redis when not given.
        """
        expired = self._claimable()
        expired_ids = {message.entry_id for message in expired}
        dead_before = {message.entry_id for message in self.messages if message.state == "dead"}

        reclaimed = [lease for lease in claim.leases if lease.entry_id in self.by_id]
        new = claim.leases[len(reclaimed) :]
        if dead_after is None:
            dead_after = self._dead_ids()
        dead_lettered = dead_after - dead_before

        assert all(lease.token == claim.leases[0].token for lease in claim.leases)
        assert all(lease.entry_id not in self.by_id for lease in new)
        assert {lease.entry_id for lease in reclaimed} <= expired_ids
        assert dead_lettered <= expired_ids
        assert claim.dead_lettered == len(dead_lettered)
        for entry_id in dead_lettered:
            assert self.by_id[entry_id].attempts >= MAX_ATTEMPTS
        for lease in reclaimed:
            message = self.by_id[lease.entry_id]
            assert message.attempts < MAX_ATTEMPTS
            assert lease.attempts == message.attempts + 1
            assert lease.payload == message.payload

        # Phase 1 examines at most batch_size expired entries; phase 2 fills the rest of
        # the batch with new entries, since dead letters take no place in it.
        assert len(reclaimed) + len(dead_lettered) == min(batch_size, len(expired))
        assert len(new) == min(batch_size - len(reclaimed), len(self.pending))
        if len(expired) <= batch_size:
            expected_dead = {m.entry_id for m in expired if m.attempts >= MAX_ATTEMPTS}
            assert dead_lettered == expected_dead

        for entry_id in dead_lettered:
            message = self.by_id[entry_id]
            last_error = LEASE_EXPIRED if message.token is not None else message.error
            message.error = (
                f"gave up after {message.attempts} attempts; "
                f"last error: {last_error or 'no error recorded'}"
            )
            message.state = "dead"
            message.token = None
            message.live = False
        for lease in reclaimed:
            message = self.by_id[lease.entry_id]
            if message.token is not None:
                message.error = LEASE_EXPIRED
            message.token = lease.token
            message.live = True
            message.attempts = lease.attempts
        for lease in new:
            message = self.pending.popleft()
            assert lease.payload == message.payload
            assert lease.attempts == 1
            message.state = "held"
            message.entry_id = lease.entry_id
            message.token = lease.token
            message.live = True
            message.attempts = 1
            self.by_id[lease.entry_id] = message

        if not live:
            wait_for_server_time(self.client, claim.server_time_ms + SHORT_LEASE_MS + 1)
            for lease in claim.leases:
                self._mark_run_out(self.by_id[lease.entry_id])

    def _mark_run_out(self, message: Message) -> None:
        message.live = False
        message.lost_leases += 1
        message.attempt_used_up = True

    @rule(drainer=st.integers(0, DRAINERS - 1), batch_size=st.integers(1, 4), live=st.booleans())
    def claim(self, drainer: int, batch_size: int, live: bool) -> None:
        lease_ms = LIVE_LEASE_MS if live else SHORT_LEASE_MS
        claim = self.outbox.claim(batch_size=batch_size, lease_ms=lease_ms)
        self._apply_claim(claim, batch_size=batch_size, live=live)
        self.hands[drainer].extend(claim.leases)

    # Outcomes of publishing

    def _take(self, drainer: int, count: int) -> list[Lease]:
        taken = self.hands[drainer][:count]
        del self.hands[drainer][:count]
        return taken

    def _entry_state(self, entry_id: str) -> tuple[Any, ...]:
        keys = self.outbox.keys
        return (
            self.client.zscore(keys.leased, entry_id),
            self.client.hget(keys.tokens, entry_id),
            self.client.hget(keys.attempts, entry_id),
            self.client.hget(keys.errors, entry_id),
            self.client.zscore(keys.dead, entry_id),
            self.client.hexists(keys.payloads, entry_id),
        )

    def _run_fenced(
        self, leases: list[Lease], call: Callable[[list[Lease]], list[bool]]
    ) -> list[bool]:
        """Call ack, extend, release or bury; stale leases must get False and change nothing."""
        expected = [self.by_id[lease.entry_id].holds(lease) for lease in leases]
        # A hand may hold an old and a new lease of one entry; only the new one may act.
        current_ids = {
            lease.entry_id for lease, current in zip(leases, expected, strict=True) if current
        }
        stale_ids = [
            lease.entry_id
            for lease, current in zip(leases, expected, strict=True)
            if not current and lease.entry_id not in current_ids
        ]
        stale_before = [self._entry_state(entry_id) for entry_id in stale_ids]

        statuses = call(leases)

        assert statuses == expected
        assert [self._entry_state(entry_id) for entry_id in stale_ids] == stale_before
        return statuses

    def _publish(self, leases: list[Lease]) -> None:
        for lease in leases:
            self.by_id[lease.entry_id].copies += 1

    def _ack(self, leases: list[Lease]) -> None:
        statuses = self._run_fenced(leases, self.outbox.ack)
        for lease, acked in zip(leases, statuses, strict=True):
            if acked:
                message = self.by_id[lease.entry_id]
                message.state = "acked"
                message.token = None

    def _release(self, leases: list[Lease], *, refund: bool, error: str) -> None:
        statuses = self._run_fenced(
            leases, lambda chosen: self.outbox.release(chosen, refund=refund, error=error)
        )
        for lease, released in zip(leases, statuses, strict=True):
            if released:
                self._record_release(self.by_id[lease.entry_id], refund=refund, error=error)

    def _record_release(self, message: Message, *, refund: bool, error: str) -> None:
        message.error = error or message.error
        message.token = None
        message.live = False
        if refund:
            message.attempts -= 1
        else:
            message.attempt_used_up = True

    def _bury(self, leases: list[Lease], *, reason: str) -> None:
        statuses = self._run_fenced(leases, lambda chosen: self.outbox.bury(chosen, reason=reason))
        for lease, buried in zip(leases, statuses, strict=True):
            if buried:
                message = self.by_id[lease.entry_id]
                message.state = "dead"
                message.token = None
                message.live = False
                message.attempt_used_up = True
                message.error = reason

    def _drainers_with_leases(self) -> list[int]:
        return [drainer for drainer, hand in enumerate(self.hands) if hand]

    @precondition(lambda self: any(self.hands))
    @rule(data=st.data(), count=st.integers(1, 3), outcome=st.sampled_from(OUTCOMES))
    def publish(self, data: st.DataObject, count: int, outcome: str) -> None:
        drainer = data.draw(st.sampled_from(self._drainers_with_leases()))
        leases = self._take(drainer, count)
        poison = [lease for lease in leases if self.by_id[lease.entry_id].poison]
        healthy = [lease for lease in leases if not self.by_id[lease.entry_id].poison]

        # A poison message fails for itself whenever it reaches the broker.
        if outcome in ("confirmed", "unknown") and poison:
            self._release(poison, refund=False, error="poison message rejected")
            leases = healthy

        if not leases:
            return
        if outcome == "confirmed":
            self._publish(leases)
            self._ack(leases)
        elif outcome == "broker_failure":
            self._release(leases, refund=True, error="broker unreachable")
        elif outcome == "message_failure":
            self._release(leases, refund=False, error="unroutable")
        elif outcome == "message_buried":
            self._bury(leases, reason="cannot decode the record")
        else:
            self._publish(leases)
            for lease in leases:
                self.by_id[lease.entry_id].unknown_outcomes += 1
            self._release(leases, refund=True, error="confirm timed out")

    @precondition(lambda self: any(self.hands))
    @rule(data=st.data())
    def extend(self, data: st.DataObject) -> None:
        drainer = data.draw(st.sampled_from(self._drainers_with_leases()))
        leases = self.hands[drainer]
        self._run_fenced(leases, lambda chosen: self.outbox.extend(chosen, lease_ms=LIVE_LEASE_MS))

    # Leases that run out and drainers that crash

    def _run_out(self, leases: list[Lease]) -> None:
        """Let the current ones of ``leases`` run out, as if their drainer stalled."""
        current = [lease for lease in leases if self.by_id[lease.entry_id].holds(lease)]
        if not current:
            return
        assert self.outbox.extend(current, lease_ms=SHORT_LEASE_MS) == [True] * len(current)
        wait_for_server_time(self.client, server_time_ms(self.client) + SHORT_LEASE_MS + 1)
        for lease in current:
            self._mark_run_out(self.by_id[lease.entry_id])

    @precondition(lambda self: any(self.hands))
    @rule(data=st.data(), count=st.integers(1, 3))
    def lease_runs_out_under_live_drainer(self, data: st.DataObject, count: int) -> None:
        drainer = data.draw(st.sampled_from(self._drainers_with_leases()))
        self._run_out(self.hands[drainer][:count])

    @precondition(lambda self: any(self.hands))
    @rule(data=st.data(), published=st.integers(0, 3), acked=st.integers(0, 3))
    def drainer_crashes(self, data: st.DataObject, published: int, acked: int) -> None:
        """Crash after claim (published=0), after publish before ack (acked=0), or
        between two acks (some acked, the rest left)."""
        drainer = data.draw(st.sampled_from(self._drainers_with_leases()))
        hand = self.hands[drainer]
        sent = hand[:published]
        self._publish(sent)
        if acked:
            self._ack(sent[:acked])
        self._run_out(hand[min(acked, len(sent)) :])
        self.hands[drainer] = []

    def _stale_drainers(self) -> list[int]:
        return [
            drainer
            for drainer, hand in enumerate(self.hands)
            if any(not self.by_id[lease.entry_id].holds(lease) for lease in hand)
        ]

    @precondition(lambda self: bool(self._stale_drainers()))
    @rule(
        data=st.data(),
        operation=st.sampled_from(["ack", "extend", "release", "refund", "bury"]),
    )
    def stale_drainer_changes_nothing(self, data: st.DataObject, operation: str) -> None:
        drainer = data.draw(st.sampled_from(self._stale_drainers()))
        stale = [
            lease for lease in self.hands[drainer] if not self.by_id[lease.entry_id].holds(lease)
        ]
        calls: dict[str, Callable[[list[Lease]], list[bool]]] = {
            "ack": self.outbox.ack,
            "extend": lambda leases: self.outbox.extend(leases, lease_ms=LIVE_LEASE_MS),
            "release": lambda leases: self.outbox.release(leases, error="late"),
            "refund": lambda leases: self.outbox.release(leases, refund=True, error="late"),
            "bury": lambda leases: self.outbox.bury(leases, reason="late"),
        }
        before = self._snapshot()

        statuses = calls[operation](stale)

        assert statuses == [False] * len(stale)
        assert self._snapshot() == before

    # Redis trouble

    @rule()
    def script_cache_is_flushed(self) -> None:
        self.client.script_flush()

    @rule(drainer=st.integers(0, DRAINERS - 1), batch_size=st.integers(1, 4))
    def claim_reply_is_lost(self, drainer: int, batch_size: int) -> None:
        self.losing["claim"].armed = True
        retried = self.outbox.claim(batch_size=batch_size, lease_ms=LIVE_LEASE_MS)

        reply, dead_after = self.losing["claim"].lost_replies.pop()
        lost = self._claim_from_reply(reply)
        self._apply_claim(lost, batch_size=batch_size, live=True, dead_after=dead_after)
        self._apply_claim(retried, batch_size=batch_size, live=True)
        self.hands[drainer].extend(retried.leases)
        # No drainer holds the first claim's leases, so they run out like a crashed drainer's.
        self._run_out(lost.leases)

    def _claim_from_reply(self, reply: list[Any]) -> Claim:
        token = reply[0].decode()
        leases = [
            Lease(reply[i].decode(), token, int(reply[i + 1]), bytes(reply[i + 2]))
            for i in range(3, len(reply), 3)
        ]
        return Claim(leases, int(reply[2]), int(reply[1]))

    @precondition(lambda self: any(self.hands))
    @rule(data=st.data(), count=st.integers(1, 3))
    def ack_reply_is_lost(self, data: st.DataObject, count: int) -> None:
        drainer = data.draw(st.sampled_from(self._drainers_with_leases()))
        leases = self._take(drainer, count)
        self._publish(leases)
        expected = [self.by_id[lease.entry_id].holds(lease) for lease in leases]

        self.losing["ack"].armed = True
        statuses = self.outbox.ack(leases)

        ((lost, _),) = self.losing["ack"].lost_replies
        self.losing["ack"].lost_replies.clear()
        assert [status == 1 for status in lost] == expected
        assert statuses == [False] * len(leases)
        for lease, acked in zip(leases, expected, strict=True):
            if acked:
                self.by_id[lease.entry_id].state = "acked"
                self.by_id[lease.entry_id].token = None

    @precondition(lambda self: any(self.hands))
    @rule(data=st.data(), count=st.integers(1, 3))
    def release_reply_is_lost(self, data: st.DataObject, count: int) -> None:
        drainer = data.draw(st.sampled_from(self._drainers_with_leases()))
        leases = self._take(drainer, count)
        expected = [self.by_id[lease.entry_id].holds(lease) for lease in leases]

        self.losing["release"].armed = True
        statuses = self.outbox.release(leases, refund=True, error="broker unreachable")

        ((lost, _),) = self.losing["release"].lost_replies
        self.losing["release"].lost_replies.clear()
        assert [status == 1 for status in lost] == expected
        assert statuses == [False] * len(leases)
        for lease, released in zip(leases, expected, strict=True):
            if released:
                self._record_release(
                    self.by_id[lease.entry_id], refund=True, error="broker unreachable"
                )

    # Operators

    @rule()
    def requeue_dead_letters(self) -> None:
        dead = [message for message in self.messages if message.state == "dead"]

        moved = self.outbox.requeue()

        assert moved == len(dead)
        for message in dead:
            message.state = "held"
            message.attempts = 0
            message.attempt_used_up = False
            message.error = None

    # Invariants

    def _snapshot(self) -> dict[str, Any]:
        keys = self.outbox.keys
        return {
            "pending": self.client.lrange(keys.pending, 0, -1),
            "leased": self.client.zrange(keys.leased, 0, -1, withscores=True),
            "tokens": self.client.hgetall(keys.tokens),
            "payloads": self.client.hgetall(keys.payloads),
            "attempts": self.client.hgetall(keys.attempts),
            "errors": self.client.hgetall(keys.errors),
            "dead": self.client.zrange(keys.dead, 0, -1, withscores=True),
            "sequence": self.client.get(keys.sequence),
        }

    @invariant()
    def redis_holds_what_the_model_holds(self) -> None:
        snapshot = self._snapshot()
        held = {m.entry_id: m for m in self.messages if m.state == "held"}
        dead = {m.entry_id: m for m in self.messages if m.state == "dead"}
        owned = {entry_id: m.token for entry_id, m in held.items() if m.token is not None}
        leased_ids = {entry_id.decode() for entry_id, _ in snapshot["leased"]}
        dead_ids = {entry_id.decode() for entry_id, _ in snapshot["dead"]}

        assert snapshot["pending"][::-1] == [message.payload for message in self.pending]
        assert leased_ids == set(held)
        assert dead_ids == set(dead)
        assert {k.decode(): v.decode() for k, v in snapshot["tokens"].items()} == owned
        assert {k.decode(): v for k, v in snapshot["payloads"].items()} == {
            entry_id: message.payload for entry_id, message in (held | dead).items()
        }
        assert {k.decode(): int(v) for k, v in snapshot["attempts"].items()} == {
            entry_id: message.attempts for entry_id, message in (held | dead).items()
        }
        assert {k.decode(): v.decode() for k, v in snapshot["errors"].items()} == {
            entry_id: message.error
            for entry_id, message in (held | dead).items()
            if message.error is not None
        }

    @invariant()
    def every_message_is_in_exactly_one_state(self) -> None:
        counts = {state: 0 for state in ("pending", "held", "dead", "acked")}
        for message in self.messages:
            counts[message.state] += 1

        assert counts["pending"] == len(self.pending)
        assert sum(counts.values()) == len(self.messages)

    @invariant()
    def copies_come_only_from_retries(self) -> None:
        for message in self.messages:
            allowed = 1 + message.lost_leases + message.unknown_outcomes
            assert message.copies <= allowed, message

    @invariant()
    def every_live_lease_is_in_a_hand(self) -> None:
        in_hands = {(lease.entry_id, lease.token) for hand in self.hands for lease in hand}
        for message in self.messages:
            if message.state == "held" and message.token is not None and message.live:
                assert (message.entry_id, message.token) in in_hands, message

    # The end: drain everything

    def teardown(self) -> None:
        try:
            self._drain_everything()
        finally:
            self.client.delete(*self._snapshot_keys())

    def _snapshot_keys(self) -> list[str]:
        keys = self.outbox.keys
        return [
            keys.pending,
            keys.leased,
            keys.tokens,
            keys.payloads,
            keys.attempts,
            keys.errors,
            keys.dead,
            keys.sequence,
        ]

    def _drain_everything(self) -> None:
        for drainer, hand in enumerate(self.hands):
            current = [lease for lease in hand if self.by_id[lease.entry_id].holds(lease)]
            self._publish(current)
            self._ack(current)
            self.hands[drainer] = []

        for _ in range(MAX_DRAIN_ROUNDS):
            if not self.pending and not self._claimable():
                break
            claim = self.outbox.claim(batch_size=100, lease_ms=LIVE_LEASE_MS)
            self._apply_claim(claim, batch_size=100, live=True)
            self._publish(claim.leases)
            self._ack(claim.leases)
        self.redis_holds_what_the_model_holds()

        for message in self.messages:
            assert message.state in ("acked", "dead"), message
            if message.state == "dead":
                assert message.attempt_used_up, message
            assert message.copies >= 1 or message.state == "dead", message
            assert message.copies <= 1 + message.lost_leases + message.unknown_outcomes, message


@pytest.fixture
def model_client(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> Iterator[redis.Redis]:
    # Lost replies make Outbox retry and log a warning; a short first backoff keeps
    # those steps fast, and the warnings are expected here.
    monkeypatch.setattr(store, "_FIRST_BACKOFF_S", 0.001)
    caplog.set_level(logging.ERROR, logger="outbox.store")
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def test_outbox_behaves_like_model(model_client: redis.Redis) -> None:
    run_state_machine_as_test(
        lambda: OutboxModel(model_client),
        settings=settings(settings.default, deadline=None, stateful_step_count=40),
    )


# Counterexamples Hypothesis found, kept as explicit step sequences. Each step is
# followed by every invariant, as in a Hypothesis run, and each test ends with the
# final drain.


class Draws:
    """Stands in for ``st.data()`` in a replayed step: returns the given values in order."""

    def __init__(self, *values: Any) -> None:
        self.values = list(values)

    def draw(self, strategy: Any) -> Any:
        return self.values.pop(0)


def replay(client: redis.Redis, steps: Callable[[OutboxModel], Iterator[None]]) -> OutboxModel:
    """Run ``steps`` on a fresh model, checking every invariant after each step."""
    machine = OutboxModel(client)
    invariants = [
        machine.redis_holds_what_the_model_holds,
        machine.every_message_is_in_exactly_one_state,
        machine.copies_come_only_from_retries,
        machine.every_live_lease_is_in_a_hand,
    ]
    for _ in steps(machine):
        for check in invariants:
            check()
    machine.teardown()
    return machine


def test_ack_after_lease_ran_out_changes_nothing(model_client: redis.Redis) -> None:
    # Before ack, extend, release and bury checked the lease deadline, this ack of a
    # lease that had run out, but that no drainer had claimed again, deleted the entry.
    def steps(machine: OutboxModel) -> Iterator[None]:
        yield machine.push_one(empty=False, noise=b"", poison=False)
        yield machine.claim(drainer=0, batch_size=1, live=False)
        yield machine.publish(data=Draws(0), count=1, outcome="confirmed")

    replay(model_client, steps)


def test_hand_with_old_and_new_lease_of_one_entry(model_client: redis.Redis) -> None:
    # A drainer whose lease ran out can claim the same entry again; then only the new
    # lease may extend or ack it, in the same call as the old one.
    def steps(machine: OutboxModel) -> Iterator[None]:
        yield machine.push_one(empty=False, noise=b"x", poison=False)
        yield machine.claim(drainer=0, batch_size=1, live=False)
        yield machine.claim(drainer=0, batch_size=1, live=True)
        yield machine.extend(data=Draws(0))
        yield machine.publish(data=Draws(0), count=2, outcome="confirmed")

    replay(model_client, steps)


def test_claim_with_more_expired_than_batch_size(model_client: redis.Redis) -> None:
    # More expired entries than batch_size, the first of them used up: the claim
    # dead-letters it and takes a new entry, because dead letters use no place in the batch.
    def steps(machine: OutboxModel) -> Iterator[None]:
        yield machine.push_one(empty=False, noise=b"", poison=False)
        yield machine.push_one(empty=True, noise=b"", poison=False)
        for _ in range(MAX_ATTEMPTS):
            yield machine.claim(drainer=0, batch_size=2, live=False)
        yield machine.push_one(empty=False, noise=b"new", poison=False)
        yield machine.claim(drainer=1, batch_size=1, live=True)

    replay(model_client, steps)


def test_lost_claim_and_its_retry_dead_letter_separately(model_client: redis.Redis) -> None:
    # The claim whose reply is lost and the retried claim each dead-letter used-up
    # entries; each reply counts only its own.
    def steps(machine: OutboxModel) -> Iterator[None]:
        yield machine.push_one(empty=False, noise=b"", poison=False)
        yield machine.push_one(empty=False, noise=b"", poison=False)
        yield machine.claim(drainer=0, batch_size=1, live=False)
        yield machine.claim_reply_is_lost(drainer=0, batch_size=2)
        yield machine.claim(drainer=0, batch_size=1, live=False)
        yield machine.claim_reply_is_lost(drainer=0, batch_size=1)

    replay(model_client, steps)


def test_poison_message_dies_while_others_survive_outage(model_client: redis.Redis) -> None:
    def steps(machine: OutboxModel) -> Iterator[None]:
        yield machine.push_batch(drafts=[(False, b"poison", True), (False, b"good", False)])
        for _ in range(MAX_ATTEMPTS):
            yield machine.claim(drainer=0, batch_size=2, live=True)
            yield machine.publish(data=Draws(0), count=1, outcome="confirmed")
            yield machine.publish(data=Draws(0), count=1, outcome="broker_failure")
        yield machine.claim(drainer=1, batch_size=2, live=True)

    machine = replay(model_client, steps)

    poison, good = machine.messages
    assert poison.state == "dead"
    assert poison.error == "gave up after 3 attempts; last error: poison message rejected"
    assert good.state == "acked"
