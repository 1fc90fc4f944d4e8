"""Session ids that every part of a host derives alike, without asking each other.

A connection's sid is a hash of the host, the boot, and the pid and start time of the sshd
process that serves the connection (the one that calls PAM). The PAM hook's open_session and
close_session calls, and later the agent for a wrapper it finds below that sshd, compute the
same sid in whatever order they run, without asking each other. pid + start time is unique
within a boot; boot_id and server_id make it unique across boots and hosts.

The sid leads with that start time, so a host's sids of one boot sort by when their
connection began. Every index keyed by sid (the collector's above all) then grows at a few
places instead of at a random page per new session: with random sids, each batch of a busy
fleet rewrote most of that index's pages.
"""
from __future__ import annotations

from .sha import sha256


def derive(server_id: str, boot: str, pid: int, started: int) -> str:
    """A UUIDv8 (RFC 9562, custom): 48 bits of the sshd process's start time (clock ticks since
    boot, as /proc gives it; it never moves, unlike the wall clock's idea of the boot time),
    then 74 bits of hash."""
    h = sha256(f"sshtrail-sid|{server_id}|{boot}|{pid}|{started}".encode()).hexdigest()
    h = (f"{started & 0xFFFF_FFFF_FFFF:012x}" + "8" + h[:3]
         + "%x" % (0x8 | int(h[3], 16) & 0x3) + h[4:19])
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"
