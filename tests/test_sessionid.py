"""Test vectors for derived session ids."""
import os
import subprocess
import time

import pytest

from sshtrail import procfs, sessionid


def test_vector():
    # Fixed: a change here splits every session open across an upgrade (hook old, agent new).
    assert sessionid.derive("host-1", "0f0e0d0c-0b0a-0908-0706-050403020100", 4242, 123456) \
        == "00000001-e240-8d9f-82c5-6d0e7095b9bc"
    sid = sessionid.derive("host-1", "b", 1, 2)
    assert len(sid) == 36 and sid[14] == "8" and sid[19] in "89ab"
    assert sid != sessionid.derive("host-2", "b", 1, 2)
    assert sid != sessionid.derive("host-1", "b", 1, 3)  # pid reused later: another session


def test_sids_of_a_boot_sort_by_session_start():
    starts = [5, 99, 100, 4096, 123456, 2**40]
    sids = [sessionid.derive("host-1", "b", 7000 - s % 5000, s) for s in starts]
    assert sids == sorted(sids)


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
