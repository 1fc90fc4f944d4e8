"""The wrapper-to-agent protocol on the agent's unix socket, and the frame encoding.

A message is a 4-byte big-endian length N, then N bytes: a JSON object (UTF-8), a newline, and
a binary payload (possibly empty). Recorded terminal data travels as payload in the frame
encoding below, which the spool also keeps, as sent, as recording chunks.

A frame: 8-byte big-endian float (seconds since the session started), 1 byte kind (b"o"
output, b"i" input, b"r" resize with ASCII "COLSxROWS"), 4-byte big-endian length, the bytes.
Output is kept as bytes, exactly as the program wrote it (non-UTF-8 included); only an export
decodes it.

Messages, wrapper -> agent: hello, frames (with seq), end. Agent -> wrapper: welcome (the sid),
ack (a seq, once its frames are in the spool), refused (why). Never trust a field that the
kernel can tell: the agent takes pid and uid from SO_PEERCRED.

Every byte of a session's output passes through here twice (wrapper, agent): the hot paths copy
it as few times as they can (one join to pack, a receive straight into the reader's buffer).
"""
from __future__ import annotations

import struct

# The headers are JSON, read and written without the json package: importing it (re, enum)
# was 9 ms of every session's start in the wrapper. The scanner is the C one json.loads itself
# uses; the writer is sshtrail.jsontext (compact, UTF-8).
from _json import make_scanner as _make_scanner

from .jsontext import to_json as _to_json

MAX_MESSAGE = 8 << 20
# What a hello carries of the session's command and terminal name, in characters, and what the
# spool keeps. sshd hands over commands of up to 128 KiB (the kernel's limit for one string of
# the environment), and the agent reads at most 64 KiB from a peer that has not said hello: a
# hello must stay well under that whatever the command, or padding one would leave the session
# unrecorded. A longer command's length goes with it (command_bytes).
COMMAND_MAX = 4096
TERM_MAX = 64
# The most bytes of frames one recording chunk may hold: a frames message's payload is stored
# as one chunk and uploaded as one request, and the collector takes no more than this in one.
MAX_CHUNK = 4 << 20
_LEN = struct.Struct(">I")
FRAME = struct.Struct(">dcI")
# Where a frame header keeps its length, so that a writer may extend the last frame it packed.
FRAME_LENGTH, FRAME_LENGTH_AT = struct.Struct(">I"), 9
KINDS = (b"o", b"i", b"r")
_RECV_ROOM = 1 << 16  # least free space offered to each receive
_INF = float("inf")


class ProtocolError(ValueError):
    pass


class _Plain:
    """What the C scanner asks its context for: plain JSON (no NaN or Infinity), as dicts."""
    strict = True
    object_hook = object_pairs_hook = None
    parse_float, parse_int = float, int

    @staticmethod
    def parse_constant(name):
        raise ValueError(f"{name} is not JSON")


_scan = _make_scanner(_Plain())


def loads(data: bytes):
    """json.loads for a header, or ValueError (RecursionError for absurd nesting)."""
    text = data.decode("utf-8").strip(" \t\n\r")
    try:
        value, end = _scan(text, 0)
    except StopIteration:
        raise ValueError("not JSON") from None
    if end != len(text):
        raise ValueError("not JSON: something after the value")
    # Only a \u escape can give a string a lone surrogate (the text itself is UTF-8), which
    # nothing can store or print: the agent would fail on it halfway through the message.
    if "\\u" in text:
        try:
            _encode_strings(value)
        except UnicodeEncodeError:
            raise ValueError("not JSON: a \\u escape of a lone surrogate") from None
    return value


def _encode_strings(value) -> None:
    """UnicodeEncodeError if a string of `value` (a key too) holds a lone surrogate. Not through
    to_json, which writes one as a \\u escape."""
    if isinstance(value, str):
        value.encode()
    elif isinstance(value, dict):
        for k, v in value.items():
            k.encode()
            _encode_strings(v)
    elif isinstance(value, list):
        for v in value:
            _encode_strings(v)


