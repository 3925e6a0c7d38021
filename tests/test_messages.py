from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, ClassVar

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outbox import (
    Command,
    DomainEvent,
    MessageEncodeError,
    OutboxConfigError,
    RecordDecodeError,
    decode,
    encode,
)
from outbox.messages import TIME_FORMAT, UnknownMessage, _wire_value, format_time
from outbox.naming import exchange_name, message_name, outbox_name, routing_key
from outbox.records import OutboxRecord, decode_record, encode_record, record_for


class UserCreated(DomainEvent):
    user_id: str


class UserRenamed(DomainEvent):
    user_id: str
    name: str
    version: ClassVar[int] = 2


class SendWelcomeEmail(Command):
    email: str
    sent_at: datetime | None = None


def test_message_name_follows_petisco():
    assert message_name("UserCreated") == "user.created"
    assert message_name("SendWelcomeEmail") == "send.welcome.email"


def test_event_gets_id_time_and_meta():
    event = UserCreated(user_id="u1")
    assert len(event.id) == 36
    assert event.occurred_on.tzinfo is not None
    assert event.meta == {}
    assert UserCreated.version == 1


def test_each_event_gets_its_own_id():
    assert UserCreated(user_id="u1").id != UserCreated(user_id="u1").id


def test_encoded_body_is_petisco_wire_format():
    event = UserCreated(
        user_id="u1", occurred_on=datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=timezone.utc)
    )
    data = json.loads(encode(event))["data"]
    assert data == {
        "id": event.id,
        "type": "user.created",
        "type_message": "domain_event",
        "version": 1,
        "occurred_on": "2024-05-06 07:08:09.123456",
        "attributes": {"user_id": "u1"},
        "meta": {},
    }


def test_command_is_encoded_as_command_with_formatted_datetimes():
    command = SendWelcomeEmail(email="a@b.c", sent_at=datetime(2024, 1, 2, 3, 4, 5))
    data = json.loads(encode(command))["data"]
    assert data["type_message"] == "command"
    assert data["attributes"]["sent_at"] == "2024-01-02 03:04:05.000000"


def test_aware_occurred_on_is_written_in_utc():
    from datetime import timedelta

    plus_two = timezone(timedelta(hours=2))
    event = UserCreated(user_id="u", occurred_on=datetime(2024, 1, 1, 12, 0, tzinfo=plus_two))
    assert json.loads(encode(event))["data"]["occurred_on"] == "2024-01-01 10:00:00.000000"


def test_decode_returns_the_registered_class():
    event = UserCreated(user_id="u1").with_meta(correlation_id="c1")
    decoded = decode(encode(event))
    assert isinstance(decoded, UserCreated)
    assert decoded == event


def test_decode_of_unregistered_type_returns_unknown_message():
    body = json.dumps(
        {"data": {"id": "x", "type": "thing.happened", "type_message": "domain_event",
                  "version": 1, "occurred_on": "2024-01-01 00:00:00.000000",
                  "attributes": {"a": 1}, "meta": {}}}
    )
    decoded = decode(body)
    assert isinstance(decoded, UnknownMessage)
    assert decoded.attributes == {"a": 1}


def test_decode_of_other_version_returns_unknown_message():
    body = encode(UserRenamed(user_id="u", name="n")).replace(b'"version":2', b'"version":1')
    assert isinstance(decode(body), UnknownMessage)


@pytest.mark.parametrize(
    "body",
    [b"", b"{}", b"[]", b'{"data": {}}', b"\xff\xfe", b'{"data": {"id": "x", "type": "t", '
     b'"type_message": "other", "occurred_on": "2024-01-01 00:00:00.000000"}}'],
)
def test_decode_rejects_bodies_outside_the_wire_format(body):
    with pytest.raises(RecordDecodeError):
        decode(body)


def test_integer_beyond_64_bits_is_rejected_at_encode():
    class Counted(DomainEvent):
        count: int

    with pytest.raises(MessageEncodeError, match="64 bits"):
        encode(Counted(count=2**64))


def test_unencodable_attribute_is_rejected_with_message_id():
    class Holder(DomainEvent):
        thing: object

    event = Holder(thing=object())
    with pytest.raises(MessageEncodeError, match=event.id):
        encode(event)


def test_routing_key_and_exchange_follow_conventions():
    assert exchange_name("acme", "registration") == "acme.registration"
    key = routing_key("acme", "registration", version=1, kind="event", name="user.created")
    assert key == "acme.registration.1.event.user_created"
    assert outbox_name("acme", "registration", "command") == "acme.registration.commands"


@pytest.mark.parametrize("bad", ["", "a b", "a{b", "x}", "a*"])
def test_names_with_forbidden_characters_are_rejected(bad):
    with pytest.raises(ValueError, match="organization"):
        exchange_name(bad, "svc")


def test_record_round_trips_through_encoding():
    record = record_for(UserCreated(user_id="u1"), organization="acme", service="reg")
    decoded = decode_record(encode_record(record))
    assert decoded.message_id == record.message_id
    assert decoded.body == record.body
    assert decoded.routing_key == "acme.reg.1.event.user_created"
    assert decoded.stored_at_ms > 0


