"""`sshtrail-pam`: what pam_exec.so runs in sshd's auth, account and session stacks.

Runs as root, once per PAM call, with the PAM environment (which a user can partly set through
pam_env's user_readenv): it takes its config only from --config, is started with `python -I`
by the PAM line `sshtrail install` writes (so PYTHONPATH and friends are ignored), never asks
for or reads the password (no expose_authtok), and finishes within `pam.timeout` seconds no
matter what: a watchdog thread ends it, and SIGALRM's default action ends it if even that thread
cannot run.

It exits non-zero whenever it could not record, and says why in syslog (LOG_AUTHPRIV). Whether
that blocks the login is the PAM control word's business: `optional` (the default, fail-open)
ignores the failure, `required` (pam.fail_closed = true) refuses the login.

What each PAM call records:
- auth, account: a pending attempt, keyed by the connection (SSH_CONNECTION). No event yet: PAM
  cannot tell this hook how the rest of the stack went (a module's result only steers jumps on
  its own line). The attempt is resolved by open_session (granted), by the sshd-log watcher
  (refused, with sshd's reason), or reported by `attempts.reap` once its connection is gone.
- open_session: `user.login` success (method and key from sshd's SSH_AUTH_INFO_0) and
  `session.start`, in one transaction. A session only opens after auth and account succeeded,
  so this is the one place where "granted" is certain.
- close_session: `session.end` with the same sid and the duration.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import syslog
import threading
import time

DEFAULT_TIMEOUT = 3.0
_PAM_TYPES = ("auth", "account", "open_session", "close_session", "password")
_MAX_FIELD = 256


class HookError(Exception):
    pass


def _report(message: str) -> None:
    syslog.openlog("sshtrail-pam", syslog.LOG_PID, syslog.LOG_AUTHPRIV)
    syslog.syslog(syslog.LOG_ERR, message)


def _start_watchdog(seconds: float, what: list[str]) -> threading.Timer:
    def expire():
        _report(f"{what[0]}: gave up after {seconds:g}s (pam.timeout); nothing recorded")
        os._exit(3)
    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    # Backstop: the default action of SIGALRM kills us even if the GIL is never released.
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(int(math.ceil(seconds)) + 1)
    return timer


def _clean(name: str, value: str | None, *, required: bool = True) -> str:
    if value is None or value == "":
        if required:
            raise HookError(f"{name} is missing from the PAM environment (is this run by pam_exec.so?)")
        return ""
    if len(value) > _MAX_FIELD or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise HookError(f"{name} is not a plausible value ({len(value)} chars, control characters "
                        "or too long); refusing to record it")
    return value


class PamCall:
    """The facts of one PAM call, checked: everything here comes from the PAM environment."""

    def __init__(self, env, ppid: int):
        self.type = _clean("PAM_TYPE", env.get("PAM_TYPE"))
        if self.type not in _PAM_TYPES:
            raise HookError(f"PAM_TYPE={self.type!r} is not one of {', '.join(_PAM_TYPES)}")
        self.user = _clean("PAM_USER", env.get("PAM_USER"))
        self.service = _clean("PAM_SERVICE", env.get("PAM_SERVICE"), required=False)
        self.tty = _clean("PAM_TTY", env.get("PAM_TTY"), required=False)
        self.rhost = _clean("PAM_RHOST", env.get("PAM_RHOST"), required=False)
        self.ppid = ppid
        conn = _clean("SSH_CONNECTION", env.get("SSH_CONNECTION"), required=False)
        if conn:
            parts = conn.split()
            if len(parts) != 4 or not parts[1].isdigit():
                raise HookError(f"SSH_CONNECTION={conn!r} is not 'ADDR PORT LADDR LPORT'")
            addr, port = parts[0], parts[1]
            self.conn = f"{addr} {port}"
            self.addr = f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
        else:
            # Not from sshd (su, a test through python-pam): the calling process is the key.
            self.conn = f"pid {ppid}"
            self.addr = self.rhost
        self.auth_info = env.get("SSH_AUTH_INFO_0", "")

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


def record(cfg, call: PamCall, now: float | None = None) -> None:
    from sshtrail import events
    from sshtrail.spool import Spool
    now = time.time() if now is None else now
    spool = Spool.from_config(cfg)
    try:
        if call.type in ("auth", "account"):
            with spool.transaction() as db:
                db.execute("INSERT INTO pam_attempts (conn, login, service, stage, pid, addr, time)"
                           " VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (call.conn, call.user, call.service, call.type, call.ppid, call.addr, now))
        elif call.type == "open_session":
            method, key = call.method_and_key()
            sid = events.new_uid()
            common = {"login": call.user, "addr.remote": call.addr}
            login = events.new("user.login", at=now, success=True, method=method,
                               service=call.service, **common)
            if key:
                login["key"] = key
            start = events.new("session.start", at=now, sid=sid, tty=call.tty, **common)

            def bookkeeping(db):
                db.execute("DELETE FROM pam_attempts WHERE conn = ?", (call.conn,))
                db.execute("INSERT OR REPLACE INTO pam_sessions (conn, pid, sid, login, started) "
                           "VALUES (?, ?, ?, ?, ?)", (call.conn, call.ppid, sid, call.user, now))
            spool.append(login, start, extra_sql=bookkeeping)
        elif call.type == "close_session":
            with spool.transaction() as db:
                row = db.execute("SELECT sid, started FROM pam_sessions WHERE conn = ? AND pid = ?",
                                 (call.conn, call.ppid)).fetchone()
            fields = {"login": call.user, "addr.remote": call.addr}
            if row:
                fields.update(sid=row[0], duration=round(now - row[1], 6))
            else:
                fields.update(sid=events.new_uid(), message="session start was not recorded")
            end = events.new("session.end", at=now, **fields)
            spool.append(end, extra_sql=lambda db: db.execute(
                "DELETE FROM pam_sessions WHERE conn = ? AND pid = ?", (call.conn, call.ppid)))
        # "password" (changing a password) is not a login event: nothing to record.
    finally:
        spool.close()


def _config_arg(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    what = [f"sshtrail-pam {os.environ.get('PAM_TYPE', '?')} for {os.environ.get('PAM_USER', '?')!r}"]
    watchdog = _start_watchdog(DEFAULT_TIMEOUT, what)
    try:
        from sshtrail import config
        cfg = config.load(_config_arg(argv), use_env=False)
        if cfg["pam.timeout"] != DEFAULT_TIMEOUT:
            watchdog.cancel()
            watchdog = _start_watchdog(cfg["pam.timeout"], what)
        call = PamCall(os.environ, os.getppid())
        record(cfg, call)
        return 0
    except Exception as e:  # noqa: BLE001 - every failure must reach syslog, never a traceback
        _report(f"{what[0]}: could not record: {e}")
        return 1
    finally:
        watchdog.cancel()
        signal.alarm(0)


if __name__ == "__main__":
    sys.exit(main())
