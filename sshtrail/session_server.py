"""The agent's side of session recording: a unix socket where session wrappers deliver
recordings, written to the spool.

Wrappers run as the logged-in user, so everything a peer says is suspect. Who it is comes from
the kernel (SO_PEERCRED: pid, uid); that it is a wrapper started by sshd is checked in /proc (its
parent and grandparent are sshd: the user's session process and the root monitor, and only
sshd's ForceCommand can make a process whose parent is sshd); the sid comes from that monitor
(sshtrail.sessionid), the same one the PAM hook derived. A frame batch is acknowledged only
once it is in the spool, so a wrapper re-sends whatever an agent that died never confirmed.

PAM hooks (root, by SO_PEERCRED) hand their calls over here too, to be written by a process
that has the spool open already (pam_module.hook._via_agent).

Anyone may connect (the socket is 0666), a session's user included, who may want recording to
stop for everyone: each connection costs the agent a thread and a descriptor until it ends. So
a connection must say hello within HELLO_TIMEOUT (a wrapper says it as it connects), and a
user may have at most PENDING_PER_UID connections that have not said it yet; more are closed
as they are accepted, before any thread is started for them. Refused connections become
`agent.peer_refused` events, counted per user (take_refusals), so a flood is seen, not stored
one event per connection.
"""
from __future__ import annotations

import errno
import logging
import os
import pwd
import signal
import socket
import socketserver
import struct
import threading
import time

from . import events, procfs, sessionid, wire
from .spool import Spool, SpoolError

log = logging.getLogger("sshtrail.agent.sessions")
# Spool connections kept open for the next wrapper (more are opened while more sessions talk at
# once, and closed once they are done).
IDLE_SPOOLS = 8
# What a connection that is not a wrapper's may hold up (see the module's docstring). One user's
# sessions starting at once each say hello within milliseconds of connecting.
HELLO_TIMEOUT = 5.0
PENDING_PER_UID = 32
# A hello (or a PAM call) is a few hundred bytes, and never more than ~25 KiB (its command is
# cut to wire.COMMAND_MAX characters): no connection is let buffer megabytes before it has said
# who it is.
FIRST_MESSAGE_MAX = 64 << 10
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # Linux 6.5; Python 3.11 has no name for it
# Root's connections are PAM hooks' calls and are not counted: root needs no flood to stop us.
_UNCOUNTED_UID = 0


class PeerRefused(Exception):
    pass


def sshd_monitor_of(pid: int, uid: int) -> tuple[int, str | None]:
    """The root sshd process serving the connection a wrapper belongs to, and the login shell
    between them if there is one. sshd starts the wrapper through the user's login shell: bash,
    zsh and dash exec it, so its parent is sshd; tcsh and fish fork it, so its parent is that
    shell, itself sshd's child. Nothing else between them is taken: a program inside a session
    has the wrapper or its shell above it."""
    shell = None
    try:
        parent = procfs.parent(pid)
        if not procfs.is_sshd(parent) and _runs_login_shell(parent, uid):
            shell = os.readlink(f"/proc/{parent}/exe")
            parent = procfs.parent(parent)
        monitor = procfs.parent(parent)
    except (procfs.ProcessGone, FileNotFoundError, ProcessLookupError, ValueError):
        raise PeerRefused(f"process {pid} vanished") from None
    except OSError as e:  # the agent's own trouble (out of descriptors, say): not the peer's
        raise PeerRefused(f"could not read process {pid}'s parents in /proc: {e}") from None
    if not (procfs.is_sshd(parent) and procfs.is_root_sshd(monitor)):
        raise PeerRefused(f"process {pid} was not started by sshd (parent {parent}, {monitor})")
    return monitor, shell


def _child_of_sshd(pid: int) -> bool:
    try:
        return procfs.is_sshd(procfs.parent(pid))
    except (OSError, ValueError):
        return False


