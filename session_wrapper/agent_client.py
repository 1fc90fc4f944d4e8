"""The wrapper's link to the agent: frames in, batches out, never blocking the relay.

The relay loop calls `add()` for every chunk of output and includes `fileno()` in its select
when `wants_write()`; `pump_read()`/`pump_write()` move bytes when the socket is ready. Every
batch is kept until the agent acknowledges it, so an agent that dies and comes back gets the
batches it never confirmed (it stores each seq once). Past `buffer_bytes` waiting, output is
dropped from the recording (never from the terminal) and counted; the count so far goes with
every batch after (the agent reports the first), the total with the end message. Runs as the
user: it has nothing to hide and nothing to trust.
"""
from __future__ import annotations

import math
import os
import time
# The C module, not socket.py: its enum wrappers cost ~5 ms of every session's start.
from _socket import AF_UNIX, SOCK_STREAM, socket

from sshtrail import wire
from sshtrail.wire import FRAME

RETRY_EVERY = 1.0
# Output read within this long of a frame's start joins that frame: a stream of 4 KiB pty reads
# becomes a few frames per batch, not hundreds, and playback cannot tell the difference.
COALESCE_S = 0.01
# A batch never outgrows a recording chunk, whatever recording.batch_bytes says: it is sealed
# once it reaches MAX_BATCH, and each add() brings at most one read of the relay (64 KiB).
MAX_BATCH = wire.MAX_CHUNK - (64 << 10) - 2 * FRAME.size


