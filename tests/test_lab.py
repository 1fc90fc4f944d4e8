"""Tests of the sshd lab (tests/lab.py): if these fail, no integration test can be trusted."""

from __future__ import annotations

import os
import pwd
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lab import HOST_PAM_FILE, MARK, Lab, LabError, sweep_stale

pytestmark = pytest.mark.integration

PARALLEL_LOGINS = 20


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _user_exists(login: str) -> bool:
    try:
        pwd.getpwnam(login)
    except KeyError:
        return False
    return True


def test_key_password_and_refused_logins(lab: Lab):
    alice = lab.add_user("alice", "s3cret pw")

    r = lab.ssh(alice, "echo hi")
    assert (r.returncode, r.stdout) == (0, b"hi\n"), r.stderr
    r = lab.ssh(alice, "id -un", password="s3cret pw")
    assert (r.returncode, r.stdout) == (0, alice.login.encode() + b"\n"), r.stderr

    assert lab.ssh(alice, "echo hi", password="wrong").returncode == 255
    assert lab.ssh(alice, "echo hi", key=lab.stranger_key).returncode == 255
    assert lab.ssh("st-nosuchuser", "echo hi", password="x").returncode == 255
    assert lab.ssh("st-nosuchuser", "echo hi", key=alice.key).returncode == 255

    log = lab.log_text()
    assert f"Accepted publickey for {alice.login} from 127.0.0.1" in log
    assert f"Accepted password for {alice.login} from 127.0.0.1" in log
    assert f"Failed password for {alice.login} from 127.0.0.1" in log
    assert f"Failed publickey for {alice.login} from 127.0.0.1" in log
    assert "Invalid user st-nosuchuser from 127.0.0.1" in log


def test_stdin_and_tty(lab: Lab):
    bob = lab.add_user("bob")
    r = lab.ssh(bob, "cat", input=b"through stdin\n")
    assert (r.returncode, r.stdout) == (0, b"through stdin\n")
    assert lab.ssh(bob, "tty", tty=True).stdout.startswith(b"/dev/pts/")
    assert lab.ssh(bob, "tty").stdout == b"not a tty\n"
    # no password set: password login impossible, key login still fine (UsePAM yes)
    assert lab.ssh(bob, password="").returncode == 255


def test_parallel_key_logins(lab: Lab):
    users = [lab.add_user(f"p{i}") for i in range(4)]
    start = threading.Barrier(PARALLEL_LOGINS)

    def login(i: int) -> subprocess.CompletedProcess:
        start.wait()  # all connections at once, to hit MaxStartups if it were too low
        return lab.ssh(users[i % len(users)], f"echo {i}")

    with ThreadPoolExecutor(PARALLEL_LOGINS) as pool:
        results = list(pool.map(login, range(PARALLEL_LOGINS)))
    for i, r in enumerate(results):
        assert (r.returncode, r.stdout) == (0, f"{i}\n".encode()), r.stderr
    assert lab.log_text().count("Accepted publickey for ") == PARALLEL_LOGINS


def test_private_files_and_config(lab: Lab):
    host_pam = HOST_PAM_FILE.read_bytes()
    assert lab.pam_service == f"sshd-sshtrail-{lab.name}"
    assert lab.pam_file == Path("/etc/pam.d") / lab.pam_service
    assert lab.pam_file.read_text().endswith(HOST_PAM_FILE.read_text())  # after a marker line
    # sshd runs under the symlink's name, which selects the PAM service; its process title
    # starts with that program name ("sshd-sshtrail-x: /path/sshd-sshtrail-x -D ... [listener]")
    title = Path(f"/proc/{lab.pid}/cmdline").read_bytes().decode(errors="replace")
    assert title.startswith(f"{lab.pam_service}: {lab.sshd_program} -D ")
    assert os.readlink(f"/proc/{lab.pid}/exe") == "/usr/sbin/sshd"
    assert os.readlink(lab.sshd_program) == "/usr/sbin/sshd"
    config = lab.sshd_config.read_text()
    assert "ListenAddress 127.0.0.1\n" in config and config.count("ListenAddress") == 1
    assert f"Port {lab.port}\n" in config
    assert "Include" not in config.replace("no Include", "")
    assert "Subsystem sftp /usr/lib/openssh/sftp-server\n" in config
    assert HOST_PAM_FILE.read_bytes() == host_pam


def test_user_names_and_marks(lab: Lab):
    a, b = lab.add_user("same"), lab.add_user("same")
    assert a.login != b.login
    for u in (a, b, lab.add_user()):
        assert u.login.startswith("st-") and len(u.login) <= 32
        entry = pwd.getpwnam(u.login)
        assert entry.pw_gecos.startswith(f"{MARK} {lab.name} ")
        auth = u.home / ".ssh" / "authorized_keys"
        assert auth.stat().st_uid == u.uid and auth.stat().st_mode & 0o777 == 0o600
        assert (u.home / ".ssh").stat().st_mode & 0o777 == 0o700
    with pytest.raises(ValueError):
        lab.add_user("../etc")


def test_own_pam_service_is_used(lab_factory):
    # A PAM stack that denies every account: if sshd read anything but the lab's own file,
    # the key login would go through.
    lab = lab_factory(pam_text="auth required pam_deny.so\naccount required pam_deny.so\n"
                               "session required pam_permit.so\n")
    carol = lab.add_user("carol")
    assert lab.ssh(carol, "true").returncode == 255
    lab.pam_file.write_text("auth required pam_deny.so\naccount required pam_permit.so\n"
                            "session required pam_permit.so\n")
    assert lab.ssh(carol, "true").returncode == 0  # PAM file is read per connection


