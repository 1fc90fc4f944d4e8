"""Host events of SSH connections outside their recorded sessions, sorted into the sessions.

The tracer follows every sshd listener (Tracer.track_sshd), so each connection's processes are
followed from the fork that made them, not only from the wrapper's hello: the connection's own
sshd, which opens the connections a client forwards (`ssh -L`, `-D`, and `-W`, which is what
ProxyJump does: no session channel, so no wrapper ever starts) and listens for `ssh -R`, and
what a login shell runs
from the user's startup files before the wrapper (tcsh, fish: see sshtrail.unrecorded). Of
root's processes there only connects come (probes.c); the wrapper, once it has said hello, and
all it starts have their session's own key and do not pass here.

Such an event comes with a pid. Its session is that of the connection's monitor, the sshd
process under the listener that calls PAM: the sid is derived from its pid and start time, as
the PAM hook derives it (sessionid). An event waits here until that PAM session is known -- the
agent is told of each session it writes for PAM (`opened`), within 0.1 s of the login; for one
opened while no agent ran, the spool's open sessions say it -- and at least HOLD seconds, so
that a wrapper's own start (its exec and imports, before its hello) is known as the wrapper's
and left out. What is not a session within `patience` -- a connection still authenticating,
one that never logged in, one of another sshd -- has nothing to be attributed to and is
dropped. What could not be placed because its processes were gone is counted (`unplaced`),
for an ebpf.lost event.
"""
from __future__ import annotations

import collections
import logging
import sqlite3

from . import procfs, sessionid

log = logging.getLogger("sshtrail.agent.ebpf")

HOLD = 1.0  # seconds: a wrapper says hello within tens of milliseconds of its exec
CHECK_EVERY = 0.25  # seconds between looks at the spool for the sessions events wait for
MAX_WAITING = 100_000  # events waiting at once; more are counted as unplaced
REMEMBER = 4096  # connections and wrappers remembered


