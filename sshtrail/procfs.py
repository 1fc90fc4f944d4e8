"""Facts about processes from /proc and the kernel: start times, the boot, liveness."""
from __future__ import annotations

import os

SSHD_NAMES = ("sshd", "sshd-session")  # the latter: OpenSSH 9.8 and later


class ProcessGone(OSError):
    pass


def boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def start_time(pid: int) -> int:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        raise ProcessGone(f"process {pid} is gone") from None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    return int(stat[stat.rindex(b")") + 2:].split()[19])


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by its parent, is not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat[stat.rindex(b")") + 2:stat.rindex(b")") + 3] != b"Z"


def is_sshd(pid: int) -> bool:
    """The process runs sshd's program: the kernel's word (/proc/PID/exe), not its name."""
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe")) in SSHD_NAMES
    except OSError:
        return False


def table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time in clock ticks since boot), for every process now."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rindex(b")") + 2:].split()  # comm may hold ')' and spaces
        found[int(name)] = (int(fields[1]), int(fields[19]))
    return found
