"""The event model: one table of every event type, and strict validation.

Every source (PAM hook, sshd-log watcher, wrapper, eBPF, agent) builds its events here, so an
event that leaves a host always has the common fields and its type's required fields, with
the right JSON types. Names and shapes follow Teleport's audit events where one exists
(`user.login`, `session.start`, `addr.remote` as a flat key), so people who know those can
read ours. This module imports nothing from the rest of sshtrail and never does I/O.
"""
from __future__ import annotations

import os
import time

from .errors import SshtrailError
from .jsontext import to_json  # noqa: F401 (events.to_json: how an event is written)

# Common to every event. `server_id`/`server_hostname` are filled by the spool from config.
COMMON = {"event": str, "code": str, "uid": str, "time": str,
          "server_id": str, "server_hostname": str}
# Allowed on any event; checked for type when present.
OPTIONAL = {"sid": str, "login": str, "addr.remote": str, "message": str,
            # The host's hash chain, set by the spool as it stores the event (sshtrail.batch).
            "seq": int, "prev_hash": str}


class EventType:
    # A plain class: typing.NamedTuple costs the PAM hook ~3 ms of imports.
    __slots__ = ("code", "required", "doc")

    def __init__(self, code: str, required: dict, doc: str):
        self.code, self.required, self.doc = code, required, doc


# The one table of event types and codes. Codes reuse Teleport's where the event is the same
# thing; sshtrail-only events take an `ST` prefix. I/W/E suffix: info, warning, error.
TYPES: dict[str, EventType] = {
    "user.login": EventType("T1000I", {"login": str, "success": bool, "method": str},
                            "an authentication result, granted (T1000I) or refused (T1000W)"),
    "session.start": EventType("T2000I", {"sid": str, "login": str}, "a session begins"),
    "session.end": EventType("T2004I", {"sid": str, "login": str}, "a session ends"),
    "exec": EventType("T3002I", {"sid": str, "login": str, "command": str},
                      "a non-interactive command"),
    "session.command": EventType("T4000I", {"sid": str, "pid": int, "path": str, "argv": list,
                                            "return_code": int},
                                 "a process exec inside a session"),
    "session.disk": EventType("T4001I", {"sid": str, "pid": int, "path": str, "flags": int,
                                         "return_code": int},
                              "a file open inside a session"),
    "session.network": EventType("T4002I", {"sid": str, "pid": int, "dst_addr": str,
                                            "dst_port": int, "version": int, "return_code": int},
                                 "a connect inside a session, or by its sshd for the client"),
    "session.network_outcome": EventType("ST4004I", {"sid": str, "pid": int, "dst_addr": str,
                                                    "dst_port": int, "version": int,
                                                    "established": bool},
                                         "how a connect its syscall left in progress ended"),
    "session.listen": EventType("ST4003I", {"sid": str, "pid": int, "addr": str, "port": int,
                                           "version": int, "return_code": int},
                                "a socket listening inside a session, or by its sshd for the "
                                "client (ssh -R)"),
    "session.recording": EventType("ST2100I", {"sid": str}, "a session has a recording"),
    "session.recording_failed": EventType("ST2101W", {"sid": str, "reason": str},
                                          "a session could not be (fully) recorded"),
    "agent.start": EventType("ST9000I", {}, "the agent started"),
    "agent.stop": EventType("ST9001I", {}, "the agent stopped"),
    "agent.ebpf_unavailable": EventType("ST9002W", {"reason": str}, "host events are off"),
    "ebpf.lost": EventType("ST9003W", {"count": int}, "the tracer lost events"),
    "agent.peer_refused": EventType("ST9004W", {"user_id": int, "count": int, "reason": str},
                                    "connections to the agent's session socket it refused"),
    "spool.dropped": EventType("ST9100W", {"count": int, "reason": str},
                               "events the spool had to drop, and why"),
    "upload.rejected": EventType("ST9200W", {"count": int, "reason": str, "first_seq": int,
                                             "last_seq": int},
                                 "events the collector refused as malformed, set aside"),
}
FAILURE_CODES = {"user.login": "T1000W"}
_MISSING = object()
# Every field each type must have, merged once: the collector validates every event it takes.
_REQUIRED = {kind: {**COMMON, **t.required} for kind, t in TYPES.items()}


class EventError(SshtrailError, ValueError):
    """An event that does not match the model; the message names the field."""


