"""The local spool: every event lands here first (SQLite, WAL mode, root-only).

Many short-lived writers at once (one PAM hook per login, the agent) and one reader that claims
batches and acknowledges them (the uploader). A committed append survives the writer being
killed (WAL; synchronous=FULL, so it survives a power cut too; the agent's recording writer
uses NORMAL, which survives a killed process, the case a wrapper re-sends for, at a fraction
of the fsyncs). A recording chunk's bytes go in a file of their own beside the database
(<spool>.chunks/SID.SEQ), written before the row that points at it; the cap counts them. Past
`max_bytes`, delivered events and chunks are pruned first; if the
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

from . import events, wal
from .chain import GENESIS, link_hash
from .errors import SshtrailError

SCHEMA_VERSION = 8
# Chunk files are named after their sid: only sids that are safe as a file name (every sid the
# agent makes is) get one; any other chunk keeps its bytes in its row. (A set, not a regex: the
# PAM hook imports this module on every PAM call, and `re` would cost it ~4 ms.)
_FILE_SAFE = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-")
# ...and only chunks this big: a streaming session's batches (recording.batch_bytes, 1 MiB),
# which SQLite would write twice (WAL, then checkpoint). An interactive session's are a few
# bytes every batch_ms, which a file each would cost an inode and a create and unlink each.
CHUNK_FILE_MIN = 64 << 10
# What `seq` and `prev_hash` add to a stored body, counted against the cap before they exist.
_CHAIN_FIELDS_BYTES = 100
SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    uid TEXT NOT NULL UNIQUE,
    time TEXT NOT NULL,
    event TEXT NOT NULL,
    login TEXT,
    sid TEXT,
    body TEXT NOT NULL,
    claim TEXT,  -- unused since schema 7 (see claims); kept, as SQLite 3.40 keeps columns
    claimed_at REAL,
    sent INTEGER NOT NULL DEFAULT 0  -- 0 waiting, 1 delivered, 2 refused by the collector
);
CREATE INDEX IF NOT EXISTS events_unsent ON events (sent, seq);
-- The uploader's claims, one row per claimed event: apart from the events so that claiming a
-- batch writes these narrow rows, not every claimed event's row again (bench/collector: the
-- uploader spent about 40% of its CPU claiming). ack and release find a batch by its claim.
CREATE TABLE IF NOT EXISTS claims (
    seq INTEGER PRIMARY KEY, claim TEXT NOT NULL, claimed_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS claims_claim ON claims (claim);
CREATE INDEX IF NOT EXISTS events_time ON events (time);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- PAM attempts not yet resolved into a granted session or a logged refusal (see pam_module).
CREATE TABLE IF NOT EXISTS pam_attempts (
    id INTEGER PRIMARY KEY, conn TEXT NOT NULL, login TEXT NOT NULL, service TEXT NOT NULL,
    stage TEXT NOT NULL, pid INTEGER NOT NULL, addr TEXT NOT NULL, time REAL NOT NULL);
CREATE INDEX IF NOT EXISTS pam_attempts_conn ON pam_attempts (conn);
-- Connections granted a session, or whose end sshd's log told: an attempt written after
-- that is resolved by it.
CREATE TABLE IF NOT EXISTS pam_granted (conn TEXT NOT NULL, time REAL NOT NULL);
CREATE INDEX IF NOT EXISTS pam_granted_conn ON pam_granted (conn);
-- Session recordings: one row each, and their chunks (wire frames as the wrapper sent them).
CREATE TABLE IF NOT EXISTS recordings (
    sid TEXT PRIMARY KEY, login TEXT NOT NULL, mode TEXT NOT NULL, command TEXT NOT NULL,
    term TEXT NOT NULL, cols INTEGER NOT NULL, rows INTEGER NOT NULL, started REAL NOT NULL,
    ended REAL, end_reason TEXT, exit_status INTEGER, wrapper_pid INTEGER NOT NULL,
    wrapper_start INTEGER NOT NULL, bytes_out INTEGER NOT NULL DEFAULT 0,
    stored_bytes INTEGER NOT NULL DEFAULT 0, chunks INTEGER NOT NULL DEFAULT 0,
    dropped_bytes INTEGER NOT NULL DEFAULT 0,
    -- bumped by every change; the uploader sends the row again until synced catches up
    version INTEGER NOT NULL DEFAULT 1, synced INTEGER NOT NULL DEFAULT 0);
-- size NULL: the bytes are in `data`. A number: they are in the chunk's file (see above), and
-- data is empty. Files, because SQLite wrote each 256 KiB chunk as 64 WAL frames, 2 syscalls
-- each, then copied it again at checkpoint: 5 ms of the agent's CPU per MiB of output, the
-- largest part of its cost (bench/pty); a file takes it in one write.
CREATE TABLE IF NOT EXISTS recording_chunks (
    sid TEXT NOT NULL, seq INTEGER NOT NULL, data BLOB NOT NULL,
    sent INTEGER NOT NULL DEFAULT 0, size INTEGER, PRIMARY KEY (sid, seq));
CREATE INDEX IF NOT EXISTS recording_chunks_unsent ON recording_chunks (sent);
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
    """A claimed batch: the events' stored bodies, exactly as they were chained, in seq order.
    Ack, release or reject it by `id`."""
    __slots__ = ("id", "bodies", "first_seq", "last_seq")

    def __init__(self, id: str, bodies: list[str], first_seq: int, last_seq: int):
        self.id, self.bodies, self.first_seq, self.last_seq = id, bodies, first_seq, last_seq

    @property
    def events(self) -> list[dict]:
        import json
        return [json.loads(b) for b in self.bodies]


class Spool:
    def __init__(self, path: str | os.PathLike, *, server_id: str = "", server_hostname: str = "",
                 max_bytes: int = 1 << 30, on_full: str = "drop_new", busy_timeout: float = 2.0,
                 synchronous: str = "FULL", any_thread: bool = False):
        self.path = os.fspath(path)
        self.server_id = server_id
        self.server_hostname = server_hostname
        self.max_bytes = max_bytes
        self.on_full = on_full
        self.chunk_dir = self.path + ".chunks"
        self._fsync_chunks = synchronous != "NORMAL"
        self._doomed: list[str] = []  # chunk files whose rows are deleted, once that commits
        self._db = self._open(busy_timeout, synchronous, any_thread)

    @classmethod
    def from_config(cls, cfg, **kw) -> "Spool":
        return cls(cfg["spool.path"], server_id=cfg.server_id, server_hostname=cfg.server_hostname,
                   max_bytes=cfg["spool.max_bytes"], on_full=cfg["spool.on_full"],
                   busy_timeout=cfg["spool.busy_timeout"], **kw)

    def _open(self, busy_timeout: float, synchronous: str, any_thread: bool
              ) -> sqlite3.Connection:
        try:
            os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
            # Created root-only before SQLite opens it: SQLite gives the -wal and -shm files
            # the database file's mode. (Not through the umask: that is process-wide, and
            # would make files other threads create meanwhile root-only too.) Only when it is
            # new: closing any descriptor of an open database drops every POSIX lock this
            # process holds on it, and another process could then checkpoint under our feet.
            if not os.path.exists(self.path):
                try:
                    os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY
                                     | os.O_CLOEXEC, 0o600))
                except FileExistsError:
                    pass  # another writer made it first
            # any_thread: one thread at a time, handed on (the agent's session server reuses a
            # connection for the next wrapper: opening one cost every session's hello ~0.7 ms).
            db = sqlite3.connect(self.path, timeout=busy_timeout, isolation_level=None,
                                 check_same_thread=not any_thread)
            wal.turn_on(db, busy_timeout)
            db.execute(f"PRAGMA synchronous={'NORMAL' if synchronous == 'NORMAL' else 'FULL'}")
            if db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                _migrate(db)
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
        same transaction (e.g. to resolve a PAM attempt together with the event it became).
        Each stored event gets the next `seq` and the previous event's hash (sshtrail.chain);
        an event whose uid is already spooled is not stored again."""
        evs = [self._complete(ev) for ev in evs]
        incoming = sum(len(events.to_json(ev)) + _CHAIN_FIELDS_BYTES for ev in evs)
        try:
            with self._pruning_txn():
                room = self._make_room(incoming)
                if room:
                    evs += [self._complete(ev) for ev in self._drained_drop_events()]
                    self._insert_chained(evs)
                    if extra_sql:
                        extra_sql(self._db)
            if not room:
                with _txn(self._db, immediate=True):
                    self._count_drop(len(evs), "spool full (on_full = drop_new)")
        except sqlite3.Error as e:
            raise SpoolError(f"spool {self.path}: write failed: {e}") from None
        if not room:
            raise SpoolFull(f"spool {self.path} is full ({self.max_bytes} bytes of undelivered "
                            f"events); {len(evs)} event(s) dropped and counted")

    def _insert_chained(self, evs: list[dict]) -> None:
        seq, prev = self._chain_head()
        added = 0
        for ev in evs:
            body_seq, body_prev = seq + 1, prev
            ev["seq"], ev["prev_hash"] = body_seq, body_prev
            body = events.to_json(ev)
            # A retried write (its uid is spooled already) gets no second link in the chain.
            if self._db.execute(
                    "INSERT INTO events (seq, uid, time, event, login, sid, body) VALUES "
                    "(?, ?, ?, ?, ?, ?, ?) ON CONFLICT (uid) DO NOTHING",
                    (body_seq, ev["uid"], ev["time"], ev["event"], ev.get("login"), ev.get("sid"),
                     body)).rowcount:
                seq, prev = body_seq, link_hash(body)
                added += 1
        if added:
            self._db.execute("INSERT OR REPLACE INTO state (key, value) VALUES ('chain', ?)",
                             (f"{seq}:{prev}",))

    def _chain_head(self) -> tuple[int, str]:
        """(seq, hash) of the last event ever stored; kept in `state`, since that event may
        have been delivered and pruned since."""
        row = self._db.execute("SELECT value FROM state WHERE key = 'chain'").fetchone()
        if row:
            seq, _, h = row[0].partition(":")
            return int(seq), h
        return 0, GENESIS

    def _used_bytes(self) -> int:
        pages, free, size = (self._db.execute(f"PRAGMA {p}").fetchone()[0]
                             for p in ("page_count", "freelist_count", "page_size"))
        return (pages - free) * size + self._chunk_file_bytes()

    def _chunk_file_bytes(self) -> int:
        row = self._db.execute("SELECT value FROM state WHERE key = 'chunk_file_bytes'").fetchone()
        return int(row[0]) if row else 0

    def _add_chunk_file_bytes(self, n: int) -> None:
        self._db.execute("INSERT INTO state (key, value) VALUES ('chunk_file_bytes', ?) ON "
                         "CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + ?",
                         (str(n), n))

    def _prune_delivered(self, incoming: int) -> bool:
        """Make room by deleting delivered events and recording chunks, oldest first: they are
        only a local convenience. True if `incoming` bytes now fit under max_bytes."""
        while self._used_bytes() + incoming > self.max_bytes:
            if self._db.execute("DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE "
                                "sent = 1 ORDER BY seq LIMIT 500)").rowcount == 0:
                break
        while self._used_bytes() + incoming > self.max_bytes:
            gone = self._db.execute("DELETE FROM recording_chunks WHERE rowid IN (SELECT rowid "
                                    "FROM recording_chunks WHERE sent = 1 LIMIT 64) "
                                    "RETURNING sid, seq, size").fetchall()
            if not gone:
                break
            in_files = [(sid, seq, size) for sid, seq, size in gone if size is not None]
            if in_files:
                self._add_chunk_file_bytes(-sum(size for _, _, size in in_files))
                self._doomed += [self._chunk_path(sid, seq) for sid, seq, _ in in_files]
        return self._used_bytes() + incoming <= self.max_bytes

    @contextmanager
    def _pruning_txn(self):
        """A write transaction that may prune chunks: their files are deleted once the rows'
        deletion has committed, and kept if it rolls back. (Inside a caller's transaction, the
        next write after it does this.)"""
        try:
            with _txn(self._db, immediate=True):
                yield
        except BaseException:
            if not self._db.in_transaction:
                self._doomed.clear()
            raise
        if not self._db.in_transaction:
            doomed, self._doomed = self._doomed, []
            for path in doomed:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

    def _make_room(self, incoming: int) -> bool:
        if self._prune_delivered(incoming):
            return True
        if self.on_full == "drop_new":
            return False
        dropped = 0
        while self._used_bytes() + incoming > self.max_bytes:
            cur = self._db.execute("DELETE FROM events WHERE seq IN (SELECT seq FROM events "
                                   "WHERE sent = 0 AND seq NOT IN (SELECT seq FROM claims) "
                                   "AND event != 'spool.dropped' ORDER BY seq LIMIT 100)")
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

    def claim(self, limit: int = 500, lease: float = 60.0, max_bytes: int | None = None
              ) -> Batch | None:
        """Claim up to `limit` undelivered events (and about `max_bytes` of bodies), oldest
        first. A claim not acknowledged within `lease` seconds (the uploader died) is claimed
        again: at-least-once delivery."""
        batch_id = events.new_uid()
        now = time.time()
        with _txn(self._db, immediate=True):
            self._db.execute("DELETE FROM claims WHERE claimed_at < ?", (now - lease,))
            rows = self._db.execute(
                "SELECT seq, body FROM events WHERE sent = 0 AND seq NOT IN "
                "(SELECT seq FROM claims) ORDER BY seq LIMIT ?", (limit,)).fetchall()
            if max_bytes is not None:
                total = 0
                for i, (_, body) in enumerate(rows):
                    total += len(body)
                    if total > max_bytes and i:  # the first event always goes, so a huge one
                        del rows[i:]             # cannot stall the queue
                        break
            if not rows:
                return None
            # The same rows, as the first ones that query found are all there is between them.
            self._db.execute(
                "INSERT INTO claims SELECT seq, ?, ? FROM events WHERE seq BETWEEN ? AND ? "
                "AND sent = 0 AND seq NOT IN (SELECT seq FROM claims)",
                (batch_id, now, rows[0][0], rows[-1][0]))
        return Batch(batch_id, [b for _, b in rows], rows[0][0], rows[-1][0])

    def ack(self, batch_id: str) -> int:
        """Mark a claimed batch delivered; returns how many events it held."""
        with _txn(self._db, immediate=True):
            n = self._db.execute("UPDATE events SET sent = 1 WHERE seq IN (SELECT seq FROM claims "
                                 "WHERE claim = ?)", (batch_id,)).rowcount
            self._db.execute("DELETE FROM claims WHERE claim = ?", (batch_id,))
            return n

    def release(self, batch_id: str) -> None:
        with _txn(self._db, immediate=True):
            self._db.execute("DELETE FROM claims WHERE claim = ?", (batch_id,))

    def release_all(self) -> int:
        """Release every claim: for an uploader starting up, when it is the only one."""
        with _txn(self._db, immediate=True):
            return self._db.execute("DELETE FROM claims").rowcount

    def reject(self, batch: Batch, reason: str) -> None:
        """Set aside a batch the collector refused as malformed (sent = 2, kept in the spool
        for a person to look at), so it never blocks what follows; an upload.rejected event
        says which seqs and why, and goes up with the next batch."""
        with _txn(self._db, immediate=True):
            n = self._db.execute("UPDATE events SET sent = 2 WHERE seq IN (SELECT seq FROM claims "
                                 "WHERE claim = ?)", (batch.id,)).rowcount
            self._db.execute("DELETE FROM claims WHERE claim = ?", (batch.id,))
            self._insert_chained([self._complete(events.new(
                "upload.rejected", count=n, reason=reason[:500], first_seq=batch.first_seq,
                last_seq=batch.last_seq))])

    def backlog(self) -> dict:
        """What waits for the collector: events (and the oldest one's time), rejected events,
        recording chunks and their bytes."""
        n, oldest = self._db.execute(
            "SELECT count(*), min(time) FROM events WHERE sent = 0").fetchone()
        rejected = self._db.execute("SELECT count(*) FROM events WHERE sent = 2").fetchone()[0]
        chunks, chunk_bytes = self._db.execute(
            "SELECT count(*), coalesce(sum(coalesce(size, length(data))), 0) "
            "FROM recording_chunks WHERE sent = 0").fetchone()
        return {"events": n, "oldest": oldest, "rejected": rejected, "chunks": chunks,
                "chunk_bytes": chunk_bytes}

    # -- recordings, the uploader's side -----------------------------------------------------

    def unsent_chunks(self, limit: int = 16) -> list[tuple[str, int, bytes | None]]:
        """(sid, seq, data) of recording chunks not yet delivered, oldest recording first; data
        None if the chunk's file is gone (deleted by hand: nothing of it can be sent)."""
        rows = self._db.execute(
            "SELECT c.sid, c.seq, c.data, c.size FROM recording_chunks c JOIN recordings r "
            "USING (sid) WHERE c.sent = 0 ORDER BY r.started, c.seq LIMIT ?", (limit,)).fetchall()
        return [(sid, seq, self._chunk_data(sid, seq, data, size))
                for sid, seq, data, size in rows]

    def mark_chunk_sent(self, sid: str, seq: int) -> None:
        with _txn(self._db, immediate=True):
            self._db.execute("UPDATE recording_chunks SET sent = 1 WHERE sid = ? AND seq = ?",
                             (sid, seq))

    def unsynced_recordings(self, limit: int = 16) -> list[dict]:
        """Recordings whose row changed since the collector last had it."""
        cur = self._db.execute("SELECT * FROM recordings WHERE synced < version ORDER BY started "
                               "LIMIT ?", (limit,))
        names = [c[0] for c in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]

    def mark_recording_synced(self, sid: str, version: int) -> None:
        with _txn(self._db, immediate=True):
            self._db.execute("UPDATE recordings SET synced = max(synced, ?) WHERE sid = ?",
                             (version, sid))

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
        try:
            with _txn(self._db, immediate=True):
                self._db.execute(f"INSERT OR IGNORE INTO recordings ({cols}) VALUES "
                                 f"({', '.join('?' * len(row))})", tuple(row.values()))
        except sqlite3.Error as e:
            raise SpoolError(f"spool {self.path}: write failed: {e}") from None

    def put_chunk(self, sid: str, seq: int, frames_blob: bytes, out_bytes: int) -> bool:
        """Store one batch of frames; a retried batch (same seq) is stored once. True if new.
        Stored uncompressed: zlib, even at level 1, cost the agent ~22 ms of CPU per MB of
        output here, more than the whole plain session; the collector compresses."""
        try:
            return self._put_chunk(sid, seq, frames_blob, out_bytes)
        except OSError as e:  # the chunk's file (disk full, ...): nothing of it was stored
            raise SpoolError(f"spool {self.path}: cannot write recording chunk {seq} of {sid} "
                             f"in {self.chunk_dir}: {e.strerror or e}") from None
        except sqlite3.Error as e:  # locked past busy_timeout, or the disk: nor of it
            raise SpoolError(f"spool {self.path}: cannot store recording chunk {seq} of {sid}: "
                             f"{e}") from None

    def _put_chunk(self, sid: str, seq: int, data: bytes, out_bytes: int) -> bool:
        in_file = len(data) >= CHUNK_FILE_MIN and 0 < len(sid) <= 64 and \
            _FILE_SAFE.issuperset(sid)
        with self._pruning_txn():
            # Recordings stop a tenth short of the cap: that room is for events, among them
            # the one saying how much output was dropped.
            if not self._prune_delivered(len(data) + self.max_bytes // 10):
                # Full: a session's output must not push out events not yet delivered (a user
                # could flood the terminal to that end). Dropped, counted, reported at its end.
                self._db.execute("UPDATE recordings SET bytes_out = bytes_out + ?, dropped_bytes "
                                 "= dropped_bytes + ?, version = version + 1 WHERE sid = ?",
                                 (out_bytes, out_bytes, sid))
                return False
            if self._db.execute("SELECT 1 FROM recording_chunks WHERE sid = ? AND seq = ?",
                                (sid, seq)).fetchone():
                return False
            if in_file:
                # The file first: a row never points at a file that is not there. A file
                # whose row never commits is written again by the retry, or swept.
                self._write_chunk_file(sid, seq, data)
                self._add_chunk_file_bytes(len(data))
            self._db.execute("INSERT INTO recording_chunks (sid, seq, data, size) "
                             "VALUES (?, ?, ?, ?)", (sid, seq, b"" if in_file else data,
                                                     len(data) if in_file else None))
            self._db.execute("UPDATE recordings SET bytes_out = bytes_out + ?, stored_bytes = "
                             "stored_bytes + ?, chunks = chunks + 1, version = version + 1 "
                             "WHERE sid = ?", (out_bytes, len(data), sid))
        return True

    def end_recording(self, sid: str, *evs: dict, **fields) -> None:
        sets = ", ".join([f"{k} = ?" for k in fields] + ["version = version + 1"])
        self.append(*evs, extra_sql=lambda db: db.execute(
            f"UPDATE recordings SET {sets} WHERE sid = ?", (*fields.values(), sid)))

    def recording(self, sid: str) -> dict | None:
        cur = self._db.execute("SELECT * FROM recordings WHERE sid = ?", (sid,))
        row = cur.fetchone()
        return dict(zip([c[0] for c in cur.description], row)) if row else None

    def recordings(self) -> list[dict]:
        """Every recording's row, and how many of its chunks the spool still holds (`held`:
        delivered ones are pruned when room is needed)."""
        cur = self._db.execute("SELECT *, (SELECT count(*) FROM recording_chunks c WHERE c.sid "
                               "= r.sid) AS held FROM recordings r ORDER BY started")
        names = [c[0] for c in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]

    def chunks_held(self, sid: str) -> int:
        return self._db.execute("SELECT count(*) FROM recording_chunks WHERE sid = ?",
                                (sid,)).fetchone()[0]

    def last_frame_time(self, sid: str) -> float | None:
        """Seconds from the start of the recording to its last frame (None: no frames)."""
        from .wire import unpack_frames
        row = self._db.execute("SELECT seq, data, size FROM recording_chunks WHERE sid = ? "
                               "ORDER BY seq DESC LIMIT 1", (sid,)).fetchone()
        data = row and self._chunk_data(sid, *row)
        frames = unpack_frames(data) if data else []
        return frames[-1][0] if frames else None

    def frames(self, sid: str):
        """The recording's frames in order: (t, kind, data)."""
        from .wire import ProtocolError, unpack_frames
        for seq, data, size in self._db.execute(
                "SELECT seq, data, size FROM recording_chunks WHERE sid = ? ORDER BY seq",
                (sid,)).fetchall():
            data = self._chunk_data(sid, seq, data, size)
            if data is None:
                raise SpoolError(f"recording {sid}: chunk {seq}'s file "
                                 f"{self._chunk_path(sid, seq)} is gone; the recording cannot "
                                 "be read whole from this spool (the collector may have it)")
            try:
                frames = unpack_frames(data)
            except ProtocolError as e:
                # Checked when it was stored: cut or changed on disk since.
                where = self._chunk_path(sid, seq) if size is not None else "in the database"
                raise SpoolError(f"recording {sid}: chunk {seq} ({where}) is damaged: {e}; the "
                                 "recording cannot be read whole from this spool (the "
                                 "collector may have it)") from None
            yield from frames

    # -- chunk files -------------------------------------------------------------------------

    def _chunk_path(self, sid: str, seq: int) -> str:
        return os.path.join(self.chunk_dir, f"{sid}.{int(seq)}")

    def _write_chunk_file(self, sid: str, seq: int, data: bytes) -> None:
        os.makedirs(self.chunk_dir, mode=0o700, exist_ok=True)
        fd = os.open(self._chunk_path(sid, seq),
                     os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if self._fsync_chunks:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _chunk_data(self, sid: str, seq: int, data: bytes, size: int | None) -> bytes | None:
        if size is None:
            return data
        try:
            with open(self._chunk_path(sid, seq), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def sweep_chunk_files(self) -> int:
        """Delete chunk files no row points at (written by an agent killed before its row
        committed); returns how many. Run by the agent at start, before it takes chunks."""
        try:
            names = os.listdir(self.chunk_dir)
        except FileNotFoundError:
            return 0
        kept = {f"{sid}.{seq}" for sid, seq in self._db.execute(
            "SELECT sid, seq FROM recording_chunks WHERE size IS NOT NULL")}
        swept = 0
        for name in names:
            if name not in kept:
                try:
                    os.unlink(os.path.join(self.chunk_dir, name))
                    swept += 1
                except FileNotFoundError:
                    pass
        return swept

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


def _statements(script: str) -> list[str]:
    # executescript would commit our transaction; comments may hold semicolons.
    lines = [line.split("--", 1)[0] for line in script.splitlines()]
    return [stmt for stmt in "\n".join(lines).split(";") if stmt.strip()]


def _migrate(db: sqlite3.Connection) -> None:
    """Create the schema, or bring a version 4 spool (before the hash chain) up to date. Two
    first writers may both get here: the version is checked again under the write lock."""
    db.execute("BEGIN IMMEDIATE")
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version == 4:
            for sql in ("ALTER TABLE recordings ADD COLUMN version INTEGER NOT NULL DEFAULT 1",
                        "ALTER TABLE recordings ADD COLUMN synced INTEGER NOT NULL DEFAULT 0",
                        "ALTER TABLE recording_chunks ADD COLUMN sent INTEGER NOT NULL DEFAULT 0"):
                db.execute(sql)
            # Events spooled before the chain existed join it now, in the order they came.
            import json
            prev, seq = GENESIS, 0
            for seq, body in db.execute("SELECT seq, body FROM events ORDER BY seq").fetchall():
                ev = json.loads(body)
                ev["seq"], ev["prev_hash"] = seq, prev
                body = events.to_json(ev)
                prev = link_hash(body)
                db.execute("UPDATE events SET body = ? WHERE seq = ?", (body, seq))
            if seq:
                db.execute("INSERT OR REPLACE INTO state (key, value) VALUES ('chain', ?)",
                           (f"{seq}:{prev}",))
        elif version not in (0, 5, 6, 7, SCHEMA_VERSION):  # 5 -> 6: an index, made below
            raise SpoolError(f"spool schema version {version} is not one this sshtrail knows "
                             f"({SCHEMA_VERSION}); was it written by a newer sshtrail?")
        if 0 < version < 8:
            # 7 -> 8: chunks may keep their bytes in files; the ones spooled before keep theirs
            # in their rows (size NULL).
            columns = [c[1] for c in db.execute("PRAGMA table_info(recording_chunks)")]
            if "size" not in columns:
                db.execute("ALTER TABLE recording_chunks ADD COLUMN size INTEGER")
        if 0 < version < 7:
            # 6 -> 7: claims move to their own table (made below). A claim in flight across
            # the upgrade is simply gone: its events are sent again, and the collector keeps
            # each once.
            db.execute("DROP INDEX IF EXISTS events_claim")
            db.execute("UPDATE events SET claim = NULL, claimed_at = NULL WHERE claim IS NOT NULL")
        for stmt in _statements(SCHEMA):
            db.execute(stmt)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


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
