"""Facts about processes from /proc and the kernel: start times, the boot, liveness."""
from __future__ import annotations

import os

SSHD_NAMES = ("sshd", "sshd-session")  # the latter: OpenSSH 9.8 and later


class ProcessGone(OSError):
    pass


def boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def _stat(pid: int) -> list[bytes]:
    """/proc/PID/stat from field 3 (state) on: [0] state, [1] parent pid, [19] start time."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessGone(f"process {pid} is gone") from None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    return stat[stat.rindex(b")") + 2:].split()


def start_time(pid: int) -> int:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22)."""
    return int(_stat(pid)[19])


def parent(pid: int) -> int:
    return int(_stat(pid)[1])


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by its parent, is not)."""
    try:
        return _stat(pid)[0] != b"Z"
    except ProcessGone:
        return False


def real_uid(pid: int) -> int:
    """Who the process runs as: its real uid. The owner of /proc/PID is the effective uid (root
    in a setuid program), and files under it belong to root once a process is non-dumpable."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    raise ProcessGone(f"process {pid} is gone")


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
        if name.isdigit():
            try:
                fields = _stat(int(name))
            except OSError:
                continue  # gone meanwhile
            found[int(name)] = (int(fields[1]), int(fields[19]))
    return found
