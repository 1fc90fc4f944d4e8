"""PAM sessions whose close never came: their sshd was killed, or the host went down.

open_session leaves a row in the spool's pam_sessions, and close_session ends it with
`session.end`. Without a close, the session would stay open in the trail for ever. The agent
looks at the rows in its look for unrecorded processes, every few seconds: a row whose sshd is
no longer the process that opened it (its pid is gone, taken by another process, or of another
boot: the sid is derived from pid, start time and boot) is ended once it has been so for
`grace` seconds, longer than a close hook can still take, with a `session.end` that says what
is not known: when this agent saw the sshd alive at a look and gone at a later one, the end
lies between (ended_after, ended_before, and duration_at_most from the session's start).
Exactly one `session.end` either way: the row's deletion and the event are one transaction,
and the event is dropped if the close hook got there first.
"""
from __future__ import annotations

import time

from pam_module.hook import remote_address
from sshtrail import events, procfs, sessionid

MESSAGE = ("the session ended without PAM's close_session (sshd was killed, or the host went "
           "down): its end is when the agent found its sshd gone, not when it ended")
# When the agent saw the sshd alive at one look and gone at the next, the end lies between.
BOUNDED = ("the session ended without PAM's close_session (sshd was killed): between "
           "ended_after, when the agent last saw its sshd, and ended_before, when it found it "
           "gone")


class _ClosedMeanwhile(Exception):
    pass


class UnclosedSessions:
    def __init__(self, grace: float):
        self.grace = grace
        # (conn, pid) -> when its sshd was first found gone: (monotonic, wall clock)
        self._gone_since: dict[tuple[str, int], tuple[float, float]] = {}
        self._alive_at: dict[tuple[str, int], float] = {}  # -> when last seen (wall clock)

    def reap(self, spool, now: float | None = None, wall: float | None = None) -> list[dict]:
        """End the sessions whose sshd has been gone for `grace` seconds; the events written.
        `now`: monotonic seconds, `wall`: time.time(), of this look."""
        now = time.monotonic() if now is None else now
        wall = time.time() if wall is None else wall
        rows = spool.db.execute("SELECT conn, pid, sid, login, started FROM pam_sessions"
                                ).fetchall()
        boot = procfs.boot_id()
        seen, written = set(), []
        for conn, pid, sid, login, started in rows:
            key = (conn, pid)
            seen.add(key)
            if _opened_by(spool.server_id, boot, pid, sid):
                self._gone_since.pop(key, None)
                self._alive_at[key] = wall
                continue
            gone_at, gone_wall = self._gone_since.setdefault(key, (now, wall))
            if now - gone_at < self.grace:
                continue
            alive = self._alive_at.get(key)
            if alive is None:  # not seen alive by this agent: it may have ended at any time
                ev = events.new("session.end", login=login, sid=sid, message=MESSAGE)
            else:
                ev = events.new("session.end", login=login, sid=sid, message=BOUNDED,
                                ended_after=events.format_time(alive),
                                ended_before=events.format_time(gone_wall),
                                duration_at_most=round(max(0.0, gone_wall - started), 3))
            addr = _addr(conn)
            if addr:
                ev["addr.remote"] = addr
            try:
                spool.append(ev, extra_sql=lambda db, k=key, s=sid: _delete(db, *k, s))
            except _ClosedMeanwhile:
                pass
            else:
                written.append(ev)
            self._gone_since.pop(key, None)
            self._alive_at.pop(key, None)
        self._gone_since = {k: t for k, t in self._gone_since.items() if k in seen}
        self._alive_at = {k: t for k, t in self._alive_at.items() if k in seen}
        return written


def _opened_by(server_id: str, boot: str, pid: int, sid: str) -> bool:
    """The process with this pid now is the one whose session has this sid."""
    try:
        return sessionid.derive(server_id, boot, pid, procfs.start_time(pid)) == sid
    except procfs.ProcessGone:
        return False


def _delete(db, conn: str, pid: int, sid: str) -> None:
    if not db.execute("DELETE FROM pam_sessions WHERE conn = ? AND pid = ? AND sid = ?",
                      (conn, pid, sid)).rowcount:
        raise _ClosedMeanwhile  # the close hook's session.end is in: ours is rolled back


def _addr(conn: str) -> str:
    """The hook's `addr.remote` for a connection key 'ADDR PORT' ('pid N': none)."""
    addr, _, port = conn.partition(" ")
    if addr == "pid" or not port.isdigit():
        return ""
    return remote_address(addr, port)
