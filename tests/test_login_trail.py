"""The login trail end to end: a real sshd on 127.0.0.1, real PAM, the real OpenSSH client,
sshtrail installed with its own CLI and the agent following sshd's log."""
import json
import os
import sqlite3
import subprocess
import sys
import time

import pytest

from trail import Trail, locked_spool

pytestmark = pytest.mark.integration


@pytest.fixture
def trail(trail_factory):
    # AllowUsers with a pattern: every lab user (st-*) may log in, root may not.
    return trail_factory(extra_sshd_config="AllowUsers st-*\n")


@pytest.fixture
def pam_trail(trail_factory):
    # For python-pam: its conversation callback dies with authenticate(), so a session module
    # that talks (pam_motd, pam_mail in Debian's sshd file) would crash it. The stacks that
    # decide auth and account are the same common-* files sshd uses.
    return trail_factory(pam_text="@include common-auth\n@include common-account\n"
                                  "@include common-session\n")


def only_failure(trail, login):
    evs = trail.logins(login)
    assert len(evs) == 1, evs
    assert evs[0]["success"] is False
    return evs[0]


def test_key_login_granted(trail):
    user = trail.lab.add_user("alice")
    r = trail.lab.ssh(user, "echo hi")
    assert r.returncode == 0 and r.stdout == b"hi\n"
    evs = trail.wait_for(lambda e: len(e) >= 4, user=user.login, what="login, start, exec, end")
    time.sleep(1.0)
    evs = trail.events(user=user.login)
    assert [e["event"] for e in evs] == ["user.login", "session.start", "exec", "session.end"]
    login, start, exec_, end = evs
    assert exec_["command"] == "echo hi" and exec_["sid"] == start["sid"]
    assert login["success"] is True and login["method"] == "publickey"
    fp = subprocess.run(["ssh-keygen", "-lf", str(user.pubkey)], capture_output=True,
                        text=True).stdout.split()[1]
    assert login["key"] == f"ssh-ed25519 {fp}"
    assert login["addr.remote"].startswith("127.0.0.1:") and login["server_id"] == "lab-host"
    assert start["sid"] == end["sid"] and end["duration"] >= 0


def test_wrong_password(trail):
    user = trail.lab.add_user("bob", "right-pw-1")
    assert trail.lab.ssh(user, password="wrong-pw").returncode == 255
    ev = only_failure(trail, user.login)
    assert ev["error"] == "bad_password" and ev["method"] == "password"


def test_unknown_user(trail):
    assert trail.lab.ssh("st-nosuch-000000", key=trail.lab.stranger_key).returncode == 255
    ev = only_failure(trail, "st-nosuch-000000")
    assert ev["error"] == "invalid_user"


def test_refused_key(trail):
    user = trail.lab.add_user("carol")
    assert trail.lab.ssh(user, key=trail.lab.stranger_key).returncode == 255
    ev = only_failure(trail, user.login)
    assert ev["error"] == "bad_key" and ev["method"] == "publickey"
    assert ev["key"].startswith("ED25519 SHA256:")


def test_locked_account(trail):
    user = trail.lab.add_user("dave", "dave-pw-1")
    subprocess.run(["usermod", "-L", user.login], check=True)
    assert trail.lab.ssh(user, password="dave-pw-1").returncode == 255
    ev = only_failure(trail, user.login)
    # sshd's log does not say why pam_unix refused a locked password: it reads as a bad one.
    assert ev["error"] == "bad_password"


def test_expired_account(trail):
    user = trail.lab.add_user("erin", "erin-pw-1")
    subprocess.run(["chage", "-E", "0", user.login], check=True)
    assert trail.lab.ssh(user).returncode == 255  # even the right key
    ev = only_failure(trail, user.login)
    assert ev["error"] == "account_denied"


def test_outside_allow_users(trail):
    assert trail.lab.ssh("root", key=trail.lab.stranger_key).returncode == 255
    ev = only_failure(trail, "root")
    assert ev["error"] == "not_allowed"


