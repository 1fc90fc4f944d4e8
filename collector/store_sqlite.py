"""The embedded store: one SQLite file, the collector's default (collector.store says what every
store guarantees).

An acknowledged ingest is what lets a host delete its copy, so every write transaction is
durable before it returns: WAL with synchronous=FULL. A call borrows a connection of its own
from a small pool, so threads never share one at a time; writers take the write lock up front
(BEGIN IMMEDIATE), so a batch never half-commits and two writers, of this process or another,
wait for each other instead of failing. They queue on a lock file first: a blocking flock wakes
the next writer the moment the lock is free, where SQLite's busy timeout polls with sleeps of up
to 100 ms, and the collector's workers spent the write lock's idle time asleep in it.

Also here, because both backends must agree on them: the event ordering key, the paging
cursor, and the search filters (store_postgres imports them).
"""
from __future__ import annotations

import base64
import binascii
import fcntl
import functools
import json
import os
import re
import sqlite3
import threading
from contextlib import contextmanager

from sshtrail import wal
from sshtrail.chain import GENESIS
from sshtrail.events import EventError, parse_time

from . import search
from .pool import ConnectionPool
from .store import (BadQuery, BatchProof, EventPage, EventQuery, Hit, Host, IngestResult,
                    Line, OutputIndexer, SearchPage, SearchQuery, Store, StoreConflict,
                    StoreError, StoredEvent)

SCHEMA_VERSION = 3
BUSY_TIMEOUT_S = 30.0
PAGE_SIZE = 16384

# -- shared with store_postgres ---------------------------------------------------------------
# Events are ordered and paged by (ts, uid, server_id). `ts` is the event's time as integer
# microseconds: hosts may send RFC 3339 with fewer fraction digits, or none, and such text does
# not sort as time does ("...:05Z" > "...:05.1Z"); an integer is exact and smaller to index.
# server_id ends the key because a uid is unique only per host.


# Ingest's hot path: the shape every host sends (sshtrail.events.format_time) is read here at a
# third of parse_time's cost, the date part once per day; anything else goes to parse_time.
_CANONICAL = re.compile(r"([0-9]{4}-[0-9]{2}-[0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})"
                        r"\.([0-9]{6})Z\Z")
_day_us: dict[str, int] = {}


def event_row(e: StoredEvent) -> tuple:
    """An event's values in _EVENT_COLS order."""
    return (e.server_id, e.uid, e.seq, e.prev_hash, e.hash, e.time, time_us(e.time), e.event,
            e.login, e.sid, e.server_hostname, e.text, fold(e.text), e.raw)


def sessions_sql(ph: str, since, login, server_id, limit) -> tuple[str, list]:
    """The sessions() query and its parameters, with `ph` the backend's placeholder."""
    conds, params = [], []
    if since is not None:
        conds.append(f"r.updated >= {ph}")
        params.append(since)
    if login is not None:
        conds.append(f"r.login = {ph}")
        params.append(login)
    if server_id is not None:
        conds.append(f"(r.server_id = {ph} OR r.server_hostname = {ph})")
        params += [server_id, server_id]
    where = "WHERE " + " AND ".join(conds) if conds else ""
    return ("SELECT r.server_id, r.sid, r.meta, r.updated, (SELECT COALESCE(SUM(size), 0) "
            "FROM chunks c WHERE c.server_id = r.server_id AND c.sid = r.sid) "
            f"FROM recordings r {where} ORDER BY r.updated DESC, r.server_id, r.sid LIMIT {ph}",
            params + [limit])


def time_us(text: str) -> int:
    m = _CANONICAL.match(text)
    if m:
        day, hh, mm, ss, us = m.groups()
        base = _day_us.get(day)
        if base is None:
            base = _time_us_slow(day + "T00:00:00Z")
            if len(_day_us) < 100_000:
                _day_us[day] = base
        h, mi, sec = int(hh), int(mm), int(ss)
        if h < 24 and mi < 60 and sec < 60:
            return base + ((h * 60 + mi) * 60 + sec) * 1_000_000 + int(us)
    return _time_us_slow(text)


def _time_us_slow(text: str) -> int:
    try:
        return round(parse_time(text) * 1_000_000)
    except EventError as e:
        raise StoreError(f"cannot store the event: {e}") from None


def epoch_us(t: float) -> int:
    return round(t * 1_000_000)


def fold(text: str) -> str | None:
    """What text search matches against, stored only where it differs from the text: both
    backends then search case-insensitively beyond ASCII, alike (SQLite's LIKE folds only
    ASCII; PostgreSQL's ILIKE depends on the database's locale)."""
    folded = text.casefold()
    return None if folded == text else folded


