"""Login refusals that only sshd's own log witnesses, turned into plain records.

Public-key refusals, unknown users, AllowUsers/DenyUsers and other refusals sshd decides before
PAM's auth stack never reach the PAM hook; the sshd log is the only place they show. This module
reads that log: `parse_line` recognises one sshd message, `ConnectionTracker` follows each
connection through its pre-auth phase and says when a refusal record is due, `LogFollower`
tails the log file across rotation and truncation. It returns plain dicts; wiring them into
events and the spool is the caller's job.

It must never: act on what it reads (the log carries attacker-chosen user names), raise on a
line it does not understand (unknown lines are ignored), report granted logins (PAM owns those),
or hold unbounded state (connections are forgotten when they end, when they go quiet, and when
too many are open).

Input: `sshd -E FILE` lines (bare messages, no timestamp, no pid), or syslog lines as rsyslog and
journald write them (`Nov 24 03:00:00 host sshd[1234]: MSG`, `2026-11-24T03:00:00.123456+00:00
host sshd[1234]: MSG`, or a raw `<38>Nov 24 03:00:00 sshd[1234]: MSG` datagram). Syslog lines are
taken only from programs named `sshd` or `sshd-*` (sshd-session in OpenSSH >= 9.8, and a
test symlink such as sshd-sshtrail-test). sshd must run with `LogLevel VERBOSE`: at INFO it
logs neither "Connection from" nor most refused keys (see the module's tests and vectors).

Record fields: login, method, error, message, addr, port, key, time.
`message` is the sshd message that settled the record, without syslog prefix and without the
`error: `/`fatal: ` level word syslog adds (so both log sources give the same text).

Reason codes (`error`):

| error             | when                                                                      |
|-------------------|---------------------------------------------------------------------------|
| bad_password      | a `Failed password` / `Failed keyboard-interactive` attempt               |
| bad_key           | a `Failed publickey` / `Failed hostbased` attempt (key not authorised)    |
| bad_credentials   | a failed attempt with another method (gssapi-with-mic, ...)               |
| invalid_user      | no such user (`Invalid user U from A port P`)                             |
| not_allowed       | sshd's access rules refused the user: AllowUsers, DenyUsers, AllowGroups, |
|                   | DenyGroups, PermitRootLogin (`ROOT LOGIN REFUSED`)                        |
| account_denied    | the account may not log in, whatever the credentials: PAM's account stack |
|                   | refused it (expired), or sshd's own checks did (missing shell; locked or  |
|                   | expired with UsePAM no)                                                   |
| too_many_failures | sshd hung up at MaxAuthTries and no attempt of the connection was logged  |
| timeout           | `Timeout before authentication` (Debian 12's sshd never logs it, below)   |
| disconnected      | the client left the pre-auth phase with a user named, no attempt logged   |
| unfinished        | the connection's end was never seen (lines lost, a silent LoginGraceTime  |
|                   | kill) and it was forgotten after `stale_after` seconds                    |

One authentication attempt gives one record: each `Failed <method>` line (except `none`, which
clients send to probe, it is no attempt) is one record; a connection that ends its pre-auth phase
with a user named but no record and no success gives one record for the whole connection; a
connection where no user was ever named (scanners, ssh-keyscan) gives none. The account-level
reasons (invalid_user, not_allowed, account_denied) win over the per-attempt ones, so an unknown
user's password attempt says invalid_user.

What sshd's log can and cannot tell (OpenSSH 9.2p1, Debian 12, measured; vectors in
tests/data/sshd_log/):
- A locked account (`usermod -L`) with UsePAM yes: a password attempt logs exactly what a wrong
  password logs (bad_password); a key still logs in (sshd skips its locked check under PAM, and
  pam_unix's account stack ignores the "!"), so there is nothing to report.
- An expired account (`chage -E 0`), right password: sshd logs `Failed password`, then `Access
  denied for user U by PAM account configuration`. So a `Failed password` of an existing user is
  held back until that connection's next line (or `hold` seconds): its record comes late.
  Right key: `Postponed publickey` then `Failed publickey`. keyboard-interactive: a `Failed`
  line without the `PAM: Authentication failure` line a wrong password always logs first.
- "User U from A not allowed because ..." has no port, and sshd's own account checks log no
  address either; later lines of that connection call the user "invalid user U".
- The LoginGraceTime kill is silent: Debian's fix for CVE-2024-6387 stopped the signal handler
  from logging `Timeout before authentication`.
- At LogLevel INFO, refused keys and "Connection from" are not logged; syslog output adds the
  pid, which settles which connection a port-less line belongs to.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import time as _time
from collections import OrderedDict
from dataclasses import dataclass

__all__ = ["parse_line", "ConnectionTracker", "LogFollower", "REASONS"]

REASONS = (
    "bad_password", "bad_key", "bad_credentials", "invalid_user", "not_allowed",
    "account_denied", "too_many_failures", "timeout", "disconnected", "unfinished",
)

# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------

_MONTHS = {m: i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}

# The hostname is optional: a raw datagram from glibc's syslog() has none, rsyslog adds it.
# It never holds brackets nor ends in a colon, or "sshd[1]: fatal: ..." would read as host
# "sshd[1]:", program "fatal".
_SYSLOG_PREFIX = re.compile(
    r"^(?:<\d{1,3}>)?"
    r"(?:(?P<bsd>(?P<mon>[A-Z][a-z]{2}) +(?P<day>\d{1,2}) (?P<hms>\d\d:\d\d:\d\d))"
    r"|(?P<iso>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?))"
    r" (?:(?P<host>[^\s\[\]]*[^\s\[\]:]) )?"
    r"(?P<prog>[^\s\[\]:]+)(?:\[(?P<pid>\d+)\])?: (?P<msg>.*)$")

# syslog output carries the level word sshd's -E output leaves out ("fatal: Access denied...").
_LEVEL_WORD = re.compile(r"^(?:fatal|error|warning|debug\d?): ")

# A user name is attacker-chosen and may hold spaces (never a newline: sshd escapes those), so
# every pattern anchors on sshd's own trailer at the end of the line and lets the user part be
# greedy: a name like "x from 6.6.6.6 port 1 ssh2" cannot move the real address.
_WHO = r"(?:(?P<who>authenticating user|invalid user|user) (?P<user>.*) )?"
_PREAUTH = r"(?P<preauth> \[preauth\])?"
_PATTERNS = [
    ("connect", re.compile(
        r"^Connection from (?P<addr>\S+) port (?P<port>\d+) on \S+ port \d+(?: rdomain .*)?$")),
    ("auth", re.compile(
        r"^(?P<result>Accepted|Failed|Postponed|Partial) (?P<method>[\w@.-]+)(?:/(?P<sub>\S+))?"
        r" for (?P<invalid>invalid user )?(?P<user>.*) from (?P<addr>\S+) port (?P<port>\d+)"
        r" ssh2(?:: (?P<key>.*?))?" + _PREAUTH + "$")),
    ("key_found", re.compile(r"^Accepted key (?P<key>\S+ \S+) found at (?P<path>.*)$")),
    ("invalid_user", re.compile(
        r"^Invalid user (?P<user>.*) from (?P<addr>\S+) port (?P<port>\d+)$")),
    ("not_allowed", re.compile(
        r"^User (?P<user>.*) from (?P<addr>\S+) not allowed because (?P<reason>.*)$")),
    # Without "from": sshd's own account checks (locked or expired with UsePAM no, bad shell).
    ("not_allowed", re.compile(r"^User (?P<user>\S+) not allowed because (?P<reason>.*)$")),
    ("account_expired", re.compile(r"^Account (?P<user>.*) has expired$")),
    ("root_refused", re.compile(
        r"^ROOT LOGIN REFUSED FROM (?P<addr>\S+) port (?P<port>\d+)" + _PREAUTH + "$")),
    ("pam_failure", re.compile(
        r"^PAM: (?P<reason>.+?) for (?P<invalid>illegal user )?(?P<user>.*) from (?P<addr>\S+)$")),
    ("max_tries", re.compile(
        r"^maximum authentication attempts exceeded for (?P<invalid>invalid user )?(?P<user>.*)"
        r" from (?P<addr>\S+) port (?P<port>\d+) ssh2" + _PREAUTH + "$")),
    ("account_denied", re.compile(
        r"^Access denied for user (?P<user>.*) by PAM account configuration" + _PREAUTH + "$")),
    ("closed", re.compile(
        r"^Connection (?:closed|reset) by " + _WHO + r"(?P<addr>\S+) port (?P<port>\d+)"
        + _PREAUTH + "$")),
    ("closed", re.compile(
        r"^Disconnected from " + _WHO + r"(?P<addr>\S+) port (?P<port>\d+)" + _PREAUTH + "$")),
    ("disconnecting", re.compile(
        r"^Disconnecting " + _WHO + r"(?P<addr>\S+) port (?P<port>\d+): (?P<reason>.*?)"
        + _PREAUTH + "$")),
    ("closed", re.compile(
        r"^ssh_dispatch_run_fatal: Connection from " + _WHO + r"(?P<addr>\S+) port (?P<port>\d+):"
        r" (?P<reason>.*?)" + _PREAUTH + "$")),
    ("received_disconnect", re.compile(
        r"^Received disconnect from (?P<addr>\S+) port (?P<port>\d+):(?P<code>\d+):"
        r" ?(?P<reason>.*?)" + _PREAUTH + "$")),
    ("timeout", re.compile(
        r"^Timeout before authentication for (?:connection from )?(?P<addr>\S+)"
        r" port (?P<port>\d+)$")),
    ("closed", re.compile(
        r"^Unable to negotiate with (?P<addr>\S+) port (?P<port>\d+): (?P<reason>.*?)"
        + _PREAUTH + "$")),
    ("closed", re.compile(
        r"^banner exchange: Connection from (?P<addr>\S+) port (?P<port>\d+): (?P<reason>.*)$")),
    ("closed", re.compile(
        r"^Did not receive identification string from (?P<addr>\S+) port (?P<port>\d+)$")),
]
# Cheap first-word filter: most lines in a busy auth.log are none of ours.
_FIRST_WORDS = {"Connection", "Accepted", "Failed", "Postponed", "Partial", "Invalid", "User",
                "Account", "ROOT", "PAM:", "maximum", "Access", "Disconnected", "Disconnecting",
                "ssh_dispatch_run_fatal:", "Received", "Timeout", "Unable", "banner", "Did"}


def _syslog_time(m: re.Match, now: float) -> float | None:
    try:
        if m.group("iso"):
            stamp = m.group("iso").replace("Z", "+00:00")
            if re.search(r"[+-]\d{4}$", stamp):  # journalctl short-iso writes +0000
                stamp = stamp[:-2] + ":" + stamp[-2:]
            parsed = _dt.datetime.fromisoformat(stamp)
            return parsed.timestamp()  # naive means local time, as syslog daemons write it
        # Traditional syslog stamps have no year and no zone: local time, this year, unless
        # that would be in the future (a December line read in January).
        year = _time.localtime(now).tm_year
        hh, mm, ss = (int(x) for x in m.group("hms").split(":"))
        for y in (year, year - 1):
            stamp = _time.mktime((y, _MONTHS[m.group("mon")], int(m.group("day")),
                                  hh, mm, ss, 0, 0, -1))
            if stamp <= now + 86400:
                return stamp
        return stamp
    except (ValueError, KeyError, OverflowError):
        return None


def parse_line(line: str, now: float | None = None) -> dict | None:
    """One sshd log line -> a small record, or None if it is not an sshd message we know.

    Keys: kind, message, time (from a syslog stamp, else None), pid, user, invalid, addr, port,
    method, result, key, reason, preauth. `now` only places a year-less syslog stamp."""
    line = line.rstrip("\r\n")
    time_, pid = None, None
    m = _SYSLOG_PREFIX.match(line)
    if m:
        prog = m.group("prog").rsplit("/", 1)[-1]
        if prog != "sshd" and not prog.startswith("sshd-"):
            return None
        time_ = _syslog_time(m, _time.time() if now is None else now)
        pid = int(m.group("pid")) if m.group("pid") else None
        line = m.group("msg")
    msg = _LEVEL_WORD.sub("", line.strip(), count=1)
    if msg.split(" ", 1)[0] not in _FIRST_WORDS:
        return None
    for kind, rx in _PATTERNS:
        mm = rx.match(msg)
        if not mm:
            continue
        g = mm.groupdict()
        rec = {"kind": kind, "message": msg, "time": time_, "pid": pid,
               "user": g.get("user"), "invalid": False, "addr": g.get("addr"), "port": None,
               "method": "", "result": g.get("result") or "", "key": g.get("key") or "",
               "reason": g.get("reason") or "", "preauth": bool(g.get("preauth"))}
        if g.get("port"):
            rec["port"] = int(g["port"])
        if g.get("invalid") or g.get("who") == "invalid user":
            rec["invalid"] = True
        if kind == "auth":
            # auth_log() prints method/submethod ("keyboard-interactive/pam"); the record keeps
            # the method, the tracker needs the submethod.
            rec["method"] = g["method"]
            rec["submethod"] = g.get("sub") or ""
        if kind in ("closed", "disconnecting") and g.get("who") == "user":
            rec["preauth"] = False  # "Disconnected from user U": a session ending, not a refusal
        return rec
    return None


# ---------------------------------------------------------------------------------------------
# Per-connection tracking
# ---------------------------------------------------------------------------------------------

_FAILED_ERROR = {"password": "bad_password", "keyboard-interactive": "bad_password",
                 "challenge-response": "bad_password", "publickey": "bad_key",
                 "hostbased": "bad_key"}
_ACCOUNT_REASONS = ("account is locked", "shell ", "account has expired")


@dataclass(eq=False)
class _Note:
    """A refusal line without a port ("User U from A not allowed because ..."): sshd logs it
    from getpwnamallow(), which knows the address but prints no port."""
    user: str
    addr: str | None
    error: str
    message: str
    time: float
    seen: float
    conn: "_Conn | None" = None  # tentative owner, until a line with a port names the user


@dataclass(eq=False)
class _Conn:
    addr: str
    port: int | None
    seen: float
    seq: int                       # opening order: "most recent connection" in _attach()
    time: float = 0.0
    pid: int | None = None
    user: str | None = None
    flag: str | None = None        # invalid_user / not_allowed / account_denied
    flag_message: str = ""
    note: _Note | None = None      # tentatively attached, unconfirmed
    method: str = ""
    key: str = ""
    held: dict | None = None       # a Failed record waiting for its next line
    held_at: float = 0.0
    emitted: int = 0
    postponed_key: bool = False    # "Postponed publickey": the key was in authorized_keys
    pam_failed: bool = False       # "PAM: Authentication failure" since the last attempt
    too_many: bool = False
    last_message: str = ""


class ConnectionTracker:
    """Feed it sshd log lines in order; it returns the refusal records that are due.

    `hold`: a `Failed password` for an existing user is held this long (or until that
    connection's next line) because sshd logs the same `Failed password` line when the password
    was right but PAM's account stack refused the account (expired): only the next line,
    `Access denied for user U by PAM account configuration`, tells them apart.
    `stale_after`: a connection or note with no line for this long is forgotten (its record
    emitted if one is due). `max_connections`: hard bound on connections and notes held.
    Call `expire(now)` now and then (feed() does it too) and `flush()` at shutdown."""

    def __init__(self, hold: float = 2.0, stale_after: float = 600.0,
                 max_connections: int = 10000):
        self.hold = hold
        self.stale_after = stale_after
        self.max_connections = max_connections
        self._conns: OrderedDict[tuple, _Conn] = OrderedDict()  # least recently seen first
        self._by_pid: dict[int, _Conn] = {}
        self._notes: list[_Note] = []
        self._held: set[_Conn] = set()
        self._seq = 0
        self._notes_swept = float("-inf")

    def open_connections(self) -> set[str]:
        """Connections whose end the log has not told yet, as attempts.conn_key makes them:
        their refusals are still to come, so their PAM attempts must not be reported alone."""
        return {f"{c.addr} {c.port}" for c in self._conns.values() if c.port}

    def __len__(self) -> int:
        """Connections and notes currently held in memory."""
        return len(self._conns) + len(self._notes)

    # -- public --------------------------------------------------------------------------------

    def feed(self, line: str, now: float) -> list[dict]:
        out = self.expire(now)
        rec = parse_line(line, now)
        if rec is None:
            return out
        t = rec["time"] if rec["time"] is not None else now
        handler = getattr(self, "_on_" + rec["kind"])
        handler(rec, t, now, out)
        return out

    def expire(self, now: float) -> list[dict]:
        """Release held records older than `hold`; forget connections and notes quiet for
        `stale_after` seconds, emitting what they still owe."""
        out: list[dict] = []
        for conn in [c for c in self._held if now - c.held_at >= self.hold]:
            self._release(conn, out)
        limit = now - self.stale_after
        while self._conns:
            conn = next(iter(self._conns.values()))
            if conn.seen > limit and len(self._conns) <= self.max_connections:
                break
            self._finish(conn, "unfinished", "", conn.time, out, evicted=True)
        # Notes are few (MaxStartups bounds pre-auth connections); a sweep a second is plenty.
        if self._notes and (now - self._notes_swept >= 1.0
                            or len(self._notes) > self.max_connections):
            self._notes_swept = now
            over, keep = len(self._notes) - self.max_connections, []
            for note in self._notes:
                if over > 0 or (note.conn is None and note.seen <= limit):
                    over -= 1
                    if note.conn is not None:
                        note.conn.note, note.conn = None, None
                    out.append(_record(note.user, "", note.error, note.message, note.addr or "",
                                       None, "", note.time))
                else:
                    keep.append(note)
            self._notes = keep
        return out

    def flush(self) -> list[dict]:
        """Emit every held record now (end of input, shutdown). Open connections are kept."""
        out: list[dict] = []
        for conn in list(self._held):
            self._release(conn, out)
        return out

    # -- lookup ----------------------------------------------------------------------------

    def _conn(self, rec: dict, t: float, now: float, create: bool = True) -> _Conn | None:
        key = (rec["addr"], rec["port"])
        conn = self._conns.get(key)
        if conn is None:
            if not create:
                return None
            # At LogLevel INFO there is no "Connection from": a connection starts at its first line.
            self._seq += 1
            conn = _Conn(rec["addr"], rec["port"], seen=now, seq=self._seq, time=t)
            self._conns[key] = conn
        conn.seen, conn.time, conn.last_message = now, t, rec["message"]
        self._conns.move_to_end(key)
        if rec["pid"] is not None:
            conn.pid = rec["pid"]
            self._by_pid[rec["pid"]] = conn
        return conn

    def _conn_for_user(self, rec: dict, user: str, addr: str | None) -> _Conn | None:
        """For port-less lines (Access denied, PAM:): the pid when syslog gave one, else the
        most recently active open connection of that user (from that address)."""
        if rec["pid"] is not None:
            conn = self._by_pid.get(rec["pid"])
            if conn is not None and conn.user == user:
                return conn
        for conn in reversed(self._conns.values()):
            if conn.user == user and (addr is None or conn.addr == addr):
                return conn
        return None

    # -- notes: "User U from A not allowed", which has no port --------------------------------

    def _attach(self, note: _Note, exclude: _Conn | None = None) -> None:
        """Tentatively give the note to the most recently opened connection still without a
        user, from the same address if any. Only a later line naming the user confirms it;
        until then a connection that names someone else, or ends without naming anyone, gives
        it back."""
        best, best_rank = None, None
        for conn in self._conns.values():
            if conn is exclude or conn.user is not None or conn.note is not None:
                continue
            rank = (note.addr is None or conn.addr == note.addr, conn.seq)
            if best_rank is None or rank > best_rank:
                best, best_rank = conn, rank
        # Another address only when the note names a host, not an IP (UseDNS yes).
        if best is not None and (best_rank[0] or not _looks_like_ip(note.addr)):
            note.conn, best.note = best, note

    def _detach(self, conn: _Conn) -> None:
        note = conn.note
        if note is not None:
            conn.note, note.conn = None, None
            self._attach(note, exclude=conn)

    def _confirm(self, conn: _Conn, note: _Note) -> None:
        previous = note.conn
        if conn.note is not None and conn.note is not note:
            self._detach(conn)
        self._notes.remove(note)
        note.conn, conn.note = None, None
        if conn.user is None:
            conn.user = note.user
        if conn.flag is None:
            conn.flag, conn.flag_message = note.error, note.message
        if previous is not None and previous is not conn:
            # The note was parked on the wrong connection; that one may own another note.
            previous.note = None
            for other in self._notes:
                if other.conn is None:
                    self._attach(other)

    def _name_user(self, conn: _Conn, user: str, invalid: bool, message: str) -> None:
        """A line with a port names the connection's user: settle notes and flags."""
        if conn.user is None:
            conn.user = user
        if conn.note is not None and (conn.note.user != user or not invalid):
            self._detach(conn)
        if invalid and conn.flag is None:
            # sshd marks users refused by getpwnamallow() "invalid" in every later line, whether
            # the account is missing or refused by AllowUsers & co; a matching note says which.
            notes = [n for n in self._notes if n.user == user]
            if notes:
                self._confirm(conn, max(notes, key=lambda n: (n.conn is conn,
                                                              n.addr == conn.addr)))
            else:
                conn.flag, conn.flag_message = "invalid_user", message

    # -- handlers --------------------------------------------------------------------------

    def _on_connect(self, rec, t, now, out):
        old = self._conns.get((rec["addr"], rec["port"]))
        if old is not None:  # port reused: the old one ended without a line we know
            self._finish(old, "unfinished", "", old.time, out, evicted=True)
        self._conn(rec, t, now)

    def _on_key_found(self, rec, t, now, out):
        pass  # no address or port: "Postponed publickey" on the connection says the same

    def _on_auth(self, rec, t, now, out):
        conn = self._conn(rec, t, now)
        self._release(conn, out)
        self._name_user(conn, rec["user"], rec["invalid"], rec["message"])
        result, method = rec["result"], rec["method"]
        if result == "Accepted":
            # PAM owns granted logins; the pre-auth phase is over.
            self._forget(conn)
            return
        if method != "none":
            conn.method = method
            if rec["key"]:
                conn.key = rec["key"]
        if result == "Postponed":
            if method == "publickey":
                conn.postponed_key = True
            return
        if result == "Partial" or method == "none":
            return  # not an attempt: "none" is the client's probe, Partial a step that passed
        # Failed
        error = conn.flag
        if error is None:
            error = _FAILED_ERROR.get(method, "bad_credentials")
            if method == "publickey" and conn.postponed_key:
                # The key was in authorized_keys (sshd said Postponed for it) and the signed
                # attempt still failed: PAM account stack or a similar check refused the account.
                error = "account_denied"
            elif method == "keyboard-interactive" and rec.get("submethod") == "pam" \
                    and not conn.pam_failed:
                # With kbd-interactive/pam, a wrong password always logs "PAM: Authentication
                # failure" first; a refusal from PAM's account stack (expired) logs nothing but
                # the Failed line.
                error = "account_denied"
        record = _record(conn.user, method, error, rec["message"], conn.addr, conn.port,
                         rec["key"], t)
        conn.postponed_key = False
        conn.pam_failed = False
        if error == "bad_password" and method == "password":
            conn.held, conn.held_at = record, now
            self._held.add(conn)
        else:
            conn.emitted += 1
            out.append(record)

    def _on_invalid_user(self, rec, t, now, out):
        conn = self._conn(rec, t, now)
        self._release(conn, out)
        self._name_user(conn, rec["user"], True, rec["message"])

    def _on_not_allowed(self, rec, t, now, out):
        reason = rec["reason"]
        error = "account_denied" if reason.startswith(_ACCOUNT_REASONS) else "not_allowed"
        self._add_note(rec["user"], rec["addr"], error, rec["message"], t, now, rec["pid"])

    def _on_account_expired(self, rec, t, now, out):
        self._add_note(rec["user"], None, "account_denied", rec["message"], t, now, rec["pid"])

    def _add_note(self, user, addr, error, message, t, now, pid):
        conn = self._by_pid.get(pid) if pid is not None else None
        if conn is not None and conn.user in (None, user):
            # syslog gave the pid, which is the connection's: no guessing needed
            if conn.note is not None:
                self._detach(conn)
            conn.user = user
            if conn.flag is None:
                conn.flag, conn.flag_message = error, message
            conn.seen = now
            self._conns.move_to_end((conn.addr, conn.port))
            return
        if addr is None and message.startswith("User "):
            # UsePAM no: sshd follows "Account U has expired" with "User U not allowed because
            # account is locked" for the same connection. One refusal, one note.
            for note in reversed(self._notes):
                if note.user == user and note.message.startswith("Account "):
                    return
        note = _Note(user, addr, error, message, t, now)
        self._notes.append(note)
        self._attach(note)

    def _on_root_refused(self, rec, t, now, out):
        conn = self._conn(rec, t, now)
        self._name_user(conn, "root", False, rec["message"])
        if conn.flag is None:
            conn.flag, conn.flag_message = "not_allowed", rec["message"]

    def _on_pam_failure(self, rec, t, now, out):
        conn = self._conn_for_user(rec, rec["user"], rec["addr"])
        if conn is not None:
            conn.pam_failed = True

    def _on_max_tries(self, rec, t, now, out):
        conn = self._conn(rec, t, now)
        self._release(conn, out)
        self._name_user(conn, rec["user"], rec["invalid"], rec["message"])
        conn.too_many = True

    def _on_account_denied(self, rec, t, now, out):
        conn = self._conn_for_user(rec, rec["user"], None)
        if conn is None:
            out.append(_record(rec["user"], "", "account_denied", rec["message"], "", None, "", t))
            return
        if conn.held is not None:  # the password was right after all
            conn.held.update(error="account_denied", message=rec["message"])
            self._release(conn, out)
        self._finish(conn, "account_denied", rec["message"], t, out)

    def _on_closed(self, rec, t, now, out):
        conn = self._conn(rec, t, now, create=rec["user"] is not None and rec["preauth"])
        if conn is None:
            return
        if rec["user"] is not None:
            self._name_user(conn, rec["user"], rec["invalid"], rec["message"])
        if not rec["preauth"]:
            self._forget(conn)  # a session ending (post-auth), never a refusal
            return
        if rec.get("too_many"):
            conn.too_many = True
        self._finish(conn, "disconnected", rec["message"], t, out)

    def _on_disconnecting(self, rec, t, now, out):
        # "Disconnecting ...: Too many authentication failures" follows the MaxAuthTries line;
        # at LogLevel INFO it may be all there is to say about refused keys.
        too_many = rec["reason"].startswith("Too many authentication failures")
        self._on_closed(dict(rec, too_many=too_many), t, now, out)

    def _on_received_disconnect(self, rec, t, now, out):
        # Always followed by "Disconnected from ..." which ends the connection.
        conn = self._conn(rec, t, now, create=False)
        if conn is not None:
            self._release(conn, out)

    def _on_timeout(self, rec, t, now, out):
        conn = self._conn(rec, t, now, create=False)
        if conn is not None:
            self._finish(conn, "timeout", rec["message"], t, out)

    # -- ending ------------------------------------------------------------------------------

    def _release(self, conn: _Conn, out: list) -> None:
        if conn.held is not None:
            out.append(conn.held)
            conn.emitted += 1
            conn.held = None
            self._held.discard(conn)

    def _forget(self, conn: _Conn) -> None:
        self._held.discard(conn)
        if conn.note is not None:
            self._detach(conn)
        self._conns.pop((conn.addr, conn.port), None)
        if conn.pid is not None and self._by_pid.get(conn.pid) is conn:
            del self._by_pid[conn.pid]

    def _finish(self, conn: _Conn, reason: str, message: str, t: float, out: list,
                evicted: bool = False) -> None:
        """The pre-auth phase ended: one record if a user was named and nothing was said yet."""
        self._release(conn, out)
        if conn.note is not None and (reason == "timeout" or evicted):
            # sshd names no user in its timeout line: the tentative note is all we have. Any
            # other end line names the user when there was a userauth request ("invalid user
            # U"), so a note still parked here belongs elsewhere: _forget() passes it on.
            self._confirm(conn, conn.note)
        if conn.user is not None and not conn.emitted:
            if conn.flag is not None:
                # the line that said why (Invalid user, not allowed...) beats "Connection closed"
                error, message = conn.flag, conn.flag_message or message
            elif conn.too_many:
                error = "too_many_failures"
            else:
                error = reason
            out.append(_record(conn.user, conn.method, error, message or conn.last_message,
                               conn.addr, conn.port, conn.key, t))
        self._forget(conn)


def _record(login, method, error, message, addr, port, key, time_) -> dict:
    return {"login": login or "", "method": method or "", "error": error,
            "message": message or "", "addr": addr or "", "port": port, "key": key or "",
            "time": float(time_)}


def _looks_like_ip(addr: str | None) -> bool:
    return bool(addr) and (":" in addr or re.fullmatch(r"[\d.]+", addr) is not None)


# ---------------------------------------------------------------------------------------------
# Following the file
# ---------------------------------------------------------------------------------------------

class LogFollower:
    """Follows a growing log file like `tail -F`, line by line, without inotify.

    `offset_state` is a `position()` saved earlier: (inode, offset of the first byte not yet
    returned as a complete line). Given one, reading resumes exactly there; if the file at
    `path` has another inode, the old one is looked for beside it (logrotate renames it to
    path.1 or path-DATE) and finished first. Without one, reading starts at the end of the
    file (`from_start=True` to read it all). A partial last line is held until its newline.
    Rotation (a new inode at `path`): the old file is read to its end, then the new one from 0.
    Truncation (size below our offset, copytruncate): restart at 0."""

    MAX_LINE = 64 * 1024  # a line longer than this is cut: sshd's own lines are far shorter

    def __init__(self, path: str, offset_state: tuple[int, int] | None = None,
                 from_start: bool = False):
        self.path = path
        self._f = None
        self._inode: int | None = None
        self._offset = 0      # consumed up to here (complete lines only)
        self._partial = b""
        st = _stat(path)
        if offset_state is not None:
            inode, offset = offset_state
            if st is not None and st.st_ino == inode:
                self._open(path, offset)
            elif not self._open_rotated(inode, offset) and st is not None:
                self._open(path, 0)  # the old file is gone: the new one from 0, the best we can
        elif st is not None:
            self._open(path, 0 if from_start else st.st_size)

    def position(self) -> tuple[int | None, int]:
        return (self._inode, self._offset)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> "LogFollower":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read_available(self) -> list[str]:
        lines: list[str] = []
        if self._f is None:
            st = _stat(self.path)
            if st is None:
                return lines
            # a file that appeared (from 0), or ours again after close() (where we were)
            self._open(self.path, self._offset if st.st_ino == self._inode else 0)
        self._read(lines)
        st = _stat(self.path)
        if st is None:
            return lines  # rotated away, new file not created yet: keep reading the old one
        if st.st_ino != self._inode:
            # Rotated: what was appended to the old file since our read is collected, then the
            # old file's unterminated tail is a line too (nothing will complete it).
            self._read(lines)
            if self._partial:
                lines.append(self._partial.decode("utf-8", "replace"))
            self._f.close()
            self._open(self.path, 0)
            self._read(lines)
        elif st.st_size < self._offset + len(self._partial):
            # Truncated (copytruncate). A held partial line belonged to the old content.
            self._partial = b""
            self._f.seek(0)
            self._offset = 0
            self._read(lines)
        return lines

    def _open(self, path: str, offset: int) -> None:
        f = open(path, "rb")
        st = os.fstat(f.fileno())
        if st.st_size < offset:
            offset = 0  # truncated while we were away
        f.seek(offset)
        self._f, self._inode, self._offset, self._partial = f, st.st_ino, offset, b""

    def _open_rotated(self, inode: int, offset: int) -> bool:
        """Resume in the file we were reading, renamed beside `path` by logrotate."""
        folder = os.path.dirname(os.path.abspath(self.path))
        base = os.path.basename(self.path)
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return False
        for e in entries:
            # compressed rotations (.gz) have new inodes anyway
            if e.name == base or not e.name.startswith(base):
                continue
            try:
                if e.inode() == inode and e.is_file(follow_symlinks=False):
                    self._open(e.path, offset)
                    return True
            except OSError:
                continue
        return False

    def _read(self, lines: list[str]) -> None:
        while True:
            chunk = self._f.read(1 << 20)
            if not chunk:
                return
            data = self._partial + chunk
            parts = data.split(b"\n")
            self._partial = parts.pop()
            for p in parts:
                self._offset += len(p) + 1
                lines.append(p.decode("utf-8", "replace"))
            if len(self._partial) > self.MAX_LINE:
                self._offset += len(self._partial)
                lines.append(self._partial.decode("utf-8", "replace"))
                self._partial = b""


def _stat(path: str):
    try:
        return os.stat(path)
    except OSError:
        return None
