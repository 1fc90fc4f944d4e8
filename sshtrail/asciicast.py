"""The asciicast v2 format: the one place that writes and reads a session recording's export.

Format (https://docs.asciinema.org/manual/asciicast/v2/): newline-delimited JSON; line 1 is a
header object (`version` 2, `width`, `height`, optional `timestamp`, `duration`,
`idle_time_limit`, `command`, `title`, `env`), every further line one event
`[time, code, data]`: time in seconds since the start (float, non-decreasing), code "o" output,
"i" input, "r" resize (data "COLSxROWS"), "m" marker (data a label).

`Writer` turns raw terminal bytes into events; `read` is the strict parser that tests and
`sshtrail play` use. The writer must never lose, duplicate or reorder a byte of what it is
handed, never raise on what the session printed (terminal output is untrusted and need not be
UTF-8), and never write a file that `read` rejects. It decides no policy: whether input is
recorded (off by default: it holds passwords typed at prompts) is the caller's choice. It writes
synchronously, so it must never be called from the PTY relay loop itself; put it behind a queue.
"""
from __future__ import annotations

import codecs
import json
import math
import re
from typing import IO, Any, Iterable, Iterator

from .errors import SshtrailError
from .jsontext import escape_unshown

VERSION = 2
CODES = ("o", "i", "r", "m")

# [0-9], not \d: on str patterns \d also matches non-ASCII digits ("٣x٤"), which no player
# parses as a size.
_SIZE = re.compile(r"([0-9]+)x([0-9]+)")

Event = tuple[float, str, str]


class AsciicastError(SshtrailError):
    """A file that is not valid asciicast v2; the message names the line and the fault."""


def _positive_int(value: Any) -> bool:
    # bool is an int subclass: `true` must not pass for a width of 1.
    return type(value) is int and value > 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    # json reads 1e400 as inf, and 1 followed by 400 zeros as an int no float holds.
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _format_time(us: int) -> str:
    # Microseconds as an integer, printed in fixed notation with trailing zeros cut (as the
    # asciinema 3 recorder does): never an exponent ("1e-06", which repr() gives), at most six
    # decimals, and always a dot, so readers that insist on a float get one.
    seconds, frac = divmod(us, 1_000_000)
    return f"{seconds}.{(f'{frac:06d}'.rstrip('0') or '0')}"


def _dumps(obj: Any) -> str:
    # ensure_ascii=False is what asciinema writes (2.x: json.dumps(ensure_ascii=False,
    # separators=(", ", ": ")); 3.x: serde_json, which never \u-escapes non-ASCII): 2-3 bytes
    # per non-ASCII character instead of 6 ("\u00e9"), and text readable with grep and less.
    # Control characters (ESC, BEL, ...) are still escaped (\u001b), as JSON requires, and so
    # are the C1 controls, bidi and invisible characters and lone surrogates (escape_unshown):
    # `sshtrail export` writes to the auditor's terminal by default, and xterm acts on a raw
    # U+009D as on ESC ]. The line therefore always encodes as UTF-8.
    return escape_unshown(json.dumps(obj, ensure_ascii=False, separators=(", ", ": ")))


