"""The wrapper's link to the agent: frames in, batches out, never blocking the relay.

The relay loop calls `add()` for every chunk of output and includes `fileno()` in its select
when `wants_write()`; `pump_read()`/`pump_write()` move bytes when the socket is ready. Every
batch is kept until the agent acknowledges it, so an agent that dies and comes back gets the
batches it never confirmed (it stores each seq once). Past `buffer_bytes` waiting, output is
dropped from the recording (never from the terminal) and counted; the count reaches the agent
in the end message. Runs as the user: it has nothing to hide and nothing to trust.
"""
from __future__ import annotations

import os
import time
# The C module, not socket.py: its enum wrappers cost ~5 ms of every session's start.
from _socket import AF_UNIX, SOCK_STREAM, socket

from sshtrail import wire

RETRY_EVERY = 1.0


class AgentClient:
    def __init__(self, path: str, hello: dict, *, batch_s: float, batch_bytes: int,
                 buffer_bytes: int):
        self.path = path
        self.hello = hello
        self.batch_s = batch_s
        self.batch_bytes = batch_bytes
        self.buffer_bytes = buffer_bytes
        self.t0 = time.monotonic()
        self.sid: str | None = None
        self.sock = None
        self.refused: str | None = None  # the agent said no, and why
        self.error: str | None = None  # the agent could not be reached, and why
        self.lost_agent = False  # connected once, then lost
        self._pending: list = []
        self._pending_bytes = 0
        self._pending_since = 0.0
        self._seq = 0
        self._unacked: dict[int, tuple[bytes, int]] = {}  # seq -> (message, data bytes)
        self._unacked_bytes = 0
        self._out = bytearray()
        self._reader = wire.Reader()
        self._next_retry = 0.0
        self.dropped_bytes = 0
        self.out_bytes = 0

    # -- connection --------------------------------------------------------------------------

    def connect(self, timeout: float = 2.0) -> bool:
        """Connect and greet (blocking, bounded). Resends what was never acknowledged."""
        self._next_retry = time.monotonic() + RETRY_EVERY
        try:
            sock = socket(AF_UNIX, SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(self.path)
            hello = dict(self.hello, resume=self.sid) if self.sid else self.hello
            sock.sendall(wire.pack(hello))
            reader = wire.Reader()
            deadline = time.monotonic() + timeout
            while True:
                data = sock.recv(65536)
                if not data:
                    raise OSError("agent closed the connection")
                msgs = reader.feed(data)
                if msgs:
                    break
                if time.monotonic() > deadline:
                    raise OSError("no answer from the agent")
            header, _ = msgs[0]
            if header["type"] != "welcome":
                self.refused = str(header.get("reason", header["type"]))
                sock.close()
                return False
        except (OSError, wire.ProtocolError) as e:
            self.error = str(e)
            return False
        self.sid = header["sid"]
        sock.setblocking(False)
        self.sock = sock
        self._reader = reader
        self._out = bytearray(b"".join(self._unacked[s][0] for s in sorted(self._unacked)))
        return True

    def _broken(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = None
        self.lost_agent = True
        self._out = bytearray()
        self._next_retry = time.monotonic() + RETRY_EVERY

    def maybe_reconnect(self) -> None:
        if self.sock is None and time.monotonic() >= self._next_retry:
            self.connect(timeout=0.5)

    # -- frames ------------------------------------------------------------------------------

    def add(self, kind: bytes, data: bytes) -> None:
        if kind == b"o":
            self.out_bytes += len(data)
        if self._unacked_bytes + self._pending_bytes + len(data) > self.buffer_bytes:
            self.dropped_bytes += len(data)
            return
        if not self._pending:
            self._pending_since = time.monotonic()
        self._pending.append((time.monotonic() - self.t0, kind, data))
        self._pending_bytes += len(data)
        if self._pending_bytes >= self.batch_bytes:
            self.seal()

    def timeout(self) -> float | None:
        """Seconds until the pending batch is due (for the relay's select), or None."""
        waits = []
        if self._pending:
            waits.append(max(0.0, self._pending_since + self.batch_s - time.monotonic()))
        if self.sock is None and (self._unacked or self._pending):
            waits.append(max(0.0, self._next_retry - time.monotonic()))
        return min(waits) if waits else None

    def tick(self) -> None:
        """Seal a due batch, retry a lost agent."""
        if self._pending and time.monotonic() >= self._pending_since + self.batch_s:
            self.seal()
        self.maybe_reconnect()

    def seal(self) -> None:
        if not self._pending:
            return
        self._seq += 1
        msg = wire.pack({"type": "frames", "seq": self._seq}, wire.pack_frames(self._pending))
        self._unacked[self._seq] = (msg, self._pending_bytes)
        self._unacked_bytes += self._pending_bytes
        self._pending, self._pending_bytes = [], 0
        if self.sock is not None:
            self._out += msg

    # -- socket ------------------------------------------------------------------------------

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    def wants_write(self) -> bool:
        return self.sock is not None and bool(self._out)

    def pump_write(self) -> None:
        try:
            n = self.sock.send(self._out)
            del self._out[:n]
        except BlockingIOError:
            pass
        except OSError:
            self._broken()

    def pump_read(self) -> None:
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._broken()
            return
        try:
            msgs = self._reader.feed(data)
        except wire.ProtocolError:
            self._broken()
            return
        for header, _ in msgs:
            if header["type"] == "ack" and isinstance(header.get("seq"), int):
                entry = self._unacked.pop(header["seq"], None)
                if entry is not None:
                    self._unacked_bytes -= entry[1]

    # -- the end -----------------------------------------------------------------------------

    def finish(self, end: dict, timeout: float) -> bool:
        """Deliver everything and the end message, waiting at most `timeout` (blocking: the
        session is over). True if the agent confirmed all of it."""
        self.seal()
        deadline = time.monotonic() + timeout
        end = dict(end, dropped_bytes=self.dropped_bytes, bytes_out=end.get("bytes_out", self.out_bytes))
        while time.monotonic() < deadline:
            if self.sock is None:
                # One quick try: a session must not hang on its way out for an absent agent.
                if not self.connect(timeout=0.5):
                    return False
            try:
                self.sock.setblocking(True)
                self.sock.settimeout(max(0.1, deadline - time.monotonic()))
                self.sock.sendall(bytes(self._out) + wire.pack(dict(end, type="end")))
                self._out = bytearray()
                while True:
                    data = self.sock.recv(65536)
                    if not data:
                        raise OSError("agent went away")
                    for header, _ in self._reader.feed(data):
                        if header["type"] == "ack" and header.get("seq") == "end":
                            self.sock.close()
                            return True
                        if header["type"] == "ack":
                            self._unacked.pop(header.get("seq"), None)
            except (OSError, wire.ProtocolError):
                self._broken()
        return False


def default_hello(mode: str, command: str, cols: int, rows: int) -> dict:
    return {"type": "hello", "mode": mode, "command": command, "cols": cols, "rows": rows,
            "term": os.environ.get("TERM", "")}
