"""PAM sessions whose close never came: their sshd was killed, or the host went down.

open_session leaves a row in the spool's pam_sessions, and close_session ends it with
`session.end`. Without a close, the session would stay open in the trail for ever. The agent
looks at the rows in its look for unrecorded processes, every few seconds: a row whose sshd is
no longer the process that opened it (its pid is gone, taken by another process, or of another
boot: the sid is derived from pid, start time and boot) is ended once it has been so for
`grace` seconds, longer than a close hook can still take, with a `session.end` that says what
is not known. Exactly one `session.end` either way: the row's deletion and the event are one
transaction, and the event is dropped if the close hook got there first.
"""
from __future__ import annotations

import time

from pam_module.hook import remote_address
from sshtrail import events, procfs, sessionid

MESSAGE = ("the session ended without PAM's close_session (sshd was killed, or the host went "
           "down): its end is when the agent found its sshd gone, not when it ended")


class _ClosedMeanwhile(Exception):
    pass


class UnclosedSessions:
    def __init__(self, grace: float):
        self.grace = grace
        self._gone_since: dict[tuple[str, int], float] = {}

    def reap(self, spool, now: float | None = None) -> list[dict]:
        """End the sessions whose sshd has been gone for `grace` seconds; the events written."""
        now = time.monotonic() if now is None else now
        rows = spool.db.execute("SELECT conn, pid, sid, login FROM pam_sessions").fetchall()
        boot = procfs.boot_id()
        seen, written = set(), []
        for conn, pid, sid, login in rows:
            key = (conn, pid)
            seen.add(key)
            if _opened_by(spool.server_id, boot, pid, sid):
                self._gone_since.pop(key, None)
                continue
            if now - self._gone_since.setdefault(key, now) < self.grace:
                continue
            ev = events.new("session.end", login=login, sid=sid, message=MESSAGE)
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
        self._gone_since = {k: t for k, t in self._gone_since.items() if k in seen}
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
