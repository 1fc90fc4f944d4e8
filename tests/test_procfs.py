"""procfs: what the agent takes from the kernel about processes."""
import os
import shutil
import subprocess
import time

import pytest

from sshtrail import procfs


def _run(program: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([program, *args], stdout=subprocess.DEVNULL)


@pytest.mark.parametrize("owner,folder_mode", [
    (65534, 0o755),  # a user's copy, in a folder of theirs
    (0, 0o777),  # root's file, in a folder anybody can write to
])
def test_a_program_named_sshd_is_not_sshd(tmp_path, owner, folder_mode):
    # Anybody can copy a program to a file named sshd and run it: inside their session, to pass
    # it for the sshd above a session wrapper (it was enough, once).
    folder = tmp_path / "b"
    folder.mkdir()
    fake = folder / "sshd"
    shutil.copy("/bin/sleep", fake)
    os.chown(fake, owner, owner)
    os.chown(folder, owner, owner)
    folder.chmod(folder_mode)
    p = _run(str(fake), "30")
    try:
        assert os.readlink(f"/proc/{p.pid}/exe") == str(fake)
        assert not procfs.is_sshd(p.pid) and not procfs.is_root_sshd(p.pid)
    finally:
        p.kill()
        p.wait()


def test_sshd_as_root_and_as_the_user(lab_factory):
    # A connection's sshd processes: the monitor, root's, and below it the one that serves the
    # session as the user (its program is sshd's too, which the user may also run as themselves).
    lab = lab_factory()
    user = lab.add_user("procfs")
    argv, env = lab.ssh_argv(user, "sleep 20")
    client = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while not (as_user := _below_monitors(lab.pid, user.uid)):
            assert time.monotonic() < deadline, "no sshd process of the user's connection"
            time.sleep(0.05)
        monitor = procfs.parent(as_user[0])
        assert procfs.is_root_sshd(lab.pid) and procfs.is_root_sshd(monitor)
        assert procfs.is_sshd(as_user[0]) and not procfs.is_root_sshd(as_user[0])
    finally:
        client.kill()
        client.wait()


def _below_monitors(listener: int, uid: int) -> list[int]:
    table = procfs.table()
    found = []
    for pid, (ppid, _) in table.items():
        if table.get(ppid, (0,))[0] == listener:
            try:
                if procfs.real_uid(pid) == uid:
                    found.append(pid)
            except procfs.ProcessGone:
                pass
    return found
