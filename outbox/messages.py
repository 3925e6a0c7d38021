"""Domain events and commands, and their JSON wire format.

The body of every published message is petisco's::

    {"data": {"id", "type", "type_message", "version", "occurred_on", "attributes", "meta"}}

where ``type`` is the dotted snake name (``user.created``), ``type_message`` is
``domain_event`` or ``command`` and ``occurred_on`` is UTC ``YYYY-MM-DD HH:MM:SS.ffffff``.
"""

from __future__ import annotations

import inspect
import math
import uuid
from datetime import datetime, timezone
from typing import Any, ClassVar, TypeVar

import msgspec

from outbox.errors import MessageEncodeError, OutboxConfigError, RecordDecodeError
from outbox.naming import MessageKind, message_name

TIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"
_json_encoder = msgspec.json.Encoder()
CONTENT_TYPE = "application/json"

_TYPE_MESSAGE: dict[MessageKind, str] = {"event": "domain_event", "command": "command"}
_KIND_OF_TYPE_MESSAGE: dict[str, MessageKind] = {v: k for k, v in _TYPE_MESSAGE.items()}

M = TypeVar("M", bound="Message")


def new_message_id() -> str:
    """Return a random UUID4 string, the id petisco gives messages."""
    return str(uuid.uuid4())


def utc_now() -> datetime:
    """Return the current time as an aware UTC datetime."""
    return datetime.now(timezone.utc)