def new_uid(now_ns: int | None = None, rand: bytes | None = None) -> str:
    """A UUIDv7 (RFC 9562): 48-bit Unix milliseconds, then randomness. Its text sorts by time,
    so the spool, the collector and an export can order by uid without parsing `time`. `rand`
    (10 bytes) in place of fresh randomness gives the same uid again: for a writer that may
    write the same event twice and wants the spool to keep it once."""
    ms = (time.time_ns() if now_ns is None else now_ns) // 1_000_000
    rand = int.from_bytes(os.urandom(10) if rand is None else rand[:10], "big")
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | (rand >> 68 & 0xFFF) << 64 \
        | 0b10 << 62 | (rand & ((1 << 62) - 1))
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def endpoint(ev: dict) -> str:
    """'ADDR:PORT' ('[ADDR]:PORT' for IPv6) of a session.network(_outcome) event's destination
    or a session.listen event's bound address; '' for other events, or an address not a
    string."""
    kind = ev.get("event")
    addr, port = ((ev.get("dst_addr"), ev.get("dst_port"))
                  if kind in ("session.network", "session.network_outcome") else
                  (ev.get("addr"), ev.get("port")) if kind == "session.listen" else (None, None))
    if not isinstance(addr, str):
        return ""
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def format_time(epoch: float) -> str:
    """RFC 3339 UTC with microseconds, the one time format of every event."""
    secs = int(epoch // 1)  # floor, so times before 1970 keep a positive fraction
    micros = int(round((epoch - secs) * 1_000_000))
    if micros == 1_000_000:
        secs, micros = secs + 1, 0
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{micros:06d}Z"


_day_seconds: dict[str, int] = {}


def parse_time(text: str) -> float:
    """Inverse of format_time (also accepts no fraction); raises EventError on anything else.
    Parsed by hand: time.strptime imports _strptime, ~9 ms of every PAM hook run."""
    # The collector checks every event's time: the shape format_time writes is read with the
    # date's days looked up once per day (a tenth of an ingested event's cost before).
    if type(text) is str and len(text) == 27:
        base = _day_seconds.get(text[:10])
        if base is not None and text[10] == "T" and text[13] == text[16] == ":" \
                and text[19] == "." and text[26] == "Z":
            hms, frac = text[11:13] + text[14:16] + text[17:19], text[20:26]
            if hms.isdigit() and frac.isdigit() and hms.isascii() and frac.isascii():
                h, mi, sec = int(hms[:2]), int(hms[2:4]), int(hms[4:])
                if h < 24 and mi < 60 and sec < 60:
                    return base + h * 3600 + mi * 60 + sec + int(frac) / 1e6
    value = _parse_time(text)
    if type(text) is str and len(text) == 27 and len(_day_seconds) < 4096:
        _day_seconds[text[:10]] = int(value // 86400) * 86400
    return value


def _parse_time(text: str) -> float:
    try:
        # isascii: int() and isdigit() take any Unicode digit ("２０２６"); RFC 3339 does not.
        if not (isinstance(text, str) and text.isascii() and text.endswith("Z") and len(text) >= 20
                and text[4] == text[7] == "-" and text[10] == "T" and text[13] == text[16] == ":"):
            raise ValueError
        y, mo, d = int(text[0:4]), int(text[5:7]), int(text[8:10])
        h, mi, s = int(text[11:13]), int(text[14:16]), int(text[17:19])
        frac = text[19:-1]
        if frac and (frac[0] != "." or not frac[1:].isdigit() or len(frac) > 7):
            raise ValueError
        leap = y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)
        days_in_month = (31, 29 if leap else 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
        if not (1 <= mo <= 12 and 1 <= d <= days_in_month[mo - 1] and h < 24 and mi < 60
                and s < 60):
            raise ValueError
        return _days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + s + (
            int(frac[1:].ljust(6, "0")) / 1e6 if frac else 0.0)
    except ValueError:
        raise EventError(f"time: {text!r} is not RFC 3339 UTC like 2026-01-02T03:04:05.000006Z") from None


def _days_from_civil(y: int, m: int, d: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm); calendar
    would import locale and datetime, ~8 ms of every PAM hook run."""
    y -= m <= 2
    era = (y if y >= 0 else y - 399) // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


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
    get = ev.get
    for name, want in _REQUIRED[kind].items():
        # `type(v) is want` is the common case and cheap; anything else is looked at closely
        # (missing, a subclass, bool where int is wanted: all errors but a subclass of str...).
        value = get(name, _MISSING)
        if type(value) is not want:
            if value is _MISSING:
                raise EventError(f"{name}: required field missing from {kind} event")
            _check_type(name, value, want)
    for name, want in OPTIONAL.items():
        value = get(name, _MISSING)
        if value is not _MISSING and type(value) is not want and name not in spec.required:
            _check_type(name, value, want)
    if kind == "user.login" and ev["success"] is False and not ev.get("error"):
        raise EventError("error: required field missing from a failed user.login event")
    expected = FAILURE_CODES.get(kind) if ev.get("success") is False else spec.code
    if ev["code"] != (expected or spec.code):
        raise EventError(f"code: {ev['code']!r} does not match {kind} (expected {expected or spec.code})")
    parse_time(ev["time"])
    return ev


def from_json(text: str | bytes) -> dict:
    import json
    try:
        ev = json.loads(text)
    except json.JSONDecodeError as e:
        raise EventError(f"event: not valid JSON ({e})") from None
    return validate(ev)