def _runs_login_shell(pid: int, uid: int) -> bool:
    """The process runs as `uid` and its program is that user's login shell (the kernel's
    word, /proc/PID/exe)."""
    try:
        shell = os.path.realpath(pwd.getpwuid(uid).pw_shell)
        return procfs.real_uid(pid) == uid and os.readlink(f"/proc/{pid}/exe") == shell
    except (OSError, KeyError):
        return False


class _Handler(socketserver.BaseRequestHandler):
    server: "SessionServer"

    def handle(self) -> None:
        sock: socket.socket = self.request
        pid, uid = peer_of(sock)
        session = None
        pending = True  # counted in the server's pending connections until its first message
        sock.settimeout(self.server.hello_timeout)
        # Receives straight into a buffer kept for the connection: a fresh 1 MiB buffer per
        # receive cost page faults and a copy for every batch of every session.
        reader = wire.Reader(1 << 18, limit=FIRST_MESSAGE_MAX)
        still_there = lambda: peer_alive(sock)  # noqa: E731 - asked at the hello only
        try:
            while True:
                msgs = reader.recv_from(sock)
                if msgs is None:
                    break
                for header, payload in msgs:
                    reply, session = self.server.handle_message(session, pid, uid, header,
                                                                payload, still_there)
                    if pending:
                        pending = False
                        self.server.said_hello(uid)
                        sock.settimeout(None)
                        reader.limit = wire.MAX_MESSAGE
                    if reply:
                        sock.sendall(wire.pack(reply))
                    if header["type"] in ("end", "pam"):
                        return
        except TimeoutError:  # only while pending: no timeout once it has spoken
            self.server.refused(uid, pid, f"it sent no whole first message within "
                                          f"{self.server.hello_timeout:g} s")
        except (PeerRefused, wire.ProtocolError) as e:
            self.server.refused(uid, pid, str(e))
            try:
                sock.sendall(wire.pack({"type": "refused", "reason": str(e)}))
            except OSError:
                pass
        except SpoolError as e:
            # Not the wrapper's fault: drop the connection; it keeps what we never acknowledged
            # and delivers it again when it reconnects.
            log.error("recording %s: %s; the wrapper will re-send", session and session["sid"], e)
            session = None
        except OSError:
            pass
        finally:
            if pending:
                self.server.said_hello(uid)
            if session and not session.get("ended") and not self.server.stopping.is_set():
                self.server.lost(session)
            self.server.release_spool()


def peer_alive(sock: socket.socket) -> bool:
    """Is the process that connected still there? A pid SO_PEERCRED gave may be another
    process's once it has ended; the pidfd SO_PEERPIDFD gives (Linux 6.5) is that process's
    for good. On an older kernel: True, and the pid is taken as before."""
    try:
        fd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError as e:
        return e.errno in (errno.ENOPROTOOPT, errno.EOPNOTSUPP)  # else ESRCH: gone, reaped
    try:
        signal.pidfd_send_signal(fd, 0)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)


