"""The PostgreSQL store, for fleets: several collector processes may share one database
(collector.store says what every store guarantees).

Nothing here may rely on being the only writer. Events go in with INSERT ... ON CONFLICT DO
NOTHING, so two processes storing the same retried batch wait for each other and store it once;
a host's head (last_seq) only ever moves up in one conditional UPSERT; schema creation runs
under an advisory lock, so two processes starting together do not trip over each other.
Never log or raise the URL as given: it may hold a password.
"""
from __future__ import annotations

import functools
import json

import psycopg
from psycopg import errors as pgerrors
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus

from sshtrail.chain import GENESIS

from . import search
from .store import (BatchProof, EventPage, EventQuery, Host, IngestResult, OutputIndexer,
                    SearchPage, SearchQuery, Store, StoreConflict, StoreError, StoredEvent)
from .pool import ConnectionPool
from .store_sqlite import (check_batch, conflict_message, event_filter, event_row, fold,
                           like_pattern, make_page, make_search_page, meta_fields, search_filter,
                           sessions_sql)

SCHEMA_VERSION = 2
# Keys of pg_advisory_xact_lock(int, int): ("sshtrail" as an int, purpose).
_LOCK_CLASS = 0x73736874
_LOCK_SCHEMA = 1
CONNECT_TIMEOUT_S = 10
# A retry of a batch racing its original in another process can deadlock on the unique
# indexes; PostgreSQL aborts one of them, which simply runs again.
_INGEST_ATTEMPTS = 3