class Message(msgspec.Struct, kw_only=True):
    """Base of :class:`DomainEvent` and :class:`Command`.

    Subclasses declare their attributes as msgspec fields. ``version``, ``message_name``
    and ``message_kind`` are class-level: set ``version: ClassVar[int] = 2`` to publish a
    new version, and ``message_name`` only to override the name derived from the class
    name. Attributes may not reuse the names of the envelope (``id``, ``occurred_on``,
    ``meta``) or of these class-level settings.
    """

    id: str = msgspec.field(default_factory=new_message_id)
    occurred_on: datetime = msgspec.field(default_factory=utc_now)
    meta: dict[str, Any] = msgspec.field(default_factory=dict)

    version: ClassVar[int] = 1
    message_name: ClassVar[str] = ""
    message_kind: ClassVar[MessageKind]

    _registry: ClassVar[dict[tuple[MessageKind, str], type[Message]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__name__ in ("DomainEvent", "Command"):
            return
        _reject_reserved_fields(cls)
        if "message_name" not in cls.__dict__:
            cls.message_name = message_name(cls.__name__)
        if hasattr(cls, "message_kind"):
            Message._registry[(cls.message_kind, cls.message_name)] = cls

    def with_meta(self: M, **meta: Any) -> M:
        """Return a copy whose ``meta`` also contains ``meta``; the id stays the same."""
        return msgspec.structs.replace(self, meta={**self.meta, **meta})

    def attributes(self) -> dict[str, Any]:
        """Return the message's own fields as JSON-ready values."""
        names = [f for f in self.__struct_fields__ if f not in _ENVELOPE_FIELDS]
        values = {name: getattr(self, name) for name in names}
        builtins: dict[str, Any] = msgspec.to_builtins(
            values, enc_hook=_reject_unknown, builtin_types=(datetime,)
        )
        return builtins


_ENVELOPE_FIELDS = frozenset({"id", "occurred_on", "meta"})
# Names a message class cannot use for its own attributes: the envelope, the class-level
# settings and the methods that encode a message.
_RESERVED_NAMES = _ENVELOPE_FIELDS | {
    "version",
    "message_name",
    "message_kind",
    "with_meta",
    "attributes",
}


def _reject_reserved_fields(cls: type) -> None:
    annotations = inspect.get_annotations(cls)
    for field_name, annotation in annotations.items():
        text = annotation if isinstance(annotation, str) else repr(annotation)
        if field_name in _RESERVED_NAMES and "ClassVar" not in text:
            hint = (
                "; set the message version with version: ClassVar[int] = N"
                if field_name == "version"
                else ""
            )
            raise OutboxConfigError(
                f"{cls.__name__} declares an attribute {field_name!r}, a name outbox uses "
                f"for the message itself; rename the attribute (for example "
                f"{cls.__name__[0].lower()}{cls.__name__[1:]}_{field_name}){hint}"
            )


class DomainEvent(Message, kw_only=True):
    """Something that happened; published with ``RabbitMqDomainEventBus.publish``."""

    message_kind: ClassVar[MessageKind] = "event"


class Command(Message, kw_only=True):
    """A request to do something; sent with ``RabbitMqCommandBus.dispatch``."""

    message_kind: ClassVar[MessageKind] = "command"


class UnknownMessage(msgspec.Struct, kw_only=True):
    """A decoded message whose type has no registered class."""

    id: str
    kind: MessageKind
    name: str
    version: int
    occurred_on: datetime
    attributes: dict[str, Any]
    meta: dict[str, Any]


def _reject_unknown(value: Any) -> Any:
    raise NotImplementedError(f"cannot encode {type(value).__name__} {value!r}")


def format_time(moment: datetime) -> str:
    """Format a datetime as petisco's ``%Y-%m-%d %H:%M:%S.%f``, converting aware ones to UTC."""
    return _time_json(moment)[1:-1].decode()


def _time_json(moment: datetime) -> bytes:
    """Return :func:`format_time` of ``moment`` as a JSON string."""
    if moment.tzinfo is not None and moment.tzinfo is not timezone.utc:
        moment = moment.astimezone(timezone.utc)
    if moment.microsecond == 0 or type(moment) is not datetime:
        # msgspec leaves out a zero fraction and rejects subclasses such as pendulum's.
        return (
            f'"{moment.year:04d}-{moment.month:02d}-{moment.day:02d} {moment.hour:02d}:'
            f'{moment.minute:02d}:{moment.second:02d}.{moment.microsecond:06d}"'
        ).encode()
    # msgspec writes RFC 3339 in C, several times faster than strftime or isoformat:
    # b'"2024-01-31T12:00:00.000001Z"', without the Z when the datetime is naive.
    rfc3339 = _json_encoder.encode(moment)
    return rfc3339[:11] + b" " + rfc3339[12:27] + b'"'


_INT64_MIN = -(2**63)
_UINT64_MAX = 2**64 - 1


def _wire_value(value: Any, path: str) -> Any:
    """Format datetimes as petisco does and reject integers most JSON consumers cannot read."""
    if isinstance(value, datetime):
        return format_time(value)
    if isinstance(value, dict):
        return {key: _wire_value(item, f"{path}.{key}") for key, item in value.items()}
    if isinstance(value, list):
        return [_wire_value(item, f"{path}[{index}]") for index, item in enumerate(value)]
    is_integer = isinstance(value, int) and not isinstance(value, bool)
    if is_integer and not _INT64_MIN <= value <= _UINT64_MAX:
        raise ValueError(f"integer {value} does not fit in 64 bits - at {path}")
    if isinstance(value, float) and not math.isfinite(value):
        # JSON has no NaN or infinity; the encoder would write null in their place.
        raise ValueError(f"{value} is not a finite number - at {path}")
    return value


_attribute_names_of: dict[type, tuple[str, ...]] = {}
_PLAIN_TYPES = (str, bool, type(None))


def _plain_attributes(message: Message) -> dict[str, Any] | None:
    """Return the attributes as they are, or None when one needs converting.

    Values that need no conversion are str, finite float, bool, None and 64-bit int.
    """
    cls = type(message)
    names = _attribute_names_of.get(cls)
    if names is None:
        names = tuple(f for f in cls.__struct_fields__ if f not in _ENVELOPE_FIELDS)
        _attribute_names_of[cls] = names
    values = {}
    for name in names:
        value = getattr(message, name)
        value_type = type(value)
        if value_type is int:
            if not _INT64_MIN <= value <= _UINT64_MAX:
                return None
        elif value_type is float:
            if not math.isfinite(value):
                return None
        elif value_type not in _PLAIN_TYPES:
            return None
        values[name] = value
    return values


def encode(message: Message) -> bytes:
    """Encode a message as its UTF-8 JSON body.

    Raises MessageEncodeError, naming the message id, for values JSON cannot carry.
    """
    if not isinstance(message, Message) or not hasattr(message, "message_kind"):
        raise MessageEncodeError(
            f"expected a DomainEvent or Command instance, got {type(message).__name__}"
        )
    try:
        attributes = _plain_attributes(message)
        if attributes is None:
            attributes = _wire_value(message.attributes(), "$.data.attributes")
        meta = message.meta
        if type(meta) is not dict or meta:
            meta = _wire_value(
                msgspec.to_builtins(meta, enc_hook=_reject_unknown, builtin_types=(datetime,)),
                "$.data.meta",
            )
        data = {
            "data": {
                "id": message.id,
                "type": message.message_name,
                "type_message": _TYPE_MESSAGE[message.message_kind],
                "version": message.version,
                "occurred_on": msgspec.Raw(_time_json(message.occurred_on)),
                "attributes": attributes,
                "meta": meta,
            }
        }
        return _json_encoder.encode(data)
    except (
        TypeError,
        ValueError,
        OverflowError,
        NotImplementedError,
        RecursionError,
        msgspec.EncodeError,
    ) as exc:
        raise MessageEncodeError(
            f"cannot encode {type(message).__name__} {message.id!r} as JSON: {exc}; "
            "use str, int (64-bit), finite float, bool, None, datetime, lists and dicts in attributes and meta"
        ) from exc


class _Data(msgspec.Struct):
    id: str
    type: str
    type_message: str
    occurred_on: str
    version: int = 1
    attributes: dict[str, Any] = msgspec.field(default_factory=dict)
    meta: dict[str, Any] | None = None


class _Body(msgspec.Struct):
    data: _Data


def decode_envelope(body: bytes | str) -> UnknownMessage:
    """Decode a wire body without looking up its class: id, kind, name, version and the rest.

    Raises RecordDecodeError when the body is not a message in the wire format.
    """
    try:
        envelope = msgspec.json.decode(body, type=_Body)
    except msgspec.DecodeError as exc:
        raise RecordDecodeError(f"body is not a message in the wire format: {exc}") from exc

    data = envelope.data
    kind = _KIND_OF_TYPE_MESSAGE.get(data.type_message)
    if kind is None:
        raise RecordDecodeError(
            f"expected type_message 'domain_event' or 'command', got {data.type_message!r}"
            " - at $.data.type_message"
        )
    try:
        occurred_on = datetime.strptime(data.occurred_on, TIME_FORMAT).replace(tzinfo=timezone.utc)
    except ValueError as exc:
        raise RecordDecodeError(
            f"expected occurred_on as {TIME_FORMAT!r}, got {data.occurred_on!r}"
            " - at $.data.occurred_on"
        ) from exc
    return UnknownMessage(
        id=data.id,
        kind=kind,
        name=data.type,
        version=data.version,
        occurred_on=occurred_on,
        attributes=data.attributes,
        meta=data.meta or {},
    )


def decode(body: bytes | str) -> Message | UnknownMessage:
    """Decode a wire body into its registered class, or UnknownMessage when none matches.

    Raises RecordDecodeError when the body is not a message in the wire format.
    """
    envelope = decode_envelope(body)
    cls = Message._registry.get((envelope.kind, envelope.name))
    if cls is None or cls.version != envelope.version:
        return envelope
    try:
        fields = {
            **envelope.attributes,
            "id": envelope.id,
            "occurred_on": envelope.occurred_on,
            "meta": envelope.meta,
        }
        return msgspec.convert(fields, cls, strict=False)
    except msgspec.ValidationError as exc:
        raise RecordDecodeError(
            f"attributes of {cls.__name__} {envelope.id!r} do not match the class: {exc}"
        ) from exc
