"""The collector's storage, as one small interface every backend implements.

Two backends pass the same conformance suite (tests/test_store.py): SQLite (store_sqlite, the
embedded default: one file) and PostgreSQL (store_postgres, for fleets: several collector
processes may share one database). Recording bytes are not kept here but in a BlobStore
(collector.blobs); the store keeps the index of what is there.

What every backend guarantees:
- `ingest` stores a batch whole or not at all. Events are unique per (server_id, uid): a retried
  batch stores nothing twice and is not an error. Two different events claiming one
  (server_id, seq) are a conflict (StoreConflict) and nothing of that batch is stored.
- Every event is kept as the exact text the host sent (`raw`), beside the columns it is
  searched by; `verify` re-derives those columns and the chain from `raw`.
- Safe for several threads of one process and, for PostgreSQL, several processes.

- Search (collector.search says what is indexed and how a query matches): the screen text of
  recordings is indexed as their chunks arrive, in the transaction that stores the chunk, so a
  retried chunk is never indexed twice; commands (`session.command` argv, `exec` command) as
  their events are stored. Both backends match alike: a case-folded literal substring.

Times are epoch seconds (float) in the interface; events carry their RFC 3339 `time` text,
which sorts as time does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from sshtrail.errors import SshtrailError


class StoreError(SshtrailError):
    """The store cannot be opened or used; the message says which and why."""


class BadQuery(StoreError):
    """A query the store cannot answer as asked (too short, a cursor it did not give out)."""


class StoreConflict(StoreError):
    """A batch contradicts what is stored (another event at the same seq); nothing stored."""


@dataclass
class StoredEvent:
    """One event as ingest hands it to the store (already parsed and checked)."""
    server_id: str
    uid: str
    seq: int
    prev_hash: str
    hash: str          # sha256 of raw (sshtrail.chain.link_hash)
    time: str          # RFC 3339, from the event
    event: str         # type
    login: str | None
    sid: str | None
    server_hostname: str
    text: str          # what a text search looks in: command argv joined, exec command, path
    raw: str           # the exact line the host sent


@dataclass
class BatchProof:
    """What proves a batch came from its host: the signature over the exact batch body, which
    is the batch's raw lines joined by newlines plus a final newline (sshtrail.batch.encode)."""
    server_id: str
    first_seq: int
    last_seq: int
    count: int
    signature: str     # base64, as the host sent it
    cert_serial: str   # hex serial of the certificate that signed it
    received: float


@dataclass
class IngestResult:
    stored: int        # events new to the store
    duplicates: int    # events already there (a retry)


@dataclass
class EventQuery:
    since: float | None = None         # time >= since
    until: float | None = None         # time < until
    types: list[str] = field(default_factory=list)
    login: str | None = None
    server_id: str | None = None       # matches server_id or server_hostname
    sid: str | None = None
    text: str | None = None            # case-insensitive substring of StoredEvent.text
    limit: int = 100
    after: str | None = None           # paging cursor: the `next` of the previous page


@dataclass
class EventPage:
    events: list[dict]                 # json.loads(raw) of each, ordered by (time, uid)
    next: str | None                   # cursor for the following page, None at the end


@dataclass
class Host:
    server_id: str
    cert_serial: str                   # hex, of the newest certificate
    cert_pem: str
    not_after: float
    enrolled: float
    revoked: bool
    last_seq: int                      # highest seq ever ingested for it (0: none)
    last_hash: str                     # that event's hash


@dataclass
class Line:
    """One line of a recording's screen text, as collector.search extracts it."""
    offset: float      # seconds from the recording's start when its first character appeared
    text: str          # what the line showed: escape sequences and control characters removed
    marks: str = ""    # when its other characters appeared, where that differs (search.marks)


@dataclass
class IndexedOutput:
    """What one chunk adds to the search index (collector.search.index_chunk makes it)."""
    lines: list[Line]              # completed lines, to index for good
    partial: Line | None           # the unfinished last line: indexed now, replaced later
    state: str | None              # what the next chunk continues from; None: keep the stored
    replaces_partial: bool         # the stored unfinished line is continued here: drop it


# Called inside the chunk's transaction with the recording's stored text state (None before
# its first chunk); only for a chunk new to the store.
OutputIndexer = Callable[[str | None], IndexedOutput]


@dataclass
class SearchQuery:
    text: str                          # literal, case-insensitive; 3 characters at least
    login: str | None = None
    server_id: str | None = None       # matches server_id or the hostname
    since: float | None = None         # hit time >= since
    until: float | None = None         # hit time < until
    kinds: tuple[str, ...] = ("output", "command")
    limit: int = 50
    before: str | None = None          # paging cursor: the `next` of the previous page


