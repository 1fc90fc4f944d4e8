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
"""
from __future__ import annotations

import json
import struct

MAX_MESSAGE = 8 << 20
_LEN = struct.Struct(">I")
_FRAME = struct.Struct(">dcI")
KINDS = (b"o", b"i", b"r")


class ProtocolError(ValueError):
    pass


def pack(header: dict, payload: bytes = b"") -> bytes:
    body = json.dumps(header, separators=(",", ":")).encode() + b"\n" + payload
    if len(body) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(body)} bytes is over the {MAX_MESSAGE} limit")
    return _LEN.pack(len(body)) + body


class Reader:
    """Incremental decoder: feed() bytes as they arrive, get whole messages back."""

    def __init__(self):
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[dict, bytes]]:
        self._buf += data
        out = []
        while len(self._buf) >= 4:
            (n,) = _LEN.unpack_from(self._buf)
            if n > MAX_MESSAGE:
                raise ProtocolError(f"message length {n} is over the {MAX_MESSAGE} limit")
            if len(self._buf) < 4 + n:
                break
            body = bytes(self._buf[4:4 + n])
            del self._buf[:4 + n]
            head, sep, payload = body.partition(b"\n")
            try:
                header = json.loads(head) if sep else None
            except (json.JSONDecodeError, UnicodeDecodeError):
                header = None
            if not isinstance(header, dict) or not isinstance(header.get("type"), str):
                raise ProtocolError("message header is not a JSON object with a type")
            out.append((header, payload))
        return out


def pack_frames(frames) -> bytes:
    """[(t, kind, data), ...] -> bytes."""
    parts = []
    for t, kind, data in frames:
        parts.append(_FRAME.pack(t, kind, len(data)))
        parts.append(data)
    return b"".join(parts)


def unpack_frames(blob: bytes) -> list[tuple[float, bytes, bytes]]:
    out, i, n = [], 0, len(blob)
    while i < n:
        if n - i < _FRAME.size:
            raise ProtocolError(f"truncated frame header at byte {i}")
        t, kind, size = _FRAME.unpack_from(blob, i)
        i += _FRAME.size
        if kind not in KINDS:
            raise ProtocolError(f"unknown frame kind {kind!r} at byte {i - _FRAME.size}")
        if size > n - i:
            raise ProtocolError(f"frame at byte {i - _FRAME.size} claims {size} bytes, {n - i} left")
        if t != t or t < 0:  # NaN or negative
            raise ProtocolError(f"frame at byte {i - _FRAME.size} has time {t}")
        out.append((t, kind, blob[i:i + size]))
        i += size
    return out
