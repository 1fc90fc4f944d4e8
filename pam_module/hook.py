"""`sshtrail-pam`: what pam_exec.so runs in sshd's auth, account and session stacks.

Runs as root, once per PAM call, with the PAM environment (which a user can partly set through
pam_env's user_readenv). So: its config comes only from --config; the PAM line that `sshtrail
install` writes starts it as `python3 -I -S hook.py` (see `command()`), so PYTHONPATH and
friends are ignored and nothing from site-packages runs; it never asks for or reads the password
(no expose_authtok); and it ends within `pam.timeout` seconds no matter what: a watchdog thread
ends it, and SIGALRM's default action ends it if even that thread cannot run.

Fail-open (the default): pam_exec runs detach.sh, which, while the agent runs, leaves the call
in the agent's queue and returns (pam_module.queue: no Python at all); else it starts this hook
in a session of its own (`setsid -f`), 0.3 s later, and returns at once, passing the PAM
caller's pid and start time (--caller, --caller-start) and the time of the call. Logins
never wait for the recording, nor share the CPU with it: a Python start costs a PAM call ~7 ms
here, and a login makes three.
Whatever goes wrong reaches syslog (LOG_AUTHPRIV). Fail-closed (`--fail-closed`, written by
install when pam.fail_closed is true, with the PAM control `required`): pam_exec runs the hook
itself, which writes before it returns and exits non-zero if it could not, so PAM refuses the
login.
Either way the write is the agent's when it runs (_via_agent), else this process's.

What each PAM call records:
- auth, account: a pending attempt, keyed by the connection (SSH_CONNECTION). No event yet: PAM
  cannot tell this hook how the rest of the stack went (a module's result only steers jumps on
  its own line). pam_module.attempts resolves it: granted by open_session, refused by the
  sshd-log watcher with sshd's reason, or reported on its own once its connection is gone.
- open_session: `user.login` success (method and key from sshd's SSH_AUTH_INFO_0) and
  `session.start`. A session opens only after auth and account succeeded, so this is the one
  place where "granted" is certain.
- close_session: `session.end` with the same sid (derived, see sshtrail.sessionid) and duration.
"""
from __future__ import annotations

import _signal as signal  # the C module: `signal` wraps it in enums, ~2.5 ms per PAM call
import _thread
import math
import os
import sys
import syslog
import time

if __name__ == "__main__" and not __package__:
    # Started as a file, `python3 -I -S .../pam_module/hook.py`: -S skips site-packages and
    # their .pth files (20-40 ms per PAM call here). The hook needs only the stdlib and its own
    # code, whose root is the parent of this folder.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEFAULT_TIMEOUT = 3.0
_PAM_TYPES = ("auth", "account", "open_session", "close_session", "password")
_MAX_FIELD = 256
# What a PAM call is made of: the agent, recording it for the hook, gets these and no more.
_ENV = ("PAM_TYPE", "PAM_USER", "PAM_SERVICE", "PAM_TTY", "PAM_RHOST", "SSH_CONNECTION",
        "SSH_AUTH_INFO_0")
# Of pam.timeout, what a hook keeps for writing a call itself when the agent did not confirm.
_LOCAL_RESERVE = 0.5
# What a call's time may lag the moment of the call by: detach.sh reads /proc/uptime, which
# counts in hundredths of a second.
_CALL_CLOCK_STEP = 0.01
# close_session's child may run before open_session's child has written (a session of a few
# ms); it waits this long for the start row to compute the duration.
_CLOSE_WAITS_FOR_OPEN = 2.0


class HookError(Exception):
    pass


def command(python: str, config_path: str | None, *, fail_closed: bool = False,
            queue: str | None = None) -> list[str]:
    """The argv a PAM line runs: Python isolated (-I: no PYTHONPATH, no user site, no cwd on
    sys.path) and without site (-S: faster, and nothing from site-packages runs as root);
    behind detach.sh unless fail-closed, which leaves the call in `queue` (the agent's, see
    pam_module.queue) while the agent runs."""
    argv = [python, "-I", "-S", os.path.abspath(__file__)]
    if config_path:
        argv += ["--config", os.path.abspath(config_path)]
    if fail_closed:
        return argv + ["--fail-closed"]
    detach = ["/bin/sh", os.path.join(os.path.dirname(os.path.abspath(__file__)), "detach.sh")]
    return detach + (["--queue", os.path.abspath(queue)] if queue else []) + argv


