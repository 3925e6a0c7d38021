"""Run ``python -m outbox.drain``'s main in this process, then print this process's peak RSS.

The peak is VmHWM from /proc/self/status, which belongs to this program's own address
space. ru_maxrss from wait4 cannot be used: Linux carries the parent's high-water mark
across the exec of a child spawned from a large parent.
"""

from __future__ import annotations

import sys

from outbox.drain import main


def _status_kib(field: str) -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


if __name__ == "__main__":
    started_kib = _status_kib("VmRSS")
    exit_status = main(sys.argv[1:])
    print(f"RSS at start {started_kib} kB, VmHWM {_status_kib('VmHWM')} kB", flush=True)
    raise SystemExit(exit_status)