def test_record_of_newer_format_is_rejected_with_upgrade_hint():
    payload = msgspec.msgpack.encode({"format": 99, "exchange": "e"})
    with pytest.raises(RecordDecodeError, match="upgrade"):
        decode_record(payload)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"{}",
        b'{"organization": "a"}',
        b"\x00\x01\x02",
        b"\x93\x01\x02",
        msgspec.msgpack.encode({"exchange": "e"}),
        encode_record(OutboxRecord(exchange="e", routing_key="k", body=b"b", message_id="m"))[:-3],
        b'{"organization": "a", "service": "b", "message": {"data": {"id": "\xff"}}}',
    ],
    ids=["empty", "empty-json", "json-missing-fields", "binary", "msgpack-array",
         "record-missing-fields", "truncated-record", "invalid-utf8"],
)
def test_undecodable_entries_raise_record_decode_error(payload):
    with pytest.raises(RecordDecodeError):
        decode_record(payload)


def test_petisco_record_is_rebuilt_with_exchange_and_routing_key():
    body = json.loads(encode(UserCreated(user_id="u1")))
    payload = json.dumps({"organization": "acme", "service": "reg", "message": body}).encode()
    record = decode_record(payload)
    assert record.exchange == "acme.reg"
    assert record.routing_key == "acme.reg.1.event.user_created"
    assert json.loads(record.body) == body
    assert record.message_id == body["data"]["id"]


def test_complete_record_of_newer_format_is_rejected():
    record = OutboxRecord(exchange="e", routing_key="k", body=b"b", message_id="m", format=2)
    with pytest.raises(RecordDecodeError, match="newer than this drainer reads"):
        decode_record(encode_record(record))


def test_attributes_named_name_and_kind_stay_attributes():
    class ProfileRenamed(DomainEvent):
        name: str
        kind: str

    event = ProfileRenamed(name="Ada", kind="person")
    data = json.loads(encode(event))["data"]
    assert data["type"] == "profile.renamed"
    assert data["attributes"] == {"name": "Ada", "kind": "person"}
    assert data["id"] == event.id


@pytest.mark.parametrize("reserved", ["id", "occurred_on", "meta", "version", "attributes"])
def test_attribute_with_reserved_name_is_rejected_at_class_definition(reserved):
    with pytest.raises(ValueError, match=f"attribute '{reserved}'"):
        type("Clashing", (DomainEvent,), {"__annotations__": {reserved: "str"}})


@settings(max_examples=300)
@given(st.datetimes(min_value=datetime(1001, 1, 1), timezones=st.none() | st.timezones()))
def test_time_matches_strftime(moment: datetime) -> None:
    in_utc = moment if moment.tzinfo is None else moment.astimezone(timezone.utc)

    assert format_time(moment) == in_utc.strftime(TIME_FORMAT)


class Anything(DomainEvent):
    value: Any
    label: str = ""


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
    | st.datetimes(min_value=datetime(1001, 1, 1), timezones=st.none() | st.just(timezone.utc)),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)


@settings(max_examples=300)
@given(_json_values, st.text())
def test_attributes_match_general_conversion(value: Any, label: str) -> None:
    # Plain values skip the conversion that datetimes, lists and dicts go through.
    event = Anything(value=value, label=label)
    general = msgspec.json.encode(_wire_value(event.attributes(), "$.data.attributes"))

    assert json.loads(encode(event))["data"]["attributes"] == json.loads(general)


class Moment(datetime):
    """A datetime subclass, as pendulum's DateTime and freezegun's FakeDatetime are."""


@pytest.mark.parametrize("microsecond", [0, 1, 999_999])
def test_datetime_subclass_is_encoded(microsecond: int) -> None:
    moment = Moment(2024, 1, 31, 12, 0, 5, microsecond, tzinfo=timezone.utc)
    body = json.loads(encode(UserCreated(user_id="1", occurred_on=moment)))

    assert body["data"]["occurred_on"] == f"2024-01-31 12:00:05.{microsecond:06d}"


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("place", ["attribute", "nested attribute", "meta"])
def test_number_json_cannot_carry_is_rejected(number: float, place: str) -> None:
    # JSON has no NaN or infinity; writing null would lose the value.
    if place == "attribute":
        event = Anything(value=number)
    elif place == "nested attribute":
        event = Anything(value={"readings": [1.0, number]})
    else:
        event = Anything(value=1, meta={"score": number})

    with pytest.raises(MessageEncodeError, match="not a finite number"):
        encode(event)


def test_value_that_contains_itself_is_rejected() -> None:
    loop: list[Any] = []
    loop.append(loop)

    with pytest.raises(MessageEncodeError, match="Anything"):
        encode(Anything(value=loop))


def test_routing_key_over_255_bytes_is_rejected() -> None:
    long_name = type("Long" + "Named" * 60, (DomainEvent,), {"__annotations__": {}})

    with pytest.raises(OutboxConfigError, match="more than the 255 AMQP allows"):
        record_for(long_name(), organization="acme", service="shop")


def test_message_id_over_255_bytes_is_rejected() -> None:
    with pytest.raises(MessageEncodeError, match=r"message id .* more than the 255"):
        record_for(UserCreated(user_id="1", id="é" * 200), organization="acme", service="shop")