def pack(header: dict, payload=b"") -> bytes:
    """One message; `payload` is any bytes-like object."""
    head = _to_json(header, sort_keys=False).encode() + b"\n"
    size = len(head) + len(payload)
    if size > MAX_MESSAGE:
        raise ProtocolError(f"message of {size} bytes is over the {MAX_MESSAGE} limit")
    return b"".join((_LEN.pack(size), head, payload))


class Reader:
    """Incremental decoder: feed() bytes as they arrive, or recv_from() a socket straight into
    its buffer; get whole messages back. Checks each length before waiting for the body, so a
    peer cannot make it buffer more than `limit`, and grows only with what actually came."""

    def __init__(self, size: int = 1 << 16, limit: int = MAX_MESSAGE):
        self.limit = limit  # the longest message taken; at most MAX_MESSAGE
        self._buf = bytearray(size)
        self._view = memoryview(self._buf)
        self._start = self._end = 0  # the bytes not yet decoded are _buf[_start:_end]

    def feed(self, data) -> list[tuple[dict, bytes]]:
        n = len(data)
        self._make_room(n)
        self._buf[self._end:self._end + n] = data
        self._end += n
        return self._decode()

    def recv_from(self, sock) -> list[tuple[dict, bytes]] | None:
        """One receive from `sock` (blocking or not, as it is); None when the peer closed."""
        self._make_room(_RECV_ROOM)
        n = sock.recv_into(self._view[self._end:])
        if not n:
            return None
        self._end += n
        return self._decode()

    def _make_room(self, n: int) -> None:
        """At least n free bytes after _end: move what is pending to the front, or grow."""
        if len(self._buf) - self._end >= n:
            return
        pending = self._view[self._start:self._end].tobytes()
        size = len(self._buf)
        while size < len(pending) + n:
            size *= 2
        if size != len(self._buf):
            self._view.release()
            self._buf = bytearray(size)
            self._view = memoryview(self._buf)
        self._buf[:len(pending)] = pending
        self._start, self._end = 0, len(pending)

    def _decode(self) -> list[tuple[dict, bytes]]:
        out = []
        buf, view = self._buf, self._view
        start, end = self._start, self._end
        while end - start >= 4:
            (n,) = _LEN.unpack_from(buf, start)
            if n > self.limit:
                raise ProtocolError(f"message length {n} is over the {self.limit} limit")
            stop = start + 4 + n
            if stop > end:
                break
            nl = buf.find(b"\n", start + 4, stop)
            try:
                header = loads(view[start + 4:nl].tobytes()) if nl >= 0 else None
            except (ValueError, RecursionError):
                header = None
            if not isinstance(header, dict) or not isinstance(header.get("type"), str):
                raise ProtocolError("message header is not a JSON object with a type")
            out.append((header, view[nl + 1:stop].tobytes()))
            start = stop
        if start == end:
            start = end = 0
        self._start, self._end = start, end
        return out


def pack_frames(frames) -> bytes:
    """[(t, kind, data), ...] -> bytes."""
    parts = []
    for t, kind, data in frames:
        parts.append(FRAME.pack(t, kind, len(data)))
        parts.append(data)
    return b"".join(parts)


def _frames(blob):
    """(t, kind, start, stop) of each frame in blob, checked."""
    i, n = 0, len(blob)
    size_ = FRAME.size
    while i < n:
        if n - i < size_:
            raise ProtocolError(f"truncated frame header at byte {i}")
        t, kind, size = FRAME.unpack_from(blob, i)
        if kind not in KINDS:
            raise ProtocolError(f"unknown frame kind {kind!r} at byte {i}")
        if size > n - i - size_:
            raise ProtocolError(f"frame at byte {i} claims {size} bytes, {n - i - size_} left")
        if not 0.0 <= t < _INF:  # negative, infinite or NaN (false to every comparison)
            raise ProtocolError(f"frame at byte {i} has time {t}")
        yield t, kind, i + size_, i + size_ + size
        i += size_ + size


def unpack_frames(blob: bytes) -> list[tuple[float, bytes, bytes]]:
    return [(t, kind, blob[a:b]) for t, kind, a, b in _frames(blob)]


def output_size(blob) -> int:
    """Check a frame blob as unpack_frames does, without copying it; the bytes of output in it."""
    return sum(b - a for _, kind, a, b in _frames(blob) if kind == b"o")