class Writer:
    """Write one recording to `fileobj`, a binary file object (the caller owns and closes it).

    The header is written at once. `write(t, code, data)` appends an event; output and input
    arrive as raw bytes cut anywhere, so each of the two streams has its own incremental UTF-8
    decoder: a character split across frames comes out whole in the frame that completes it,
    invalid bytes become U+FFFD, and a frame that only starts a character writes no event.
    `close()` flushes what the decoders still hold (an unfinished character, as U+FFFD).
    """

    def __init__(self, fileobj: IO[bytes], *, width: int, height: int,
                 timestamp: int | None = None, env: dict[str, str] | None = None,
                 command: str | None = None, title: str | None = None) -> None:
        if not _positive_int(width) or not _positive_int(height):
            raise ValueError(f"width and height must be positive ints, got {width!r}x{height!r}")
        if timestamp is not None and type(timestamp) is not int:
            raise ValueError(f"timestamp must be an int (Unix seconds), got {timestamp!r}")
        for name, value in (("command", command), ("title", title)):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a str, got {value!r}")
        if env is not None and not all(isinstance(k, str) and isinstance(v, str)
                                       for k, v in env.items()):
            raise ValueError(f"env must map str to str, got {env!r}")
        self._file = fileobj
        self._decoders = {code: codecs.getincrementaldecoder("utf-8")(errors="replace")
                          for code in ("o", "i")}
        self._last_us = 0
        self._closed = False
        # Key order as asciinema writes it; absent fields are left out rather than null.
        header: dict[str, Any] = {"version": VERSION, "width": width, "height": height}
        for key, value in (("timestamp", timestamp), ("command", command), ("title", title),
                           ("env", env or None)):
            if value is not None:
                header[key] = value
        self._write_line(_dumps(header))

    def write(self, t: float, code: str, data: bytes | str) -> None:
        """Append an event at `t` seconds since the start.

        "o"/"i": raw bytes (or str); "r": "COLSxROWS"; "m": a marker label (str).
        Raises ValueError for a time before the previous event's or a malformed event: those
        are bugs of the caller, never something the session can cause.
        """
        if self._closed:
            raise ValueError("write() on a closed asciicast Writer")
        if not _is_number(t) or not math.isfinite(t) or t < 0:
            raise ValueError(f"time must be a finite number >= 0, got {t!r}")
        # Compared after rounding to the microseconds written, so the file is non-decreasing
        # whatever the float noise.
        us = round(t * 1_000_000)
        if us < self._last_us:
            raise ValueError(f"time {t} is before the previous event's time "
                             f"{_format_time(self._last_us)}")
        if code in self._decoders:
            if isinstance(data, str):
                # Through the decoder too, so bytes it holds from the previous frame come out
                # first, in order.
                data = data.encode("utf-8")
            elif not isinstance(data, (bytes, bytearray, memoryview)):
                raise ValueError(f"{code!r} data must be bytes or str, got {type(data).__name__}")
            text = self._decoders[code].decode(bytes(data))
            if not text:
                # Only the start of a character: the frame that completes it carries it.
                return
        elif code == "r":
            if not isinstance(data, str) or not _valid_size(data):
                raise ValueError(f"resize data must be 'COLSxROWS' (positive), got {data!r}")
            text = data
        elif code == "m":
            if not isinstance(data, str):
                raise ValueError(f"marker data must be a str, got {type(data).__name__}")
            text = data
        else:
            raise ValueError(f"unknown event code {code!r} (expected one of {', '.join(CODES)})")
        self._last_us = us
        self._emit(us, code, text)

    def close(self) -> None:
        """Write what the decoders hold, at the last event's time, and flush the file.

        Does not close `fileobj` (the caller opened it). Calling it twice is harmless."""
        if self._closed:
            return
        self._closed = True
        for code, decoder in self._decoders.items():
            tail = decoder.decode(b"", final=True)
            if tail:
                self._emit(self._last_us, code, tail)
        flush = getattr(self._file, "flush", None)
        if flush is not None:
            flush()

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _emit(self, us: int, code: str, text: str) -> None:
        self._write_line(f"[{_format_time(us)}, {_dumps(code)}, {_dumps(text)}]")

    def _write_line(self, line: str) -> None:
        # One write() per line: a writer killed mid-recording leaves at most one torn line.
        self._file.write((line + "\n").encode("utf-8"))


def _valid_size(data: str) -> bool:
    m = _SIZE.fullmatch(data)
    return m is not None and int(m.group(1)) > 0 and int(m.group(2)) > 0


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON (and every player) does not.
    raise ValueError(f"{name} is not valid JSON")


# Marks a blank line; not None, which is what the line `null` parses to.
_BLANK = object()