def test_refusals_are_told_apart(trail):
    # One table of what each refusal reads as; they must all differ from each other.
    lab = trail.lab
    pw_user = lab.add_user("pw", "pw-pw-1")
    key_user = lab.add_user("key")
    cases = {
        "bad_password": (pw_user.login, lambda: lab.ssh(pw_user, password="nope")),
        "bad_key": (key_user.login, lambda: lab.ssh(key_user, key=lab.stranger_key)),
        "invalid_user": ("st-ghost-111111", lambda: lab.ssh("st-ghost-111111", key=lab.stranger_key)),
        "not_allowed": ("root", lambda: lab.ssh("root", key=lab.stranger_key)),
    }
    for _, run in cases.values():
        assert run().returncode == 255
    for error, (login, _) in cases.items():
        assert only_failure(trail, login)["error"] == error


def test_a_session_whose_sshd_is_killed_still_ends(trail):
    # PAM's close_session never runs for it: the agent finds the session's sshd gone and ends
    # it, once, saying what it does not know.
    user = trail.lab.add_user("kill")
    argv, env = trail.lab.ssh_argv(user, "sleep 15")
    client = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        (start,) = trail.wait_for(lambda e: len(e) >= 1, type="session.start", user=user.login,
                                  what="session.start")
        with sqlite3.connect(trail.spool_path) as db:
            (monitor,) = db.execute("SELECT pid FROM pam_sessions WHERE sid = ?",
                                    (start["sid"],)).fetchone()
        # The connection's two sshd processes, as `pkill sshd` or the OOM killer would.
        children = subprocess.run(["pgrep", "-P", str(monitor)], capture_output=True).stdout
        for pid in [monitor] + [int(p) for p in children.split()]:
            os.kill(pid, 9)
        client.wait(30)
    finally:
        if client.poll() is None:
            client.kill()
    (end,) = trail.wait_for(lambda e: len(e) >= 1, type="session.end", user=user.login,
                            what="session.end", timeout=40)
    assert end["sid"] == start["sid"] and "without PAM's close_session" in end["message"]
    assert end["addr.remote"] == start["addr.remote"]
    time.sleep(6)  # another look: still one end
    assert len(trail.events(type="session.end", user=user.login)) == 1


def test_hook_failure_lets_login_in_and_reaches_syslog(trail, syslog_sink):
    user = trail.lab.add_user("frank")
    spool_dir = trail.spool_path.parent
    blocked = spool_dir.with_name("spool-moved")
    trail.stop_agent()
    os.rename(spool_dir, blocked)
    spool_dir.write_text("not a directory")  # the hook cannot open its spool
    try:
        r = trail.lab.ssh(user, "echo in")
        assert r.returncode == 0 and r.stdout == b"in\n"
        msg = syslog_sink.wait_for("could not record")
        assert "cannot open" in msg and user.login in msg
    finally:
        spool_dir.unlink()
        os.rename(blocked, spool_dir)


def test_hook_hang_is_cut_and_login_proceeds(trail, syslog_sink):
    trail.write_config("[pam]\ntimeout = 1.0\n[spool]\nbusy_timeout = 30.0\n")
    user = trail.lab.add_user("gina")
    # The hook runs only without an agent: with one, the call waits in its queue
    # (test_pam_queue.py: a locked spool holds neither the login nor the calls).
    trail.stop_agent()
    with locked_spool(trail.spool_path):
        t0 = time.monotonic()
        r = trail.lab.ssh(user, "echo in")
        assert r.returncode == 0 and r.stdout == b"in\n"
        assert time.monotonic() - t0 < 10
        syslog_sink.wait_for("gave up after 1s (pam.timeout)")


def test_fail_closed_refuses_when_it_cannot_record(trail, syslog_sink):
    trail.write_config("[pam]\nfail_closed = true\n")
    trail.install()  # fail_closed is applied by install: it sets the PAM control word
    assert "required pam_exec.so" in trail.lab.pam_file.read_text()
    user = trail.lab.add_user("hank")
    assert trail.lab.ssh(user, "true").returncode == 0  # recording works: let in
    spool_dir = trail.spool_path.parent
    trail.stop_agent()
    os.rename(spool_dir, spool_dir.with_name("spool-moved"))
    spool_dir.write_text("not a directory")
    try:
        assert trail.lab.ssh(user, "true").returncode == 255
        syslog_sink.wait_for("cannot open")
    finally:
        spool_dir.unlink()
        os.rename(spool_dir.with_name("spool-moved"), spool_dir)


PAM_LOGIN = """
import json, sys, pam
service, login, password = sys.argv[1:]
p = pam.pam()
ok = p.authenticate(login, password, service=service, call_end=False)
if ok:
    p.open_session()
    p.close_session()
    p.end()  # after a failed authenticate python-pam has already ended the handle
print(json.dumps([ok, p.reason]))
"""


