"""Session ids that every part of a host derives alike, without asking each other.

A connection's sid is a hash of the host, the boot, and the pid and start time of the sshd
process that serves the connection (the one that calls PAM). The PAM hook's open_session and
close_session calls, and later the agent for a wrapper it finds below that sshd, all compute
the same sid, in whatever order they reach the spool: no lookup, no race. pid + start time is
unique within a boot; boot_id and server_id make it unique across boots and hosts.
"""
from __future__ import annotations

from .sha import sha256


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


def derive(server_id: str, boot: str, pid: int, started: int) -> str:
    """A UUIDv8 (RFC 9562, custom) from the sshd process's identity."""
    h = sha256(f"sshtrail-sid|{server_id}|{boot}|{pid}|{started}".encode()).hexdigest()
    h = h[:12] + "8" + h[13:16] + "%x" % (0x8 | int(h[16], 16) & 0x3) + h[17:32]
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"
