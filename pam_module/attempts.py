"""Pending PAM attempts: resolved into granted sessions or logged refusals, or reported alone.

The hook records an attempt at the auth and account stages because it cannot see how the stack
ends (see hook.py). Each attempt must end as exactly one outcome:
- open_session grants the connection (the hook writes user.login success): its attempts up to
  then are resolved, even one whose detached writer reaches the spool after the grant;
- the sshd-log watcher consumes one attempt per refusal it reports for that connection, or all
  of them when the connection ends, so an attempt seen by both PAM and sshd's log is one event;
- `reap` reports what neither explained once the calling process is gone: a refusal sshd's log
  did not show (another PAM service, a log that is not watched). Never dropped silently.
"""
from __future__ import annotations

import time

from sshtrail import events, procfs

# Past this age an attempt is reported even if its process still runs: sshd's LoginGraceTime is
# 120 s by default, so a live pre-auth connection cannot hold one this long.
MAX_AGE = 900.0


def add(db, *, conn: str, login: str, service: str, stage: str, pid: int, addr: str,
        at: float) -> None:
    # Once per PAM call: the hook may write a call the agent already wrote (see hook.record),
    # and a second row would be reported as a second refusal.
    db.execute("INSERT INTO pam_attempts (conn, login, service, stage, pid, addr, time) "
               "SELECT ?, ?, ?, ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM pam_attempts WHERE "
               "conn = ? AND stage = ? AND pid = ? AND time = ?)",
               (conn, login, service, stage, pid, addr, at, conn, stage, pid, at))


# PAM calls are stamped from /proc/uptime (hook.call_time): to its hundredth of a second. Calls
# of one login in the same hundredth are in order, and count as such.
STAMP_RESOLUTION = 0.02


def grant(db, conn: str, *, at: float) -> None:
    db.execute("DELETE FROM pam_attempts WHERE conn = ? AND time <= ?",
               (conn, at + STAMP_RESOLUTION))
    db.execute("DELETE FROM pam_granted WHERE time < ?", (at - MAX_AGE,))
    db.execute("INSERT INTO pam_granted (conn, time) VALUES (?, ?)", (conn, at))


# The detached, niced hook writes an attempt when it runs, which on a busy host can be after
# sshd's log told the connection's end: such late attempts are resolved for this long after.
LATE_WRITER_SLACK = 30.0


def conclude(db, conn: str, *, at: float) -> None:
    """sshd's log has told how this connection ended: an attempt of it that the hook writes
    only now is resolved, like one written after a grant. (A new connection from the same
    source port within LATE_WRITER_SLACK is still told by the log; only an attempt of it that
    the log does not explain would go unreported.)"""
    db.execute("INSERT INTO pam_granted (conn, time) VALUES (?, ?)", (conn, at + LATE_WRITER_SLACK))


def conn_key(addr: str, port: int | None) -> str:
    """The key the hook uses for an sshd connection (from SSH_CONNECTION: 'ADDR PORT')."""
    return f"{addr} {port}"


def consume(db, conn: str, *, everything: bool) -> int:
    """Resolve the oldest attempt of a connection (one refusal = one attempt), or all of them."""
    if everything:
        return db.execute("DELETE FROM pam_attempts WHERE conn = ?", (conn,)).rowcount
    return db.execute("DELETE FROM pam_attempts WHERE id = (SELECT min(id) FROM pam_attempts "
                      "WHERE conn = ?)", (conn,)).rowcount


def reap(spool, *, grace: float, now: float | None = None, skip: set[str] = frozenset()
         ) -> list[dict]:
    """Report attempts whose process has been gone for `grace` seconds (or that are older than
    MAX_AGE) as refusals, one per connection, and delete them. Returns the events written.
    `skip`: connections sshd's log is still telling (its account of them wins)."""
    now = time.time() if now is None else now
    with spool.transaction() as db:
        # Written after the grant that covers it (detached writers race): resolved, not refused.
        db.execute("DELETE FROM pam_attempts WHERE EXISTS (SELECT 1 FROM pam_granted g "
                   "WHERE g.conn = pam_attempts.conn AND g.time + ? >= pam_attempts.time)",
                   (STAMP_RESOLUTION,))
        rows = db.execute("SELECT id, conn, login, service, stage, pid, addr, time "
                          "FROM pam_attempts WHERE time <= ? ORDER BY id", (now - grace,)).fetchall()
    stale: dict[str, list] = {}
    for row in rows:
        _, conn, _, _, _, pid, _, started = row
        if now - started >= MAX_AGE or (conn not in skip and not procfs.alive(pid)):
            stale.setdefault(conn, []).append(row)
    written = []
    for conn, group in stale.items():
        stages = {r[4] for r in group}
        auth_tries = sum(1 for r in group if r[4] == "auth")
        # An account-stage attempt means authentication itself had passed.
        error = "account_denied" if "account" in stages else "auth_failed"
        ev = events.new("user.login", at=group[-1][7], login=group[-1][2], success=False,
                        method="password/keyboard-interactive" if auth_tries else "",
                        error=error, service=group[-1][3], attempts=max(auth_tries, 1),
                        message="PAM saw this attempt; it opened no session and sshd's log did "
                                "not explain it")
        if group[-1][6]:
            ev["addr.remote"] = group[-1][6]
        ids = [r[0] for r in group]
        spool.append(ev, extra_sql=lambda db, ids=ids: db.executemany(
            "DELETE FROM pam_attempts WHERE id = ?", [(i,) for i in ids]))
        written.append(ev)
    return written
