"""Non-interactive sessions (`ssh host cmd`, scp, sftp, rsync, git): the command runs on pipes
of ours, and every byte is passed on unchanged in both directions, counted, and recorded only
if config asks for it.

Each direction holds at most one chunk: it reads only when its chunk went out, and waits for the
other end to take it, so a slow reader slows the writer exactly as a direct pipe would, and no
direction can stall another (scp's lockstep protocol would deadlock on a relay that blocks).
EOF is passed on when it comes: the command's stdout closing closes ours, the client's stdin
closing closes the command's.

The command runs in the wrapper's process group, and what signals that group (a shutdown, which
signals every process of the session; sshd's signal request, which signals the group) reaches
the command itself. The wrapper must not die of it first: its default action killed the wrapper
on the spot, before the command's output and exit, and the session read as crashed. So the
wrapper takes them as events, lets the command decide, and says in the end that one came.
"""
from __future__ import annotations

import errno
import os
import select
# The C module, not socket.py: its enum wrappers cost ~5 ms of every session's start.
from _socket import SHUT_WR, socket

# The C module, not signal.py: its enum wrappers cost ~5 ms of every session's start.
import _signal as signal

from session_wrapper.program import exec_program
from sshtrail.wakeup import SignalPipe

CHUNK = 65536
# Whose default action would end the wrapper, by name.
TAKEN = {signal.SIGHUP: "SIGHUP", signal.SIGINT: "SIGINT", signal.SIGQUIT: "SIGQUIT",
         signal.SIGTERM: "SIGTERM", signal.SIGUSR1: "SIGUSR1", signal.SIGUSR2: "SIGUSR2",
         signal.SIGALRM: "SIGALRM"}


class _Stream:
    def __init__(self, src: int, dst: int, kind: bytes | None):
        self.src, self.dst, self.kind = src, dst, kind
        self.buf = b""
        self.eof = False
        self.count = 0

    @property
    def done(self) -> bool:
        return self.eof and not self.buf


def run(path: str, argv: list[str], env: dict, client, *, record: bool
        ) -> tuple[int, int, int, str | None]:
    """Run the command; returns (wait status, bytes in, bytes out, the first signal the wrapper
    was sent meanwhile)."""
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            for fd, target in ((in_r, 0), (out_w, 1), (err_w, 2)):
                os.dup2(fd, target)
            for fd in (in_r, in_w, out_r, out_w, err_r, err_w):
                os.close(fd)
        except OSError:
            os._exit(127)
        exec_program(path, argv, env)
    for fd in (in_r, out_w, err_w):
        os.close(fd)
    signals = SignalPipe(TAKEN)
    came = None
    streams = [_Stream(0, in_w, None), _Stream(out_r, 1, b"o" if record else None),
               _Stream(err_r, 2, b"o" if record else None)]
    for s in streams:
        os.set_blocking(s.src, False)
        os.set_blocking(s.dst, False)
    try:
        while not all(s.done for s in streams[1:]):
            rlist = [s.src for s in streams if not s.buf and not s.eof] + [signals.fd]
            wlist = [s.dst for s in streams if s.buf]
            if client is not None and client.sock is not None:
                rlist.append(client.fileno())
                if client.wants_write():
                    wlist.append(client.fileno())
            try:
                r, w, _ = select.select(rlist, wlist, [], client.timeout() if client else None)
            except InterruptedError:
                continue
            if signals.fd in r:
                for number in signals.read():
                    came = came or TAKEN.get(number)
            for s in streams:
                if s.src in r and not s.buf and not s.eof:
                    try:
                        data = os.read(s.src, CHUNK)
                    except BlockingIOError:
                        continue
                    except OSError as e:
                        if e.errno != errno.EIO:
                            raise
                        data = b""
                    if not data:
                        s.eof = True
                        _close_dst(s)
                        continue
                    s.count += len(data)
                    if s.kind and client is not None:
                        client.add(s.kind, data)
                    s.buf = data
                    _flush(s)
                elif s.dst in w and s.buf:
                    _flush(s)
            if client is not None:
                if client.sock is not None and client.fileno() in w:
                    client.pump_write()
                if client.sock is not None and client.fileno() in r:
                    client.pump_read()
                client.tick()
    finally:
        for s in streams:
            for fd in (s.src, s.dst):
                if fd > 2:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
    _, status = os.waitpid(pid, 0)  # the signals still taken: one now must not end us either
    for number in signals.read():
        came = came or TAKEN.get(number)
    signals.close()
    return status, streams[0].count, streams[1].count + streams[2].count, came


def _flush(s: _Stream) -> None:
    try:
        n = os.write(s.dst, s.buf)
    except BlockingIOError:
        return
    except BrokenPipeError:
        # The reader is gone (the command closed its stdin, or the client went away): what it
        # would have read is discarded, as a direct pipe would have it fail.
        s.buf, s.eof = b"", True
        _close_src(s)
        return
    s.buf = s.buf[n:]
    if s.eof and not s.buf:
        _close_dst(s)


def _close_dst(s: _Stream) -> None:
    if s.buf:
        return  # closed once the last chunk is out
    if s.dst > 2:
        os.close(s.dst)
        s.dst = -1
    elif s.dst in (1, 2):
        # sshd may hand a non-pty session one socket as both stdin and stdout: closing fd 1
        # alone would not end the stream while fd 0 holds the same socket open.
        try:
            socket(fileno=os.dup(s.dst)).shutdown(SHUT_WR)
        except OSError:
            pass  # a pipe: closing is enough
        os.close(s.dst)
        s.dst = -1


def _close_src(s: _Stream) -> None:
    if s.src > 2:
        os.close(s.src)
        s.src = -1
