"""The PTY relay: one loop between the user's terminal (sshd's pty on fds 0/1) and a pty of our
own that the session's program runs in, recording what passes.

Signals arrive as bytes on a pipe (signal.set_wakeup_fd), not as handlers racing the loop:
SIGWINCH resizes our pty and records an "r" frame; SIGCHLD ends the loop once the program is
gone and its output drained. Output passes through a buffer of at most OUT_CAP bytes, with both
sides non-blocking: we keep reading the program while sshd drains the terminal (pipelined, not
lockstep), and stop reading when the buffer is full (a slow client slows the program, nothing
piles up). The agent never holds anything up: frames go to AgentClient, which batches them and
sends only when its socket is writable.
"""
from __future__ import annotations

import errno
import fcntl
import os
import select
import struct
import termios
import tty

# The C module, not signal.py: its enum wrappers (enum itself) cost ~5 ms of every session's
# start, and the relay needs only numbers and handlers.
import _signal as signal

CHUNK = 65536
# One pass takes what the pty has (a pty hands out ~4 KiB per read) into one frame: a frame per
# 4 KiB cost the relay half its CPU.
OUT_CAP = 256 * 1024


def get_winsize(fd: int) -> tuple[int, int]:
    try:
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
        return (cols or 80, rows or 24)
    except OSError:
        return (80, 24)


def set_winsize(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except InterruptedError:
            continue
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        view = view[n:]


def _read(fd: int, room: int) -> tuple[bytes, bool]:
    """One read of what the pty has now (a pty hands out at most 4 KiB a read), and whether its
    other side is gone. One read per wakeup: a second one mostly finds nothing, and a read that
    fails with EAGAIN costs as much as one that works."""
    try:
        data = os.read(fd, min(room, CHUNK))
    except BlockingIOError:
        return b"", False
    except OSError as e:
        if e.errno != errno.EIO:  # EIO: every holder of the pty's other side is gone
            raise
        return b"", True
    return data, not data


class _Poll:
    """select.poll with each fd's events set only when they change: the loop asks for the same
    set nearly every pass, and a syscall per pass is what the relay costs."""

    def __init__(self):
        self._poll = select.poll()
        self._events: dict[int, int] = {}

    def want(self, fd: int, events: int) -> None:
        if self._events.get(fd, 0) != events:
            if events:
                self._poll.register(fd, events)
                self._events[fd] = events
            else:
                self._poll.unregister(fd)
                del self._events[fd]

    def forget(self, fd: int) -> None:
        if fd in self._events:
            self._poll.unregister(fd)
            del self._events[fd]

    def poll(self, timeout: float | None) -> dict[int, int]:
        return dict(self._poll.poll(None if timeout is None else timeout * 1000))


def relay(path: str, argv: list[str], env: dict, client, *, record_input: bool,
          strict: bool = False) -> int:
    """Run argv in a new pty, relay until it exits; returns its wait status. `strict`: end the
    session if the agent goes away (recording is required)."""
    cols, rows = get_winsize(0)
    pid, master = os.forkpty()
    if pid == 0:
        try:
            os.execve(path, argv, env)
        finally:
            os._exit(127)
    set_winsize(master, cols, rows)
    os.set_blocking(master, False)

    sig_r, sig_w = os.pipe()
    for fd in (sig_r, sig_w):
        os.set_blocking(fd, False)
    old_wakeup = signal.set_wakeup_fd(sig_w)
    old_handlers = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGWINCH, signal.SIGCHLD)}
    saved_tty = None
    try:
        saved_tty = termios.tcgetattr(0)
        tty.setraw(0)
    except termios.error:
        pass

    status = None
    stdin_open = True
    master_open = True
    hung_up = False
    out = bytearray()
    os.set_blocking(1, False)  # fd 0 shares it (sshd's pty): poll says when each may go
    IN, OUT = select.POLLIN, select.POLLOUT
    poller = _Poll()
    poller.want(sig_r, IN)
    agent_fd = -1
    try:
        while True:
            reading_master = master_open and len(out) < OUT_CAP
            poller.want(master, IN if reading_master else 0)
            poller.want(0, IN if stdin_open else 0)
            poller.want(1, OUT if out else 0)
            if client.fileno() != agent_fd:  # connected, lost or reconnected
                poller.forget(agent_fd)
                agent_fd = client.fileno()
            if agent_fd >= 0:
                poller.want(agent_fd, IN | OUT if client.wants_write() else IN)
            timeout = client.timeout()
            if status is not None:  # only drain what the program left: do not wait for more
                timeout = 0.05 if timeout is None else min(timeout, 0.05)
            try:
                ready = poller.poll(timeout)
            except InterruptedError:
                continue
            if sig_r in ready:
                sigs = os.read(sig_r, 512)
                if bytes([signal.SIGWINCH]) in sigs:
                    cols, rows = get_winsize(0)
                    set_winsize(master, cols, rows)
                    client.add(b"r", f"{cols}x{rows}".encode())
                if status is None and bytes([signal.SIGCHLD]) in sigs:
                    done, st = os.waitpid(pid, os.WNOHANG)
                    if done:
                        status = st
            if master in ready:
                data, closed = _read(master, OUT_CAP - len(out))
                if data:
                    client.add(b"o", data)
                    if not out:
                        # Straight on to the terminal: waiting for poll to say fd 1 has room
                        # would cost a pass of the loop per read.
                        try:
                            n = os.write(1, data)
                        except BlockingIOError:
                            n = 0
                        if n < len(data):
                            out += data[n:] if n else data
                    else:
                        out += data
                if closed:
                    master_open = False
            elif status is not None and reading_master:
                master_open = False  # the program is gone and nothing more waits on its pty
            if out and 1 in ready:
                try:
                    del out[:os.write(1, out)]
                except BlockingIOError:
                    pass
            if not master_open and not out:
                break
            if 0 in ready:
                try:
                    data = os.read(0, CHUNK)
                except BlockingIOError:
                    data = None
                if data == b"":
                    stdin_open = False  # the client sent EOF; the program sees it as ^D would
                elif data:
                    if record_input:
                        client.add(b"i", data)
                    _write_all(master, data)  # non-blocking pty: waits for room, loses nothing
            if agent_fd >= 0 and agent_fd in ready:
                if ready[agent_fd] & OUT:
                    client.pump_write()
                if client.sock is not None and ready[agent_fd] & ~OUT:
                    client.pump_read()
            client.tick()
            if strict and client.lost_agent and client.sock is None and not hung_up:
                hung_up = True
                out += (b"\r\nsshtrail: the session recorder went away, and this account "
                        b"may not work unrecorded: ending the session.\r\n")
                os.killpg(pid, signal.SIGHUP)
    finally:
        os.set_blocking(1, True)
        if out:
            _write_all(1, bytes(out))
        try:
            # sshd may drop what is still in its pty once we are gone: let it read everything.
            termios.tcdrain(1)
        except termios.error:
            pass
        if saved_tty is not None:
            termios.tcsetattr(0, termios.TCSAFLUSH, saved_tty)
        signal.set_wakeup_fd(old_wakeup)
        for s, h in old_handlers.items():
            signal.signal(s, h)
        os.close(sig_r)
        os.close(sig_w)
        os.close(master)
    if status is None:
        _, status = os.waitpid(pid, 0)
    return status
