"""The record an outbox stores for each message: everything needed to republish it.

Records are msgpack maps. petisco's Redis buses store JSON records instead
(``{"organization", "service", "message": {"data": {...}}}``); :func:`decode_record`
reads both and rebuilds exchange and routing key for petisco's.
"""

from __future__ import annotations

import json
import time
from typing import Any

import msgspec

from outbox import messages, naming
from outbox.errors import MessageEncodeError, OutboxConfigError, RecordDecodeError

RECORD_FORMAT = 1
"""Version of the record layout written by this release; newer ones are rejected."""


class OutboxRecord(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=False):
    """One message as stored in an outbox and republished by the drainer."""

    exchange: str
    routing_key: str
    body: bytes
    message_id: str
    content_type: str = messages.CONTENT_TYPE
    type: str | None = None
    timestamp_s: int | None = None
    headers: dict[str, Any] | None = None
    expiration_ms: int | None = None
    stored_at_ms: int = 0
    format: int = RECORD_FORMAT


class _VersionProbe(msgspec.Struct, forbid_unknown_fields=False):
    format: int = RECORD_FORMAT


class _PetiscoRecord(msgspec.Struct, forbid_unknown_fields=False):
    organization: str
    service: str
    message: dict[str, Any]


_encoder = msgspec.msgpack.Encoder()
_record_decoder = msgspec.msgpack.Decoder(OutboxRecord)
_probe_decoder = msgspec.msgpack.Decoder(_VersionProbe)
_petisco_decoder = msgspec.json.Decoder(_PetiscoRecord)


def record_for(message: messages.Message, *, organization: str, service: str) -> OutboxRecord:
    """Build the record of a message published by a service, following petisco's conventions.

    ``stored_at_ms`` is stamped now, so a per-message TTL counts from the publish call.
    """
    exchange, routing_key = naming.route(
        organization, service, message.version, message.message_kind, message.message_name
    )
    message_id = message.id
    if not isinstance(message_id, str) or len(message_id) > _SAFE_SHORT_STRING:
        _check_short_string("message id", message_id, message_id)
    return OutboxRecord(
        exchange=exchange,
        routing_key=routing_key,
        body=messages.encode(message),
        message_id=message.id,
        type=message.message_name,
        timestamp_s=int(message.occurred_on.timestamp()),
        stored_at_ms=time.time_ns() // 1_000_000,
    )


# A string of up to 63 characters fits in an AMQP short string whatever its UTF-8 length.
_SAFE_SHORT_STRING = naming.AMQP_SHORT_STRING_BYTES // 4


def _check_short_string(field: str, value: object, message_id: object) -> None:
    if not isinstance(value, str):
        raise MessageEncodeError(
            f"the {field} of message {message_id!r} must be a str, got {type(value).__name__}"
        )
    size = len(value.encode())
    if size > naming.AMQP_SHORT_STRING_BYTES:
        raise MessageEncodeError(
            f"the {field} of message {message_id!r} has {size} bytes, more than the "
            f"{naming.AMQP_SHORT_STRING_BYTES} AMQP allows; shorten it"
        )


def encode_record(record: OutboxRecord) -> bytes:
    """Encode a record for storage, stamping the time it was stored."""
    if record.stored_at_ms == 0:
        record = msgspec.structs.replace(record, stored_at_ms=int(time.time() * 1000))
    return _encoder.encode(record)


def decode_record(payload: bytes) -> OutboxRecord:
    """Decode a stored entry: an outbox record, or a record written by petisco's Redis buses.

    Raises RecordDecodeError with the reason when the entry is neither.
    """
    if not payload:
        raise RecordDecodeError("entry is empty (0 bytes)")
    if payload[:1] in (b"{", b" ", b"\n", b"\t", b"\r"):
        return _decode_petisco(payload)
    try:
        record = _record_decoder.decode(payload)
    except msgspec.DecodeError as exc:
        # A newer layout may fail the current schema; its format number explains why.
        _check_format(payload, exc)
        raise RecordDecodeError(f"entry is not a valid outbox record: {exc}") from exc
    if record.format > RECORD_FORMAT:
        raise _newer_format_error(record.format)
    return record


def _check_format(payload: bytes, cause: Exception) -> None:
    try:
        probe = _probe_decoder.decode(payload)
    except msgspec.DecodeError as exc:
        raise RecordDecodeError(
            f"entry is neither an outbox record nor petisco JSON: {exc}"
        ) from exc
    if probe.format > RECORD_FORMAT:
        raise _newer_format_error(probe.format) from cause


def _newer_format_error(found: int) -> RecordDecodeError:
    return RecordDecodeError(
        f"record format {found} is newer than this drainer reads ({RECORD_FORMAT}); "
        "upgrade redis-outbox where the drainer runs, then requeue the dead letter"
    )


def _decode_petisco(payload: bytes) -> OutboxRecord:
    try:
        record = _petisco_decoder.decode(payload)
    except msgspec.DecodeError as exc:
        raise RecordDecodeError(f"entry is not a petisco record: {exc}") from exc

    # json.dumps with its default separators gives the bytes petisco's own bus publishes.
    body = json.dumps(record.message).encode()
    decoded = messages.decode_envelope(body)
    try:
        routing_key = naming.routing_key(
            record.organization,
            record.service,
            version=decoded.version,
            kind=decoded.kind,
            name=decoded.name,
        )
    except OutboxConfigError as exc:
        raise RecordDecodeError(f"petisco record names an invalid exchange: {exc}") from exc
    return OutboxRecord(
        exchange=naming.exchange_name(record.organization, record.service),
        routing_key=routing_key,
        body=body,
        message_id=decoded.id,
        type=decoded.name,
        timestamp_s=int(decoded.occurred_on.timestamp()),
    )