class AgentClient:
    def __init__(self, path: str, hello: dict, *, batch_s: float, batch_bytes: int,
                 buffer_bytes: int):
        self.path = path
        self.hello = hello
        self.batch_s = batch_s
        self.batch_bytes = min(batch_bytes, MAX_BATCH)
        self.buffer_bytes = buffer_bytes
        self.t0 = time.monotonic()
        self.sid: str | None = None
        self.sock = None
        self.refused: str | None = None  # the agent said no, and why
        self.error: str | None = None  # the agent could not be reached, and why
        self.lost_agent = False  # connected once, then lost
        # The batch being filled, already in the frame encoding: _batch[:_pos], in a buffer
        # allocated once (growing a bytearray 4 KiB at a time copies it over and over), at the
        # first frame: zeroing it costs ~1 ms, and most sessions (`ssh host cmd`) have none.
        self._batch = bytearray()
        self._pos = 0
        self._batch_data = 0  # bytes of terminal data in it
        self._due = 0.0  # when it must be sealed
        # The output frame that may still grow: its header's offset (-1: none), its length so
        # far (its header holds its first read's length until it closes), and until when it takes
        # more output.
        self._frame_at = -1
        self._frame_len = 0
        self._frame_until = -math.inf
        self._seq = 0
        self._unacked: dict[int, tuple[bytes, int]] = {}  # seq -> (message, data bytes)
        self._unacked_bytes = 0
        self._sendq: list = []  # memoryviews of messages, the first maybe partly sent
        self._reader = wire.Reader()
        self._next_retry = 0.0
        # When tick() has work: the pending batch is due, or a lost agent is to be tried again
        # (monotonic seconds), else None. Kept up to date, so the relay's pass needs no call to
        # learn its poll timeout.
        self.wake_at: float | None = None
        self.dropped_bytes = 0
        self.out_bytes = 0

    # -- connection --------------------------------------------------------------------------

    def connect(self, timeout: float = 2.0) -> bool:
        """Connect and greet (blocking, bounded). Resends what was never acknowledged."""
        self._next_retry = time.monotonic() + RETRY_EVERY
        try:
            sock = socket(AF_UNIX, SOCK_STREAM)
            sock.settimeout(timeout)
            deadline = time.monotonic() + timeout
            while True:
                try:
                    sock.connect(self.path)
                    break
                except BlockingIOError:  # its backlog is full (a burst of logins): wait a turn
                    if time.monotonic() > deadline:
                        raise OSError("the agent's socket stayed busy") from None
                    time.sleep(0.01)
            hello = dict(self.hello, resume=self.sid) if self.sid else self.hello
            sock.sendall(wire.pack(hello))
            reader = wire.Reader()
            while True:
                msgs = reader.recv_from(sock)
                if msgs is None:
                    raise OSError("agent closed the connection")
                if msgs:
                    break
                if time.monotonic() > deadline:
                    raise OSError("no answer from the agent")
            header, _ = msgs[0]
            if header["type"] != "welcome":
                self.refused = str(header.get("reason", header["type"]))
                self.buffer_bytes = 0  # nothing will take it: every frame is dropped, counted
                sock.close()
                return False
        except (OSError, wire.ProtocolError) as e:
            self.error = str(e)
            return False
        self.sid = header["sid"]
        sock.setblocking(False)
        self.sock = sock
        self._reader = reader
        self._sendq = [memoryview(self._unacked[s][0]) for s in sorted(self._unacked)]
        self._rewake()
        return True

    def _broken(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = None
        self.lost_agent = True
        self._sendq.clear()
        self._next_retry = time.monotonic() + RETRY_EVERY
        self._rewake()

    def maybe_reconnect(self) -> None:
        # Not after a refusal: the agent decided from who we are, which does not change.
        if self.sock is None and self.refused is None and time.monotonic() >= self._next_retry:
            self.connect(timeout=0.5)
            self._rewake()

    def _rewake(self) -> None:
        wake = self._due if self._pos else None
        # A lost agent is asked again with nothing to deliver too: a restarted agent learns from
        # the resume that the session lives on, and follows its processes again (eBPF).
        if self.sock is None and self.refused is None and (self._unacked or self._pos
                                                           or self.lost_agent):
            wake = self._next_retry if wake is None else min(wake, self._next_retry)
        self.wake_at = wake

    # -- frames ------------------------------------------------------------------------------

    def add(self, kind: bytes, data: bytes, now: float | None = None) -> None:
        """One frame of `data`, read at `now` (time.monotonic(); now if None). Output read
        within COALESCE_S of an output frame's start joins it: the relay adds every read, and
        this is its CPU per read, so a frame that grows only counts its length here and has it
        written into its header when it closes (_close_frame)."""
        n = len(data)
        if kind == b"o":
            self.out_bytes += n
        if self._unacked_bytes + self._batch_data + n > self.buffer_bytes:
            self.dropped_bytes += n
            return
        if now is None:
            now = time.monotonic()
        pos = self._pos
        if pos + FRAME.size + n > len(self._batch):
            self._grow(FRAME.size + n)
        if kind == b"o" and now < self._frame_until:
            self._frame_len += n
        else:
            self._close_frame()
            if not pos:
                self._due = now + self.batch_s
            FRAME.pack_into(self._batch, pos, now - self.t0, kind, n)
            if kind == b"o":
                self._frame_at, self._frame_len = pos, n
                self._frame_until = now + COALESCE_S
            pos += FRAME.size
        self._batch[pos:pos + n] = data
        self._pos = pos + n
        self._batch_data += n
        if self._pos >= self.batch_bytes:
            self.seal()
        elif pos == FRAME.size:
            self._rewake()  # this frame began the batch: it is due

    def _grow(self, n: int) -> None:
        if self._batch:
            self._batch += bytes(n)
        else:
            self._batch = bytearray(max(self.batch_bytes + 2 * FRAME.size + 65536, n))

    def _close_frame(self) -> None:
        if self._frame_at >= 0:
            wire.FRAME_LENGTH.pack_into(self._batch, self._frame_at + wire.FRAME_LENGTH_AT,
                                        self._frame_len)
            self._frame_at = -1
            self._frame_until = -math.inf

    def timeout(self) -> float | None:
        """Seconds until tick() has work (for a select), or None."""
        return None if self.wake_at is None else max(0.0, self.wake_at - time.monotonic())

    def tick(self) -> None:
        """Seal a due batch, retry a lost agent."""
        if self._pos and time.monotonic() >= self._due:
            self.seal()
        if self.sock is None:
            self.maybe_reconnect()

    def seal(self) -> None:
        if not self._pos:
            return
        self._close_frame()
        self._seq += 1
        header = {"type": "frames", "seq": self._seq}
        if self.dropped_bytes:  # so far: the agent says so at once (the end may never come)
            header["dropped"] = self.dropped_bytes
        msg = wire.pack(header, memoryview(self._batch)[:self._pos])
        self._unacked[self._seq] = (msg, self._batch_data)
        self._unacked_bytes += self._batch_data
        self._pos = self._batch_data = 0
        if self.sock is not None:
            self._sendq.append(memoryview(msg))
        self._rewake()

    # -- socket ------------------------------------------------------------------------------

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    def wants_write(self) -> bool:
        return self.sock is not None and bool(self._sendq)

    def pump_write(self) -> None:
        q = self._sendq
        try:
            while q:
                n = self.sock.send(q[0])
                if n < len(q[0]):
                    q[0] = q[0][n:]
                    return
                del q[0]
        except BlockingIOError:
            pass
        except OSError:
            self._broken()

    def pump_read(self) -> None:
        try:
            msgs = self._reader.recv_from(self.sock)
        except BlockingIOError:
            return
        except (OSError, wire.ProtocolError):
            msgs = None
        if msgs is None:
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
        if self.refused is not None:
            return False
        self.seal()
        deadline = time.monotonic() + timeout
        end = dict(end, dropped_bytes=self.dropped_bytes, bytes_out=end.get("bytes_out", self.out_bytes))
        # Two tries at most: an agent that takes us in and then fails (its spool broken or
        # full) must not be hammered in a loop, nor hold the session's exit until the deadline.
        for _ in range(2):
            if time.monotonic() >= deadline:
                break
            if self.sock is None:
                # One quick try: a session must not hang on its way out for an absent agent.
                if not self.connect(timeout=0.5):
                    return False
            try:
                self.sock.setblocking(True)
                self.sock.settimeout(max(0.1, deadline - time.monotonic()))
                while self._sendq:
                    self.sock.sendall(self._sendq.pop(0))
                self.sock.sendall(wire.pack(dict(end, type="end")))
                while True:
                    msgs = self._reader.recv_from(self.sock)
                    if msgs is None:
                        raise OSError("agent went away")
                    for header, _ in msgs:
                        if header["type"] == "ack" and header.get("seq") == "end":
                            self.sock.close()
                            return True
                        if header["type"] == "ack":
                            self._unacked.pop(header.get("seq"), None)
            except (OSError, wire.ProtocolError):
                self._broken()
        return False


def default_hello(mode: str, command: str, cols: int, rows: int) -> dict:
    shown = text(command)
    hello = {"type": "hello", "mode": mode, "command": shown[:wire.COMMAND_MAX], "cols": cols,
             "rows": rows, "term": text(os.environ.get("TERM", ""))[:wire.TERM_MAX]}
    if len(shown) > wire.COMMAND_MAX:
        hello["command_bytes"] = len(command.encode("utf-8", "surrogateescape"))
    return hello


def text(value: str) -> str:
    """`value` as the agent can store it. What sshd hands us (the command, TERM) is bytes, and
    need not be UTF-8: a file named in Latin-1 is `scp -f caf\xe9.txt`. Python gives such bytes
    to us as lone surrogates, which encode to nothing; the events show them as U+FFFD, as host
    events show such paths. The program itself gets the bytes as they came."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