@dataclass
class Hit:
    kind: str                  # "output": seen on screen; "command": a command event's text
    server_id: str
    sid: str | None
    login: str | None
    hostname: str | None
    time: float | None         # epoch seconds; None for output of a recording never described
    offset: float | None       # seconds into the recording; None: the session has no recording
    line: str                  # the line (or command) it was found in
    uid: str | None = None     # the command event's uid


@dataclass
class SearchPage:
    hits: list[Hit]            # newest first
    next: str | None           # cursor for older hits, None at the end


class Store:
    """The interface. Backends subclass it and implement every method."""

    # -- events ------------------------------------------------------------------------------
    def ingest(self, events: list[StoredEvent], proof: BatchProof) -> IngestResult:
        """Store the batch's new events and its proof in one transaction, raise StoreConflict
        on a seq clash, and raise the host's last_seq/last_hash to the batch's highest seq if
        that is higher."""
        raise NotImplementedError

    def event_hash(self, server_id: str, seq: int) -> str | None:
        """The stored hash of one host's event at `seq`, or None."""
        raise NotImplementedError

    def query(self, q: EventQuery) -> EventPage:
        raise NotImplementedError

    def chain(self, server_id: str, after_seq: int = 0, limit: int = 10000) -> list[StoredEvent]:
        """A host's events in seq order, from after_seq, every column as stored (for verify)."""
        raise NotImplementedError

    def proofs(self, server_id: str) -> list[BatchProof]:
        """A host's batch proofs, in first_seq order."""
        raise NotImplementedError

    def add_finding(self, server_id: str, kind: str, detail: str, when: float) -> None:
        """Something ingest noticed and stored anyway (a broken link): verify reports it."""
        raise NotImplementedError

    def findings(self, server_id: str) -> list[tuple[str, str, float]]:
        """(kind, detail, when), oldest first."""
        raise NotImplementedError

    # -- recordings (bytes in the BlobStore; this is their index) -------------------------------
    def put_recording(self, server_id: str, sid: str, meta: dict, updated: float) -> None:
        """Create or replace a recording's metadata (an upsert: the host sends it again as the
        session goes on). `meta` is a JSON-able dict, returned as is by `recording`."""
        raise NotImplementedError

    def put_chunk(self, server_id: str, sid: str, seq: int, size: int, stored_size: int,
                  index: OutputIndexer | None = None) -> bool:
        """Index one chunk whose bytes are already in the blob store; True if new. For a new
        chunk, `index` is called in the same transaction with the recording's text state and
        what it returns is stored with the chunk: its lines searchable, its state kept for the
        next chunk (by any collector process), the previous unfinished line replaced if asked."""
        raise NotImplementedError

    def recording(self, server_id: str | None, sid: str) -> dict | None:
        """{"server_id", "sid", "meta", "updated", "chunks": [seq, ...] (ascending),
        "bytes": total size} or None. server_id None: whichever host has that sid."""
        raise NotImplementedError

    def sessions(self, *, since: float | None = None, login: str | None = None,
                 server_id: str | None = None, limit: int = 100) -> list[dict]:
        """Recordings, newest first: {"server_id", "sid", "meta", "updated", "bytes"}."""
        raise NotImplementedError

    # -- search ------------------------------------------------------------------------------
    def search(self, q: SearchQuery) -> SearchPage:
        """Screen lines and commands holding q.text (case-folded, literal), newest first: by
        the time the line began on screen, or the command event's time. Raises BadQuery for
        a text under 3 characters, a limit under 1 or a cursor it did not give out."""
        raise NotImplementedError

    # -- hosts, enrollment, readers -----------------------------------------------------------
    def add_enroll_token(self, token_hash: str, expires: float, server_id: str | None) -> None:
        raise NotImplementedError

    def use_enroll_token(self, token_hash: str, now: float) -> tuple[bool, str | None]:
        """Atomically mark a token used. (True, server_id it was made for or None) if it was
        valid, unused and unexpired; (False, None) otherwise. Never valid twice."""
        raise NotImplementedError

    def put_host(self, server_id: str, cert_serial: str, cert_pem: str, not_after: float,
                 enrolled: float) -> None:
        """Record a host's (new) certificate; un-revokes, keeps last_seq/last_hash."""
        raise NotImplementedError

    def host(self, server_id: str) -> Host | None:
        raise NotImplementedError

    def hosts(self) -> list[Host]:
        raise NotImplementedError

    def revoke(self, server_id: str) -> bool:
        """Mark a host's certificates revoked; False if the host is unknown."""
        raise NotImplementedError

    def add_reader(self, token_hash: str, name: str, created: float) -> None:
        raise NotImplementedError

    def reader(self, token_hash: str) -> str | None:
        """The name of the reader that token belongs to, or None."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError
