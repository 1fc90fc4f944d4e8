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
    """The process runs sshd's program: the kernel's word (/proc/PID/exe), not its name, and a
    file only root can have put there. Anybody may copy a program to a file named sshd: the
    user in a session, to pass a process of theirs for the sshd that started a wrapper. (Anybody
    may also run sshd's own program, as themselves: is_root_sshd for the processes that only
    root's sshd has.)"""
    try:
        path = os.readlink(f"/proc/{pid}/exe")
        if path.endswith(" (deleted)"):  # replaced since it started (an upgrade): still sshd
            path = path[:-len(" (deleted)")]
        if os.path.basename(path) not in SSHD_NAMES:
            return False
        if not _roots(os.stat(f"/proc/{pid}/exe")):  # the file it runs, wherever it is now
            return False
        folder = os.path.dirname(path)
        while True:  # and nobody but root could have put a file by that name there
            if not _roots(os.stat(folder)):
                return False
            if folder == "/":
                return True
            folder = os.path.dirname(folder)
    except OSError:
        return False


def is_root_sshd(pid: int) -> bool:
    """sshd's program, run by root: a listener, or the process serving a connection (its
    monitor), which a user cannot start."""
    try:
        return is_sshd(pid) and real_uid(pid) == 0
    except OSError:
        return False


def _roots(st: os.stat_result) -> bool:
    """Owned by root, and writable by nobody else."""
    return st.st_uid == 0 and not st.st_mode & 0o022


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