def test_reload_and_restart_pick_up_config(lab: Lab):
    dave = lab.add_user("dave")
    pid, port = lab.pid, lab.port
    with open(lab.sshd_config, "a") as f:
        f.write(f"DenyUsers {dave.login}\n")
    lab.reload()
    assert lab.pid == pid  # SIGHUP re-exec, same process
    assert lab.ssh(dave).returncode == 255

    lab.sshd_config.write_text(lab.sshd_config.read_text().replace(f"DenyUsers {dave.login}\n", ""))
    lab.restart()
    assert lab.pid != pid and lab.port == port
    assert lab.ssh(dave, "echo back").stdout == b"back\n"

    lab.stop()
    lab.stop()  # idempotent
    assert not lab.running and not _port_open(port)


def test_reload_with_broken_config_raises_with_log(lab: Lab):
    with open(lab.sshd_config, "a") as f:
        f.write("NoSuchKeyword yes\n")
    with pytest.raises(LabError, match="Bad configuration option"):
        lab.reload()
    assert not lab.running


def test_start_failure_raises_and_cleans_up(lab_factory):
    lab = lab_factory(start=False, extra_sshd_config="NoSuchKeyword yes\n")
    with pytest.raises(LabError, match="Bad configuration option: NoSuchKeyword"):
        lab.start()
    assert lab.pam_file.exists()
    lab.cleanup()
    assert not lab.pam_file.exists() and not lab.sshd_program.is_symlink()


def test_extra_config_replaces_defaults(lab_factory):
    lab = lab_factory(extra_sshd_config="PasswordAuthentication no\n"
                                        "Match User nobody\n  PasswordAuthentication yes\n")
    assert lab.sshd_config.read_text().count("PasswordAuthentication") == 2
    erin = lab.add_user("erin", "pw")
    assert lab.ssh(erin, password="pw").returncode == 255
    assert lab.ssh(erin).returncode == 0
    with pytest.raises(ValueError, match="port"):
        Lab("tbad", lab.workdir / "bad", extra_sshd_config="Port 22\n")


def test_cleanup_removes_users_pam_file_and_closes_port(lab_factory):
    lab = lab_factory()
    frank = lab.add_user("frank", "pw")
    # an open session: cleanup must end it, or userdel would refuse
    session = subprocess.Popen(lab.ssh_argv(frank, "sleep 300")[0], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lab.wait_for_log(f"Starting session: command for {frank.login}")
    assert _user_exists(frank.login) and lab.pam_file.exists() and _port_open(lab.port)
    pid = lab.pid

    lab.cleanup()
    lab.cleanup()  # idempotent

    assert session.wait(10) != 0
    assert not _user_exists(frank.login)
    assert not frank.home.exists()
    assert not lab.pam_file.exists()
    assert not lab.sshd_program.is_symlink()
    assert not Path(f"/proc/{pid}").exists()
    assert not _port_open(lab.port)


_CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from lab import Lab
    lab = Lab({name!r}, Path({workdir!r}))
    lab.start()
    user = lab.add_user("orphan")
    print(user.login, lab.pid, lab.port, flush=True)
    {ending}
""")


def _child_lab(tmp_path: Path, name: str, ending: str) -> tuple[subprocess.Popen, list[str]]:
    """Run a lab in a separate Python process; returns it and (login, sshd pid, port)."""
    code = _CHILD.format(tests=str(Path(__file__).parent), name=name,
                         workdir=str(tmp_path / name), ending=ending)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().split()


def test_atexit_cleans_up_a_forgotten_lab(tmp_path: Path):
    # The script never calls cleanup and dies of an exception: atexit must still remove all.
    name = "tatexit" + secrets.token_hex(3)  # unique: another run may be doing the same
    proc, (login, pid, port) = _child_lab(tmp_path, name, "raise SystemExit(3)")
    assert proc.wait(30) == 3
    assert not _user_exists(login)
    assert not Path(f"/etc/pam.d/sshd-sshtrail-{name}").exists()
    assert not Path(f"/proc/{pid}").exists() and not _port_open(int(port))


def test_killed_run_leaves_no_sshd_and_sweep_removes_the_rest(tmp_path: Path):
    name = "tkilled" + secrets.token_hex(3)
    pam_file = Path(f"/etc/pam.d/sshd-sshtrail-{name}")
    proc, (login, pid, port) = _child_lab(tmp_path, name, "time.sleep(300)")
    try:
        assert _user_exists(login) and pam_file.exists()
        proc.send_signal(signal.SIGKILL)  # neither finally nor atexit runs
        proc.wait(10)
        deadline = time.monotonic() + 10  # the parent-death signal ends the orphaned sshd
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{pid}").exists() and not _port_open(int(port))
        # A concurrent test run's sweep may beat ours to it: expect our sweep to report only
        # what was still there.
        expected = {f"user {login}"} if _user_exists(login) else set()
        expected |= {str(pam_file)} if pam_file.exists() else set()
    finally:
        removed = sweep_stale()
    assert expected <= set(removed)
    assert not _user_exists(login)
    assert not pam_file.exists()


def test_pam_file_of_another_lab_is_never_overwritten(lab_factory):
    first = lab_factory()
    text = first.pam_file.read_text()
    second = lab_factory(first.name + "x")  # distinct name: fine
    clash = Lab(first.name, second.workdir / "clash")
    try:
        with pytest.raises(LabError, match="already exists"):
            clash.start()
    finally:
        clash.cleanup()
    assert first.pam_file.read_text() == text  # the clashing lab neither wrote nor removed it
    assert first.ssh(first.add_user("g"), "true").returncode == 0