def like_pattern(needle: str) -> str:
    # The searched-for text is literal: a user looking for "100%" or "a_b" means just that.
    esc = needle.casefold().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{esc}%"


def encode_cursor(ts: int, uid: str, server_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([ts, uid, server_id]).encode()).decode()


def decode_cursor(cursor: str) -> tuple[int, str, str]:
    try:
        ts, uid, server_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        if type(ts) is int and isinstance(uid, str) and isinstance(server_id, str):
            return ts, uid, server_id
    except (ValueError, TypeError, binascii.Error):
        pass
    raise StoreError(f"paging cursor {cursor[:80]!r} is not one this collector gave out: pass "
                     "the `next` of the previous page unchanged")


def event_filter(q: EventQuery, ph: str) -> tuple[str, list]:
    """The WHERE clause (with leading WHERE, or "") and its parameters, for placeholder ph."""
    if q.limit < 1:
        raise StoreError(f"query limit must be at least 1, got {q.limit}")
    conds: list[str] = []
    params: list = []
    if q.since is not None:
        conds.append(f"ts >= {ph}")
        params.append(epoch_us(q.since))
    if q.until is not None:
        conds.append(f"ts < {ph}")
        params.append(epoch_us(q.until))
    if q.types:
        conds.append(f"event IN ({', '.join([ph] * len(q.types))})")
        params.extend(q.types)
    if q.login is not None:
        conds.append(f"login = {ph}")
        params.append(q.login)
    if q.server_id is not None:
        # The IN list lets the (server_id, ts) index serve hostnames too; the OR keeps the
        # match exact for a host that was renamed or a hostname that two hosts shared.
        conds.append(f"server_id IN (SELECT CAST({ph} AS TEXT) UNION SELECT server_id FROM "
                     f"hostnames WHERE hostname = {ph}) "
                     f"AND (server_id = {ph} OR server_hostname = {ph})")
        params += [q.server_id] * 4
    if q.sid is not None:
        conds.append(f"sid = {ph}")
        params.append(q.sid)
    if q.text:
        conds.append(f"COALESCE(ftext, text) LIKE {ph} ESCAPE '\\'")
        params.append(like_pattern(q.text))
    if q.after is not None:
        ts, uid, server_id = decode_cursor(q.after)
        # The plain `ts >=` lets an index on ts start at the cursor; the rest breaks ties.
        conds.append(f"ts >= {ph} AND (ts > {ph} OR uid > {ph} OR "
                     f"(uid = {ph} AND server_id > {ph}))")
        params += [ts, ts, uid, uid, server_id]
    return ("WHERE " + " AND ".join(conds) if conds else ""), params


def make_page(rows: list, limit: int) -> EventPage:
    """rows: (raw, ts, uid, server_id), at most limit+1 of them (the +1 says a next page exists)."""
    more = len(rows) > limit
    rows = rows[:limit]
    nxt = encode_cursor(rows[-1][1], rows[-1][2], rows[-1][3]) if more else None
    return EventPage(events=[json.loads(r[0]) for r in rows], next=nxt)


def search_filter(q: SearchQuery, ph: str) -> tuple[str, list]:
    """WHERE over the rows of a search (columns kind, server_id, ord, login, hostname, ts,
    sort), and its parameters."""
    if q.limit < 1:
        raise BadQuery(f"search limit must be at least 1, got {q.limit}")
    conds: list[str] = []
    params: list = []
    if q.login is not None:
        conds.append(f"login = {ph}")
        params.append(q.login)
    if q.server_id is not None:
        # A host's recordings do not name its hostname: its events do (the hostnames table).
        conds.append(f"(server_id = {ph} OR hostname = {ph} OR server_id IN "
                     f"(SELECT server_id FROM hostnames WHERE hostname = {ph}))")
        params += [q.server_id] * 3
    if q.since is not None:
        conds.append(f"ts >= {ph}")
        params.append(epoch_us(q.since))
    if q.until is not None:
        conds.append(f"ts < {ph}")
        params.append(epoch_us(q.until))
    if q.before is not None:
        conds.append(f"(sort, kind, server_id, ord) < ({ph}, {ph}, {ph}, {ph})")
        params += list(search.decode_cursor(q.before))
    return ("WHERE " + " AND ".join(conds) if conds else ""), params


