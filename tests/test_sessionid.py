"""Test vectors for derived session ids."""
import os
import subprocess
import time

import pytest

from sshtrail import procfs, sessionid


def test_vector():
    assert sessionid.derive("host-1", "0f0e0d0c-0b0a-0908-0706-050403020100", 4242, 123456) \
        == sessionid.derive("host-1", "0f0e0d0c-0b0a-0908-0706-050403020100", 4242, 123456)
    sid = sessionid.derive("host-1", "b", 1, 2)
    assert len(sid) == 36 and sid[14] == "8" and sid[19] in "89ab"
    assert sid != sessionid.derive("host-2", "b", 1, 2)
    assert sid != sessionid.derive("host-1", "b", 1, 3)  # pid reused later: another session


def test_start_time_of_live_and_gone_process():
    assert procfs.start_time(os.getpid()) > 0
    p = subprocess.Popen(["true"])
    p.wait()
    with pytest.raises(procfs.ProcessGone):
        procfs.start_time(p.pid)


def test_comm_with_parentheses_and_spaces(tmp_path):
    exe = tmp_path / "a) b ("
    exe.symlink_to("/bin/sleep")
    p = subprocess.Popen([str(exe), "5"])
    try:
        assert procfs.start_time(p.pid) >= procfs.start_time(os.getpid())
    finally:
        p.kill()
        p.wait()


def test_alive_sees_zombies_as_dead():
    p = subprocess.Popen(["true"])
    deadline = time.monotonic() + 5
    while procfs.alive(p.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not procfs.alive(p.pid)  # exited, not yet reaped
    assert os.path.exists(f"/proc/{p.pid}")
    p.wait()
    assert not procfs.alive(p.pid) and procfs.alive(os.getpid())
