"""Loading and calling the Lua scripts in ``lua/``."""

from __future__ import annotations

from functools import cache
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path
from typing import Any

SCRIPT_NAMES = ("claim", "ack", "extend", "release", "bury", "requeue", "purge", "stats", "adopt")


def lua_directory() -> Traversable:
    """Return the folder of the Lua scripts: inside the installed package, else the source tree."""
    packaged = resources.files("outbox") / "lua"
    if packaged.is_dir():
        return packaged
    source_tree = Path(__file__).resolve().parent.parent / "lua"
    if source_tree.is_dir():
        return source_tree
    raise FileNotFoundError(
        f"the Lua scripts of outbox are missing: looked in {packaged} and {source_tree}; "
        "reinstall redis-outbox"
    )


@cache
def script_source(name: str) -> str:
    """Return the text of ``lua/<name>.lua``."""
    if name not in SCRIPT_NAMES:
        raise KeyError(f"no Lua script named {name!r}; expected one of {SCRIPT_NAMES}")
    return (lua_directory() / f"{name}.lua").read_text(encoding="utf-8")


def register(client: Any, name: str) -> Any:
    """Register a script on a redis-py client; the returned callable reloads it after NOSCRIPT."""
    return client.register_script(script_source(name))
