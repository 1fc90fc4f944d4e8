"""The PTY relay: one loop between the user's terminal (sshd's pty on fds 0/1) and a pty of our
own that the session's program runs in, recording what passes.

Signals arrive as bytes on a pipe (signal.set_wakeup_fd), not as handlers racing the loop:
SIGWINCH resizes our pty and records an "r" frame; SIGCHLD ends the loop once the program is
gone and its output drained. SIGHUP (sshd's pty hung up: the client went away) and SIGTERM end
the session as sshd's own hangup would, but told: the program's group gets SIGHUP, what it
writes until it exits is recorded, and the end says why (left to their default, either killed
the wrapper on the spot, its last batch and the end lost, the session listed as crashed).

Output passes through a buffer of at most OUT_CAP bytes, with both sides non-blocking: we keep
reading the program while sshd drains the terminal (pipelined, not lockstep), and stop reading
when the buffer is full (a slow client slows the program, nothing piles up). Input likewise,
through at most IN_CAP bytes: a program that reads no input while it writes (a paste into
`yes`) must not stop its output, as sshd alone would not; waiting for it to take the input,
the relay would stop reading its output, and both would wait for ever. The agent never holds
anything up: frames go to AgentClient, which batches them and sends only when its socket is
writable.
"""
from __future__ import annotations

import errno
import fcntl
import os
import select
import struct
import termios
import time
import tty

# The C module, not signal.py: its enum wrappers (enum itself) cost ~5 ms of every session's
# start, and the relay needs only numbers and handlers.
import _signal as signal

from session_wrapper.program import exec_program
from sshtrail.wakeup import SignalPipe

CHUNK = 65536
# One pass takes what the pty has (a pty hands out ~4 KiB per read) into one frame: a frame per
# 4 KiB cost the relay half its CPU.
OUT_CAP = 256 * 1024
IN_CAP = CHUNK  # past it, sshd holds the client's input, as it does for a program of its own
# After a hangup, how long the program has to exit: one that ignores SIGHUP (nohup, a trap) is
# left running, as sshd leaves it, and the session ends without its exit status.
HANGUP_GRACE = 2.0


def get_winsize(fd: int) -> tuple[int, int]:
    try:
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
        return (cols or 80, rows or 24)
    except OSError:
        return (80, 24)