def _report(message: str) -> None:
    syslog.openlog("sshtrail-pam", syslog.LOG_PID, syslog.LOG_AUTHPRIV)
    syslog.syslog(syslog.LOG_ERR, message)


class _Watchdog:
    """Ends the process at the deadline, reporting why, even while the main thread is stuck in
    C (sqlite waiting for a lock releases the GIL). _thread, not threading: ~3 ms less per call.
    Backstop: SIGALRM's default action kills us even if the GIL is never released."""

    def __init__(self, seconds: float, what: str):
        self.what = what
        self.start = time.monotonic()
        self.set(seconds)
        _thread.start_new_thread(self._run, ())

    def set(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = self.start + seconds
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(int(math.ceil(seconds)) + 1)

    def _run(self) -> None:
        while (left := self.deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.05))
        _report(f"{self.what}: gave up after {self.seconds:g}s (pam.timeout); nothing recorded")
        os._exit(3)


def _clean(name: str, value: str | None, *, required: bool = True) -> str:
    if value is None or value == "":
        if required:
            raise HookError(f"{name} is missing from the PAM environment (is this run by pam_exec.so?)")
        return ""
    if len(value) > _MAX_FIELD or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise HookError(f"{name} is not a plausible value ({len(value)} chars, control characters "
                        "or too long); refusing to record it")
    return value


def remote_address(addr: str, port: str) -> str:
    """`addr.remote` as events carry it: 'ADDR:PORT', '[ADDR]:PORT' for IPv6."""
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


class PamCall:
    """The facts of one PAM call, taken before the hook detaches (the calling sshd may be gone
    by the time the child writes) and checked: all of it comes from the PAM environment."""

    def __init__(self, env, ppid: int, now: float, *, taken: dict | None = None,
                 ppid_start: int | None = None):
        """`taken`: what the hook's process read from /proc and chose (see message()), when the
        agent records the call for it. `ppid_start`: the caller's start time, as detach.sh read
        it while the caller was surely there (else read now)."""
        self.env = {k: env[k] for k in _ENV if k in env}
        self.now = now
        self.type = _clean("PAM_TYPE", env.get("PAM_TYPE"))
        if self.type not in _PAM_TYPES:
            raise HookError(f"PAM_TYPE={self.type!r} is not one of {', '.join(_PAM_TYPES)}")
        self.user = _clean("PAM_USER", env.get("PAM_USER"))
        self.service = _clean("PAM_SERVICE", env.get("PAM_SERVICE"), required=False)
        self.tty = _clean("PAM_TTY", env.get("PAM_TTY"), required=False)
        self.rhost = _clean("PAM_RHOST", env.get("PAM_RHOST"), required=False)
        self.ppid = ppid
        if taken is None:
            from sshtrail import procfs
            if ppid_start is None:
                try:
                    ppid_start = procfs.start_time(ppid)
                except procfs.ProcessGone:
                    ppid_start = None  # sshd already gone (a very short session): see sid()
            taken = {"ppid_start": ppid_start, "boot": procfs.boot_id(),
                     "seed": os.urandom(10).hex()}
        self.ppid_start, self.boot, self.seed = taken["ppid_start"], taken["boot"], taken["seed"]
        conn = _clean("SSH_CONNECTION", env.get("SSH_CONNECTION"), required=False)
        if conn:
            parts = conn.split()
            if len(parts) != 4 or not parts[1].isdigit():
                raise HookError(f"SSH_CONNECTION={conn!r} is not 'ADDR PORT LADDR LPORT'")
            addr, port = parts[0], parts[1]
            self.conn = f"{addr} {port}"
            self.addr = remote_address(addr, port)
        else:
            # Not from sshd (su, a test through python-pam): the calling process is the key.
            self.conn = f"pid {ppid}"
            self.addr = self.rhost
        self.auth_info = env.get("SSH_AUTH_INFO_0", "")

    def message(self) -> dict:
        """The call as the agent takes it: what it needs to record it as this process would,
        down to the event uids."""
        return {"type": "pam", "env": self.env, "ppid": self.ppid, "now": self.now,
                "ppid_start": self.ppid_start, "boot": self.boot, "seed": self.seed}

    @classmethod
    def from_message(cls, m: dict) -> "PamCall":
        env, ppid, now, start, seed = (m.get(k) for k in ("env", "ppid", "now", "ppid_start",
                                                          "seed"))
        if not (isinstance(env, dict) and all(isinstance(v, str) for v in env.values())
                and type(ppid) is int and type(now) is float and isinstance(m.get("boot"), str)
                and (start is None or type(start) is int) and isinstance(seed, str)
                and len(seed) == 20 and all(c in "0123456789abcdef" for c in seed)):
            raise HookError("PAM call message with fields missing or of the wrong type")
        return cls(env, ppid, now, taken={"ppid_start": start, "boot": m["boot"], "seed": seed})

    def uid(self, kind: str, at: float) -> str:
        """This call's `kind` event's uid: the same whoever writes it, the agent or the hook."""
        from sshtrail import events
        from sshtrail.sha import sha256
        return events.new_uid(int(at * 1e9), sha256(f"{self.seed} {kind}".encode()).digest())

    def sid(self, server_id: str) -> str:
        """Derived from the sshd process (see sshtrail.sessionid), so others can find it; if
        that process is already gone, a fresh id (close_session looks up what open chose)."""
        from sshtrail import events, sessionid
        if self.ppid_start is None:
            return events.new_uid()
        return sessionid.derive(server_id, self.boot, self.ppid, self.ppid_start)

    def method_and_key(self) -> tuple[str, str]:
        """sshd's SSH_AUTH_INFO_0: one line per method passed, e.g. 'publickey ssh-ed25519 AAAA..'.
        Several lines mean AuthenticationMethods chained them; we keep them all, in order."""
        from pam_module.keyinfo import fingerprint
        methods, key = [], ""
        for line in self.auth_info.splitlines():
            words = line.split()
            if not words:
                continue
            methods.append(words[0])
            if words[0] == "publickey" and len(words) >= 3 and not key:
                key = f"{words[1]} {fingerprint(words[2])}"
        return ",".join(methods), key