def peer_of(sock: socket.socket) -> tuple[int, int]:
    """The connecting process's pid and uid, from the kernel."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _ = struct.unpack("3i", creds)
    return pid, uid


class SessionServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    # A login brings its PAM calls and its wrapper: socketserver's backlog of 5 made a burst of
    # logins find it full, and a unix socket refuses (EAGAIN) rather than queue the connect.
    request_queue_size = 256

    def __init__(self, cfg, on_session=None, strict_for=None, on_login=None):
        self.cfg = cfg
        self.on_session = on_session
        self.on_login = on_login
        self.strict_for = strict_for or cfg.strict_for  # (login, gid) -> must be recorded
        self.stopping = threading.Event()
        self._local = threading.local()
        # Spool connections between wrappers: each connection has a thread, and a thread its
        # own connection (SQLite's), taken from here and given back when it is done.
        self._idle: list[Spool] = []
        self._idle_lock = threading.Lock()
        # Connections not past their first message, per uid; refusals not yet reported, per uid:
        # [count, first reason, first pid, first time].
        self.hello_timeout = HELLO_TIMEOUT
        self.pending_per_uid = PENDING_PER_UID
        self._pending: dict[int, int] = {}
        self._refusals: dict[int, list] = {}
        self._peers_lock = threading.Lock()
        path = cfg["agent.socket"]
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        if os.path.exists(path):
            os.unlink(path)
        super().__init__(path, _Handler)
        # Any user may connect: what they may do is decided from their kernel credentials.
        os.chmod(path, 0o666)

    @property
    def spool(self) -> Spool:
        spool = getattr(self._local, "spool", None)
        if spool is None:
            with self._idle_lock:
                spool = self._idle.pop() if self._idle else None
            if spool is None:
                # NORMAL: a batch survives the agent being killed (what the wrapper's re-send
                # covers) without an fsync per 256 KiB of someone's terminal output.
                spool = Spool.from_config(self.cfg, synchronous="NORMAL", any_thread=True)
            self._local.spool = spool
        return spool

    def release_spool(self) -> None:
        """The calling thread is done with its spool connection: keep it for the next one."""
        spool = getattr(self._local, "spool", None)
        if spool is None:
            return
        self._local.spool = None
        if spool.db.in_transaction:  # left half-way by an error: not for anyone else
            spool.close()
            return
        with self._idle_lock:
            keep = len(self._idle) < IDLE_SPOOLS and not self.stopping.is_set()
            if keep:
                self._idle.append(spool)
        if not keep:
            spool.close()

    # -- who may hold a connection -----------------------------------------------------------

    def verify_request(self, request, client_address) -> bool:
        """socketserver's check, in the accepting thread, before a thread is started for the
        connection: past its uid's share of pending connections, it is closed at once."""
        try:
            pid, uid = peer_of(request)
        except OSError:
            return False
        with self._peers_lock:
            held = self._pending.get(uid, 0)
            if uid == _UNCOUNTED_UID or held < self.pending_per_uid:
                self._pending[uid] = held + 1
                return True
        # Past it, a process whose parent is sshd (a wrapper, as ForceCommand starts it) still
        # comes in: a user flooding the socket must not keep their own sessions unrecorded.
        if _child_of_sshd(pid):
            with self._peers_lock:
                self._pending[uid] = self._pending.get(uid, 0) + 1
            return True
        self.refused(uid, pid, f"{held} connections of this user had not said hello yet, the "
                               f"most one user may hold")
        try:
            request.send(wire.pack({"type": "refused", "reason": "too many connections of "
                                    "yours are waiting; try again"}), socket.MSG_DONTWAIT)
        except OSError:
            pass
        return False

    def process_request(self, request, client_address) -> None:
        try:
            super().process_request(request, client_address)  # starts the connection's thread
        except BaseException:
            self.said_hello(peer_of(request)[1])  # no thread will
            raise

    def said_hello(self, uid: int) -> None:
        """A connection of `uid` is past its first message, or gone before it."""
        with self._peers_lock:
            left = self._pending.get(uid, 0) - 1
            if left > 0:
                self._pending[uid] = left
            else:
                self._pending.pop(uid, None)

    def refused(self, uid: int, pid: int, reason: str) -> None:
        """Count a refused connection for take_refusals(); the log says the first of each
        user between two reports, so that a flood does not flood the log either."""
        with self._peers_lock:
            seen = self._refusals.get(uid)
            if seen is None:
                self._refusals[uid] = [1, reason, pid, time.time()]
            else:
                seen[0] += 1
        if seen is None:
            log.warning("peer pid %d uid %d refused: %s", pid, uid, reason)

    def take_refusals(self) -> list[dict]:
        """The refusals since the last call, as one `agent.peer_refused` event per user, at
        the time of its first."""
        with self._peers_lock:
            taken, self._refusals = self._refusals, {}
        evs = []
        for uid, (count, reason, pid, at) in sorted(taken.items()):
            try:
                login = {"login": pwd.getpwuid(uid).pw_name}
            except KeyError:
                login = {}
            evs.append(events.new(
                "agent.peer_refused", at=at, user_id=uid, count=count, pid=pid,
                reason=reason[:1000],
                message=f"{count} connection(s) to the session socket refused; the first, of "
                        f"process {pid}: {reason}"[:1000], **login))
        return evs

    def stop(self) -> None:
        self.stopping.set()
        self.shutdown()
        self.server_close()
        with self._idle_lock:
            idle, self._idle = self._idle, []
        for spool in idle:
            spool.close()
        try:
            os.unlink(self.cfg["agent.socket"])
        except OSError:
            pass

    # -- messages ----------------------------------------------------------------------------

    def handle_message(self, session, pid, uid, header, payload, still_there=None):
        """One message of a connection from process `pid` (uid); returns the reply and the
        connection's session. `still_there()`: is the process that connected still alive (so
        `pid` is still its)?"""
        kind = header["type"]
        if kind == "hello":
            return self._hello(pid, uid, header, still_there)
        if kind == "pam" and session is None:
            return self._pam(uid, header), None
        if session is None:
            raise wire.ProtocolError(f"{kind} before hello")
        if kind == "frames":
            seq = header.get("seq")
            if type(seq) is not int or not 1 <= seq < 1 << 62:  # a bool is an int too
                raise wire.ProtocolError("frames without a valid seq")
            if len(payload) > wire.MAX_CHUNK:  # stored, it could never be uploaded
                raise wire.ProtocolError(f"frames of {len(payload)} bytes, over the "
                                         f"{wire.MAX_CHUNK} one recording chunk may hold")
            out = wire.output_size(payload)  # rejects garbage before it is stored
            self.spool.put_chunk(session["sid"], seq, payload, out)
            dropped = _int(header.get("dropped"), 0)
            if dropped and not session.get("dropping"):
                # Said now, once: the end that gives the total may never come (a killed wrapper).
                session["dropping"] = True
                self.spool.append(events.new(
                    "session.recording_failed", sid=session["sid"], login=session["login"],
                    dropped_bytes=dropped, reason=(
                        f"output is being dropped from the recording ({dropped} bytes so far): "
                        "the agent was slow or away and the wrapper's buffer was full")))
            return {"type": "ack", "seq": seq}, session
        if kind == "end":
            self._end(session, header)
            session["ended"] = True
            return {"type": "ack", "seq": "end"}, session
        raise wire.ProtocolError(f"unknown message type {kind!r}")

    def _pam(self, uid, header):
        """A PAM hook's call, written here for it (see pam_module.hook._via_agent): as the hook
        itself would, into the spool the hook names, which must be ours."""
        if uid != 0:
            raise PeerRefused("PAM calls are taken from root only")
        if header.get("spool") != self.cfg["spool.path"]:
            raise PeerRefused(f"this agent writes {self.cfg['spool.path']}, not "
                              f"{header.get('spool')!r}")
        from pam_module import hook
        try:
            call = hook.PamCall.from_message(header)
        except hook.HookError as e:
            raise wire.ProtocolError(str(e)) from None
        # Its own spool, synchronous FULL as the hook's: a login is evidence, not a terminal's
        # output. (One call per connection, and a thread per connection: nothing to keep.)
        spool = Spool.from_config(self.cfg)
        try:
            hook.record(self.cfg, call, spool=spool, on_login=self.on_login)
        finally:
            spool.close()
        return {"type": "ack", "seq": "pam"}

    def _hello(self, pid, uid, header, still_there=None):
        monitor, shell = sshd_monitor_of(pid, uid)
        started = procfs.start_time(pid)
        if still_there is not None and not still_there():
            # Asked after reading /proc: alive then, it was alive while we read, and its pid
            # was its own. Gone, the pid may be a wrapper's now, and the connection another's
            # (inherited, or passed): what /proc said is not about the peer.
            raise PeerRefused(f"process {pid} ended before its hello was read")
        pw = pwd.getpwuid(uid)
        login = pw.pw_name
        if shell and self.strict_for(login, pw.pw_gid):
            # Such a shell ran the user's own startup file before this process, which may be
            # anything posing as the wrapper: a session that must be recorded cannot rest on it.
            raise PeerRefused(f"the login shell {shell} runs the user's own startup files "
                              "before the session recorder, and this account must be recorded: "
                              "its administrator can give it bash, zsh or sh")
        resume = header.get("resume")
        if resume:
            row = self.spool.recording(resume)
            if not row or row["wrapper_pid"] != pid or row["wrapper_start"] != started:
                raise PeerRefused(f"resume of {resume!r} by a process that did not start it")
            sid = resume
        else:
            spool = self.spool
            sid = sessionid.derive(spool.server_id, procfs.boot_id(), monitor,
                                   procfs.start_time(monitor))
            if spool.recording(sid):  # a second channel of the same connection (multiplexing)
                sid = events.new_uid()
            mode = "interactive" if header.get("mode") == "interactive" else "exec"
            spool.start_recording(
                sid=sid, login=login, mode=mode,
                command=str(header.get("command", ""))[:wire.COMMAND_MAX],
                term=str(header.get("term", ""))[:wire.TERM_MAX],
                cols=_int(header.get("cols"), 80, 0xFFFF),
                rows=_int(header.get("rows"), 24, 0xFFFF), started=time.time(),
                wrapper_pid=pid, wrapper_start=started)
            if header.get("late"):
                spool.append(events.new("session.recording_failed", sid=sid, login=login,
                                        reason=f"the agent was unreachable when the session "
                                               f"started: {header['late']}"[:1000]))
        session = {"sid": sid, "login": login, "pid": pid}
        if _int(header.get("command_bytes"), 0):  # the command was longer than the hello holds
            session["command_bytes"] = header["command_bytes"]
        log.info("recording %s for %s (wrapper pid %d)", sid, login, pid)
        if self.on_session:  # a resume too: this may be a new agent, whose tracer never knew it
            self.on_session(pid, sid, login)
        return {"type": "welcome", "sid": sid}, session

    def _end(self, session, header):
        sid, login = session["sid"], session["login"]
        row = self.spool.recording(sid)
        now = time.time()  # the events' time and the recording's end: the same instant
        status = header.get("exit_status")  # a wait status's: -signal, or the exit code
        status = status if type(status) is int and -128 <= status <= 255 else None
        evs = []
        common = {"sid": sid, "login": login}
        cut = {"command_bytes": session["command_bytes"]} if "command_bytes" in session else {}
        reason = str(header.get("reason", "exited"))[:200]
        why = {"end_reason": reason} if reason != "exited" else {}  # a signal ended it
        duration = round(now - row["started"], 6)
        if row["mode"] == "exec":
            evs.append(events.new("exec", at=now, command=row["command"], exit_status=status,
                                  bytes_in=_int(header.get("bytes_in"), 0),
                                  bytes_out=_int(header.get("bytes_out"), 0),
                                  duration=duration, **cut, **why, **common))
        if row["chunks"] or row["mode"] == "interactive":
            evs.append(events.new("session.recording", at=now, size=row["bytes_out"],
                                  stored=row["stored_bytes"], duration=duration,
                                  exit_status=status, **cut, **why, **common))
        dropped = _int(header.get("dropped_bytes"), 0)
        if dropped:
            evs.append(events.new("session.recording_failed", at=now, reason=(
                f"{dropped} bytes of output were not recorded: the agent was slow or away and "
                "the wrapper's buffer was full"), dropped_bytes=dropped, **common))
        if row["dropped_bytes"]:
            evs.append(events.new("session.recording_failed", at=now, reason=(
                f"{row['dropped_bytes']} bytes of output were not recorded: the spool was full "
                f"(spool.max_bytes) of events not yet delivered"),
                dropped_bytes=row["dropped_bytes"], **common))
        fields = {}
        if row["mode"] == "exec" and not row["chunks"]:
            fields["bytes_out"] = _int(header.get("bytes_out"), 0)  # passed through, not recorded
        self.spool.end_recording(sid, *evs, ended=now, exit_status=status, end_reason=reason,
                                 **fields)

    def lost(self, session) -> None:
        """The wrapper went away without an end: killed, or crashed."""
        sid = session["sid"]
        reason = ("the session wrapper went away without reporting an end (killed or crashed): "
                  "output it had not handed over yet (up to recording.batch_ms of it, more if "
                  "the agent was slow) is not in the recording")
        # A killed process closes its sockets while it is still exiting: give it a moment.
        deadline = time.monotonic() + 1.0
        while (alive := procfs.alive(session["pid"])) and time.monotonic() < deadline:
            time.sleep(0.02)
        if alive:
            reason = "the session wrapper closed its connection to the agent without an end"
        _end_unreported(self.spool, self.spool.recording(sid), reason, time.time())


