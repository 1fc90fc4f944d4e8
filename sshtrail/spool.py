"""The local spool: every event lands here first (SQLite, WAL mode, root-only).

Many short-lived writers at once (one PAM hook per login, the agent) and one reader that claims
batches and acknowledges them (the uploader). A committed append survives the writer being
killed (WAL; synchronous=FULL, so it survives a power cut too; the agent's recording writer
uses NORMAL, which survives a killed process, the case a wrapper re-sends for, at a fraction
of the fsyncs). Past `max_bytes`, delivered events are pruned first; if the
spool is still full, `on_full` decides what goes, and what went is counted and reported as a
`spool.dropped` event as soon as there is room: the spool never drops anything silently.

The write path uses the stdlib sqlite3 module directly: the PAM hook runs once per login and
importing sqlite-utils costs ~50 ms there. The read side (queries, `sshtrail events`) goes
through sqlite-utils. This module must never import a component (pam_module, collector, ...).
"""
from __future__ import annotations

import os
import sqlite3
import time
from contextlib import contextmanager

from . import events
from .errors import SshtrailError

SCHEMA_VERSION = 4
SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    uid TEXT NOT NULL UNIQUE,
    time TEXT NOT NULL,
    event TEXT NOT NULL,
    login TEXT,
    sid TEXT,
    body TEXT NOT NULL,
    claim TEXT,
    claimed_at REAL,
    sent INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS events_unsent ON events (sent, seq);
CREATE INDEX IF NOT EXISTS events_time ON events (time);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- PAM attempts not yet resolved into a granted session or a logged refusal (see pam_module).
CREATE TABLE IF NOT EXISTS pam_attempts (
    id INTEGER PRIMARY KEY, conn TEXT NOT NULL, login TEXT NOT NULL, service TEXT NOT NULL,
    stage TEXT NOT NULL, pid INTEGER NOT NULL, addr TEXT NOT NULL, time REAL NOT NULL);