def record(cfg, call: PamCall, spool=None, on_login=None) -> None:
    """Write the call. `spool`: one already open (the agent's), left open. Writing a call twice
    (the agent did, but its confirmation never came) keeps it once. `on_login(pid, start, sid,
    login)`: told of a session opened by a known sshd process, once written (the agent's host
    events)."""
    from pam_module import attempts
    from sshtrail import events
    from sshtrail.spool import Spool
    own = spool is None
    if own:
        spool = Spool.from_config(cfg)
    try:
        if call.type in ("auth", "account"):
            with spool.transaction() as db:
                attempts.add(db, conn=call.conn, login=call.user, service=call.service,
                             stage=call.type, pid=call.ppid, addr=call.addr, at=call.now)
        elif call.type == "open_session":
            method, key = call.method_and_key()
            common = {"login": call.user, "addr.remote": call.addr}
            login = events.new("user.login", at=call.now, uid=call.uid("user.login", call.now),
                               success=True, method=method, service=call.service, **common)
            if key:
                login["key"] = key
            start = events.new("session.start", at=call.now,
                               uid=call.uid("session.start", call.now),
                               sid=call.sid(spool.server_id),
                               tty=call.tty, **common)

            def bookkeeping(db):
                attempts.grant(db, call.conn, at=call.now)
                db.execute("INSERT OR REPLACE INTO pam_sessions (conn, pid, sid, login, started) "
                           "VALUES (?, ?, ?, ?, ?)", (call.conn, call.ppid, start["sid"],
                                                      call.user, call.now))
            spool.append(login, start, extra_sql=bookkeeping)
            if on_login and call.ppid_start is not None:
                on_login(call.ppid, call.ppid_start, start["sid"], call.user)
        elif call.type == "close_session":
            row = _wait_for_start(spool, call)
            sid = row[0] if row else call.sid(spool.server_id)
            # Each call's time is when PAM made it, to a hundredth of a second (detach.sh), or
            # when a fail-closed hook ran: an end never precedes its start all the same, nor,
            # within that hundredth, the end of the session's recording (PAM closes a session
            # once its wrapper has ended it: the end would be listed before the wrapper's exec).
            at = max(call.now, row[1]) if row else call.now
            recording = spool.recording(sid)
            ended = recording and recording["ended"]
            if ended and at < ended < at + _CALL_CLOCK_STEP:
                at = ended
            end = events.new("session.end", at=at, uid=call.uid("session.end", at),
                             login=call.user, sid=sid, **{"addr.remote": call.addr})
            if row:
                end["duration"] = round(at - row[1], 6)
            else:
                end["message"] = "session start was not recorded"
            spool.append(end, extra_sql=lambda db: db.execute(
                "DELETE FROM pam_sessions WHERE conn = ? AND pid = ?", (call.conn, call.ppid)))
        # "password" (changing a password) is not a login event: nothing to record.
    finally:
        if own:
            spool.close()