def make_search_page(rows: list, limit: int, folded: str) -> SearchPage:
    """rows: (kind, server_id, ord, sid, login, hostname, ts, t, marks, text, uid, sort), at
    most limit+1 (the +1 says an older page exists)."""
    more = len(rows) > limit
    rows = rows[:limit]
    hits = []
    for kind, server_id, _, sid, login, hostname, ts, t, marks, text, uid, _ in rows:
        if kind == "output":
            offset, line = search.output_hit(text, t, marks, folded)
            time_ = None if ts is None else (ts / 1e6 - t + offset)
        else:
            offset, line, time_ = t, search.command_hit(text, folded), ts / 1e6
        hits.append(Hit(kind=kind, server_id=server_id, sid=sid, login=login, hostname=hostname,
                        time=time_, offset=None if offset is None else search.ceil_us(offset),
                        line=line, uid=uid))
    last = rows[-1] if rows else None
    nxt = search.encode_cursor((last[11], last[0], last[1], last[2])) if more else None
    return SearchPage(hits=hits, next=nxt)


def check_batch(events: list[StoredEvent], proof: BatchProof) -> None:
    for e in events:
        if e.server_id != proof.server_id:
            raise StoreError(f"batch of server {proof.server_id!r} holds an event of server "
                             f"{e.server_id!r} (uid {e.uid}); a host writes only its own events")


def conflict_message(server_id: str, e: StoredEvent, same_uid: tuple | None,
                     at_seq_uid: str | None) -> str:
    if same_uid is not None:
        what = (f"event {e.uid} is already stored as seq {same_uid[0]} with another body, the "
                f"batch sends it as seq {e.seq}")
    else:
        what = f"seq {e.seq} already holds event {at_seq_uid}, the batch sends event {e.uid}"
    return f"server {server_id}: {what}; nothing of the batch was stored"