def close_orphans(spool) -> int:
    """End the recordings whose wrapper died while no agent ran (its end was never told, and
    no connection of it is left to lose): at the agent's start, once live wrappers have had the
    time to come back. Their end is taken as their last frame. Returns how many."""
    table = procfs.table()
    found = 0
    for row in spool.recordings():
        if row["ended"] is None and \
                table.get(row["wrapper_pid"], (0, None))[1] != row["wrapper_start"]:
            last = spool.last_frame_time(row["sid"])
            _end_unreported(spool, row, "the session wrapper ended while the agent was not "
                            "running: its end, exit status and any output it had not handed "
                            "over are unknown; the end given is its last recorded output "
                            "(its start if none)", row["started"] + (last or 0.0))
            found += 1
    return found


def _end_unreported(spool, row, reason: str, ended: float) -> None:
    """End a recording whose wrapper never said how it ended, with the events an end would
    have had (exit status unknown), saying so. A command's is its `exec` event: without it, the
    command of a killed `ssh host cmd` was in no event at all."""
    common = {"sid": row["sid"], "login": row["login"], "end_reason": reason,
              "duration": round(ended - row["started"], 6)}
    evs = []
    if row["mode"] == "exec":
        evs.append(events.new("exec", at=ended, command=row["command"], exit_status=None,
                              **common))
    if row["chunks"] or row["mode"] == "interactive":
        evs.append(events.new("session.recording", at=ended, size=row["bytes_out"],
                              stored=row["stored_bytes"], **common))
    spool.end_recording(row["sid"], *evs, ended=ended, end_reason=reason)
    log.warning("recording %s: %s", row["sid"], reason)


def _int(value, default: int, most: int = (1 << 63) - 1) -> int:
    """A count from the wrapper, or `default`: SQLite stores integers of 64 bits, and raised
    OverflowError, which no handler expects, for a bigger one."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= most:
        return value
    return default


def serve(cfg, on_session=None, strict_for=None, on_login=None) -> SessionServer:
    """Start the server on a thread of its own; stop() it when done. `on_session(pid, sid,
    login)` is told of every new session's wrapper (the host-event tracer follows it);
    `strict_for(login, gid)` says who must be recorded (default: by `cfg`); `on_login(pid,
    start, sid, login)` of every PAM session opened through the agent, by its sshd process."""
    server = SessionServer(cfg, on_session, strict_for, on_login)
    threading.Thread(target=server.serve_forever, name="sessions", daemon=True).start()
    return server
