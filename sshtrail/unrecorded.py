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
Nothing here trusts a process's name: a wrapper is a pid the agent got from SO_PEERCRED. The
processes between sshd and a live wrapper are the shell that started it (tcsh and fish fork for
`-c`, bash execs): not reported themselves, but their other children are.

The same look finds what holds a recorded terminal from outside: sshd's pty belongs to the
user, and what writes to it reaches the client past the recording. The wrapper holds it
exclusive (TIOCEXCL) as it starts, but a process that opened it before then (one left running
by an earlier login can watch /dev/pts for it) keeps its descriptor. Any process of that user
holding it, other than the wrapper and the shell that started it, is reported.

For a login whose sessions must be recorded (recording.mode strict, strict_users, strict_groups)
the agent also ends what it found (`end_tree`): it stops the process and all it started, tells
the session why on the process's stderr, and kills them. That ends the session when the process
is its shell, the usual escape.
"""
from __future__ import annotations

import os
import pwd
import signal
import stat
import time

from . import events, procfs

CLK_TCK = os.sysconf("SC_CLK_TCK")
SYS_PIDFD_GETFD = 438  # the same on every architecture (Linux 5.6)
ENDED_MESSAGE = ("sshtrail: process {pid} ({command}) ran in this session outside the session "
                 "recorder, and this account may not work unrecorded: ending it.")


def _describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().rstrip(b"\0").split(b"\0")
    except OSError:
        return "?"
    return " ".join(a.decode(errors="replace") for a in argv)[:500]


class UnrecordedWatch:
    def __init__(self, grace: float, strict_for=None):
        """`strict_for(login, gid)`: must that login be recorded (then what escapes is ended)."""
        self.grace = grace
        self.strict_for = strict_for
        self._reported: set[tuple[int, int]] = set()  # (pid, start time): once per process

    def scan(self, spool) -> list[dict]:
        """The events to write for what runs unrecorded now (see the module docstring)."""
        db = spool.db
        sessions = db.execute("SELECT pid, sid, login FROM pam_sessions").fetchall()
        if not sessions:
            self._reported.clear()
            return []
        table = procfs.table()
        # A recording left open by an agent that died has a pid that another process may have
        # now: a wrapper is its pid and its start time.
        wrappers = {pid for pid, start in db.execute(
            "SELECT wrapper_pid, wrapper_start FROM recordings WHERE ended IS NULL")
            if table.get(pid, (0, None))[1] == start}
        self._reported = {k for k in self._reported if table.get(k[0], (0, None))[1] == k[1]}
        children = _children(table)
        starters = set()  # between a session's sshd and a live wrapper
        for pid in wrappers:
            pid = table[pid][0]
            while pid in table and pid not in starters and not procfs.is_sshd(pid):
                starters.add(pid)
                pid = table[pid][0]
        now = time.clock_gettime(time.CLOCK_BOOTTIME) * CLK_TCK  # what start times count
        found = []
        for monitor, sid, login in sessions:
            if monitor not in table or not procfs.is_root_sshd(monitor):
                continue  # the session is over (its close may not have been written yet)
            try:
                pw = pwd.getpwnam(login)
            except KeyError:
                continue
            stack = list(children.get(monitor, ()))
            while stack:
                pid = stack.pop()
                if pid in wrappers:
                    continue  # recorded, with all it starts
                # sshd's process for the connection is the monitor's child; below it, a user
                # may run sshd's program too.
                if pid in starters or (table[pid][0] == monitor and procfs.is_sshd(pid)):
                    stack.extend(children.get(pid, ()))
                    continue
                start = table[pid][1]
                try:
                    owner = procfs.real_uid(pid)
                except OSError:
                    continue
                if (owner != pw.pw_uid or (now - start) / CLK_TCK < self.grace
                        or (pid, start) in self._reported):
                    continue
                found.append(self._report(pid, start, sid, login, pw, (
                    "process {pid} ({command}) runs in this SSH session outside the session "
                    "wrapper, unrecorded: the login shell may have started it from a startup "
                    "file before the ForceCommand (see `sshtrail doctor`)")))
        found += self._terminal_holders(db, table, wrappers, starters)
        return found

    def _report(self, pid: int, start: int, sid: str, login: str, pw, reason: str) -> dict:
        """Once per process: the event, having ended the process if the login must be recorded."""
        self._reported.add((pid, start))
        command = _describe(pid)
        reason = reason.format(pid=pid, command=command)
        extra = {}
        if self.strict_for is not None and self.strict_for(login, pw.pw_gid):
            why_not = end_tree(pid, start, ENDED_MESSAGE.format(pid=pid, command=command))
            extra["ended"] = why_not is None
            reason += ("; this account must be recorded: it was ended, with all it "
                       f"started" if why_not is None else
                       f"; this account must be recorded, but it could not be ended: "
                       f"{why_not}")
        return events.new("session.recording_failed", sid=sid, login=login, pid=pid,
                          command=command, reason=reason, **extra)

    def _terminal_holders(self, db, table, wrappers, starters) -> list[dict]:
        """Processes of a live interactive recording's user, outside its wrapper and the shell
        that started it, that hold its terminal (the wrapper's fd 0, sshd's pty)."""
        terminals = {}  # the pty's device number -> (sid, login, passwd entry)
        for sid, login, pid in db.execute(
                "SELECT sid, login, wrapper_pid FROM recordings "
                "WHERE ended IS NULL AND mode = 'interactive'"):
            if pid not in wrappers:
                continue
            try:
                st = os.stat(f"/proc/{pid}/fd/0")
                pw = pwd.getpwnam(login)
            except (OSError, KeyError):
                continue
            if stat.S_ISCHR(st.st_mode):
                terminals[st.st_rdev] = (sid, login, pw)
        uids = {pw.pw_uid for _, _, pw in terminals.values()}
        found = []
        for pid, (_, start) in table.items() if terminals else ():
            if pid in wrappers or pid in starters or (pid, start) in self._reported:
                continue
            try:
                if procfs.real_uid(pid) not in uids:
                    continue
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    st = os.stat(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if not stat.S_ISCHR(st.st_mode) or st.st_rdev not in terminals:
                    continue
                if procfs.is_root_sshd(pid):
                    break  # sshd of a root login: its monitor holds the pty too
                sid, login, pw = terminals[st.st_rdev]
                found.append(self._report(pid, start, sid, login, pw, (
                    "process {pid} ({command}) holds this session's terminal outside the "
                    "session wrapper: what it writes there reaches the client unrecorded, and "
                    "it can read what the user types; it opened the terminal before the "
                    "wrapper held it (left running by an earlier login, say)")))
                break
        return found


def _children(table: dict) -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    return children


def _tree(table: dict, root: int) -> list[int]:
    children = _children(table)
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, ()))
    return found


def end_tree(root: int, start: int, message: str) -> str | None:
    """Stop `root` (started at `start`, clock ticks) and everything under it, write `message`
    to its stderr, kill them all. None when done, else why not. Every signal goes through a
    pidfd checked against the start time: a pid reused meanwhile is never hit."""
    pidfds: dict[int, int] = {}
    try:
        # Stopped top down, in passes: a stopped process forks no more, and what forked
        # before it was stopped shows up in the next pass.
        for _ in range(10):
            table = procfs.table()
            if root not in table or table[root][1] != start:
                if not pidfds:
                    return "it ended first"
                break  # gone meanwhile: what it started, stopped so far, still goes
            new = [p for p in _tree(table, root) if p not in pidfds]
            if not new:
                break
            for pid in new:
                try:
                    fd = os.pidfd_open(pid)
                except OSError:
                    continue  # gone: nothing to end
                try:
                    same = procfs.start_time(pid) == table[pid][1]  # not a pid reused since
                except procfs.ProcessGone:
                    same = False
                if same:
                    pidfds[pid] = fd
                    signal.pidfd_send_signal(fd, signal.SIGSTOP)
                else:
                    os.close(fd)
        if root in pidfds:
            _tell(pidfds[root], message)
        for fd in pidfds.values():
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return None
    except OSError as e:
        for fd in pidfds.values():  # whatever was stopped must not stay stopped
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            except OSError:
                pass
        return f"{e.strerror or e}"
    finally:
        for fd in pidfds.values():
            os.close(fd)


def _tell(pidfd: int, message: str) -> None:
    """Write to the process's own stderr, taken with pidfd_getfd: the very open file it holds,
    with its access mode, so root writes nothing there that the user could not (a path under
    /proc/PID/fd would reopen the file as root). Only to a terminal, pipe or socket (never into
    a file), and without waiting: the agent must not hang on a full pipe."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(SYS_PIDFD_GETFD, pidfd, 2, 0)
    if fd < 0:
        return
    try:
        mode = os.fstat(fd).st_mode
        tty = stat.S_ISCHR(mode) and os.isatty(fd)
        if tty or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            os.set_blocking(fd, False)  # shared with the process, which is stopped, then killed
            eol = "\r\n" if tty else "\n"  # a raw terminal moves down without going left
            os.write(fd, (eol + message + eol).encode())
    except OSError:
        pass
    finally:
        os.close(fd)
