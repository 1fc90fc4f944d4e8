"""Processes in an SSH session that no session wrapper started: what a login shell's startup
files ran outside the recording.

sshd runs the ForceCommand through the user's login shell. bash and zsh are kept from reading
the user's files first (unsafe_env.SHELL_SETTINGS); csh, tcsh, fish, tmux and shells sshtrail
does not know read them anyway, and an `exec` there means the wrapper never starts. So the agent
looks, every few seconds, under the sshd of each open PAM session (the spool's pam_sessions):
a process there that runs as the session's user, is neither sshd nor under a live recording's
wrapper, and has lived longer than `grace` is reported once, as session.recording_failed naming
it. `ssh -N` has no such process; a login's own helpers (pam_exec, motd) run as root or are gone
by then. What lives shorter than a look misses it: the eBPF tracer is what sees every exec.
Nothing here trusts a process's name: a wrapper is a pid the agent got from SO_PEERCRED.
"""
from __future__ import annotations

import os
import pwd
import time

from . import events, procfs

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().rstrip(b"\0").split(b"\0")
    except OSError:
        return "?"
    return " ".join(a.decode(errors="replace") for a in argv)[:500]


class UnrecordedWatch:
    def __init__(self, grace: float):
        self.grace = grace
        self._reported: set[tuple[int, int]] = set()  # (pid, start time): once per process

    def scan(self, spool) -> list[dict]:
        """The events to write for what runs unrecorded now (see the module docstring)."""
        db = spool.db
        sessions = db.execute("SELECT pid, sid, login FROM pam_sessions").fetchall()
        if not sessions:
            self._reported.clear()
            return []
        wrappers = {pid for (pid,) in db.execute(
            "SELECT wrapper_pid FROM recordings WHERE ended IS NULL")}
        table = procfs.table()
        self._reported = {k for k in self._reported if table.get(k[0], (0, None))[1] == k[1]}
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        now = time.clock_gettime(time.CLOCK_BOOTTIME) * CLK_TCK  # what start times count
        found = []
        for monitor, sid, login in sessions:
            if monitor not in table or not procfs.is_sshd(monitor):
                continue  # the session is over (its close may not have been written yet)
            try:
                uid = pwd.getpwnam(login).pw_uid
            except KeyError:
                continue
            stack = list(children.get(monitor, ()))
            while stack:
                pid = stack.pop()
                if pid in wrappers:
                    continue  # recorded, with all it starts
                if procfs.is_sshd(pid):
                    stack.extend(children.get(pid, ()))
                    continue
                start = table[pid][1]
                try:
                    owner = os.stat(f"/proc/{pid}").st_uid
                except OSError:
                    continue
                if (owner != uid or (now - start) / CLK_TCK < self.grace
                        or (pid, start) in self._reported):
                    continue
                self._reported.add((pid, start))
                command = _describe(pid)
                found.append(events.new(
                    "session.recording_failed", sid=sid, login=login, pid=pid, command=command,
                    reason=f"process {pid} ({command}) runs in this SSH session outside the "
                           "session wrapper, unrecorded: the login shell may have started it "
                           "from a startup file before the ForceCommand (see `sshtrail doctor`)"))
        return found
