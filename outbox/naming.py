"""Exchange, routing-key and outbox-name conventions shared with petisco."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Literal

from outbox.errors import OutboxConfigError

MessageKind = Literal["event", "command"]

KEY_PREFIX = "outbox"
# Set of outbox names that buses stored entries in; drainers read it to find new outboxes
# without scanning the keyspace.
REGISTRY_KEY = f"{KEY_PREFIX}:names"

# AMQP short strings, such as exchange names and routing keys, hold at most 255 bytes.
AMQP_SHORT_STRING_BYTES = 255
# Characters that would break a hash tag, a routing-key segment or a Redis key pattern.
_FORBIDDEN_NAME_CHARS = re.compile(r"[{}\s*?\[\]]")
_CAMEL_BOUNDARY = re.compile(r"(?<!^)(?=[A-Z])")


def message_name(class_name: str) -> str:
    """Derive petisco's dotted message name from a class name: ``UserCreated`` -> ``user.created``."""
    return _CAMEL_BOUNDARY.sub("_", class_name).lower().replace("_", ".")


def exchange_name(organization: str, service: str) -> str:
    """Return the topic exchange of a service: ``{organization}.{service}``."""
    if not (isinstance(organization, str) and isinstance(service, str)):
        check_name_part("organization", organization)
        check_name_part("service", service)
    return _checked_exchange_name(organization, service)


@functools.lru_cache(maxsize=1024)
def _checked_exchange_name(organization: str, service: str) -> str:
    # Buses build an exchange name for every message; the checks run once per pair.
    check_name_part("organization", organization)
    check_name_part("service", service)
    return f"{organization}.{service}"


def routing_key(
    organization: str, service: str, *, version: int, kind: MessageKind, name: str
) -> str:
    """Return ``{organization}.{service}.{version}.{event|command}.{snake_case_name}``."""
    return route(organization, service, version, kind, name)[1]


def route(
    organization: str, service: str, version: int, kind: MessageKind, name: str
) -> tuple[str, str]:
    """Return the exchange and routing key of a message."""
    if not (isinstance(organization, str) and isinstance(service, str)):
        check_name_part("organization", organization)
        check_name_part("service", service)
    return _route(organization, service, version, kind, name)


@functools.lru_cache(maxsize=4096)
def _route(
    organization: str, service: str, version: int, kind: MessageKind, name: str
) -> tuple[str, str]:
    # Buses route every message; the names are checked and joined once per message type.
    exchange = _checked_exchange_name(organization, service)
    key = f"{exchange}.{version}.{kind}.{name.replace('.', '_')}"
    for label, value in (("exchange", exchange), ("routing key", key)):
        size = len(value.encode())
        if size > AMQP_SHORT_STRING_BYTES:
            raise OutboxConfigError(
                f"{label} {value[:60]!r}... has {size} bytes, more than the "
                f"{AMQP_SHORT_STRING_BYTES} AMQP allows; shorten the organization, the service "
                "or the message name"
            )
    return exchange, key


def outbox_name(organization: str, service: str, kind: MessageKind) -> str:
    """Return the outbox that stores one service's events or commands."""
    return f"{exchange_name(organization, service)}.{kind}s"


def check_name_part(what: str, value: str) -> None:
    """Raise OutboxConfigError unless ``value`` can be part of exchange names and Redis keys."""
    if not isinstance(value, str) or not value:
        raise OutboxConfigError(f"{what} must be a non-empty string, got {value!r}")
    if _FORBIDDEN_NAME_CHARS.search(value):
        raise OutboxConfigError(
            f"{what} {value!r} contains a character that is not allowed in outbox names "
            "(braces, whitespace, '*', '?', '[' or ']'); choose a name without them"
        )


@dataclass(frozen=True)
class OutboxKeys:
    """The Redis keys of one outbox; they share the hash tag ``{name}`` so Redis Cluster
    keeps them in one slot."""

    name: str
    pending: str
    leased: str
    tokens: str
    payloads: str
    attempts: str
    errors: str
    dead: str
    sequence: str

    @classmethod
    def for_outbox(cls, name: str) -> OutboxKeys:
        check_name_part("outbox name", name)
        prefix = f"{KEY_PREFIX}:{{{name}}}:"
        return cls(
            name=name,
            pending=prefix + "pending",
            leased=prefix + "leased",
            tokens=prefix + "tokens",
            payloads=prefix + "payloads",
            attempts=prefix + "attempts",
            errors=prefix + "errors",
            dead=prefix + "dead",
            sequence=prefix + "seq",
        )


_KEY_PATTERN = re.compile(r"^" + KEY_PREFIX + r":\{(?P<name>[^{}]+)\}:(?P<part>[a-z]+)$")

# Keys whose existence means an outbox has work or history; the others only accompany them.
DISCOVERY_PARTS = frozenset({"pending", "leased", "dead"})


def outbox_name_from_key(key: str) -> str | None:
    """Return the outbox name of an outbox key, or None for any other key."""
    match = _KEY_PATTERN.match(key)
    if match is None or match.group("part") not in DISCOVERY_PARTS:
        return None
    return match.group("name")