CREATE INDEX IF NOT EXISTS pam_attempts_conn ON pam_attempts (conn);
-- Connections granted a session; an attempt written after its grant is resolved by it.
CREATE TABLE IF NOT EXISTS pam_granted (conn TEXT NOT NULL, time REAL NOT NULL);
CREATE INDEX IF NOT EXISTS pam_granted_conn ON pam_granted (conn);
-- Session recordings: one row each, and their chunks (wire frames as the wrapper sent them).
CREATE TABLE IF NOT EXISTS recordings (
    sid TEXT PRIMARY KEY, login TEXT NOT NULL, mode TEXT NOT NULL, command TEXT NOT NULL,
    term TEXT NOT NULL, cols INTEGER NOT NULL, rows INTEGER NOT NULL, started REAL NOT NULL,
    ended REAL, end_reason TEXT, exit_status INTEGER, wrapper_pid INTEGER NOT NULL,
    wrapper_start INTEGER NOT NULL, bytes_out INTEGER NOT NULL DEFAULT 0,
    stored_bytes INTEGER NOT NULL DEFAULT 0, chunks INTEGER NOT NULL DEFAULT 0,
    dropped_bytes INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS recording_chunks (
    sid TEXT NOT NULL, seq INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (sid, seq));
-- Open PAM sessions, so close_session can tell the duration.
CREATE TABLE IF NOT EXISTS pam_sessions (
    conn TEXT NOT NULL, pid INTEGER NOT NULL, sid TEXT NOT NULL, login TEXT NOT NULL,
    started REAL NOT NULL, PRIMARY KEY (conn, pid));
"""


class SpoolError(SshtrailError):
    """The spool cannot be opened or written; the message says where and why."""


class SpoolFull(SpoolError):
    """An append was refused under on_full = drop_new; it has been counted."""


class Batch:
    """A claimed batch: ack or release it by `id`."""
    __slots__ = ("id", "events")

    def __init__(self, id: str, events: list[dict]):
        self.id, self.events = id, events


class Spool:
    def __init__(self, path: str | os.PathLike, *, server_id: str = "", server_hostname: str = "",
                 max_bytes: int = 1 << 30, on_full: str = "drop_new", busy_timeout: float = 2.0,
                 synchronous: str = "FULL"):
        self.path = os.fspath(path)
        self.server_id = server_id
        self.server_hostname = server_hostname
        self.max_bytes = max_bytes
        self.on_full = on_full
        self._db = self._open(busy_timeout, synchronous)

    @classmethod
    def from_config(cls, cfg, **kw) -> "Spool":
        return cls(cfg["spool.path"], server_id=cfg.server_id, server_hostname=cfg.server_hostname,
                   max_bytes=cfg["spool.max_bytes"], on_full=cfg["spool.on_full"],
                   busy_timeout=cfg["spool.busy_timeout"], **kw)

    def _open(self, busy_timeout: float, synchronous: str) -> sqlite3.Connection:
        try:
            os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
            old = os.umask(0o077)  # the file and its -wal/-shm are created root-only
            try:
                db = sqlite3.connect(self.path, timeout=busy_timeout, isolation_level=None)
                db.execute("PRAGMA journal_mode=WAL")
            finally:
                os.umask(old)
            db.execute(f"PRAGMA synchronous={'NORMAL' if synchronous == 'NORMAL' else 'FULL'}")
            if db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                # IF NOT EXISTS: two first writers may both get here; the second is a no-op.
                db.executescript("BEGIN IMMEDIATE;" + SCHEMA
                                 + f"PRAGMA user_version={SCHEMA_VERSION};COMMIT;")
            return db
        except (OSError, sqlite3.Error) as e:
            raise SpoolError(f"spool {self.path}: cannot open: {e}") from None

    def close(self) -> None:
        self._db.close()

    # -- writing ---------------------------------------------------------------------------

    def _complete(self, ev: dict) -> dict:
        ev.setdefault("server_id", self.server_id)
        ev.setdefault("server_hostname", self.server_hostname)
        return events.validate(ev)

    def append(self, *evs: dict, extra_sql=None) -> None:
        """Validate and store events in one transaction; all or none. `extra_sql(db)` runs in the
        same transaction (e.g. to resolve a PAM attempt together with the event it became)."""
        evs = [self._complete(ev) for ev in evs]
        rows = [_row(ev) for ev in evs]
        try:
            with _txn(self._db, immediate=True):
                room = self._make_room(sum(len(r[-1]) for r in rows))
                if room:
                    rows += [_row(self._complete(ev)) for ev in self._drained_drop_events()]
                    self._db.executemany(
                        "INSERT OR IGNORE INTO events (uid, time, event, login, sid, body) "
                        "VALUES (?, ?, ?, ?, ?, ?)", rows)
                    if extra_sql:
                        extra_sql(self._db)
            if not room:
                with _txn(self._db, immediate=True):
                    self._count_drop(len(rows), "spool full (on_full = drop_new)")
        except sqlite3.Error as e:
            raise SpoolError(f"spool {self.path}: write failed: {e}") from None
        if not room:
            raise SpoolFull(f"spool {self.path} is full ({self.max_bytes} bytes of undelivered "
                            f"events); {len(rows)} event(s) dropped and counted")

    def _used_bytes(self) -> int:
        pages, free, size = (self._db.execute(f"PRAGMA {p}").fetchone()[0]
                             for p in ("page_count", "freelist_count", "page_size"))
        return (pages - free) * size

    def _prune_delivered(self, incoming: int) -> bool:
        """Make room by deleting delivered events, oldest first: they are only a local
        convenience. True if `incoming` bytes now fit under max_bytes."""
        while self._used_bytes() + incoming > self.max_bytes:
            cur = self._db.execute("DELETE FROM events WHERE seq IN (SELECT seq FROM events "
                                   "WHERE sent = 1 ORDER BY seq LIMIT 500)")
            if cur.rowcount == 0:
                break
        return self._used_bytes() + incoming <= self.max_bytes

    def _make_room(self, incoming: int) -> bool:
        if self._prune_delivered(incoming):
            return True
        if self.on_full == "drop_new":
            return False
        dropped = 0
        while self._used_bytes() + incoming > self.max_bytes:
            cur = self._db.execute("DELETE FROM events WHERE seq IN (SELECT seq FROM events "
                                   "WHERE sent = 0 AND claim IS NULL AND event != 'spool.dropped' "
                                   "ORDER BY seq LIMIT 100)")
            if cur.rowcount == 0:
                break
            dropped += cur.rowcount
        if dropped:
            self._count_drop(dropped, "spool full (on_full = drop_oldest)")
        return self._used_bytes() + incoming <= self.max_bytes

    def _count_drop(self, n: int, reason: str) -> None:
        # An UPDATE in place needs no new page, so the count is kept even when the spool is full.
        self._db.execute("INSERT INTO state (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE "
                         "SET value = CAST(value AS INTEGER) + excluded.value",
                         ("dropped:" + reason, str(n)))

    def _drained_drop_events(self) -> list[dict]:
        rows = self._db.execute("SELECT key, value FROM state WHERE key LIKE 'dropped:%'").fetchall()
        if not rows:
            return []
        self._db.execute("DELETE FROM state WHERE key LIKE 'dropped:%'")
        return [events.new("spool.dropped", count=int(v), reason=k.split(":", 1)[1]) for k, v in rows]

    # -- the uploader's side ---------------------------------------------------------------

    def claim(self, limit: int = 500, lease: float = 60.0) -> Batch | None:
        """Claim up to `limit` undelivered events, oldest first. A claim not acknowledged within
        `lease` seconds (the uploader died) is claimed again: at-least-once delivery."""
        batch_id = events.new_uid()
        now = time.time()
        with _txn(self._db, immediate=True):
            self._db.execute(
                "UPDATE events SET claim = ?, claimed_at = ? WHERE seq IN (SELECT seq FROM events "
                "WHERE sent = 0 AND (claim IS NULL OR claimed_at < ?) ORDER BY seq LIMIT ?)",
                (batch_id, now, now - lease, limit))
            bodies = self._db.execute("SELECT body FROM events WHERE claim = ? ORDER BY seq",
                                      (batch_id,)).fetchall()
        if not bodies:
            return None
        import json  # here and below, not at the top: the PAM hook's path needs no json
        return Batch(batch_id, [json.loads(b) for (b,) in bodies])

    def ack(self, batch_id: str) -> int:
        """Mark a claimed batch delivered; returns how many events it held."""
        with _txn(self._db, immediate=True):
            return self._db.execute("UPDATE events SET sent = 1, claim = NULL WHERE claim = ?",
                                    (batch_id,)).rowcount

    def release(self, batch_id: str) -> None:
        with _txn(self._db, immediate=True):
            self._db.execute("UPDATE events SET claim = NULL WHERE claim = ?", (batch_id,))

    # -- small durable state (log positions, PAM bookkeeping) --------------------------------

    def get_state(self, key: str, default=None):
        row = self._db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        import json
        return json.loads(row[0]) if row else default

    def set_state(self, key: str, value) -> None:
        with _txn(self._db, immediate=True):
            self._db.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)",
                             (key, events.to_json(value)))

    @property
    def db(self) -> sqlite3.Connection:
        """The connection, for modules that keep their own small tables in the spool."""
        return self._db

    @contextmanager
    def transaction(self):
        with _txn(self._db, immediate=True):
            yield self._db

    # -- recordings ------------------------------------------------------------------------

    def start_recording(self, **row) -> None:
        cols = ", ".join(row)
        with _txn(self._db, immediate=True):
            self._db.execute(f"INSERT OR IGNORE INTO recordings ({cols}) VALUES "
                             f"({', '.join('?' * len(row))})", tuple(row.values()))

    def put_chunk(self, sid: str, seq: int, frames_blob: bytes, out_bytes: int) -> bool:
        """Store one batch of frames; a retried batch (same seq) is stored once. True if new.
        Stored uncompressed: zlib, even at level 1, cost the agent ~22 ms of CPU per MB of
        output here, more than the whole plain session; the collector compresses."""
        data = frames_blob
        with _txn(self._db, immediate=True):
            # Recordings stop a tenth short of the cap: that room is for events, among them
            # the one saying how much output was dropped.
            if not self._prune_delivered(len(data) + self.max_bytes // 10):
                # Full: a session's output must not push out events not yet delivered (a user
                # could flood the terminal to that end). Dropped, counted, reported at its end.
                self._db.execute("UPDATE recordings SET bytes_out = bytes_out + ?, dropped_bytes "
                                 "= dropped_bytes + ? WHERE sid = ?", (out_bytes, out_bytes, sid))
                return False
            new = self._db.execute("INSERT OR IGNORE INTO recording_chunks (sid, seq, data) "
                                   "VALUES (?, ?, ?)", (sid, seq, data)).rowcount
            if new:
                self._db.execute("UPDATE recordings SET bytes_out = bytes_out + ?, stored_bytes = "
                                 "stored_bytes + ?, chunks = chunks + 1 WHERE sid = ?",
                                 (out_bytes, len(data), sid))
        return bool(new)

    def end_recording(self, sid: str, *evs: dict, **fields) -> None:
        sets = ", ".join(f"{k} = ?" for k in fields)
        self.append(*evs, extra_sql=lambda db: db.execute(
            f"UPDATE recordings SET {sets} WHERE sid = ?", (*fields.values(), sid)))

    def recording(self, sid: str) -> dict | None:
        cur = self._db.execute("SELECT * FROM recordings WHERE sid = ?", (sid,))
        row = cur.fetchone()
        return dict(zip([c[0] for c in cur.description], row)) if row else None

    def recordings(self) -> list[dict]:
        cur = self._db.execute("SELECT * FROM recordings ORDER BY started")
        names = [c[0] for c in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]

    def frames(self, sid: str):
        """The recording's frames in order: (t, kind, data)."""
        from .wire import unpack_frames
        for (data,) in self._db.execute("SELECT data FROM recording_chunks WHERE sid = ? "
                                        "ORDER BY seq", (sid,)):
            yield from unpack_frames(data)

    # -- reading -----------------------------------------------------------------------------

    def query(self, *, kind: str | None = None, login: str | None = None,
              since: float | None = None, sid: str | None = None, limit: int | None = None) -> list[dict]:
        """Spooled events, oldest first, filtered by type, user, sid and time."""
        import sqlite_utils  # read side only; see the module docstring
        where, params = [], []
        for col, val in (("event", kind), ("login", login), ("sid", sid)):
            if val is not None:
                where.append(f"{col} = ?")
                params.append(val)
        if since is not None:
            where.append("time >= ?")
            params.append(events.format_time(since))
        sql = "SELECT body FROM events" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY time, seq"
        if limit:
            sql += f" LIMIT {int(limit)}"
        import json
        return [json.loads(r["body"]) for r in sqlite_utils.Database(self._db).query(sql, params)]

    def count(self, *, sent: bool | None = None) -> int:
        sql, params = "SELECT count(*) FROM events", ()
        if sent is not None:
            sql, params = sql + " WHERE sent = ?", (int(sent),)
        return self._db.execute(sql, params).fetchone()[0]


def _row(ev: dict) -> tuple:
    return (ev["uid"], ev["time"], ev["event"], ev.get("login"), ev.get("sid"), events.to_json(ev))


@contextmanager
def _txn(db: sqlite3.Connection, immediate: bool = False):
    """BEGIN IMMEDIATE takes the write lock up front, so concurrent writers queue on the busy
    timeout instead of failing with SQLITE_BUSY at commit."""
    if db.in_transaction:
        yield
        return
    db.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
    try:
        yield
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    else:
        if db.in_transaction:
            db.execute("COMMIT")