def _parse_line(raw: bytes | str, lineno: int) -> Any:
    """The JSON value of one line, or _BLANK."""
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise AsciicastError(f"line {lineno}: not UTF-8 (byte {e.start})") from None
    else:
        text = raw
    if not text.strip():
        return _BLANK
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise AsciicastError(f"line {lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    except ValueError as e:
        raise AsciicastError(f"line {lineno}: invalid JSON: {e}") from None


def _check_header(header: Any) -> None:
    def fail(what: str) -> AsciicastError:
        return AsciicastError(f"line 1: {what}")

    if not isinstance(header, dict):
        raise fail(f"header is not a JSON object but {_json_type(header)}")
    if "version" not in header:
        raise fail("header has no version")
    if type(header["version"]) is not int or header["version"] != VERSION:
        raise fail(f"version is {header['version']!r}, expected 2 (only asciicast v2 is read)")
    for key in ("width", "height"):
        if key not in header:
            raise fail(f"header has no {key}")
        if not _positive_int(header[key]):
            raise fail(f"{key} must be a positive integer, got {header[key]!r}")
    # Optional fields: type-checked because a player uses them, null allowed because asciinema
    # 2.x writes "env": {"SHELL": null} when the variable was unset (older files: "title": null).
    for key in ("timestamp", "duration", "idle_time_limit"):
        value = header.get(key)
        if value is not None and not _is_number(value):
            raise fail(f"{key} must be a number, got {value!r}")
        if value is not None and not _is_finite(value):
            raise fail(f"{key} is out of range (not a finite number)")
    for key in ("command", "title"):
        value = header.get(key)
        if value is not None and not isinstance(value, str):
            raise fail(f"{key} must be a string, got {value!r}")
    env = header.get("env")
    if env is not None and not (isinstance(env, dict) and all(
            v is None or isinstance(v, str) for v in env.values())):
        raise fail(f"env must be an object of strings, got {env!r}")


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return "a number"


def _check_event(event: Any, lineno: int, prev_time: float) -> Event:
    def fail(what: str) -> AsciicastError:
        return AsciicastError(f"line {lineno}: {what}")

    if not isinstance(event, list):
        raise fail(f"event is not a JSON array but {_json_type(event)}")
    if len(event) != 3:
        raise fail(f"event has {len(event)} elements, expected 3: [time, code, data]")
    t, code, data = event
    if not _is_number(t):
        raise fail(f"time must be a number, got {_json_type(t)} {t!r}")
    if not _is_finite(t):
        raise fail("time is out of range (not a finite number)")
    if t < 0:
        raise fail(f"time {t} is negative")
    if t < prev_time:
        raise fail(f"time {t} is before the previous event's time {prev_time}")
    if code not in CODES:  # also catches a non-string code: no list or number is in CODES
        raise fail(f"unknown event code {code!r} (expected one of {', '.join(CODES)})")
    if not isinstance(data, str):
        raise fail(f"data of a {code!r} event must be a string, got {_json_type(data)} {data!r}")
    if code == "r" and not _valid_size(data):
        raise fail(f"resize data {data!r} is not COLSxROWS (positive integers)")
    return float(t), code, data


def _events(lines: Iterator[bytes | str]) -> Iterator[Event]:
    prev_time = 0.0
    blank_at = None
    for lineno, raw in enumerate(lines, start=2):
        value = _parse_line(raw, lineno)
        if value is _BLANK:
            blank_at = blank_at or lineno
            continue
        if blank_at is not None:
            raise AsciicastError(f"line {blank_at}: blank line between events "
                                 f"(only trailing blank lines are allowed)")
        event = _check_event(value, lineno, prev_time)
        prev_time = event[0]
        yield event


def read(fileobj: Iterable[bytes | str]) -> tuple[dict[str, Any], Iterator[Event]]:
    """Parse a recording strictly: (header, events), events an iterator of (t, code, data).

    `fileobj` is a binary file (or any iterable of lines; str lines are accepted too). The
    header is checked before this returns; the events lazily, so a long recording is never held
    in memory: the iterator raises AsciicastError when it reaches a bad line. Every error names
    the line number (1 = header) and the fault.
    """
    lines = iter(fileobj)
    first = next(lines, None)
    if first is None:
        raise AsciicastError("line 1: missing header (the file is empty)")
    header = _parse_line(first, 1)
    if header is _BLANK:
        raise AsciicastError("line 1: missing header (blank line)")
    _check_header(header)
    return header, _events(lines)


def write_session(fileobj: IO[bytes], meta: dict, frames: Iterable[tuple[float, bytes, bytes]]
                  ) -> None:
    """A recorded session as asciicast v2: `meta` is a recording's row (login, sid, term, cols,
    rows, started, command), `frames` its (t, kind, data) frames in order. Frames come from a
    host, so a time that goes backwards is held at the previous one instead of failing."""
    cols, rows = meta.get("cols"), meta.get("rows")
    if not (_positive_int(cols) and _positive_int(rows)):
        cols, rows = 80, 24
    env = {"TERM": meta["term"]} if isinstance(meta.get("term"), str) and meta["term"] else None
    started = meta.get("started")
    with Writer(fileobj, width=cols, height=rows,
                timestamp=int(started) if _is_number(started) else None, env=env,
                command=meta.get("command") or None,
                title=f"{meta.get('login', '?')} {meta.get('sid', '')}".strip()) as w:
        last = 0.0
        for t, kind, data in frames:
            last = max(last, t)
            if kind == b"r":
                data = data.decode(errors="replace")
                if not _valid_size(data):
                    continue
            w.write(last, kind.decode(), data)