def _via_agent(cfg, call: PamCall, timeout: float) -> bool:
    """Have the agent write the call: it has the spool open and sqlite3 loaded, which cost this
    process ~20 of its ~35 ms of CPU, three times a login, on the cores the login runs on. True
    once the agent (a root process: the kernel says so) confirmed the write; else the caller
    writes it itself."""
    if timeout <= 0:
        return False
    import struct
    from _socket import AF_UNIX, SO_PEERCRED, SOCK_STREAM, SOL_SOCKET, socket

    from sshtrail import wire
    sock = socket(AF_UNIX, SOCK_STREAM)  # the C socket: no context manager, no enum import
    try:
        sock.settimeout(timeout)
        sock.connect(cfg["agent.socket"])
        _, uid, _ = struct.unpack("3i", sock.getsockopt(SOL_SOCKET, SO_PEERCRED, 12))
        if uid != 0:
            return False  # not our agent: whoever it is would be told what it need not know
        sock.sendall(wire.pack(dict(call.message(), spool=cfg["spool.path"])))
        reader = wire.Reader()
        while True:
            msgs = reader.recv_from(sock)
            if msgs is None:
                return False
            if msgs:
                return msgs[0][0].get("type") == "ack"
    except (OSError, wire.ProtocolError):
        return False
    finally:
        sock.close()


def _wait_for_start(spool, call: PamCall) -> tuple[str, float] | None:
    """The (sid, start time) open_session recorded for this connection and sshd process."""
    deadline = time.monotonic() + _CLOSE_WAITS_FOR_OPEN
    while True:
        row = spool.db.execute("SELECT sid, started FROM pam_sessions WHERE conn = ? AND pid = ?",
                               (call.conn, call.ppid)).fetchone()
        if row or time.monotonic() >= deadline:
            return tuple(row) if row else None
        time.sleep(0.02)


def _option(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def call_time(uptime: str | None, now: float) -> float:
    """When PAM called: `uptime` is /proc/uptime as detach.sh read it then (fail-open), else now
    (fail-closed: PAM is waiting for us)."""
    if uptime is None:
        return now
    try:
        ago = time.clock_gettime(time.CLOCK_BOOTTIME) - float(uptime)
    except ValueError:
        raise HookError(f"--called-at-uptime {uptime!r} is not a number of seconds") from None
    # A negative or old value is not detach.sh's: our own clock then.
    return now - ago if 0 <= ago < DEFAULT_TIMEOUT * 10 else now


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    now = time.time()
    what = f"sshtrail-pam {os.environ.get('PAM_TYPE', '?')} for {os.environ.get('PAM_USER', '?')!r}"
    watchdog = _Watchdog(DEFAULT_TIMEOUT, what)
    try:
        caller = _option(argv, "--caller")
        if caller is not None and not caller.isdigit():
            raise HookError(f"--caller {caller!r} is not a pid")
        caller_start = _option(argv, "--caller-start")
        if caller_start is not None and not caller_start.isdigit():
            raise HookError(f"--caller-start {caller_start!r} is not a start time in clock ticks")
        now = call_time(_option(argv, "--called-at-uptime"), now)
        call = PamCall(os.environ, int(caller) if caller else os.getppid(), now,
                       ppid_start=int(caller_start) if caller_start else None)
        from sshtrail import config
        cfg = config.load_cached(_option(argv, "--config"))
        watchdog.set(cfg["pam.timeout"])
        if not _via_agent(cfg, call, watchdog.deadline - time.monotonic() - _LOCAL_RESERVE):
            record(cfg, call)
        return 0
    except Exception as e:  # noqa: BLE001 - every failure must reach syslog, never a traceback
        _report(f"{what}: could not record: {e}")
        return 1
    finally:
        signal.alarm(0)


if __name__ == "__main__":
    sys.exit(main())