class ConnectionEvents:
    def __init__(self, server_id: str, patience: float):
        self.server_id = server_id
        self.boot = procfs.boot_id()
        self.patience = patience
        self.listeners: dict[int, int] = {}  # pid -> start time
        self.unplaced = 0  # events whose session could not be found: their processes had gone
        self.cut_short = 0  # events let go at the agent's stop while their session could come
        self._wrappers: dict[int, int] = {}  # pid -> start time, of wrappers that said hello
        # pid -> (start time, connection) of processes placed before: a daemon the connection
        # left behind is still its connection's once its parents are gone
        self._procs: collections.OrderedDict = collections.OrderedDict()
        # connection -> deque of (due, deadline, pid, start, forwarded, event), oldest first:
        # a look costs a lookup per connection with something due, not a pass over all events
        self._waiting: dict[tuple[int, int], collections.deque] = {}
        self._count = 0  # events waiting
        # (monitor pid, start) -> (sid, login) of connections known to be sessions of ours
        self._sessions: collections.OrderedDict = collections.OrderedDict()
        self._next_check = 0.0

    def new_listeners(self) -> list[int]:
        """sshd processes whose parent is not sshd, not seen before: the listeners to follow."""
        table = procfs.table()
        self.listeners = {p: s for p, s in self.listeners.items() if table.get(p, (0, -1))[1] == s}
        new = []
        for pid, (ppid, start) in table.items():
            if pid not in self.listeners and procfs.is_root_sshd(pid) and not procfs.is_sshd(ppid):
                self.listeners[pid] = start
                new.append(pid)
        return new

    def opened(self, monitor: int, start: int, sid: str, login: str) -> None:
        """A PAM session opened, by the connection process `monitor` (started at `start`)."""
        self._sessions[(monitor, start)] = (sid, login)
        if len(self._sessions) > REMEMBER:
            self._sessions.popitem(last=False)

    def wrapper(self, pid: int) -> None:
        """`pid` is a session wrapper (it said hello): what it did before is the recorder's."""
        try:
            self._wrappers[pid] = procfs.start_time(pid)
        except procfs.ProcessGone:
            return
        if len(self._wrappers) > REMEMBER:
            self._wrappers = {p: s for p, s in self._wrappers.items() if _start(p) == s}

    def add(self, evs: list[dict], now: float, db=None) -> None:
        """Events of KEY_SSHD processes, as the tracer decoded them (one poll's: a process's
        place is found once per batch, not per event). `db`: the spool, to look for their
        sessions now, while they are surely open (one that closes within HOLD would be gone
        from pam_sessions by the time ready() looks)."""
        places: dict[int, tuple | None] = {}
        for ev in evs:
            pid = ev["pid"]
            if pid in self.listeners:
                continue  # sshd itself, binding its port when it restarts: no connection's
            if pid not in places:
                places[pid] = self._place(pid, ev["ppid"], db)
            place = places[pid]
            if place is None or self._count >= MAX_WAITING:
                self.unplaced += 1
                continue
            pstart, conn = place
            if conn[0] == pid:
                continue  # the connection's own monitor: authentication and PAM's work, root's
            # sshd's process for the connection, the monitor's child: a user may run sshd's
            # program too, inside their session.
            forwarded = (ev["kind"] in ("connect", "connected", "listen")
                         and ev["ppid"] == conn[0] and procfs.is_sshd(pid))
            self._waiting.setdefault(conn, collections.deque()).append(
                (now + HOLD, now + self.patience, pid, pstart, forwarded, ev))
            self._count += 1

    def _place(self, pid: int, ppid: int, db) -> tuple[int | None, tuple[int, int]] | None:
        """(start time, connection) of a process, or None if its connection cannot be found."""
        pstart = _start(pid)
        conn = self._known(pid, pstart) or self._connection(pid)
        if conn is not None and pstart is None and pid in self._procs:
            # Gone, and known: its first event (the tracer hands it over at once) found it
            # alive; the rest come in batches, and a wrapper lives ~30 ms before its hello.
            pstart = self._procs[pid][0]
        if conn is None:
            # Gone already, or left its connection's tree (a daemon, reparented): the process
            # that forked it may still be there, or be known.
            conn = self._known(ppid, _start(ppid)) or self._connection(ppid)
        if conn is None:
            return None
        if pstart is not None and conn[0] != pid:
            self._procs[pid] = (pstart, conn)
            if len(self._procs) > REMEMBER:
                self._procs.popitem(last=False)
        if db is not None and conn not in self._sessions:
            self._lookup(db, conn)
        return pstart, conn

    def _known(self, pid: int, start: int | None) -> tuple[int, int] | None:
        """The connection of a process seen before: the same one if it has the same start
        time, or if it is gone (its pid is not yet anyone else's)."""
        hit = self._procs.get(pid)
        return hit[1] if hit is not None and start in (None, hit[0]) else None

    def _connection(self, pid: int) -> tuple[int, int] | None:
        """(pid, start time) of the connection's monitor, the listener's child that pid is or
        descends from."""
        for _ in range(64):
            try:
                ppid = procfs.parent(pid)
            except procfs.ProcessGone:
                return None
            if ppid in self.listeners:
                start = _start(pid)
                return None if start is None else (pid, start)
            if ppid <= 1:
                return None
            pid = ppid
        return None

    def ready(self, db, now: float, *, final: bool = False) -> list[tuple[dict, str, str, bool]]:
        """(event, sid, login, forwarded by sshd) of the events whose session is now known.
        `final` (the agent stops): all that can be placed now, and the rest is let go."""
        if not self._waiting or (now < self._next_check and not final):
            return []
        self._next_check = now + CHECK_EVERY
        out = []
        for conn in list(self._waiting):
            items = self._waiting[conn]
            if now < items[0][0] and not final:
                continue  # nothing due yet
            session = self._sessions.get(conn) or self._lookup(db, conn)
            while items and (final or now >= (items[0][1] if session is None else items[0][0])):
                _, deadline, pid, pstart, forwarded, ev = items.popleft()
                self._count -= 1
                if session is None:
                    if now < deadline:
                        self.cut_short += 1  # (final) its connection may yet become a session
                    continue  # not a session of this spool: nothing to attribute it to
                if pstart is not None and self._wrappers.get(pid) == pstart:
                    continue  # the wrapper starting, before its hello
                out.append((ev, session[0], session[1], forwarded))
            if not items:
                del self._waiting[conn]
        return out

    def _lookup(self, db, conn: tuple[int, int]):
        sid = sessionid.derive(self.server_id, self.boot, conn[0], conn[1])
        try:
            row = db.execute("SELECT login FROM pam_sessions WHERE pid = ? AND sid = ?",
                             (conn[0], sid)).fetchone()
        except sqlite3.Error as e:
            # Asked again at the next look: a failing read must not stop the tracer (this runs
            # inside its poll), nor drop the events before their patience is out.
            log.warning("looking up the session of connection %d: %s", conn[0], e)
            return None
        if row is None:
            return None
        self.opened(conn[0], conn[1], sid, row[0])
        return sid, row[0]


def _start(pid: int) -> int | None:
    try:
        return procfs.start_time(pid)
    except procfs.ProcessGone:
        return None
