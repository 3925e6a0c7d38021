"""Each Lua script's header block must match the script and the Python wrapper that calls it.

A header lists ``KEYS[n]`` and ``ARGV[n]`` one per line. Lines whose names end in a
number (``id_1``, ``id_1, token_1``) show the repeated tail of ARGV, which the script
reads in one loop. These tests parse the headers, the ``local`` bindings of the scripts
and the calls that :class:`outbox.store.Outbox` makes, and fail when any of them drift.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from outbox import _scripts
from outbox.adopt import adopt
from outbox.store import Outbox

SLOT_LINE = re.compile(
    r"^(?P<slots>(?:KEYS|ARGV)\[\d+\](?:,\s*(?:KEYS|ARGV)\[\d+\])*)\s+(?P<rest>.*)$"
)
SLOT = re.compile(r"(KEYS|ARGV)\[(\d+)\]")
BINDING = re.compile(
    r"^local (?P<name>\w+) = (?P<value>.*\b(?P<table>KEYS|ARGV)\[(?P<index>\d+)\].*)$"
)
LOOP = re.compile(r"^\s*for (?P<var>\w+) = (?P<start>\d+), #ARGV(?:, (?P<step>\d+))? do$")
STRING_LITERAL = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")
REDIS_CALL = re.compile(r"redis\.call\('(?P<command>[A-Z]+)'(?:,\s*(?P<first>[^,)]+))?")
# Commands that take no key; every other redis.call names its key first.
KEYLESS_COMMANDS = {"TIME"}
READ_COMMANDS = {
    "TIME",
    "LLEN",
    "LRANGE",
    "ZCARD",
    "ZCOUNT",
    "ZRANGE",
    "ZSCORE",
    "HLEN",
    "HGET",
    "HEXISTS",
    "HMGET",
    "GET",
}


@dataclass
class Slot:
    """One header line: the KEYS or ARGV indices it lists and the names it gives them."""

    table: str
    indices: list[int]
    names: list[str]
    kind: str

    @property
    def repeated(self) -> bool:
        return any(re.search(r"_\d+$", name) for name in self.names)


@dataclass
class Script:
    name: str
    flags: set[str]
    header: str
    slots: list[Slot]
    code_lines: list[str]

    @property
    def keys(self) -> list[Slot]:
        return [slot for slot in self.slots if slot.table == "KEYS"]

    @property
    def fixed_argv(self) -> list[Slot]:
        return [slot for slot in self.slots if slot.table == "ARGV" and not slot.repeated]

    @property
    def repeated_argv(self) -> list[Slot]:
        return [slot for slot in self.slots if slot.table == "ARGV" and slot.repeated]

    def bindings(self) -> list[re.Match[str]]:
        return [match for line in self.code_lines if (match := BINDING.match(line))]


def parse_script(name: str) -> Script:
    source = _scripts.script_source(name)
    shebang, _, rest = source.partition("\n")
    assert shebang.startswith("#!lua"), f"{name}.lua must start with a #!lua line, got {shebang!r}"
    flags = set()
    for word in shebang.split()[1:]:
        if word.startswith("flags="):
            flags = set(word.removeprefix("flags=").split(","))

    assert rest.startswith("--[["), f"{name}.lua must open with a --[[ header block"
    header, _, code = rest.removeprefix("--[[").partition("]]")
    slots = []
    for line in header.splitlines():
        match = SLOT_LINE.match(line.strip())
        if match is None:
            continue
        found = SLOT.findall(match["slots"])
        words = match["rest"].split()
        names = [word.rstrip(",") for word in words[: len(found)]]
        kind = words[len(found)].rstrip(",") if len(words) > len(found) else ""
        slots.append(Slot(found[0][0], [int(index) for _, index in found], names, kind))

    code_lines = []
    for line in code.splitlines():
        stripped = line.split("--", 1)[0].rstrip()
        if stripped.strip():
            code_lines.append(stripped)
    return Script(name, flags, header, slots, code_lines)


SCRIPTS = {name: parse_script(name) for name in _scripts.SCRIPT_NAMES}


def lua_file_names() -> set[str]:
    return {
        entry.name.removesuffix(".lua")
        for entry in _scripts.lua_directory().iterdir()
        if entry.name.endswith(".lua")
    }


def test_every_lua_file_is_a_known_script() -> None:
    assert lua_file_names() == set(_scripts.SCRIPT_NAMES)


@pytest.mark.parametrize("name", _scripts.SCRIPT_NAMES)
def test_header_opens_with_summary_atomicity_and_returns(name: str) -> None:
    header = SCRIPTS[name].header

    assert header.strip().startswith(f"{name}: ")
    assert "\nAtomic" in header
    assert "\nReturns:" in header


@pytest.mark.parametrize("name", _scripts.SCRIPT_NAMES)
def test_header_lists_keys_in_order(name: str) -> None:
    script = SCRIPTS[name]
    indices = [index for slot in script.keys for index in slot.indices]

    assert indices == list(range(1, len(indices) + 1))
    assert all(len(slot.indices) == 1 for slot in script.keys)


@pytest.mark.parametrize("name", _scripts.SCRIPT_NAMES)
def test_header_lists_argv_in_order(name: str) -> None:
    script = SCRIPTS[name]
    fixed = [index for slot in script.fixed_argv for index in slot.indices]
    repeated = [index for slot in script.repeated_argv for index in slot.indices]

    assert fixed == list(range(1, len(fixed) + 1))
    assert repeated == list(range(len(fixed) + 1, len(fixed) + 1 + len(repeated)))


@pytest.mark.parametrize("name", _scripts.SCRIPT_NAMES)
def test_script_binds_exactly_the_listed_keys(name: str) -> None:
    script = SCRIPTS[name]
    listed = {slot.indices[0]: slot.names[0] for slot in script.keys}
    bound = {
        int(match["index"]): match["name"]
        for match in script.bindings()
        if match["table"] == "KEYS"
    }

    assert sorted(bound) == sorted(listed)
    for index, header_name in listed.items():
        assert bound[index] == f"{header_name}_key", f"KEYS[{index}] of {name}.lua"


@pytest.mark.parametrize("name", _scripts.SCRIPT_NAMES)
def test_script_binds_exactly_the_listed_fixed_argv(name: str) -> None:
    script = SCRIPTS[name]
    listed = {slot.indices[0]: slot.names[0] for slot in script.fixed_argv}
    bound = {
        int(match["index"]): match["name"]
        for match in script.bindings()
        if match["table"] == "ARGV"
    }

    assert sorted(bound) == sorted(listed)
    for index, header_name in listed.items():
        local_name = bound[index]
        assert local_name == header_name or local_name.startswith(f"{header_name}_"), (
            f"ARGV[{index}] of {name}.lua is listed as {header_name!r} but bound to {local_name!r}"
        )


@pytest.mark.parametrize("name", _scripts.SCRIPT_NAMES)
def test_script_binds_keys_and_argv_before_anything_else(name: str) -> None:
    script = SCRIPTS[name]
    count = len(script.bindings())

    first_lines = script.code_lines[:count]

    assert all(BINDING.match(line) for line in first_lines)


@pytest.mark.parametrize("name", _scripts.SCRIPT_NAMES)
def test_script_reads_repeated_argv_in_one_loop(name: str) -> None:
    script = SCRIPTS[name]
    loops = [match for line in script.code_lines if (match := LOOP.match(line))]
    if not script.repeated_argv:
        assert loops == []
        return

    first = script.repeated_argv[0]
    group = len(first.indices)
    (loop,) = loops

    assert int(loop["start"]) == first.indices[0]
    assert int(loop["step"] or 1) == group
    assert all(len(slot.indices) == group for slot in script.repeated_argv)


@pytest.mark.parametrize("name", _scripts.SCRIPT_NAMES)
def test_script_never_indexes_keys_or_argv_after_binding(name: str) -> None:
    script = SCRIPTS[name]
    loop_variables = {match["var"] for line in script.code_lines if (match := LOOP.match(line))}
    repeated = script.repeated_argv
    group = len(repeated[0].indices) if repeated else 0
    allowed = {f"ARGV[{var}]" for var in loop_variables}
    allowed |= {f"ARGV[{var} + {offset}]" for var in loop_variables for offset in range(1, group)}

    later_lines = [line for line in script.code_lines if not BINDING.match(line)]
    indexing = [
        access
        for line in later_lines
        for access in re.findall(r"(?:KEYS|ARGV)\[[^\]]*\]", line)
        if access not in allowed
    ]

    assert indexing == []
    assert not any("#KEYS" in line for line in later_lines)


@pytest.mark.parametrize("name", _scripts.SCRIPT_NAMES)
def test_script_builds_no_key_names(name: str) -> None:
    script = SCRIPTS[name]
    literals = [literal for line in script.code_lines for literal in STRING_LITERAL.findall(line)]
    key_locals = {match["name"] for match in script.bindings() if match["table"] == "KEYS"}

    assert [literal for literal in literals if "outbox" in literal or "{" in literal] == []
    for line in script.code_lines:
        for call in REDIS_CALL.finditer(line):
            if call["command"] in KEYLESS_COMMANDS:
                continue
            assert call["first"] in key_locals, f"{name}.lua: {line.strip()}"


def test_stats_is_marked_no_writes() -> None:
    # Without the flag Redis rejects the script on read-only replicas.
    assert "no-writes" in SCRIPTS["stats"].flags


@pytest.mark.parametrize(
    "name", [name for name, script in SCRIPTS.items() if "no-writes" in script.flags]
)
def test_script_marked_no_writes_calls_only_read_commands(name: str) -> None:
    script = SCRIPTS[name]
    commands = {call["command"] for line in script.code_lines for call in REDIS_CALL.finditer(line)}

    assert commands <= READ_COMMANDS


# The wrapper side: what Outbox passes to each script.


@dataclass
class RecordedCall:
    keys: list[str]
    args: list[Any]


class ScriptSpy:
    """Wraps a registered script and records the KEYS and ARGV of every call."""

    def __init__(self, registered: Any) -> None:
        self.registered = registered
        # Outbox falls back to EVAL with this source when EVALSHA keeps missing.
        self.script = registered.script
        self.calls: list[RecordedCall] = []

    def __call__(self, keys: list[str], args: list[Any], **options: Any) -> Any:
        self.calls.append(RecordedCall(list(keys), list(args)))
        return self.registered(keys=keys, args=args, **options)


def record_wrapper_calls(client: redis.Redis) -> dict[str, list[RecordedCall]]:
    """Call every public operation of an Outbox once and return what each script received."""
    outbox = Outbox(client, "orders.events", max_attempts=3)
    spies = {name: ScriptSpy(script) for name, script in outbox._scripts.items()}
    outbox._scripts = spies  # type: ignore[assignment]

    outbox.push([b"ack", b"extend", b"release", b"bury", b"purge"])
    ack, extend, release, bury, purge = outbox.claim(batch_size=5, lease_ms=60_000).leases
    outbox.ack([ack])
    outbox.extend([extend], lease_ms=60_000)
    outbox.release([release], delay_ms=0, refund=True, error="broker unreachable")
    outbox.bury([bury, purge], reason="poison")
    outbox.stats()
    outbox.requeue([bury.entry_id])
    outbox.requeue()
    outbox.purge([purge.entry_id])
    outbox.purge()
    adopt(outbox, "source", chunk_size=2)
    return {name: spy.calls for name, spy in spies.items()}


def key_roles(outbox_keys: Any) -> dict[str, str]:
    """Map each Redis key of an outbox to its role, such as ``pending`` or ``leased``."""
    return {
        value: field for field, value in dataclasses.asdict(outbox_keys).items() if field != "name"
    }


def test_wrapper_calls_every_script(redis_client: redis.Redis) -> None:
    calls = record_wrapper_calls(redis_client)

    assert [name for name, recorded in calls.items() if not recorded] == []


@pytest.mark.parametrize("name", _scripts.SCRIPT_NAMES)
def test_wrapper_passes_listed_keys_in_order(redis_client: redis.Redis, name: str) -> None:
    script = SCRIPTS[name]
    roles = key_roles(Outbox(redis_client, "orders.events").keys)
    listed = [slot.names[0] for slot in script.keys]

    for call in record_wrapper_calls(redis_client)[name]:
        assert len(call.keys) == len(listed)
        assert [roles.get(key, key) for key in call.keys] == listed


@pytest.mark.parametrize("name", _scripts.SCRIPT_NAMES)
def test_wrapper_passes_listed_argv(redis_client: redis.Redis, name: str) -> None:
    script = SCRIPTS[name]
    fixed = script.fixed_argv
    group = len(script.repeated_argv[0].indices) if script.repeated_argv else 0

    for call in record_wrapper_calls(redis_client)[name]:
        tail = call.args[len(fixed) :]
        assert len(call.args) >= len(fixed)
        if group == 0:
            assert tail == []
        else:
            assert len(tail) % group == 0
        for slot, value in zip(fixed, call.args, strict=False):
            if slot.kind == "int":
                assert isinstance(value, int), f"ARGV[{slot.indices[0]}] {slot.names[0]}"
                assert not isinstance(value, bool), f"ARGV[{slot.indices[0]}] {slot.names[0]}"
            else:
                assert isinstance(value, str), f"ARGV[{slot.indices[0]}] {slot.names[0]}"


@pytest.mark.parametrize("name", ["ack", "extend", "release", "bury"])
def test_wrapper_passes_id_and_token_pairs(redis_client: redis.Redis, name: str) -> None:
    fixed_count = len(SCRIPTS[name].fixed_argv)

    for call in record_wrapper_calls(redis_client)[name]:
        pairs = call.args[fixed_count:]
        ids, tokens = pairs[0::2], pairs[1::2]
        assert len(ids) >= 1
        assert len(ids) == len(tokens)
        assert all(entry_id.isdigit() for entry_id in ids)
        assert all(token.isdigit() for token in tokens)
