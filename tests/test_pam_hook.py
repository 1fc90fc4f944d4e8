"""The PAM hook run the way pam_exec.so runs it: a root process with the PAM environment.

These run the hook's PAM command line directly with the environment sshd gives it (seen in a
real sshd here); tests/test_login_trail.py drives it through a real sshd and real PAM. In the
default fail-open mode the hook returns at once and a detached child writes, so the tests wait
for the spool rather than for the process.
"""
import os
import sqlite3
import subprocess
import sys
import time

import pytest

from pam_module import hook
from sshtrail import config, events
from sshtrail.spool import Spool
from trail import locked_spool

KEY = "AAAAC3NzaC1lZDI1NTE5AAAAIBWY77vFY7wvig/UJUmQmmM/Fn+xEcLiccBiVRTg4XSS"
KEY_FP = "SHA256:4jBZ99usNnhJr7HuUrzcURnWCbMKeWkF6PN14WaYptY"  # as sshd logged it for this key


@pytest.fixture
def cfg_path(tmp_path):
    p = tmp_path / "sshtrail.toml"
    # pam.timeout 10 s, not 3: once, in a full CI run, a detached open_session hook wrote
    # nothing within its 3 s (busy machine: an fsync, CPU at nice 10; syslog was not listened
    # to, so the cause went unseen). These tests are about what the hook writes, not its limit.
    p.write_text(f'server_id = "hook-test"\n[spool]\npath = "{tmp_path}/spool/spool.db"\n'
                 '[pam]\ntimeout = 10.0\n')
    return p


def run_hook(cfg_path, pam_type, *, user="alice", env=None, timeout=20, fail_closed=False,
             capture=True, extra=()):
    base = {"PAM_TYPE": pam_type, "PAM_USER": user, "PAM_SERVICE": "sshd", "PAM_TTY": "ssh",
            "PAM_RHOST": "127.0.0.1", "SSH_CONNECTION": "127.0.0.1 50500 127.0.0.1 22"}
    if pam_type in ("open_session", "close_session"):
        base["SSH_AUTH_INFO_0"] = f"publickey ssh-ed25519 {KEY}\n"
    base.update(env or {})
    base = {k: v for k, v in base.items() if v is not None}
    argv = hook.command(sys.executable, cfg_path, fail_closed=fail_closed) + list(extra)
    # capture=False: output to /dev/null, as pam_exec gives it; a captured pipe would keep us
    # waiting for the detached child too, which holds it until it is done.
    out = subprocess.PIPE if capture else subprocess.DEVNULL
    return subprocess.run(argv, env=base, stdout=out, stderr=out, text=True, timeout=timeout,
                          cwd="/")


def spooled(cfg_path, **kw):
    if not os.path.exists(config.load(cfg_path)["spool.path"]):
        return []
    s = Spool.from_config(config.load(cfg_path))
    try:
        return s.query(**kw)
    finally:
        s.close()