# -- the SQLite store -------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE events (
    server_id TEXT NOT NULL,
    uid TEXT NOT NULL,
    seq INTEGER NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    time TEXT NOT NULL,
    ts INTEGER NOT NULL,
    event TEXT NOT NULL,
    login TEXT,
    sid TEXT,
    server_hostname TEXT NOT NULL,
    text TEXT NOT NULL,
    ftext TEXT,
    raw TEXT NOT NULL,
    PRIMARY KEY (server_id, uid),
    UNIQUE (server_id, seq)
);
CREATE INDEX events_ts ON events (ts);
CREATE INDEX events_login ON events (login, ts);
CREATE INDEX events_event ON events (event, ts);
CREATE INDEX events_sid ON events (sid, ts);
CREATE INDEX events_server ON events (server_id, ts);
CREATE TABLE hostnames (
    hostname TEXT NOT NULL,
    server_id TEXT NOT NULL,
    PRIMARY KEY (hostname, server_id)
);
CREATE TABLE proofs (
    server_id TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    count INTEGER NOT NULL,
    signature TEXT NOT NULL,
    cert_serial TEXT NOT NULL,
    received REAL NOT NULL,
    UNIQUE (server_id, first_seq, last_seq, signature)
);
CREATE TABLE heads (
    server_id TEXT PRIMARY KEY,
    last_seq INTEGER NOT NULL,
    last_hash TEXT NOT NULL
);
CREATE TABLE findings (
    server_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX findings_server ON findings (server_id, at);
CREATE TABLE recordings (
    server_id TEXT NOT NULL,
    sid TEXT NOT NULL,
    meta TEXT NOT NULL,
    updated REAL NOT NULL,
    login TEXT,
    server_hostname TEXT,
    PRIMARY KEY (server_id, sid)
);
CREATE INDEX recordings_updated ON recordings (updated);
CREATE INDEX recordings_sid ON recordings (sid);
CREATE TABLE chunks (
    server_id TEXT NOT NULL,
    sid TEXT NOT NULL,
    seq INTEGER NOT NULL,
    size INTEGER NOT NULL,
    stored_size INTEGER NOT NULL,
    PRIMARY KEY (server_id, sid, seq)
);
CREATE TABLE hosts (
    server_id TEXT PRIMARY KEY,
    cert_serial TEXT NOT NULL,
    cert_pem TEXT NOT NULL,
    not_after REAL NOT NULL,
    enrolled REAL NOT NULL,
    revoked INTEGER NOT NULL
);
CREATE TABLE enroll_tokens (
    token_hash TEXT PRIMARY KEY,
    expires REAL NOT NULL,
    server_id TEXT,
    used REAL
);
CREATE TABLE readers (
    token_hash TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created REAL NOT NULL
);
"""

# Version 2: search (collector.search). FTS5 with the trigram tokenizer finds any substring of
# 3 characters or more; it indexes the case-folded text (`ftext` where folding changes it, as
# for events) with case_sensitive 1, so that matching is Python's casefold, as on PostgreSQL.
# Output lines are an external-content index over a view (the text is kept once, in
# output_lines, whose INTEGER PRIMARY KEY is a rowid VACUUM cannot renumber), detail=none and
# queried with GLOB: FTS5 narrows the rows by their trigrams and checks each against the text,
# for an index about a third the size of detail=full's (bench/search) at some ms per query.
# Commands are a contentless index over their events (no text to check against, so detail=full
# and a phrase query), mapped through command_lines (events' own rowid is not stable), filled
# by ingest, once per batch, from the rows that batch added (a per-row trigger cost ~58 µs an
# event, five times the rest of the insert: bench/collector).
_SEARCH_SCHEMA = """
CREATE TABLE output_lines (
    id INTEGER PRIMARY KEY,
    server_id TEXT NOT NULL,
    sid TEXT NOT NULL,
    t REAL NOT NULL,
    marks TEXT NOT NULL,
    text TEXT NOT NULL,
    ftext TEXT
);
CREATE VIEW output_folded AS SELECT id, COALESCE(ftext, text) AS body FROM output_lines;
CREATE VIRTUAL TABLE output_fts USING fts5(body, content='output_folded', content_rowid='id',
    tokenize='trigram case_sensitive 1', detail=none);
CREATE TABLE output_state (
    server_id TEXT NOT NULL,
    sid TEXT NOT NULL,
    state TEXT NOT NULL,
    partial INTEGER,
    PRIMARY KEY (server_id, sid)
);
CREATE TABLE command_lines (
    id INTEGER PRIMARY KEY,
    server_id TEXT NOT NULL,
    uid TEXT NOT NULL
);
CREATE VIRTUAL TABLE command_fts USING fts5(body, content='',
    tokenize='trigram case_sensitive 1');
"""
# A store of version 1 gets the commands it already holds indexed when it is opened; the output
# of its recordings stays unindexed (their bytes are in the blob store, not here).
_SEARCH_BACKFILL = """
INSERT INTO command_lines (server_id, uid) SELECT server_id, uid FROM events
    WHERE event IN ('session.command', 'exec') AND text <> '' ORDER BY ts;
INSERT INTO command_fts (rowid, body) SELECT c.id, COALESCE(e.ftext, e.text)
    FROM command_lines c JOIN events e ON e.server_id = c.server_id AND e.uid = c.uid;
"""

# Version 3. The command index merges its segments 16 at a time instead of 4: every batch
# adds a segment, and with 4 the merges rewrote the growing index so often that indexing cost
# twice as much per event at 200,000 events as at 20,000 (bench/collector); a search reads a
# few more segments.
_TUNING = """
INSERT INTO command_fts (command_fts, rank) VALUES ('automerge', 16);
"""

_EVENT_COLS = ("server_id, uid, seq, prev_hash, hash, time, ts, event, login, sid, "
               "server_hostname, text, ftext, raw")
_STORED_COLS = ("server_id, uid, seq, prev_hash, hash, time, event, login, sid, "
                "server_hostname, text, raw")
_HOST_SELECT = ("SELECT h.server_id, h.cert_serial, h.cert_pem, h.not_after, h.enrolled, "
                "h.revoked, COALESCE(d.last_seq, 0), COALESCE(d.last_hash, ?) "
                "FROM hosts h LEFT JOIN heads d ON d.server_id = h.server_id")


def meta_fields(meta: dict) -> tuple[str | None, str | None]:
    """The recording metadata that sessions() filters on: login and server_hostname."""
    login, hostname = meta.get("login"), meta.get("server_hostname")
    return (login if isinstance(login, str) else None,
            hostname if isinstance(hostname, str) else None)


def _sqlite_errors(method):
    """sqlite3 errors leave as StoreError naming the file: the operator sees what to fix."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as e:
            hint = ""
            if "locked" in str(e) or "busy" in str(e):
                hint = (f" (another process held it for over {BUSY_TIMEOUT_S:.0f} s: look for "
                        "a stuck process using the file)")
            elif "full" in str(e):
                hint = " (free some disk space)"
            raise StoreError(f"SQLite store {self.path}: {method.__name__} failed: "
                             f"{e}{hint}") from None
    return wrapper


class SqliteStore(Store):
    def __init__(self, path):
        self.path = str(path)
        self._pool = ConnectionPool(self._connect, lambda c: not c.in_transaction,
                                    f"SQLite store {self.path}")
        self._use = self._pool.use
        # One per process: flock excludes open file descriptions, so a store object must not
        # cross a fork (nor may its SQLite connections).
        self._writers = threading.Lock()
        try:
            self._lock_fd = os.open(self.path + "-writer", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                                    0o600)
        except OSError as e:
            raise StoreError(f"cannot open the SQLite store's lock file {self.path}-writer: "
                             f"{e.strerror}; check that its directory is writable by the "
                             "collector's user") from None
        try:
            self._open_schema()
        except BaseException:
            self.close()
            raise

    # -- connections and transactions ---------------------------------------------------------

    def _all(self, sql: str, params=()) -> list:
        with self._use() as c:
            return c.execute(sql, params).fetchall()

    def _one(self, sql: str, params=()):
        rows = self._all(sql, params)
        return rows[0] if rows else None

    def _connect(self) -> sqlite3.Connection:
        try:
            # isolation_level=None: transactions are begun here, explicitly, never implicitly
            # by the sqlite3 module. check_same_thread=False: a connection serves whichever
            # thread borrows it, one at a time.
            c = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                check_same_thread=False)
        except sqlite3.Error as e:
            raise StoreError(f"cannot open the SQLite store {self.path}: {e}; check that its "
                             "directory exists and is writable by the collector's user") from None
        try:
            # Takes effect only on a new file, and only before it is in WAL mode. 16 KiB pages
            # ingest about a third faster than 4 KiB with our six event indexes.
            c.execute(f"PRAGMA page_size={PAGE_SIZE}")
            mode = wal.turn_on(c, BUSY_TIMEOUT_S)
            if mode.lower() != "wal":
                raise StoreError(f"SQLite store {self.path}: cannot use WAL mode (got {mode}); "
                                 "put the file on a local filesystem")
            # In WAL mode NORMAL would lose the last commits on a power cut; hosts have
            # already deleted what we acknowledged, so every commit waits for the disk.
            c.execute("PRAGMA synchronous=FULL")
            c.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
            c.execute("PRAGMA cache_size=-32768")  # 32 MiB: the event indexes of a busy day
            # Statement journals (one per row the search trigger touches) in memory, not in
            # temp files: a write syscall storm otherwise (bench/collector: 37 -> 3 µs of
            # system time per event).
            c.execute("PRAGMA temp_store=MEMORY")
        except sqlite3.Error as e:
            c.close()
            raise StoreError(f"cannot open the SQLite store {self.path}: {e}; is it an "
                             "sshtrail store?") from None
        except BaseException:
            c.close()
            raise
        return c

    def _open_schema(self) -> None:
        try:
            with self._tx() as c:
                version = c.execute("PRAGMA user_version").fetchone()[0]
                if version == 0:
                    if c.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                        raise StoreError(f"{self.path} is an SQLite file but not an sshtrail "
                                         "store: give the collector a new file name")
                    for stmt in _statements(_SCHEMA + _SEARCH_SCHEMA + _TUNING):
                        c.execute(stmt)
                    c.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                elif version in (1, 2):
                    upgrade = (_SEARCH_SCHEMA + _SEARCH_BACKFILL if version == 1 else "") + _TUNING
                    for stmt in _statements(upgrade):
                        c.execute(stmt)
                    c.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                elif version > SCHEMA_VERSION:
                    raise StoreError(f"SQLite store {self.path} has schema version {version}, "
                                     f"newer than this collector's {SCHEMA_VERSION}: upgrade "
                                     "sshtrail")
        except sqlite3.Error as e:
            raise StoreError(f"cannot open the SQLite store {self.path}: {e}; is it an "
                             "sshtrail store?") from None

    @contextmanager
    def _tx(self):
        """A write transaction: the write lock is taken at BEGIN, so nothing in it can fail
        half-way for lack of the lock."""
        with self._use() as c, self._writers:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                c.execute("BEGIN IMMEDIATE")
                try:
                    yield c
                    c.execute("COMMIT")
                except BaseException:
                    if c.in_transaction:  # SQLite has already rolled back after some errors
                        c.execute("ROLLBACK")
                    raise
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    @contextmanager
    def _snapshot(self):
        """A read transaction, for reads of several statements that must agree."""
        with self._use() as c:
            c.execute("BEGIN")
            try:
                yield c
            finally:
                if c.in_transaction:
                    c.execute("COMMIT")

    def close(self) -> None:
        self._pool.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # -- events -------------------------------------------------------------------------------
    @_sqlite_errors
    def ingest(self, events: list[StoredEvent], proof: BatchProof) -> IngestResult:
        if not events:
            return IngestResult(stored=0, duplicates=0)
        check_batch(events, proof)
        rows = [event_row(e) for e in events]
        top = max(events, key=lambda e: e.seq)
        with self._tx() as c:
            # DO NOTHING on either unique key; whatever was skipped is checked below to be
            # the very same event (a retry) and not a different one (a conflict).
            # Rows new in this transaction get rowids above the largest one now.
            (last_rowid,) = c.execute("SELECT coalesce(max(rowid), 0) FROM events").fetchone()
            stored = c.executemany(
                f"INSERT INTO events ({_EVENT_COLS}) VALUES ({', '.join('?' * 14)}) "
                "ON CONFLICT DO NOTHING", rows).rowcount
            if stored:
                (last_line,) = c.execute(
                    "SELECT coalesce(max(id), 0) FROM command_lines").fetchone()
                # NOT INDEXED: left to itself the planner takes events_event for the IN and
                # reads every command ever stored, in every batch.
                c.execute("INSERT INTO command_lines (server_id, uid) SELECT server_id, uid "
                          "FROM events NOT INDEXED WHERE rowid > ? "
                          "AND event IN ('session.command', 'exec') "
                          "AND text <> '' ORDER BY rowid", (last_rowid,))
                c.execute("INSERT INTO command_fts (rowid, body) SELECT l.id, "
                          "COALESCE(e.ftext, e.text) FROM command_lines l JOIN events e ON "
                          "e.server_id = l.server_id AND e.uid = l.uid WHERE l.id > ?",
                          (last_line,))
            if stored < len(rows):
                self._check_duplicates(c, proof.server_id, events)
            c.executemany("INSERT INTO hostnames VALUES (?, ?) ON CONFLICT DO NOTHING",
                          {(e.server_hostname, e.server_id) for e in events})
            c.execute("INSERT INTO proofs VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                      (proof.server_id, proof.first_seq, proof.last_seq, proof.count,
                       proof.signature, proof.cert_serial, proof.received))
            c.execute("INSERT INTO heads VALUES (?, ?, ?) ON CONFLICT (server_id) DO UPDATE "
                      "SET last_seq = excluded.last_seq, last_hash = excluded.last_hash "
                      "WHERE excluded.last_seq > heads.last_seq",
                      (top.server_id, top.seq, top.hash))
        return IngestResult(stored=stored, duplicates=len(rows) - stored)

    def _check_duplicates(self, c, server_id: str, events: list[StoredEvent]) -> None:
        have = {uid: (seq, h) for uid, seq, h in c.execute(
            "SELECT uid, seq, hash FROM events WHERE server_id = ? "
            "AND uid IN (SELECT value FROM json_each(?))",
            (server_id, json.dumps([e.uid for e in events])))}
        for e in events:
            same = have.get(e.uid)
            if same != (e.seq, e.hash):
                at = c.execute("SELECT uid FROM events WHERE server_id = ? AND seq = ?",
                               (server_id, e.seq)).fetchone()
                raise StoreConflict(conflict_message(server_id, e, same, at and at[0]))

    @_sqlite_errors
    def event_hash(self, server_id: str, seq: int) -> str | None:
        row = self._one("SELECT hash FROM events WHERE server_id = ? AND seq = ?",
                        (server_id, seq))
        return row[0] if row else None

    @_sqlite_errors
    def query(self, q: EventQuery) -> EventPage:
        where, params = event_filter(q, "?")
        rows = self._all(f"SELECT raw, ts, uid, server_id FROM events {where} "
                         "ORDER BY ts, uid, server_id LIMIT ?", params + [q.limit + 1])
        return make_page(rows, q.limit)

    @_sqlite_errors
    def chain(self, server_id: str, after_seq: int = 0, limit: int = 10000) -> list[StoredEvent]:
        rows = self._all(f"SELECT {_STORED_COLS} FROM events WHERE server_id = ? AND seq > ? "
                         "ORDER BY seq LIMIT ?", (server_id, after_seq, limit))
        return [StoredEvent(*r) for r in rows]

    @_sqlite_errors
    def proofs(self, server_id: str) -> list[BatchProof]:
        rows = self._all("SELECT * FROM proofs WHERE server_id = ? ORDER BY first_seq, rowid",
                         (server_id,))
        return [BatchProof(*r) for r in rows]

    @_sqlite_errors
    def add_finding(self, server_id: str, kind: str, detail: str, when: float) -> None:
        with self._tx() as c:
            c.execute("INSERT INTO findings VALUES (?, ?, ?, ?)", (server_id, kind, detail, when))

    @_sqlite_errors
    def findings(self, server_id: str) -> list[tuple[str, str, float]]:
        return [tuple(r) for r in self._all(
            "SELECT kind, detail, at FROM findings WHERE server_id = ? ORDER BY at, rowid",
            (server_id,))]

    # -- recordings ---------------------------------------------------------------------------
    @_sqlite_errors
    def put_recording(self, server_id: str, sid: str, meta: dict, updated: float) -> None:
        login, hostname = meta_fields(meta)
        with self._tx() as c:
            c.execute("INSERT INTO recordings VALUES (?, ?, ?, ?, ?, ?) "
                      "ON CONFLICT (server_id, sid) DO UPDATE SET meta = excluded.meta, "
                      "updated = excluded.updated, login = excluded.login, "
                      "server_hostname = excluded.server_hostname",
                      (server_id, sid, json.dumps(meta), updated, login, hostname))

    @_sqlite_errors
    def put_chunk(self, server_id: str, sid: str, seq: int, size: int, stored_size: int,
                  index: OutputIndexer | None = None) -> bool:
        with self._tx() as c:
            new = c.execute("INSERT INTO chunks VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                            (server_id, sid, seq, size, stored_size)).rowcount == 1
            if new and index is not None:
                self._index_output(c, server_id, sid, index)
        return new

    def _index_output(self, c, server_id: str, sid: str, index: OutputIndexer) -> None:
        # The write lock is held (BEGIN IMMEDIATE): no other process reads this state meanwhile.
        row = c.execute("SELECT state, partial FROM output_state WHERE server_id = ? AND sid = ?",
                        (server_id, sid)).fetchone()
        out = index(row[0] if row else None)
        if out.replaces_partial and row and row[1] is not None:
            old = c.execute("SELECT COALESCE(ftext, text) FROM output_lines WHERE id = ?",
                            (row[1],)).fetchone()
            if old:
                c.execute("INSERT INTO output_fts (output_fts, rowid, body) "
                          "VALUES ('delete', ?, ?)", (row[1], old[0]))
                c.execute("DELETE FROM output_lines WHERE id = ?", (row[1],))
        for line in out.lines:
            self._add_line(c, server_id, sid, line)
        if out.state is not None:
            partial = self._add_line(c, server_id, sid, out.partial) if out.partial else None
            c.execute("INSERT INTO output_state VALUES (?, ?, ?, ?) ON CONFLICT (server_id, sid) "
                      "DO UPDATE SET state = excluded.state, partial = excluded.partial",
                      (server_id, sid, out.state, partial))

    @staticmethod
    def _add_line(c, server_id: str, sid: str, line: Line) -> int:
        ftext = fold(line.text)
        rowid = c.execute("INSERT INTO output_lines (server_id, sid, t, marks, text, ftext) "
                          "VALUES (?, ?, ?, ?, ?, ?)",
                          (server_id, sid, line.offset, line.marks, line.text, ftext)).lastrowid
        c.execute("INSERT INTO output_fts (rowid, body) VALUES (?, ?)",
                  (rowid, ftext if ftext is not None else line.text))
        return rowid

    @_sqlite_errors
    def recording(self, server_id: str | None, sid: str) -> dict | None:
        with self._snapshot() as c:
            if server_id is None:
                row = c.execute("SELECT server_id, meta, updated FROM recordings WHERE sid = ? "
                                "ORDER BY updated DESC, server_id LIMIT 1", (sid,)).fetchone()
            else:
                row = c.execute("SELECT server_id, meta, updated FROM recordings "
                                "WHERE server_id = ? AND sid = ?", (server_id, sid)).fetchone()
            if row is None:
                return None
            chunks = c.execute("SELECT seq, size FROM chunks WHERE server_id = ? AND sid = ? "
                               "ORDER BY seq", (row[0], sid)).fetchall()
        return {"server_id": row[0], "sid": sid, "meta": json.loads(row[1]), "updated": row[2],
                "chunks": [s for s, _ in chunks], "bytes": sum(n for _, n in chunks)}

    @_sqlite_errors
    def sessions(self, *, since: float | None = None, login: str | None = None,
                 server_id: str | None = None, limit: int = 100) -> list[dict]:
        rows = self._all(*sessions_sql("?", since, login, server_id, limit))
        return [{"server_id": s, "sid": sid, "meta": json.loads(m), "updated": u, "bytes": b}
                for s, sid, m, u, b in rows]

    # -- search -------------------------------------------------------------------------------
    @_sqlite_errors
    def search(self, q: SearchQuery) -> SearchPage:
        folded = search.fold_query(q.text)
        parts, params = [], []
        started = "json_extract(r.meta, '$.started')"
        if "output" in q.kinds:
            # ts: when the line began, epoch microseconds (NULL without recording metadata).
            parts.append(
                "SELECT 'output' AS kind, o.server_id AS server_id, o.id AS ord, o.sid AS sid, "
                "r.login AS login, COALESCE(r.server_hostname, (SELECT min(h.hostname) "
                "FROM hostnames h WHERE h.server_id = o.server_id)) AS hostname, "
                f"CAST(round(({started} + o.t) * 1000000) AS INTEGER) AS ts, o.t AS t, "
                "o.marks AS marks, o.text AS text, NULL AS uid "
                "FROM output_fts f JOIN output_lines o ON o.id = f.rowid "
                "LEFT JOIN recordings r ON r.server_id = o.server_id AND r.sid = o.sid "
                "WHERE f.body GLOB ?")
            params.append(search.glob_pattern(folded))
        if "command" in q.kinds:
            parts.append(
                "SELECT 'command' AS kind, e.server_id AS server_id, e.seq AS ord, e.sid AS sid, "
                "e.login AS login, e.server_hostname AS hostname, e.ts AS ts, "
                f"(e.ts - round({started} * 1000000)) / 1000000.0 AS t, '' AS marks, "
                "e.text AS text, e.uid AS uid "
                "FROM command_fts f JOIN command_lines l ON l.id = f.rowid "
                "JOIN events e ON e.server_id = l.server_id AND e.uid = l.uid "
                "LEFT JOIN recordings r ON r.server_id = e.server_id AND r.sid = e.sid "
                "WHERE command_fts MATCH ?")
            params.append(search.fts_phrase(folded))
        where, wparams = search_filter(q, "?")
        rows = self._all(
            f"SELECT * FROM (SELECT *, COALESCE(ts, -1) AS sort FROM ({' UNION ALL '.join(parts)})"
            f") {where} ORDER BY sort DESC, kind DESC, server_id DESC, ord DESC LIMIT ?",
            params + wparams + [q.limit + 1]) if parts else []
        return make_search_page(rows, q.limit, folded)

    # -- hosts, enrollment, readers -----------------------------------------------------------
    @_sqlite_errors
    def add_enroll_token(self, token_hash: str, expires: float, server_id: str | None) -> None:
        with self._tx() as c:
            try:
                c.execute("INSERT INTO enroll_tokens VALUES (?, ?, ?, NULL)",
                          (token_hash, expires, server_id))
            except sqlite3.IntegrityError:
                # Replacing it could make a used token valid again.
                raise StoreError("that enrollment token already exists: make a new one") from None

    @_sqlite_errors
    def use_enroll_token(self, token_hash: str, now: float) -> tuple[bool, str | None]:
        with self._tx() as c:
            # fetchall: COMMIT fails while a RETURNING statement is still being stepped.
            rows = c.execute("UPDATE enroll_tokens SET used = ? WHERE token_hash = ? "
                             "AND used IS NULL AND expires > ? RETURNING server_id",
                             (now, token_hash, now)).fetchall()
        return (True, rows[0][0]) if rows else (False, None)

    @_sqlite_errors
    def put_host(self, server_id: str, cert_serial: str, cert_pem: str, not_after: float,
                 enrolled: float) -> None:
        with self._tx() as c:
            c.execute("INSERT INTO hosts VALUES (?, ?, ?, ?, ?, 0) ON CONFLICT (server_id) "
                      "DO UPDATE SET cert_serial = excluded.cert_serial, cert_pem = "
                      "excluded.cert_pem, not_after = excluded.not_after, enrolled = "
                      "excluded.enrolled, revoked = 0",
                      (server_id, cert_serial, cert_pem, not_after, enrolled))

    @_sqlite_errors
    def host(self, server_id: str) -> Host | None:
        row = self._one(_HOST_SELECT + " WHERE h.server_id = ?", (GENESIS, server_id))
        return _host(row) if row else None

    @_sqlite_errors
    def hosts(self) -> list[Host]:
        return [_host(r) for r in self._all(_HOST_SELECT + " ORDER BY h.server_id", (GENESIS,))]

    @_sqlite_errors
    def revoke(self, server_id: str) -> bool:
        with self._tx() as c:
            return c.execute("UPDATE hosts SET revoked = 1 WHERE server_id = ?",
                             (server_id,)).rowcount > 0

    @_sqlite_errors
    def add_reader(self, token_hash: str, name: str, created: float) -> None:
        with self._tx() as c:
            try:
                c.execute("INSERT INTO readers VALUES (?, ?, ?)", (token_hash, name, created))
            except sqlite3.IntegrityError:
                raise StoreError("that reader token already exists: make a new one") from None

    @_sqlite_errors
    def reader(self, token_hash: str) -> str | None:
        row = self._one("SELECT name FROM readers WHERE token_hash = ?", (token_hash,))
        return row[0] if row else None


def _statements(script: str) -> list[str]:
    """The statements of a script, whole: a trigger's body holds semicolons of its own."""
    out, part = [], ""
    for line in script.splitlines(keepends=True):
        part += line
        if sqlite3.complete_statement(part):
            out.append(part.strip())
            part = ""
    assert not part.strip(), part
    return out


def _host(r) -> Host:
    return Host(server_id=r[0], cert_serial=r[1], cert_pem=r[2], not_after=r[3], enrolled=r[4],
                revoked=bool(r[5]), last_seq=r[6], last_hash=r[7])
