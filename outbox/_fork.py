"""Objects that drop what they share with their parent process in a child made by os.fork.

A child that wrote to its parent's sockets would mix its frames or commands into the
parent's, and a lock that one of the parent's threads held at the fork stays locked in
the child. Each registered object's ``_after_fork`` replaces such state, without closing or
writing to the parent's sockets.
"""

from __future__ import annotations

import os
import weakref
from typing import Any

_registered: weakref.WeakSet[Any] = weakref.WeakSet()


def reset_after_fork(instance: Any) -> None:
    """Call ``instance._after_fork()`` in every child forked while the instance is alive."""
    _registered.add(instance)


def _after_fork_in_child() -> None:
    for instance in list(_registered):
        instance._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
