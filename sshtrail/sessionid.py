"""Session ids that every part of a host derives alike, without asking each other.

A connection's sid is a hash of the host, the boot, and the pid and start time of the sshd
process that serves the connection (the one that calls PAM). The PAM hook's open_session and
close_session calls, and later the agent for a wrapper it finds below that sshd, compute the
same sid in whatever order they run, without asking each other. pid + start time is unique
within a boot; boot_id and server_id make it unique across boots and hosts.
"""
from __future__ import annotations

from .sha import sha256


def derive(server_id: str, boot: str, pid: int, started: int) -> str:
    """A UUIDv8 (RFC 9562, custom) from the sshd process's identity."""
    h = sha256(f"sshtrail-sid|{server_id}|{boot}|{pid}|{started}".encode()).hexdigest()
    h = h[:12] + "8" + h[13:16] + "%x" % (0x8 | int(h[16], 16) & 0x3) + h[17:32]
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"