def wait_spooled(cfg_path, n, timeout=10, syslog=None, **kw):
    """`syslog`: a syslog_sink, whose messages (a detached hook's only voice) a failure shows."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        evs = spooled(cfg_path, **kw)
        if len(evs) >= n:
            return evs
        time.sleep(0.02)
    said = [m for m in syslog.messages if "sshtrail" in m] if syslog else "(not listened to)"
    raise AssertionError(f"expected {n} events, have {spooled(cfg_path, **kw)}; syslog: {said}")


def test_session_open_close_writes_login_start_end(cfg_path):
    assert run_hook(cfg_path, "account").returncode == 0
    wait_spooled_attempts(cfg_path, 1)
    assert run_hook(cfg_path, "open_session").returncode == 0
    assert run_hook(cfg_path, "close_session").returncode == 0
    evs = wait_spooled(cfg_path, 3)
    assert [e["event"] for e in evs] == ["user.login", "session.start", "session.end"]
    login, start, end = evs
    assert login["success"] is True and login["method"] == "publickey"
    assert login["key"] == f"ssh-ed25519 {KEY_FP}"
    assert login["addr.remote"] == "127.0.0.1:50500" and login["server_id"] == "hook-test"
    assert start["sid"] == end["sid"] and end["duration"] >= 0
    # The account-stage attempt was resolved by the session: nothing left pending.
    assert wait_spooled_attempts(cfg_path, 0) == 0


def wait_spooled_attempts(cfg_path, n, timeout=10):
    deadline = time.monotonic() + timeout
    while True:
        path = config.load(cfg_path)["spool.path"]
        count = (sqlite3.connect(path).execute("SELECT count(*) FROM pam_attempts").fetchone()[0]
                 if os.path.exists(path) else 0)
        if count == n or time.monotonic() > deadline:
            return count
        time.sleep(0.02)


def test_sid_is_shared_even_when_close_is_written_first(cfg_path, syslog_sink):
    # Open and close are written by detached children; a very short session can have its close
    # child reach the spool first. Both derive the sid from the same sshd process.
    run_hook(cfg_path, "close_session", capture=False)
    run_hook(cfg_path, "open_session", capture=False)
    evs = wait_spooled(cfg_path, 3, syslog=syslog_sink)
    (start,) = [e for e in evs if e["event"] == "session.start"]
    (end,) = [e for e in evs if e["event"] == "session.end"]
    assert start["sid"] == end["sid"]
    assert end["time"] >= start["time"] and end["duration"] >= 0  # never ends before it starts
    assert [e["event"] for e in evs] == ["user.login", "session.start", "session.end"]


def test_fail_closed_writes_before_returning(cfg_path):
    r = run_hook(cfg_path, "open_session", fail_closed=True)
    assert r.returncode == 0
    assert len(spooled(cfg_path)) == 2  # no waiting: written before the hook returned


def test_password_method_and_chained_methods(cfg_path):
    run_hook(cfg_path, "open_session", env={"SSH_AUTH_INFO_0": "publickey ssh-ed25519 " + KEY
                                            + "\nkeyboard-interactive\n"})
    (login,) = wait_spooled(cfg_path, 1, kind="user.login")
    assert login["method"] == "publickey,keyboard-interactive"


def test_hook_never_sees_a_password(cfg_path):
    # pam_exec without expose_authtok gives the hook no stdin; make sure it never waits on one.
    r = subprocess.run(hook.command(sys.executable, cfg_path),
                       env={"PAM_TYPE": "auth", "PAM_USER": "alice"}, stdin=subprocess.PIPE,
                       capture_output=True, timeout=10)
    assert r.returncode == 0


@pytest.mark.parametrize("env,reason", [
    ({"PAM_TYPE": None}, "PAM_TYPE is missing"),
    ({"PAM_TYPE": "reboot"}, "PAM_TYPE='reboot' is not one of"),
    ({"PAM_USER": "ali\x1b]52;c;ZXZpbA==\x07ce"}, "PAM_USER is not a plausible value"),
    ({"PAM_USER": "a" * 5000}, "PAM_USER is not a plausible value"),
    ({"SSH_CONNECTION": "garbage"}, "SSH_CONNECTION='garbage' is not"),
])
@pytest.mark.parametrize("fail_closed", [False, True])
def test_garbage_environment_is_reported(cfg_path, syslog_sink, env, reason, fail_closed):
    r = run_hook(cfg_path, "open_session", env=env, fail_closed=fail_closed)
    # Fail-open lets the login go on; fail-closed refuses it (PAM control `required`).
    assert r.returncode == (1 if fail_closed else 0)
    assert r.stdout == "" and "Traceback" not in r.stderr
    msg = syslog_sink.wait_for(reason)
    assert "sshtrail-pam" in msg and "could not record" in msg
    time.sleep(0.2)
    assert spooled(cfg_path) == []


def test_unwritable_spool_reported_to_syslog(tmp_path, syslog_sink):
    (tmp_path / "not-a-dir").write_text("")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[spool]\npath = "{tmp_path}/not-a-dir/spool.db"\n')
    assert run_hook(cfg, "open_session").returncode == 0
    syslog_sink.wait_for("cannot open")
    assert run_hook(cfg, "open_session", fail_closed=True).returncode == 1


def test_malformed_config_reported_to_syslog(tmp_path, syslog_sink):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[pam]\ntimeout = 'soon'\n")
    assert run_hook(cfg, "open_session").returncode == 0
    syslog_sink.wait_for("pam.timeout must be a number")
    assert run_hook(cfg, "open_session", fail_closed=True).returncode == 1


def test_hang_is_cut_at_the_timeout(tmp_path, syslog_sink):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[spool]\npath = "{tmp_path}/s/spool.db"\nbusy_timeout = 60.0\n'
                   "[pam]\ntimeout = 1.0\n")
    Spool(tmp_path / "s" / "spool.db").close()
    with locked_spool(tmp_path / "s" / "spool.db"):
        assert run_hook(cfg, "open_session").returncode == 0  # fail-open: the login goes on
        syslog_sink.wait_for("gave up after 1s (pam.timeout)")
        t0 = time.monotonic()
        r = run_hook(cfg, "open_session", fail_closed=True)
        elapsed = time.monotonic() - t0
    assert r.returncode != 0
    assert elapsed < 10  # far below the 60 s the lock wait alone would take


def test_user_environment_cannot_steer_the_root_hook(tmp_path, cfg_path):
    # A user can put variables into the PAM environment through ~/.pam_environment.
    evil = tmp_path / "evil"
    evil.mkdir()
    marker = tmp_path / "pwned"
    (evil / "sitecustomize.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    for name in ("sleep", "nice", "setsid", "sh", "python3"):  # what detach.sh runs, by name
        (evil / name).write_text(f"#!/bin/sh\n/usr/bin/touch {marker}\n")
        (evil / name).chmod(0o755)
    other = tmp_path / "other.toml"
    other.write_text(f'[spool]\npath = "{tmp_path}/user-chosen.db"\n')
    r = run_hook(cfg_path, "open_session", env={"PYTHONPATH": str(evil), "PYTHONSTARTUP": str(evil),
                                                "SSHTRAIL_CONFIG": str(other), "PATH": str(evil)})
    assert r.returncode == 0
    assert len(wait_spooled(cfg_path, 1, kind="user.login")) == 1
    assert not marker.exists()
    assert not (tmp_path / "user-chosen.db").exists()


def test_password_change_records_nothing(cfg_path):
    assert run_hook(cfg_path, "password", fail_closed=True).returncode == 0
    assert spooled(cfg_path) == []


def test_the_hook_starts_without_re_or_enum():
    # Every PAM call (three a login) pays for what the hook imports: re (with enum) is ~4 ms.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import pam_module.hook, "
            "pam_module.attempts, pam_module.keyinfo, sshtrail.spool, sshtrail.sessionid, "
            "sshtrail.procfs, sshtrail.config, sshtrail.events; "
            "print(sorted(m for m in ('re', 'enum', 'json') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code, root], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"


HOOK_THEN_MODULES = ("import sys; sys.path.insert(0, sys.argv[1]); from pam_module import hook; "
                     "rc = hook.main(sys.argv[2:]); print(rc, 'sqlite3' in sys.modules)")


def test_the_agent_writes_for_the_hook_when_it_is_there(tmp_path):
    # Each PAM call is a Python start; with the agent up, the agent (spool open, sqlite3 loaded)
    # writes the call, and the hook never loads sqlite3: ~20 ms less CPU per call beside the login.
    from sshtrail.session_server import SessionServer
    cfg_file = tmp_path / "sshtrail.toml"
    cfg_file.write_text(f'server_id = "hook-test"\n[spool]\npath = "{tmp_path}/spool/spool.db"\n'
                        f'[agent]\nsocket = "{tmp_path}/agent.sock"\n')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {"PAM_TYPE": "open_session", "PAM_USER": "alice", "PAM_SERVICE": "sshd",
           "PAM_RHOST": "127.0.0.1", "SSH_CONNECTION": "127.0.0.1 50501 127.0.0.1 22",
           "SSH_AUTH_INFO_0": f"publickey ssh-ed25519 {KEY}\n"}

    def hook_run():
        argv = [sys.executable, "-I", "-S", "-c", HOOK_THEN_MODULES, root, "--config",
                str(cfg_file), "--fail-closed"]
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30).stdout

    server = SessionServer(config.load(cfg_file))
    import threading
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert hook_run().split() == ["0", "False"]  # written, and not by the hook
    finally:
        server.stop()
    logins = spooled(cfg_file, kind="user.login")
    assert [(e["login"], e["key"]) for e in logins] == [("alice", f"ssh-ed25519 {KEY_FP}")]
    # The agent gone: the hook writes itself, as before.
    env["SSH_CONNECTION"] = "127.0.0.1 50502 127.0.0.1 22"
    assert hook_run().split() == ["0", "True"]
    assert len(spooled(cfg_file, kind="user.login")) == 2


def test_a_call_written_twice_is_kept_once(cfg_path):
    # The agent wrote a call, then died before it said so: the hook writes it again. Same event
    # uids and the same attempt row, so the spool keeps it once.
    cfg = config.load(cfg_path)
    env = {"PAM_USER": "alice", "PAM_SERVICE": "sshd", "PAM_RHOST": "127.0.0.1",
           "SSH_CONNECTION": "127.0.0.1 50503 127.0.0.1 22",
           "SSH_AUTH_INFO_0": f"publickey ssh-ed25519 {KEY}\n"}
    t = time.time()
    for i, pam_type in enumerate(("account", "open_session", "close_session")):
        call = hook.PamCall(dict(env, PAM_TYPE=pam_type), os.getpid(), t + i)
        again = hook.PamCall.from_message(call.message())  # as the agent gets it
        hook.record(cfg, again)
        hook.record(cfg, call)
        if pam_type == "account":
            assert wait_spooled_attempts(cfg_path, 1, timeout=0) == 1
    assert [e["event"] for e in spooled(cfg_path)] == ["user.login", "session.start",
                                                       "session.end"]


@pytest.mark.parametrize("lag,placed_at_recording_end", [(0.004, True), (0.05, False)])
def test_a_session_end_is_not_listed_before_the_recording_it_follows(cfg_path, lag,
                                                                    placed_at_recording_end):
    # PAM closes a session after its wrapper ended the recording, but the call's time counts in
    # hundredths (/proc/uptime): within one, the end is placed at the recording's end, not
    # before the wrapper's exec event; a call further off keeps its own time.
    cfg = config.load(cfg_path)
    env = {"PAM_USER": "alice", "PAM_SERVICE": "sshd", "PAM_RHOST": "127.0.0.1",
           "SSH_CONNECTION": "127.0.0.1 50504 127.0.0.1 22",
           "SSH_AUTH_INFO_0": f"publickey ssh-ed25519 {KEY}\n"}
    t = time.time() - 10
    hook.record(cfg, hook.PamCall(dict(env, PAM_TYPE="open_session"), os.getpid(), t))
    (start,) = spooled(cfg_path, kind="session.start")
    s = Spool.from_config(cfg)
    try:
        s.start_recording(sid=start["sid"], login="alice", mode="exec", command="true",
                          term="", cols=0, rows=0, started=t + 0.5, wrapper_pid=1,
                          wrapper_start=1)
        s.end_recording(start["sid"], ended=t + 1.0 + lag, exit_status=0, end_reason="exited")
    finally:
        s.close()
    hook.record(cfg, hook.PamCall(dict(env, PAM_TYPE="close_session"), os.getpid(), t + 1.0))
    (end,) = spooled(cfg_path, kind="session.end")
    expected = t + 1.0 + lag if placed_at_recording_end else t + 1.0
    assert end["time"] == events.format_time(expected)
    assert end["duration"] == round(expected - t, 6)


def test_a_call_is_stamped_when_pam_made_it_not_when_its_hook_ran(cfg_path):
    # The detached hooks of one login start in any order on a busy host. Stamped when each ran,
    # an account attempt written after the session that granted it looked later than the grant,
    # and was reported as a refusal once its caller was gone. detach.sh reads the time first.
    from pam_module import attempts
    with open("/proc/uptime") as f:
        up = float(f.read().split()[0])
    t0 = time.time()
    opened = run_hook(cfg_path, "open_session", fail_closed=True,
                      extra=["--called-at-uptime", f"{up - 5:.2f}"])
    assert opened.returncode == 0
    # The account call came 10 ms before the session opened; its hook ran after it.
    late = run_hook(cfg_path, "account", fail_closed=True,
                    extra=["--called-at-uptime", f"{up - 5.01:.2f}"])
    assert late.returncode == 0
    (login,) = spooled(cfg_path, kind="user.login")
    assert abs(events.parse_time(login["time"]) - (t0 - 5)) < 0.5
    s = Spool.from_config(config.load(cfg_path))
    try:
        # Long after, its caller long gone: an attempt the grant does not cover is reported.
        assert attempts.reap(s, grace=0, now=time.time() + attempts.MAX_AGE + 1) == []
        assert s.db.execute("SELECT count(*) FROM pam_attempts").fetchone()[0] == 0
    finally:
        s.close()
    assert [e["event"] for e in spooled(cfg_path)] == ["user.login", "session.start"]


def test_a_session_whose_close_never_came_is_ended_once_after_the_grace(tmp_path):
    from pam_module.sessions import UnclosedSessions
    from sshtrail import procfs, sessionid
    spool = Spool(tmp_path / "spool.db", server_id="h")
    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid: no process now
    me = os.getpid()
    live_sid = sessionid.derive("h", procfs.boot_id(), me, procfs.start_time(me))
    for conn, pid, sid in (("127.0.0.1 5000", gone.pid, "gone-sid"), ("pid 1", me, live_sid)):
        spool.db.execute("INSERT INTO pam_sessions (conn, pid, sid, login, started) "
                         "VALUES (?, ?, ?, 'alice', 0)", (conn, pid, sid))
    unclosed = UnclosedSessions(grace=10.0)
    assert unclosed.reap(spool, now=100.0) == [] and unclosed.reap(spool, now=109.0) == []
    (ev,) = unclosed.reap(spool, now=110.0)
    assert ev["event"] == "session.end" and ev["sid"] == "gone-sid"
    assert ev["addr.remote"] == "127.0.0.1:5000" and "close_session" in ev["message"]
    assert unclosed.reap(spool, now=500.0) == []  # once; the live session's sshd is still here
    assert [e["sid"] for e in spool.query(kind="session.end")] == ["gone-sid"]
    spool.close()


def test_a_close_that_comes_while_the_agent_ends_the_session_wins(tmp_path, monkeypatch):
    # The close hook's session.end commits between the agent's look at the row and its own
    # write: the agent's event is rolled back with its delete, and only one end is spooled.
    from pam_module import sessions
    spool = Spool(tmp_path / "spool.db", server_id="h")
    spool.db.execute("INSERT INTO pam_sessions (conn, pid, sid, login, started) "
                     "VALUES ('127.0.0.1 5000', 1, 'late-close', 'alice', 0)")

    def closed_meanwhile(*_):
        spool.db.execute("DELETE FROM pam_sessions")  # what the close hook's write does
        return False
    monkeypatch.setattr(sessions, "_opened_by", closed_meanwhile)
    assert sessions.UnclosedSessions(grace=0.0).reap(spool, now=1.0) == []
    assert spool.query(kind="session.end") == []
    spool.close()


def test_a_session_whose_sshd_was_seen_alive_then_gone_ends_between_the_two(tmp_path):
    from pam_module.sessions import BOUNDED, UnclosedSessions
    from sshtrail import events, procfs, sessionid
    spool = Spool(tmp_path / "spool.db", server_id="h")
    sshd = subprocess.Popen(["sleep", "60"])  # stands in for the connection's sshd
    sid = sessionid.derive("h", procfs.boot_id(), sshd.pid, procfs.start_time(sshd.pid))
    spool.db.execute("INSERT INTO pam_sessions (conn, pid, sid, login, started) "
                     "VALUES ('127.0.0.1 5000', ?, ?, 'alice', 900.0)", (sshd.pid, sid))
    unclosed = UnclosedSessions(grace=10.0)
    assert unclosed.reap(spool, now=100.0, wall=1000.0) == []  # alive
    sshd.kill()
    sshd.wait()
    assert unclosed.reap(spool, now=105.0, wall=1005.0) == []  # gone: the grace begins
    (ev,) = unclosed.reap(spool, now=115.0, wall=1015.0)
    assert ev["message"] == BOUNDED and ev["duration_at_most"] == 105.0
    assert (ev["ended_after"], ev["ended_before"]) == (events.format_time(1000.0),
                                                       events.format_time(1005.0))
    spool.close()