# uid and server_id sort bytewise ("C") whatever the database's locale, as in SQLite: paging
# order and cursors are then the same on both backends.
_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS sshtrail_schema (version integer NOT NULL)",
    """CREATE TABLE IF NOT EXISTS events (
        server_id text COLLATE "C" NOT NULL,
        uid text COLLATE "C" NOT NULL,
        seq bigint NOT NULL,
        prev_hash text NOT NULL,
        hash text NOT NULL,
        time text NOT NULL,
        ts bigint NOT NULL,
        event text NOT NULL,
        login text,
        sid text,
        server_hostname text NOT NULL,
        text text NOT NULL,
        ftext text,
        raw text NOT NULL,
        PRIMARY KEY (server_id, uid),
        UNIQUE (server_id, seq))""",
    "CREATE INDEX IF NOT EXISTS events_ts ON events (ts)",
    "CREATE INDEX IF NOT EXISTS events_login ON events (login, ts)",
    "CREATE INDEX IF NOT EXISTS events_event ON events (event, ts)",
    "CREATE INDEX IF NOT EXISTS events_sid ON events (sid, ts)",
    "CREATE INDEX IF NOT EXISTS events_server ON events (server_id, ts)",
    """CREATE TABLE IF NOT EXISTS hostnames (
        hostname text NOT NULL,
        server_id text COLLATE "C" NOT NULL,
        PRIMARY KEY (hostname, server_id))""",
    """CREATE TABLE IF NOT EXISTS proofs (
        id bigserial PRIMARY KEY,
        server_id text NOT NULL,
        first_seq bigint NOT NULL,
        last_seq bigint NOT NULL,
        count integer NOT NULL,
        signature text NOT NULL,
        cert_serial text NOT NULL,
        received double precision NOT NULL,
        UNIQUE (server_id, first_seq, last_seq, signature))""",
    """CREATE TABLE IF NOT EXISTS heads (
        server_id text PRIMARY KEY,
        last_seq bigint NOT NULL,
        last_hash text NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS findings (
        id bigserial PRIMARY KEY,
        server_id text NOT NULL,
        kind text NOT NULL,
        detail text NOT NULL,
        at double precision NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS findings_server ON findings (server_id, at)",
    """CREATE TABLE IF NOT EXISTS recordings (
        server_id text COLLATE "C" NOT NULL,
        sid text COLLATE "C" NOT NULL,
        meta text NOT NULL,
        updated double precision NOT NULL,
        login text,
        server_hostname text,
        PRIMARY KEY (server_id, sid))""",
    "CREATE INDEX IF NOT EXISTS recordings_updated ON recordings (updated)",
    "CREATE INDEX IF NOT EXISTS recordings_sid ON recordings (sid)",
    """CREATE TABLE IF NOT EXISTS chunks (
        server_id text NOT NULL,
        sid text NOT NULL,
        seq bigint NOT NULL,
        size bigint NOT NULL,
        stored_size bigint NOT NULL,
        PRIMARY KEY (server_id, sid, seq))""",
    """CREATE TABLE IF NOT EXISTS hosts (
        server_id text COLLATE "C" PRIMARY KEY,
        cert_serial text NOT NULL,
        cert_pem text NOT NULL,
        not_after double precision NOT NULL,
        enrolled double precision NOT NULL,
        revoked boolean NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS enroll_tokens (
        token_hash text PRIMARY KEY,
        expires double precision NOT NULL,
        server_id text,
        used double precision)""",
    """CREATE TABLE IF NOT EXISTS readers (
        token_hash text PRIMARY KEY,
        name text NOT NULL,
        created double precision NOT NULL)""",
    # Version 2: search (collector.search). pg_trgm's GIN indexes serve LIKE '%...%' on the
    # case-folded text (ftext where folding changes it, as for event search): the same matching
    # as SQLite's, whatever the database's locale. pg_trgm is a trusted extension (PostgreSQL
    # 13+): the database's owner may create it. Commands are indexed in place, by a partial
    # index over their events.
    "CREATE EXTENSION IF NOT EXISTS pg_trgm",
    """CREATE TABLE IF NOT EXISTS output_lines (
        id bigserial PRIMARY KEY,
        server_id text COLLATE "C" NOT NULL,
        sid text COLLATE "C" NOT NULL,
        t double precision NOT NULL,
        marks text NOT NULL,
        text text NOT NULL,
        ftext text)""",
    "CREATE INDEX IF NOT EXISTS output_lines_trgm ON output_lines "
    "USING gin ((COALESCE(ftext, text)) gin_trgm_ops)",
    """CREATE TABLE IF NOT EXISTS output_state (
        server_id text NOT NULL,
        sid text NOT NULL,
        state text,
        partial bigint,
        PRIMARY KEY (server_id, sid))""",
    "CREATE INDEX IF NOT EXISTS events_command_trgm ON events "
    "USING gin ((COALESCE(ftext, text)) gin_trgm_ops) "
    "WHERE event IN ('session.command', 'exec')",
]
# Per connection; its rows go at each commit. COPY into it, then one INSERT ... SELECT: no
# round trip per event.
_BATCH_TABLE = """CREATE TEMP TABLE IF NOT EXISTS sshtrail_batch (
    server_id text, uid text, seq bigint, prev_hash text, hash text, time text, ts bigint,
    event text, login text, sid text, server_hostname text, text text, ftext text, raw text)
    ON COMMIT DELETE ROWS"""
_EVENT_COLS = ("server_id, uid, seq, prev_hash, hash, time, ts, event, login, sid, "
               "server_hostname, text, ftext, raw")
_STORED_COLS = ("server_id, uid, seq, prev_hash, hash, time, event, login, sid, "
                "server_hostname, text, raw")
_HOST_SELECT = ("SELECT h.server_id, h.cert_serial, h.cert_pem, h.not_after, h.enrolled, "
                "h.revoked, COALESCE(d.last_seq, 0), COALESCE(d.last_hash, %s) "
                "FROM hosts h LEFT JOIN heads d ON d.server_id = h.server_id")


def redact(url: str) -> str:
    """The URL as it may be shown: user, host, port and database, never the password."""
    try:
        d = conninfo_to_dict(url)
    except psycopg.Error:
        return "<an unparsable PostgreSQL URL>"
    user = d.get("user")
    port = d.get("port")
    return (f"postgresql://{user + '@' if user else ''}{d.get('host', '')}"
            f"{':' + str(port) if port else ''}/{d.get('dbname', '')}")


def _text(v):
    # PostgreSQL text cannot hold NUL. raw never does (JSON escapes it) but the columns
    # derived from it may; refusing them would leave the host's upload stuck for good.
    return v.replace("\x00", "\ufffd") if isinstance(v, str) and "\x00" in v else v


def _texts(params) -> list:
    return [_text(v) for v in params]


def _pg_errors(method):
    """psycopg errors leave as StoreError naming the database (without password)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except psycopg.Error as e:
            raise StoreError(f"PostgreSQL store {self.shown}: {method.__name__} failed: "
                             f"{self._scrub(e)}") from None
    return wrapper


class PostgresStore(Store):
    def __init__(self, url: str):
        self.url = url
        self.shown = redact(url)
        try:
            self._password = conninfo_to_dict(url).get("password")
        except psycopg.Error:
            raise StoreError(f"the PostgreSQL URL is not valid: write it as "
                             "postgresql://USER@HOST:PORT/DATABASE") from None
        # A connection the server dropped, or left inside a transaction, is not lent again.
        self._pool = ConnectionPool(
            self._connect, lambda c: not c.broken and c.info.transaction_status
            == TransactionStatus.IDLE, f"PostgreSQL store {self.shown}")
        self._use = self._pool.use
        self._create_schema()

    def _scrub(self, e: Exception) -> str:
        msg = str(e).strip()
        return msg.replace(self._password, "***") if self._password else msg

    # -- connections --------------------------------------------------------------------------
    def _all(self, sql: str, params=()) -> list:
        with self._use() as c:
            return c.execute(sql, params).fetchall()

    def _one(self, sql: str, params=()):
        with self._use() as c:
            return c.execute(sql, params).fetchone()

    def _run(self, sql: str, params=()) -> int:
        """A statement without result; its row count."""
        with self._use() as c:
            return c.execute(sql, params).rowcount

    def _connect(self) -> psycopg.Connection:
        try:
            # autocommit: every transaction is an explicit `with c.transaction()`.
            c = psycopg.connect(self.url, autocommit=True,
                                connect_timeout=int(conninfo_to_dict(self.url).get(
                                    "connect_timeout", CONNECT_TIMEOUT_S)))
            c.execute(_BATCH_TABLE)
        except psycopg.Error as e:
            raise StoreError(f"cannot connect to the PostgreSQL store {self.shown}: "
                             f"{self._scrub(e)}; check that the server runs, the database "
                             "exists and the collector's user may use it") from None
        return c

    def _create_schema(self) -> None:
        try:
            with self._use() as c, c.transaction():
                c.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_CLASS, _LOCK_SCHEMA))
                for stmt in _SCHEMA:
                    c.execute(stmt)
                row = c.execute("SELECT max(version) FROM sshtrail_schema").fetchone()
                version = row[0] or 0
                if version > SCHEMA_VERSION:
                    raise StoreError(f"PostgreSQL store {self.shown} has schema version "
                                     f"{version}, newer than this collector's "
                                     f"{SCHEMA_VERSION}: upgrade sshtrail")
                if version == 0:
                    c.execute("INSERT INTO sshtrail_schema VALUES (%s)", (SCHEMA_VERSION,))
                elif version < SCHEMA_VERSION:  # the statements above added what was missing
                    c.execute("UPDATE sshtrail_schema SET version = %s", (SCHEMA_VERSION,))
        except psycopg.Error as e:
            self.close()
            raise StoreError(f"cannot create the schema in the PostgreSQL store {self.shown}: "
                             f"{self._scrub(e)}; the collector's user needs CREATE on the "
                             "database") from None
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._pool.close()

    # -- events -------------------------------------------------------------------------------
    @_pg_errors
    def ingest(self, events: list[StoredEvent], proof: BatchProof) -> IngestResult:
        if not events:
            return IngestResult(stored=0, duplicates=0)
        check_batch(events, proof)
        rows = [_texts(event_row(e)) for e in events]
        top = max(rows, key=lambda r: r[2])
        for attempt in range(1, _INGEST_ATTEMPTS + 1):
            try:
                return self._ingest(events, rows, top, _texts(
                    (proof.server_id, proof.first_seq, proof.last_seq, proof.count,
                     proof.signature, proof.cert_serial, proof.received)))
            except (pgerrors.DeadlockDetected, pgerrors.SerializationFailure):
                if attempt == _INGEST_ATTEMPTS:
                    raise

    def _ingest(self, events: list[StoredEvent], rows: list, top: list,
                proof: list) -> IngestResult:
        server_id = proof[0]
        with self._use() as c, c.transaction(), c.cursor() as cur:
            with cur.copy(f"COPY sshtrail_batch ({_EVENT_COLS}) FROM STDIN") as copy:
                for r in rows:
                    copy.write_row(r)
            # In seq order, so that two processes storing overlapping batches take the
            # index locks in the same order. Skipped rows are checked below: a retry, or a
            # conflict.
            cur.execute(f"INSERT INTO events ({_EVENT_COLS}) SELECT {_EVENT_COLS} "
                        "FROM sshtrail_batch ORDER BY seq ON CONFLICT DO NOTHING")
            stored = cur.rowcount
            if stored < len(rows):
                cur.execute("SELECT b.uid, b.seq FROM sshtrail_batch b WHERE NOT EXISTS ("
                            "SELECT 1 FROM events e WHERE e.server_id = b.server_id "
                            "AND e.uid = b.uid AND e.seq = b.seq AND e.hash = b.hash) "
                            "ORDER BY b.seq LIMIT 1")
                bad = cur.fetchone()
                if bad is not None:
                    e = next(e for e, r in zip(events, rows)
                             if r[1] == bad[0] and r[2] == bad[1])
                    same = cur.execute("SELECT seq, hash FROM events WHERE server_id = %s "
                                       "AND uid = %s", (server_id, e.uid)).fetchone()
                    at = cur.execute("SELECT uid FROM events WHERE server_id = %s "
                                     "AND seq = %s", (server_id, e.seq)).fetchone()
                    raise StoreConflict(conflict_message(server_id, e, same, at and at[0]))
            cur.execute("INSERT INTO hostnames SELECT DISTINCT server_hostname, server_id "
                        "FROM sshtrail_batch ON CONFLICT DO NOTHING")
            cur.execute("INSERT INTO proofs (server_id, first_seq, last_seq, count, signature, "
                        "cert_serial, received) VALUES (%s, %s, %s, %s, %s, %s, %s) "
                        "ON CONFLICT DO NOTHING", proof)
            # One statement, so a concurrent ingest of the same host cannot slip in between
            # reading and writing the head; the WHERE keeps it from moving down.
            cur.execute("INSERT INTO heads VALUES (%s, %s, %s) ON CONFLICT (server_id) DO UPDATE "
                        "SET last_seq = excluded.last_seq, last_hash = excluded.last_hash "
                        "WHERE heads.last_seq < excluded.last_seq",
                        (top[0], top[2], top[4]))
        return IngestResult(stored=stored, duplicates=len(rows) - stored)

    @_pg_errors
    def event_hash(self, server_id: str, seq: int) -> str | None:
        row = self._one("SELECT hash FROM events WHERE server_id = %s AND seq = %s",
                        (_text(server_id), seq))
        return row[0] if row else None

    @_pg_errors
    def query(self, q: EventQuery) -> EventPage:
        where, params = event_filter(q, "%s")
        rows = self._all(
            f"SELECT raw, ts, uid, server_id FROM events {where} "
            "ORDER BY ts, uid, server_id LIMIT %s", _texts(params) + [q.limit + 1])
        return make_page(rows, q.limit)

    @_pg_errors
    def chain(self, server_id: str, after_seq: int = 0, limit: int = 10000) -> list[StoredEvent]:
        rows = self._all(
            f"SELECT {_STORED_COLS} FROM events WHERE server_id = %s AND seq > %s "
            "ORDER BY seq LIMIT %s", (_text(server_id), after_seq, limit))
        return [StoredEvent(*r) for r in rows]

    @_pg_errors
    def proofs(self, server_id: str) -> list[BatchProof]:
        rows = self._all(
            "SELECT server_id, first_seq, last_seq, count, signature, cert_serial, received "
            "FROM proofs WHERE server_id = %s ORDER BY first_seq, id", (_text(server_id),))
        return [BatchProof(*r) for r in rows]

    @_pg_errors
    def add_finding(self, server_id: str, kind: str, detail: str, when: float) -> None:
        self._run("INSERT INTO findings (server_id, kind, detail, at) VALUES (%s, %s, %s, %s)",
                  _texts((server_id, kind, detail, when)))

    @_pg_errors
    def findings(self, server_id: str) -> list[tuple[str, str, float]]:
        return [tuple(r) for r in self._all(
            "SELECT kind, detail, at FROM findings WHERE server_id = %s ORDER BY at, id",
            (_text(server_id),))]

    # -- recordings ---------------------------------------------------------------------------
    @_pg_errors
    def put_recording(self, server_id: str, sid: str, meta: dict, updated: float) -> None:
        login, hostname = meta_fields(meta)
        self._run(
            "INSERT INTO recordings VALUES (%s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (server_id, sid) DO UPDATE SET meta = excluded.meta, "
            "updated = excluded.updated, login = excluded.login, "
            "server_hostname = excluded.server_hostname",
            _texts((server_id, sid, json.dumps(meta), updated, login, hostname)))

    @_pg_errors
    def put_chunk(self, server_id: str, sid: str, seq: int, size: int, stored_size: int,
                  index: OutputIndexer | None = None) -> bool:
        server_id, sid = _text(server_id), _text(sid)
        with self._use() as c, c.transaction():
            # A retry racing its original in another process waits here on the unique key,
            # then finds it stored and indexes nothing.
            new = c.execute("INSERT INTO chunks VALUES (%s, %s, %s, %s, %s) "
                            "ON CONFLICT DO NOTHING",
                            (server_id, sid, seq, size, stored_size)).rowcount == 1
            if new and index is not None:
                self._index_output(c, server_id, sid, index)
        return new

    def _index_output(self, c, server_id: str, sid: str, index: OutputIndexer) -> None:
        # The state row is locked until commit: the next chunk, in whatever process, reads
        # what this one leaves.
        c.execute("INSERT INTO output_state (server_id, sid) VALUES (%s, %s) "
                  "ON CONFLICT DO NOTHING", (server_id, sid))
        state, partial = c.execute(
            "SELECT state, partial FROM output_state WHERE server_id = %s AND sid = %s "
            "FOR UPDATE", (server_id, sid)).fetchone()
        out = index(state)
        if out.replaces_partial and partial is not None:
            c.execute("DELETE FROM output_lines WHERE id = %s", (partial,))
        rows = [(server_id, sid, ln.offset, ln.marks, _text(ln.text), _text(fold(ln.text)))
                for ln in out.lines]
        if rows:
            with c.cursor() as cur:
                cur.executemany("INSERT INTO output_lines (server_id, sid, t, marks, text, ftext) "
                                "VALUES (%s, %s, %s, %s, %s, %s)", rows)
        if out.state is not None:
            new_partial = None
            if out.partial is not None:
                ln = out.partial
                new_partial = c.execute(
                    "INSERT INTO output_lines (server_id, sid, t, marks, text, ftext) "
                    "VALUES (%s, %s, %s, %s, %s, %s) RETURNING id",
                    (server_id, sid, ln.offset, ln.marks, _text(ln.text),
                     _text(fold(ln.text)))).fetchone()[0]
            c.execute("UPDATE output_state SET state = %s, partial = %s "
                      "WHERE server_id = %s AND sid = %s",
                      (out.state, new_partial, server_id, sid))

    @_pg_errors
    def recording(self, server_id: str | None, sid: str) -> dict | None:
        # One transaction: the chunks listed belong to the metadata read.
        with self._use() as c, c.transaction():
            if server_id is None:
                row = c.execute("SELECT server_id, meta, updated FROM recordings WHERE sid = %s "
                                "ORDER BY updated DESC, server_id LIMIT 1",
                                (_text(sid),)).fetchone()
            else:
                row = c.execute("SELECT server_id, meta, updated FROM recordings "
                                "WHERE server_id = %s AND sid = %s",
                                _texts((server_id, sid))).fetchone()
            if row is None:
                return None
            chunks = c.execute("SELECT seq, size FROM chunks WHERE server_id = %s AND sid = %s "
                               "ORDER BY seq", (row[0], _text(sid))).fetchall()
        return {"server_id": row[0], "sid": sid, "meta": json.loads(row[1]), "updated": row[2],
                "chunks": [s for s, _ in chunks], "bytes": sum(n for _, n in chunks)}

    @_pg_errors
    def sessions(self, *, since: float | None = None, login: str | None = None,
                 server_id: str | None = None, limit: int = 100) -> list[dict]:
        sql, params = sessions_sql("%s", since, login, server_id, limit)
        rows = self._all(sql, _texts(params[:-1]) + [limit])
        return [{"server_id": s, "sid": sid, "meta": json.loads(m), "updated": u, "bytes": int(b)}
                for s, sid, m, u, b in rows]

    # -- search -------------------------------------------------------------------------------
    @_pg_errors
    def search(self, q: SearchQuery) -> SearchPage:
        folded = search.fold_query(q.text)
        pattern = like_pattern(folded)
        started = "(r.meta::json->>'started')::float8"
        parts, params = [], []
        if "output" in q.kinds:
            parts.append(
                "SELECT 'output'::text AS kind, o.server_id AS server_id, o.id AS ord, "
                "o.sid AS sid, r.login AS login, COALESCE(r.server_hostname, (SELECT "
                "min(h.hostname) FROM hostnames h WHERE h.server_id = o.server_id)) AS hostname, "
                f"round(({started} + o.t) * 1000000)::bigint AS ts, o.t AS t, o.marks AS marks, "
                "o.text AS text, NULL::text AS uid "
                "FROM output_lines o LEFT JOIN recordings r "
                "ON r.server_id = o.server_id AND r.sid = o.sid "
                "WHERE COALESCE(o.ftext, o.text) LIKE %s ESCAPE '\\'")
            params.append(pattern)
        if "command" in q.kinds:
            parts.append(
                "SELECT 'command'::text AS kind, e.server_id AS server_id, e.seq AS ord, "
                "e.sid AS sid, e.login AS login, e.server_hostname AS hostname, e.ts AS ts, "
                f"(e.ts - round({started} * 1000000)) / 1000000.0 AS t, ''::text AS marks, "
                "e.text AS text, e.uid AS uid "
                "FROM events e LEFT JOIN recordings r ON r.server_id = e.server_id "
                "AND r.sid = e.sid WHERE e.event IN ('session.command', 'exec') "
                "AND COALESCE(e.ftext, e.text) LIKE %s ESCAPE '\\'")
            params.append(pattern)
        if not parts:
            return make_search_page([], q.limit, folded)
        where, wparams = search_filter(q, "%s")
        rows = self._all(
            f"SELECT * FROM (SELECT *, COALESCE(ts, -1) AS sort FROM ({' UNION ALL '.join(parts)}"
            f") u) s {where} ORDER BY sort DESC, kind DESC, server_id DESC, ord DESC LIMIT %s",
            _texts(params + wparams) + [q.limit + 1])
        return make_search_page(rows, q.limit, folded)

    # -- hosts, enrollment, readers -----------------------------------------------------------
    @_pg_errors
    def add_enroll_token(self, token_hash: str, expires: float, server_id: str | None) -> None:
        try:
            self._run("INSERT INTO enroll_tokens VALUES (%s, %s, %s, NULL)",
                      _texts((token_hash, expires, server_id)))
        except pgerrors.UniqueViolation:
            # Replacing it could make a used token valid again.
            raise StoreError("that enrollment token already exists: make a new one") from None

    @_pg_errors
    def use_enroll_token(self, token_hash: str, now: float) -> tuple[bool, str | None]:
        # One UPDATE: of two racing uses, the second waits for the first's row lock, then
        # finds `used` set and matches nothing.
        row = self._one(
            "UPDATE enroll_tokens SET used = %s WHERE token_hash = %s AND used IS NULL "
            "AND expires > %s RETURNING server_id", (now, _text(token_hash), now))
        return (True, row[0]) if row else (False, None)

    @_pg_errors
    def put_host(self, server_id: str, cert_serial: str, cert_pem: str, not_after: float,
                 enrolled: float) -> None:
        self._run(
            "INSERT INTO hosts VALUES (%s, %s, %s, %s, %s, false) ON CONFLICT (server_id) "
            "DO UPDATE SET cert_serial = excluded.cert_serial, cert_pem = excluded.cert_pem, "
            "not_after = excluded.not_after, enrolled = excluded.enrolled, revoked = false",
            _texts((server_id, cert_serial, cert_pem, not_after, enrolled)))

    @_pg_errors
    def host(self, server_id: str) -> Host | None:
        row = self._one(_HOST_SELECT + " WHERE h.server_id = %s", (GENESIS, _text(server_id)))
        return Host(*row) if row else None

    @_pg_errors
    def hosts(self) -> list[Host]:
        return [Host(*r) for r in self._all(_HOST_SELECT + " ORDER BY h.server_id", (GENESIS,))]

    @_pg_errors
    def revoke(self, server_id: str) -> bool:
        return self._run("UPDATE hosts SET revoked = true WHERE server_id = %s",
                         (_text(server_id),)) > 0

    @_pg_errors
    def add_reader(self, token_hash: str, name: str, created: float) -> None:
        try:
            self._run("INSERT INTO readers VALUES (%s, %s, %s)",
                      _texts((token_hash, name, created)))
        except pgerrors.UniqueViolation:
            raise StoreError("that reader token already exists: make a new one") from None

    @_pg_errors
    def reader(self, token_hash: str) -> str | None:
        row = self._one("SELECT name FROM readers WHERE token_hash = %s",
                                   (_text(token_hash),))
        return row[0] if row else None
