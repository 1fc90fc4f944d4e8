"""Taking a host's upload into the store: checked whole, stored whole, or refused whole.

Everything here runs on bytes that came from the network. A batch is refused (and nothing of it
stored) when its signature is not the host's, when it is malformed, or when it holds events of
another host; it is stored, and the break recorded as a finding for `verify`, when its chain
does not link to what the store already holds (the events are evidence either way).

A recording's chunks and metadata arrive on their own (see sshtrail.batch) and are kept
compressed in the blob store; a chunk's screen text is indexed for search as it is stored
(collector.search).
"""
from __future__ import annotations

import json
import logging
import re
import time

from sshtrail import batch, events, signing, wire
from sshtrail.errors import SshtrailError

from . import search
from .blobs import compress
from .store import BatchProof, IndexedOutput, IngestResult, StoredEvent

log = logging.getLogger("sshtrail.collector")

# sshtrail's sids are UUIDs; this also keeps them safe as blob-store path parts.
_SID = re.compile(r"[A-Za-z0-9._-]{1,128}\Z")


class Refused(SshtrailError):
    """An upload the collector will not store; `status` is the HTTP status to answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def search_text(ev: dict) -> str:
    """What a text search looks in: the command line a session ran, the file it opened, the
    address it connected to or listened on (`10.0.0.5:22`, `[::1]:8080`)."""
    kind = ev["event"]
    if kind in ("session.network", "session.network_outcome", "session.listen"):
        return events.endpoint(ev)
    if kind == "session.command":
        try:
            return " ".join(ev["argv"])
        except TypeError:  # validate checks argv is a list, not what it holds
            return " ".join(a for a in ev["argv"] if isinstance(a, str))
    if kind == "exec":
        return ev["command"]
    if kind == "session.disk":
        return ev["path"]
    return ""


def _check_signature(cert, body: bytes, signature: str | None) -> None:
    if not signature:
        raise Refused(401, f"no {batch.SIGNATURE_HEADER} header: uploads are signed with the "
                           "host's key")
    if not signing.verify(cert, body, signature):
        raise Refused(401, f"{batch.SIGNATURE_HEADER} does not verify with this host's "
                           "certificate over the request body")


def ingest_events(store, server_id: str, cert, body: bytes, signature: str | None,
                  now: float | None = None) -> IngestResult:
    now = time.time() if now is None else now
    _check_signature(cert, body, signature)
    try:
        lines = batch.parse(body)
    except batch.BatchError as e:
        raise Refused(400, str(e)) from None
    stored = []
    for n, line in enumerate(lines, 1):
        ev = line.event
        if ev["server_id"] != server_id:
            # 400, not 403: it is this batch that is wrong (the host sets it aside), not the
            # host's right to write.
            raise Refused(400, f"line {n}: server_id {ev['server_id']!r}: this host may write only "
                               f"events of {server_id!r}")
        stored.append(StoredEvent(
            server_id=server_id, uid=ev["uid"], seq=line.seq, prev_hash=line.prev_hash,
            hash=line.hash, time=ev["time"], event=ev["event"], login=ev.get("login"),
            sid=ev.get("sid"), server_hostname=ev["server_hostname"], text=search_text(ev),
            raw=line.raw))
    before_hash = store.event_hash(server_id, lines[0].seq - 1) if lines[0].seq > 1 else None
    breaks = batch.broken_links(lines, (lines[0].seq - 1, before_hash) if before_hash else None)
    proof = BatchProof(server_id=server_id, first_seq=lines[0].seq, last_seq=lines[-1].seq,
                       count=len(lines), signature=signature, cert_serial=signing.cert_serial_hex(cert),
                       received=now)
    result = store.ingest(stored, proof)
    if result.stored:
        for detail in breaks:
            store.add_finding(server_id, "broken_link", detail, now)
    return result


_META = {"login": str, "mode": str, "command": str, "term": str, "cols": int, "rows": int,
         "started": (int, float), "ended": (int, float, type(None)),
         "end_reason": (str, type(None)), "exit_status": (int, type(None)),
         "bytes_out": int, "stored_bytes": int, "chunks": int, "dropped_bytes": int}


def check_sid(sid: str) -> str:
    if not _SID.match(sid):
        raise Refused(400, f"session id {sid[:80]!r} is not one sshtrail makes")
    return sid


def put_recording(store, server_id: str, cert, sid: str, body: bytes, signature: str | None,
                  now: float | None = None) -> None:
    check_sid(sid)
    _check_signature(cert, body, signature)
    try:
        meta = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Refused(400, f"recording metadata is not JSON: {e}") from None
    if not isinstance(meta, dict):
        raise Refused(400, "recording metadata must be a JSON object")
    for key, want in _META.items():
        if key in meta and (not isinstance(meta[key], want) or isinstance(meta[key], bool)):
            raise Refused(400, f"recording metadata: {key} has the wrong type ({meta[key]!r})")
    meta = {k: meta[k] for k in _META if k in meta}
    meta["sid"] = sid
    store.put_recording(server_id, sid, meta, time.time() if now is None else now)


def chunk_key(server_id: str, sid: str, seq: int) -> str:
    return f"{server_id}/{sid}/{seq:08d}"


def put_chunk(store, blobs, server_id: str, cert, sid: str, seq: int, body: bytes,
              signature: str | None) -> bool:
    check_sid(sid)
    if seq < 0:
        raise Refused(400, f"chunk number {seq} is negative")
    _check_signature(cert, body, signature)
    try:
        frames = wire.unpack_frames(body)
    except wire.ProtocolError as e:
        raise Refused(400, f"recording chunk {seq} is malformed: {e}") from None
    packed = compress(body)
    # The bytes first, then the index: a crash between leaves an unindexed blob the retry
    # overwrites, never an index entry without its bytes.
    blobs.put(chunk_key(server_id, sid, seq), packed)

    def index(state: str | None) -> IndexedOutput:
        try:
            return search.index_chunk(state, seq, frames)
        except Exception:  # noqa: BLE001 - a bug here must not make the host's upload stick
            log.exception("recording %s/%s chunk %d: not indexed for search", server_id, sid, seq)
            return IndexedOutput([], None, None, False)
    return store.put_chunk(server_id, sid, seq, len(body), len(packed), index)
