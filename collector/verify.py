"""`sshtrail verify`: is each host's trail in the collector whole and untouched?

Per host, from the stored events alone (their raw text as the host sent it):
- gaps: sequence numbers missing between 1 and the highest one ever received;
- altered: an event whose raw text no longer hashes to its recorded hash, or whose searchable
  columns no longer say what its raw text says;
- broken chain: an event whose prev_hash is not the hash of the event stored before it
  (an event changed, removed and renumbered, or reordered);
- bad signature: a batch whose stored events no longer make the body the host signed;
- findings that ingest recorded (a batch that did not link to what was already stored).

What it cannot see: a whole trailing batch removed together with its proof and the host's
high-water mark. Anchor that elsewhere (e.g. compare with the host's `sshtrail status`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from sshtrail import batch, signing

PAGE = 5000


@dataclass
class Problem:
    server_id: str
    kind: str      # gap, altered, broken_chain, bad_signature, finding
    detail: str

    def __str__(self) -> str:
        return f"{self.server_id}: {self.kind}: {self.detail}"


@dataclass
class HostReport:
    server_id: str
    events: int
    last_seq: int
    batches: int
    problems: list[Problem]


def _check_columns(e, ev: dict) -> str | None:
    for column, field in (("seq", "seq"), ("uid", "uid"), ("time", "time"), ("event", "event"),
                          ("login", "login"), ("sid", "sid"), ("server_id", "server_id"),
                          ("prev_hash", "prev_hash")):
        if getattr(e, column) != ev.get(field):
            return f"stored {column} {getattr(e, column)!r} but the event says {ev.get(field)!r}"
    return None


def verify_host(store, host) -> HostReport:
    sid = host.server_id
    problems: list[Problem] = []
    rejected: list[tuple[int, int]] = []
    expected, prev, count, after = 1, None, 0, 0
    while True:
        page = store.chain(sid, after, PAGE)
        if not page:
            break
        for e in page:
            count += 1
            if e.seq > expected:
                problems.append(Problem(sid, "gap", _gap(expected, e.seq - 1, rejected)))
            raw_hash = batch.link_hash(e.raw)
            try:
                ev = json.loads(e.raw)
            except ValueError:
                ev = None
            if raw_hash != e.hash or not isinstance(ev, dict):
                problems.append(Problem(sid, "altered", f"seq {e.seq}: the stored text no longer "
                                                        "hashes to what was received"))
            else:
                wrong = _check_columns(e, ev)
                if wrong:
                    problems.append(Problem(sid, "altered", f"seq {e.seq}: {wrong}"))
                if ev.get("event") == "upload.rejected":
                    rejected.append((ev.get("first_seq", 0), ev.get("last_seq", 0)))
            if prev is not None and prev.seq == e.seq - 1 and batch.link_hash(prev.raw) != (
                    ev.get("prev_hash") if isinstance(ev, dict) else e.prev_hash):
                problems.append(Problem(sid, "broken_chain", f"seq {e.seq} does not vouch for "
                                                             f"seq {prev.seq} before it"))
            expected, prev = e.seq + 1, e
        after = page[-1].seq
    if host.last_seq >= expected:
        problems.append(Problem(sid, "gap", _gap(expected, host.last_seq, rejected)
                                + " (at the end: received once, gone now)"))
    proofs = store.proofs(sid)
    cert = signing.load_cert(host.cert_pem)
    for proof in proofs:
        rows = [e for e in store.chain(sid, proof.first_seq - 1, proof.last_seq - proof.first_seq + 1)
                if e.seq <= proof.last_seq]
        body = batch.encode([e.raw for e in rows]) if rows else b""
        if len(rows) != proof.count or not signing.verify(cert, body, proof.signature):
            note = "" if proof.cert_serial == host.cert_serial else (
                f"; signed with certificate {proof.cert_serial}, the host now has "
                f"{host.cert_serial}")
            problems.append(Problem(sid, "bad_signature",
                                    f"batch seq {proof.first_seq}-{proof.last_seq} ({proof.count} "
                                    f"events, {len(rows)} stored) no longer verifies{note}"))
    for kind, detail, _when in store.findings(sid):
        problems.append(Problem(sid, "finding", f"{kind}: {detail}"))
    return HostReport(sid, count, host.last_seq, len(proofs), problems)


def _gap(first: int, last: int, rejected: list[tuple[int, int]]) -> str:
    what = f"seq {first}" if first == last else f"seq {first}-{last} ({last - first + 1} events)"
    for lo, hi in rejected:
        if lo <= first and last <= hi:
            return what + " missing: the host says the collector refused them as malformed " \
                          "(they are kept in its spool)"
    return what + " missing"


def verify(store, server_id: str | None = None) -> list[HostReport]:
    hosts = [h for h in store.hosts() if server_id is None or h.server_id == server_id]
    return [verify_host(store, h) for h in hosts]