def pam_attempt(service, login, password):
    # In a process of its own, as sshd would be: the hook keys PAM-only attempts on the
    # calling pid, and reports them once that process is gone.
    r = subprocess.run([sys.executable, "-c", PAM_LOGIN, service, login, password],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_python_pam_granted(pam_trail):
    trail = pam_trail
    user = trail.lab.add_user("ivan", "ivan-pw-1")
    ok, _ = pam_attempt(trail.lab.pam_service, user.login, "ivan-pw-1")
    assert ok
    evs = trail.wait_for(lambda e: len(e) >= 3, user=user.login, what="login, start, end")
    assert [e["event"] for e in evs] == ["user.login", "session.start", "session.end"]
    time.sleep(3)  # past attempt_grace and a reap: the auth/account attempts were resolved
    assert [e["event"] for e in trail.events(user=user.login)] == \
        ["user.login", "session.start", "session.end"]


def test_python_pam_refused_password(pam_trail):
    trail = pam_trail
    user = trail.lab.add_user("judy", "judy-pw-1")
    ok, _ = pam_attempt(trail.lab.pam_service, user.login, "wrong")
    assert not ok
    # No sshd log line explains it: the agent reports it once the calling process is gone.
    ev = only_failure(trail, user.login)
    assert ev["error"] == "auth_failed" and "PAM saw this attempt" in ev["message"]


def test_python_pam_refused_account(pam_trail):
    trail = pam_trail
    user = trail.lab.add_user("kim", "kim-pw-1")
    subprocess.run(["chage", "-E", "0", user.login], check=True)
    ok, _ = pam_attempt(trail.lab.pam_service, user.login, "kim-pw-1")
    assert not ok
    ev = only_failure(trail, user.login)
    assert ev["error"] == "account_denied"


def test_events_cli_filters(trail):
    user = trail.lab.add_user("lee")
    trail.lab.ssh(user)
    trail.wait_for(lambda e: len(e) >= 1, user=user.login, type="session.end")
    table = trail.cli("events", "--user", user.login, "--since", "10m").stdout
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["TIME", "EVENT", "LOGIN"]
    assert len(lines) == 5 and "granted publickey" in table and "exec" in table
    assert trail.cli("events", "--user", user.login, "--since", "bogus", check=False).returncode == 2


def test_the_events_table_shows_what_would_hide_or_reorder_a_row(trail):
    # A command line is the user's to write: a right-to-left override in it would show the rest
    # of the row reversed, a zero-width space would hide; the table names each instead.
    user = trail.lab.add_user("rlo")
    assert trail.lab.ssh(user, "true #\u202eexe.sh\u200b").returncode == 0
    trail.wait_for(lambda e: len(e) >= 1, user=user.login, type="exec", what="the exec event")
    table = trail.cli("events", "--user", user.login, "--type", "exec").stdout
    assert "true #\\u202eexe.sh\\u200b" in table
    assert "\u202e" not in table and "\u200b" not in table


@pytest.fixture
def bare_trail(lab_factory):
    """A lab and a Trail config for it, nothing installed yet."""
    t = Trail(lab_factory())
    yield t
    t.close()


def test_install_twice_then_uninstall_restores_bytes(bare_trail):
    t, lab = bare_trail, bare_trail.lab
    before = {p: p.read_bytes() for p in (lab.pam_file, lab.sshd_config)}
    first = t.install().stdout
    assert "changed" in first and lab.pam_file.read_bytes() != before[lab.pam_file]
    installed = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in before}
    second = t.install().stdout
    assert "changed" not in second.replace("unchanged", "")
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in before} == installed
    t.uninstall()
    assert {p: p.read_bytes() for p in before} == before
    user = lab.add_user("after")
    assert lab.ssh(user, "echo ok").stdout == b"ok\n"  # sshd and PAM work as before


def test_install_without_wrapper_then_with_it(bare_trail):
    t, lab = bare_trail, bare_trail.lab
    t.install(wrapper=False)
    assert "ForceCommand" not in lab.sshd_config.read_text()
    t.install()
    assert lab.sshd_config.read_text().count("ForceCommand") == 1
    t.install(wrapper=False)  # taken out again, in place
    assert "ForceCommand" not in lab.sshd_config.read_text()
