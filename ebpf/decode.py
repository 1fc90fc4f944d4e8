"""Decoding of the events ebpf/probes.c puts in the ring buffer into plain dicts.

The one place that knows the binary layout: the ctypes structures below mirror the C structs of
probes.c (`struct header`, `exec_event`, `open_event`, `connect_event`), and the constants mirror
its EV_* and F_* defines. Change both together.

Everything here is pure: bytes in, dict out, nothing read from the host, so it can be tested
without BPF. What the traced process put in its arguments is data, never trusted: strings are
decoded with errors="replace" (filenames and arguments need not be UTF-8).
"""
from __future__ import annotations

import ctypes as ct
import ipaddress

TASK_COMM_LEN = 16

EV_EXEC = 1
EV_EXEC_FAILED = 2
EV_OPEN = 3
EV_CONNECT = 4
EV_LISTEN = 5
EV_CONNECTED = 6

F_ARGV_TRUNCATED = 1 << 0
F_ARGV_UNREADABLE = 1 << 1
F_PATH_TRUNCATED = 1 << 2
F_PATH_UNREADABLE = 1 << 3

AF_INET = 2
AF_INET6 = 10


class Header(ct.Structure):
    _fields_ = [
        ("ts_ns", ct.c_uint64),
        ("ret", ct.c_int64),
        ("kind", ct.c_uint32),
        ("key", ct.c_uint32),
        ("pid", ct.c_uint32),
        ("tid", ct.c_uint32),
        ("ppid", ct.c_uint32),
        ("uid", ct.c_uint32),
        ("flags", ct.c_uint32),
        ("aux", ct.c_uint32),
        ("comm", ct.c_char * TASK_COMM_LEN),
    ]


class ExecFixed(ct.Structure):
    """exec_event up to buf, which holds the filename (path_len bytes with its NUL), then the
    argv entries, each NUL-terminated, up to buf_len."""
    _fields_ = [
        ("h", Header),
        ("path_len", ct.c_uint32),
        ("buf_len", ct.c_uint32),
        ("args_count", ct.c_uint32),
        ("_pad", ct.c_uint32),
    ]


class OpenFixed(ct.Structure):
    _fields_ = [
        ("h", Header),
        ("path_len", ct.c_uint32),
        ("_pad", ct.c_uint32),
    ]


class ConnectEvent(ct.Structure):
    _fields_ = [
        ("h", Header),
        ("family", ct.c_uint16),
        ("port", ct.c_uint16),  # network byte order
        ("_pad", ct.c_uint32),
        ("addr", ct.c_uint8 * 16),
    ]


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def _cstr(raw: bytes) -> str:
    return _text(raw.split(b"\0", 1)[0])


class Decoder:
    """Turns raw ring-buffer records into event dicts.

    time_offset: seconds to add to a CLOCK_MONOTONIC timestamp (bpf_ktime_get_ns) to get epoch
    seconds.
    """

    def __init__(self, *, time_offset: float):
        self.time_offset = time_offset

    def decode(self, data: bytes) -> dict | None:
        """One record as a dict, or None for a record of an unknown kind (never expected)."""
        if len(data) < ct.sizeof(Header):
            return None
        h = Header.from_buffer_copy(data)
        base = {
            "key": h.key,
            "pid": h.pid,
            "ppid": h.ppid,
            "comm": _cstr(h.comm),
            "time": h.ts_ns / 1e9 + self.time_offset,
            "ret": h.ret,
        }
        if h.kind in (EV_EXEC, EV_EXEC_FAILED):
            return self._exec(data, h, base)
        if h.kind == EV_OPEN:
            return self._open(data, h, base)
        if h.kind in (EV_CONNECT, EV_LISTEN, EV_CONNECTED):
            return self._net(data, h, base)
        return None

    def _exec(self, data: bytes, h: Header, base: dict) -> dict:
        e = ExecFixed.from_buffer_copy(data)
        buf = data[ct.sizeof(ExecFixed):ct.sizeof(ExecFixed) + e.buf_len]
        path = buf[:max(e.path_len - 1, 0)]
        argv = [_text(a) for a in buf[e.path_len:].split(b"\0")[:e.args_count]]
        ev = {
            "kind": "exec",
            **base,
            "uid": h.uid,
            "path": _text(path),
            "path_truncated": bool(h.flags & F_PATH_TRUNCATED),
            "argv": argv,
            "argv_truncated": bool(h.flags & F_ARGV_TRUNCATED),
        }
        # A failed exec carries no argv: it is read from the new program's stack, which a failed
        # exec never gets (see probes.c).
        if h.flags & F_PATH_UNREADABLE:
            ev["path_unreadable"] = True
        if h.flags & F_ARGV_UNREADABLE:
            ev["argv_unreadable"] = True
        return ev

    def _open(self, data: bytes, h: Header, base: dict) -> dict:
        e = OpenFixed.from_buffer_copy(data)
        at = ct.sizeof(OpenFixed)
        ev = {
            "kind": "open",
            **base,
            "path": _text(data[at:at + max(e.path_len - 1, 0)]),
            "path_truncated": bool(h.flags & F_PATH_TRUNCATED),
            "flags": h.aux,
        }
        if h.flags & F_PATH_UNREADABLE:
            ev["path_unreadable"] = True
        return ev

    def _net(self, data: bytes, h: Header, base: dict) -> dict:
        """A connect (its destination), a listen (the address the socket was bound to), or how
        a connect the syscall left in progress ended (`established`)."""
        e = ConnectEvent.from_buffer_copy(data)
        raw = bytes(e.addr)
        if e.family == AF_INET:
            family, addr = 4, str(ipaddress.IPv4Address(raw[:4]))
        else:
            family, addr = 6, str(ipaddress.IPv6Address(raw))
        port = int.from_bytes(e.port.to_bytes(2, "little"), "big")
        if h.kind == EV_LISTEN:
            return {"kind": "listen", **base, "family": family, "addr": addr, "port": port}
        if h.kind == EV_CONNECTED:
            return {"kind": "connected", **base, "family": family, "dst_addr": addr,
                    "dst_port": port, "established": h.ret == 0}
        return {"kind": "connect", **base, "family": family, "dst_addr": addr, "dst_port": port}