def set_winsize(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _write_all(fd: int, data: bytes) -> None:
    """Blocking, for the end: the program is gone, and sshd takes what it left."""
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


def _to_program(master: int, data) -> int:
    """Write what the program's pty takes of `data` now; returns how many bytes are done with.
    Once the program's side is gone (EIO), all of them: what it never read goes with it."""
    try:
        return os.write(master, data)
    except BlockingIOError:
        return 0
    except OSError as e:
        if e.errno != errno.EIO:
            raise
        return len(data)


# As they come from the signal pipe.
WINCH, CHLD = bytes([signal.SIGWINCH]), bytes([signal.SIGCHLD])
HUP, TERM = bytes([signal.SIGHUP]), bytes([signal.SIGTERM])
# Signals to the wrapper's process group (sshd's signal request), whose default action would end
# the wrapper (SIGINT with a traceback to the terminal): the program, in a session of its own,
# is not in that group; the wrapper goes on relaying.
IGNORED = (signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM)


def _register(poller, fd: int, old: int, new: int) -> int:
    """Change what fd is polled for from `old` to `new` events (0: not polled); returns new."""
    if new:
        poller.register(fd, new)  # registers, or modifies a registration
    elif old:
        poller.unregister(fd)
    return new


def hold_exclusive(fd: int) -> None:
    """No more opens of the terminal on fd but root's (TIOCEXCL). sshd's pty belongs to the
    user: a program in the session that opened its /dev/pts/N could write to the client and read
    from it past the recording. (A tty opened before this keeps its descriptor: see README.)"""
    try:
        fcntl.ioctl(fd, termios.TIOCEXCL)
    except OSError:
        pass  # not a tty: nothing to hold


def relay(path: str, argv: list[str], env: dict, client, *, record_input: bool,
          strict: bool = False) -> tuple[int | None, str | None]:
    """Run argv in a new pty, relay until it exits; returns its wait status (None: it had not
    exited HANGUP_GRACE after a hangup) and, when a signal ended the session, why. `strict`: end
    the session if the agent goes away (recording is required)."""
    cols, rows = get_winsize(0)
    try:
        # The client's terminal modes, which sshd set on its pty (erase ^H, say): the program's
        # pty has them too, as it would have had sshd's. A new pty has the kernel's defaults.
        modes = termios.tcgetattr(0)
    except termios.error:
        modes = None
    pid, master = os.forkpty()
    if pid == 0:
        if modes is not None:
            try:
                termios.tcsetattr(0, termios.TCSANOW, modes)
            except termios.error:
                pass
        if "SSH_TTY" in env:  # the program's terminal, as sshd's SSH_TTY is: sshd's own is held
            try:              # exclusive (hold_exclusive), and opening it fails
                env["SSH_TTY"] = os.ttyname(0)
            except OSError:
                pass
        exec_program(path, argv, env)
    set_winsize(master, cols, rows)
    os.set_blocking(master, False)

    signals = SignalPipe((signal.SIGWINCH, signal.SIGCHLD, signal.SIGHUP, signal.SIGTERM,
                          *IGNORED))
    sig_r = signals.fd
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
    ended_by = None  # the signal that ends the session, once one came
    left_behind = False  # it came after the program's exit, as we drained what it left
    give_up_at = None  # when to stop waiting for the program after it
    tty_gone = False  # sshd's pty hung up: nothing more goes to it
    out = bytearray()
    inq = bytearray()  # input the program has not taken yet
    os.set_blocking(1, False)  # fd 0 shares it (sshd's pty): poll says when each may go
    IN, OUT = select.POLLIN, select.POLLOUT
    poller = select.poll()
    poller.register(sig_r, IN)
    # What master, fd 0, fd 1 and the agent's socket are registered for (0: not at all). The
    # loop costs CPU per pass, and a pass of streaming output, the pass that counts, is one
    # poll, one read and one write; everything else is looked at only when it changed.
    m_ev = in_ev = out_ev = a_ev = 0
    agent_sock, agent_fd = None, -1
    read, write, monotonic = os.read, os.write, time.monotonic
    now = monotonic()
    try:
        while True:
            ev = ((IN if len(out) < OUT_CAP else 0) | (OUT if inq else 0)) if master_open else 0
            if ev != m_ev:
                m_ev = _register(poller, master, m_ev, ev)
            ev = IN if stdin_open and len(inq) < IN_CAP else 0
            if ev != in_ev:
                in_ev = _register(poller, 0, in_ev, ev)
            ev = OUT if out else 0
            if ev != out_ev:
                out_ev = _register(poller, 1, out_ev, ev)
            if client.sock is not agent_sock:  # connected, lost or reconnected
                a_ev = _register(poller, agent_fd, a_ev, 0)
                agent_sock = client.sock
                agent_fd = agent_sock.fileno() if agent_sock is not None else -1
            if agent_sock is not None:
                ev = IN | OUT if client.wants_write() else IN
                if ev != a_ev:
                    a_ev = _register(poller, agent_fd, a_ev, ev)
            wake = client.wake_at
            timeout = None if wake is None else max(0.0, wake - now) * 1000
            if status is not None:  # only drain what the program left: do not wait for more
                timeout = 50 if timeout is None else min(timeout, 50)
            if give_up_at is not None:
                left = max(0.0, give_up_at - now) * 1000
                timeout = left if timeout is None else min(timeout, left)
            try:
                events = poller.poll(timeout)
            except InterruptedError:
                continue
            now = monotonic()
            r_master = r_stdin = r_out = r_sig = r_agent = 0
            for fd, ev in events:
                if fd == master:
                    r_master = ev
                elif fd == 1:
                    r_out = ev
                elif fd == 0:
                    r_stdin = ev
                elif fd == sig_r:
                    r_sig = ev
                elif fd == agent_fd:
                    r_agent = ev
            if r_sig:
                sigs = signals.read()
                if WINCH in sigs:
                    cols, rows = get_winsize(0)
                    set_winsize(master, cols, rows)
                    client.add(b"r", f"{cols}x{rows}".encode(), now)
                if status is None and CHLD in sigs:
                    done, st = os.waitpid(pid, os.WNOHANG)
                    if done:
                        status = st
                if ended_by is None and (HUP in sigs or TERM in sigs):
                    ended_by = "SIGHUP" if HUP in sigs else "SIGTERM"
                    give_up_at = now + HANGUP_GRACE
                    if HUP in sigs:  # the terminal is gone: the program's output is only recorded
                        tty_gone, stdin_open = True, False
                        out.clear()
                    if status is None:
                        _hang_up(master, pid)
                    else:  # it had exited: what still writes is what it left running
                        left_behind = True
            if r_master & ~OUT:
                # One read per wakeup: a second one mostly finds nothing, and a read that fails
                # with EAGAIN costs as much as one that works.
                try:
                    data = read(master, min(OUT_CAP - len(out), CHUNK))
                except BlockingIOError:
                    data = None
                except OSError as e:
                    if e.errno != errno.EIO:  # EIO: every holder of the pty's other side is gone
                        raise
                    data = b""
                if data:
                    client.add(b"o", data, now)
                    if tty_gone:
                        pass
                    elif not out:
                        # Straight on to the terminal: waiting for poll to say fd 1 has room
                        # would cost a pass of the loop per read.
                        try:
                            n = write(1, data)
                        except BlockingIOError:
                            n = 0
                        except OSError as e:  # EIO: hung up before its SIGHUP came
                            if e.errno != errno.EIO:
                                raise
                            tty_gone, stdin_open, n = True, False, len(data)
                        if n < len(data):
                            out += data[n:] if n else data
                    else:
                        out += data
                elif data is not None:
                    master_open = False
            elif status is not None and m_ev & IN:
                master_open = False  # the program is gone and nothing more waits on its pty
            if inq and (r_master & OUT or not master_open):
                del inq[:_to_program(master, inq) if master_open else len(inq)]
            if out and r_out:
                try:
                    del out[:write(1, out)]
                except BlockingIOError:
                    pass
                except OSError as e:
                    if e.errno != errno.EIO:
                        raise
                    tty_gone, stdin_open = True, False
                    out.clear()
            if not master_open and not out:
                break
            if give_up_at is not None and now >= give_up_at:
                break  # the program ignores the hangup: it is left running, as sshd leaves it
            if r_stdin and stdin_open:
                try:
                    data = read(0, CHUNK)
                except BlockingIOError:
                    data = None
                except OSError as e:
                    if e.errno != errno.EIO:
                        raise
                    data = b""
                if data == b"":
                    stdin_open = False  # the client sent EOF; the program sees it as ^D would
                elif data:
                    if record_input:
                        client.add(b"i", data, now)
                    if inq:  # the program has not taken what came before: after it
                        inq += data
                    else:
                        inq += data[_to_program(master, data):]
            if r_agent:
                if r_agent & OUT:
                    client.pump_write()
                if client.sock is not None and r_agent & ~OUT:
                    client.pump_read()
            if agent_sock is None or (client.wake_at is not None and now >= client.wake_at):
                client.tick()
            if strict and client.lost_agent and client.sock is None and not hung_up:
                hung_up = True
                out += (b"\r\nsshtrail: the session recorder went away, and this account "
                        b"may not work unrecorded: ending the session.\r\n")
                os.killpg(pid, signal.SIGHUP)
    finally:
        os.set_blocking(1, True)
        if out and not tty_gone:
            _write_all(1, bytes(out))
        try:
            # sshd may drop what is still in its pty once we are gone: let it read everything.
            termios.tcdrain(1)
            if saved_tty is not None:
                termios.tcsetattr(0, termios.TCSAFLUSH, saved_tty)
        except termios.error:
            pass  # hung up
        signals.close()
        os.close(master)
    if status is None:
        done, st = os.waitpid(pid, os.WNOHANG if ended_by else 0)
        status = st if done else None
    return status, ended_by and _ended_by(ended_by, status, left_behind)


def _hang_up(master: int, pid: int) -> None:
    """What a hangup of the program's terminal does (closing our side would too, but leave us
    nothing to record): SIGHUP to its session leader and its foreground process group."""
    groups = {pid}
    try:
        groups.add(os.tcgetpgrp(master))
    except OSError:
        pass
    for group in groups:
        try:
            os.killpg(group, signal.SIGHUP)
        except (ProcessLookupError, PermissionError):
            pass


def _ended_by(sig: str, status: int | None, left_behind: bool) -> str:
    why = ("the terminal hung up (the client disconnected, or a process of the user's sent "
           "SIGHUP)" if sig == "SIGHUP" else "the session wrapper was sent SIGTERM")
    if left_behind:  # the program ended by itself: its status says how
        return (f"the program had exited; then {why}, while processes it left running still "
                "wrote to its terminal")
    if status is None:
        return f"{why}; the program ignored SIGHUP and was left running"
    return f"{why}; the program was sent SIGHUP and ended"
