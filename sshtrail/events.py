"""The event model: one table of every event type, and strict validation.

Every source (PAM hook, sshd-log watcher, wrapper, eBPF, agent) builds its events here, so an
event that leaves a host always has the common fields and its type's required fields, with
the right JSON types. Names and shapes follow Teleport's audit events where one exists
(`user.login`, `session.start`, `addr.remote` as a flat key), so people who know those can
read ours. This module imports nothing from the rest of sshtrail and never does I/O.
"""
from __future__ import annotations

import calendar
import json
import os
import time
from typing import NamedTuple

from .errors import SshtrailError

# Common to every event. `server_id`/`server_hostname` are filled by the spool from config.
COMMON = {"event": str, "code": str, "uid": str, "time": str,
          "server_id": str, "server_hostname": str}
# Allowed on any event; checked for type when present.
OPTIONAL = {"sid": str, "login": str, "addr.remote": str, "message": str}


class EventType(NamedTuple):
    code: str
    required: dict
    doc: str


# The one table of event types and codes. Codes reuse Teleport's where the event is the same
# thing; sshtrail-only events take an `ST` prefix. I/W/E suffix: info, warning, error.
TYPES: dict[str, EventType] = {
    "user.login": EventType("T1000I", {"login": str, "success": bool, "method": str},
                            "an authentication result, granted (T1000I) or refused (T1000W)"),
    "session.start": EventType("T2000I", {"sid": str, "login": str}, "a session begins"),
    "session.end": EventType("T2004I", {"sid": str, "login": str}, "a session ends"),
    "exec": EventType("T3002I", {"sid": str, "login": str, "command": str},
                      "a non-interactive command"),
    "session.command": EventType("T4000I", {"sid": str, "pid": int, "path": str, "argv": list},
                                 "a process exec inside a session"),
    "session.disk": EventType("T4001I", {"sid": str, "pid": int, "path": str},
                              "a file open inside a session"),
    "session.network": EventType("T4002I", {"sid": str, "pid": int, "dst_addr": str,
                                            "dst_port": int}, "a connect inside a session"),
    "session.recording": EventType("ST2100I", {"sid": str}, "a session has a recording"),
    "session.recording_failed": EventType("ST2101W", {"sid": str, "reason": str},
                                          "a session could not be (fully) recorded"),
    "agent.start": EventType("ST9000I", {}, "the agent started"),
    "agent.stop": EventType("ST9001I", {}, "the agent stopped"),
    "agent.ebpf_unavailable": EventType("ST9002W", {"reason": str}, "host events are off"),
    "ebpf.lost": EventType("ST9003W", {"count": int}, "the tracer lost events"),
    "spool.dropped": EventType("ST9100W", {"count": int, "reason": str},
                               "events the spool had to drop, and why"),
}
FAILURE_CODES = {"user.login": "T1000W"}


class EventError(SshtrailError, ValueError):
    """An event that does not match the model; the message names the field."""


def new_uid(now_ns: int | None = None) -> str:
    """A UUIDv7 (RFC 9562): 48-bit Unix milliseconds, then randomness. Its text sorts by time,
    so the spool, the collector and an export can order by uid without parsing `time`."""
    ms = (time.time_ns() if now_ns is None else now_ns) // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | (rand >> 68 & 0xFFF) << 64 \
        | 0b10 << 62 | (rand & ((1 << 62) - 1))
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def format_time(epoch: float) -> str:
    """RFC 3339 UTC with microseconds, the one time format of every event."""
    secs = int(epoch)
    micros = int(round((epoch - secs) * 1_000_000))
    if micros == 1_000_000:
        secs, micros = secs + 1, 0
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{micros:06d}Z"


def parse_time(text: str) -> float:
    """Inverse of format_time (also accepts no fraction); raises EventError on anything else."""
    try:
        base, _, frac = text.rstrip("Z").partition(".")
        if not text.endswith("Z"):
            raise ValueError
        st = time.strptime(base, "%Y-%m-%dT%H:%M:%S")
        return calendar.timegm(st) + (int(frac.ljust(6, "0")[:6]) / 1e6 if frac else 0.0)
    except ValueError:
        raise EventError(f"time: {text!r} is not RFC 3339 UTC like 2026-01-02T03:04:05.000006Z")


def new(kind: str, *, at: float | None = None, **fields) -> dict:
    """A fresh event of type `kind` with code, uid and time filled in. Keys with a dot
    (`addr.remote`) are passed as `**{"addr.remote": ...}`. Not validated until `validate`,
    because server identity is added later by the spool."""
    if kind not in TYPES:
        raise EventError(f"event: unknown type {kind!r}; known types: {', '.join(sorted(TYPES))}")
    now = time.time() if at is None else at
    code = TYPES[kind].code
    if fields.get("success") is False and kind in FAILURE_CODES:
        code = FAILURE_CODES[kind]
    ev = {"event": kind, "code": code, "uid": new_uid(int(now * 1e9)), "time": format_time(now)}
    ev.update(fields)
    return ev


def _check_type(name: str, value, want: type) -> None:
    # bool is an int in Python; an audit field that says 1 where it means true is a bug.
    ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
    if not ok:
        raise EventError(f"{name}: expected {want.__name__}, got {type(value).__name__} {value!r}")


def validate(ev) -> dict:
    """Check an event against the table; returns it unchanged or raises EventError naming the
    first wrong field."""
    if not isinstance(ev, dict):
        raise EventError(f"event: expected a JSON object, got {type(ev).__name__}")
    kind = ev.get("event")
    if kind not in TYPES:
        raise EventError(f"event: unknown type {kind!r}; known types: {', '.join(sorted(TYPES))}")
    spec = TYPES[kind]
    for name, want in {**COMMON, **spec.required}.items():
        if name not in ev:
            raise EventError(f"{name}: required field missing from {kind} event")
        _check_type(name, ev[name], want)
    for name, want in OPTIONAL.items():
        if name in ev and name not in spec.required:
            _check_type(name, ev[name], want)
    if kind == "user.login" and ev["success"] is False and not ev.get("error"):
        raise EventError("error: required field missing from a failed user.login event")
    expected = FAILURE_CODES.get(kind) if ev.get("success") is False else spec.code
    if ev["code"] != (expected or spec.code):
        raise EventError(f"code: {ev['code']!r} does not match {kind} (expected {expected or spec.code})")
    parse_time(ev["time"])
    return ev


def to_json(ev: dict) -> str:
    return json.dumps(ev, separators=(",", ":"), ensure_ascii=False, sort_keys=True)


def from_json(text: str | bytes) -> dict:
    try:
        ev = json.loads(text)
    except json.JSONDecodeError as e:
        raise EventError(f"event: not valid JSON ({e})") from None
    return validate(ev)
