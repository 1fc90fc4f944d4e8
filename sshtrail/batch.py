"""The upload format between a host's uploader and the collector, and the hash chain in it.

A batch is NDJSON: one line per event, each line byte for byte the event's body as the spool
stored it. Every body carries `seq` (the host's own sequence number, 1, 2, 3, ...) and
`prev_hash` (sha256 hex of the previous body's bytes; GENESIS for seq 1), so each event vouches
for the one before it, and the collector can check the chain without trusting any re-encoding:
it hashes the bytes it received and keeps them as they are. The uploader signs the whole body
(SIGNATURE_HEADER, see sshtrail.signing) with the host's key.

Recording chunks travel separately (`PUT /v1/recordings/SID/chunks/N`, the wire-format frames as
the spool holds them), signed the same way; a recording's metadata as one JSON object.

This module is pure: no I/O, no network. It must never import a component.
"""
from __future__ import annotations

import json
import re

from . import events, wire
from .chain import GENESIS, link_hash  # noqa: F401  (part of this module's face)

MEDIA_TYPE = "application/x-ndjson"
SIGNATURE_HEADER = "X-Sshtrail-Signature"
# One batch's limits: the uploader stays under them, the collector refuses anything over them.
MAX_EVENTS = 5000
MAX_BYTES = 8 << 20
MAX_CHUNK_BYTES = wire.MAX_CHUNK
_HEX64 = re.compile("[0-9a-f]{64}").fullmatch
_raw_decode = json.JSONDecoder().raw_decode


class BatchError(ValueError):
    """A batch the collector must refuse whole; the message names the line and the field."""


def encode(bodies: list[str]) -> bytes:
    return ("\n".join(bodies) + "\n").encode()


class Line:
    """One parsed line of a batch: the exact text, the event, and its place in the chain."""
    __slots__ = ("raw", "event", "seq", "prev_hash", "hash")

    def __init__(self, raw: str, event: dict):
        self.raw, self.event = raw, event
        self.seq, self.prev_hash = event["seq"], event["prev_hash"]
        self.hash = link_hash(raw)


def _json_line(raw: str):
    """json.loads(raw). That is raw_decode plus a whitespace check and a wrapper: a line that
    raw_decode does not take whole (whitespace around it, or anything wrong) goes through
    json.loads for its answer or its error."""
    try:
        value, end = _raw_decode(raw)
        if end == len(raw):
            return value
    except ValueError:
        pass
    return json.loads(raw)


def parse(data: bytes, *, max_events: int = MAX_EVENTS) -> list[Line]:
    """Parse and validate a whole batch, or raise BatchError naming the first bad line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BatchError(f"batch is not UTF-8 (byte {e.start})") from None
    raws = text.split("\n")
    if raws and raws[-1] == "":
        raws.pop()
    if not raws:
        raise BatchError("batch is empty: send one event per line")
    if len(raws) > max_events:
        raise BatchError(f"batch has {len(raws)} events; at most {max_events} per batch")
    lines, last_seq = [], 0
    for n, raw in enumerate(raws, 1):
        try:
            ev = _json_line(raw)
        except json.JSONDecodeError as e:
            raise BatchError(f"line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
        try:
            events.validate(ev)
        except events.EventError as e:
            raise BatchError(f"line {n}: {e}") from None
        seq, prev = ev.get("seq"), ev.get("prev_hash")
        if type(seq) is not int or seq < 1:
            raise BatchError(f"line {n}: seq: expected a positive integer, got {seq!r}")
        if not (type(prev) is str and _HEX64(prev)):
            raise BatchError(f"line {n}: prev_hash: expected 64 lowercase hex digits, got {prev!r}")
        if seq <= last_seq:
            raise BatchError(f"line {n}: seq {seq} does not follow {last_seq}: a batch is in "
                             "increasing seq order")
        last_seq = seq
        lines.append(Line(raw, ev))
    return lines


def broken_links(lines: list[Line], before: tuple[int, str] | None = None) -> list[str]:
    """Where consecutive events do not vouch for each other. `before`: (seq, hash) of the event
    stored just before the first line, if known. Gaps are not breaks: they are reported by
    their own check (a host may have dropped events, and said so)."""
    found = []
    prev = before
    for line in lines:
        if line.seq == 1 and line.prev_hash != GENESIS:
            found.append(f"seq 1: prev_hash should be the genesis value, is {line.prev_hash[:12]}…")
        if prev is not None and prev[0] == line.seq - 1 and prev[1] != line.prev_hash:
            found.append(f"seq {line.seq}: prev_hash {line.prev_hash[:12]}… does not match the "
                         f"hash of seq {prev[0]} ({prev[1][:12]}…)")
        prev = (line.seq, line.hash)
    return found
