"""Sorting host events of SSH connections into their sessions (sshtrail.connection_events), on
a real process tree standing in for sshd's: this test process as the listener, a child of it as
a connection's monitor, and the monitor's child as the process that runs as the user."""
import os
import sqlite3
import subprocess
import time

import pytest

from sshtrail import procfs, sessionid
from sshtrail.connection_events import ConnectionEvents


@pytest.fixture
def tree():
    monitor = subprocess.Popen(["sh", "-c", "sleep 30 & wait"])
    deadline = time.monotonic() + 5
    while True:
        kids = [p for p, (ppid, _) in procfs.table().items() if ppid == monitor.pid]
        if kids or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    yield monitor.pid, kids[0]
    monitor.kill()
    subprocess.run(["pkill", "-P", str(monitor.pid)])
    monitor.wait()


@pytest.fixture
def db():
    d = sqlite3.connect(":memory:")
    d.execute("CREATE TABLE pam_sessions (conn TEXT, pid INTEGER, sid TEXT, login TEXT, "
              "started REAL)")
    return d


def conns(patience=5.0):
    c = ConnectionEvents("host-1", patience)
    c.listeners = {os.getpid(): procfs.start_time(os.getpid())}
    return c


def ev(pid, ppid=0, kind="open"):
    return {"kind": kind, "pid": pid, "ppid": ppid, "path": "/etc/hostname"}


def sid_of(monitor):
    return sessionid.derive("host-1", procfs.boot_id(), monitor, procfs.start_time(monitor))


def test_an_event_waits_for_its_session_and_is_placed_in_it(tree, db):
    monitor, child = tree
    c = conns()
    c.add([ev(child)], now=100.0)
    assert c.ready(db, now=100.5) == []  # held: a wrapper may still say hello
    assert c.ready(db, now=102.0) == []  # no session yet: it waits
    db.execute("INSERT INTO pam_sessions VALUES ('c', ?, ?, 'alice', 0)",
               (monitor, sid_of(monitor)))
    (placed,) = c.ready(db, now=103.0)
    assert placed[1:] == (sid_of(monitor), "alice", False)
    # Known now: the session's row may go (it closed), later events still find it.
    db.execute("DELETE FROM pam_sessions")
    c.add([ev(child, kind="connect")], now=104.0)
    assert [p[1] for p in c.ready(db, now=105.5)] == [sid_of(monitor)]


def test_a_session_the_agent_was_told_of_needs_no_row(tree, db):
    monitor, child = tree
    c = conns()
    c.opened(monitor, procfs.start_time(monitor), "told-sid", "bob")
    c.add([ev(child)], now=100.0)
    assert [p[1:3] for p in c.ready(db, now=101.5)] == [("told-sid", "bob")]


def test_what_is_no_session_is_let_go_and_the_monitor_itself_is_not_reported(tree, db):
    monitor, child = tree
    c = conns(patience=5.0)
    c.add([ev(monitor, kind="connect")], now=100.0)  # authentication's, PAM's: root's own work
    c.add([ev(child)], now=100.0)
    assert c.ready(db, now=104.0) == [] and len(c._waiting) == 1
    assert c.ready(db, now=106.0) == [] and len(c._waiting) == 0  # never a session
    assert c.unplaced == 0


def test_at_the_agents_stop_what_could_still_become_a_session_is_counted(tree, db):
    monitor, child = tree
    c = conns(patience=5.0)
    c.add([ev(child), ev(child, kind="connect")], now=100.0)
    c.add([ev(child, kind="exec")], now=90.0)  # its patience is out: never a session
    assert c.ready(db, now=100.5, final=True) == []
    assert c.cut_short == 2 and len(c._waiting) == 0


def test_the_wrappers_own_start_is_left_out(tree, db):
    monitor, child = tree
    c = conns()
    c.opened(monitor, procfs.start_time(monitor), "s", "carol")
    c.add([ev(child, kind="exec")], now=100.0)  # its exec of the ForceCommand, its imports
    c.wrapper(child)  # then its hello
    assert c.ready(db, now=101.5) == []


def test_a_gone_process_is_found_through_its_parent_or_counted(tree, db):
    monitor, child = tree
    c = conns()
    c.opened(monitor, procfs.start_time(monitor), "s", "dave")
    gone = subprocess.Popen(["true"])
    gone.wait()
    c.add([ev(gone.pid, ppid=child)], now=100.0)  # forked by a process that is still there
    assert [p[1] for p in c.ready(db, now=101.5)] == ["s"]
    c.add([ev(gone.pid, ppid=gone.pid)], now=102.0)  # nothing left to find its connection by
    assert c.unplaced == 1 and c.ready(db, now=104.0) == []


def test_only_sshd_processes_whose_parent_is_not_sshd_are_listeners(monkeypatch):
    table = {10: (1, 5), 11: (10, 6), 12: (11, 7), 20: (1, 8)}
    monkeypatch.setattr(procfs, "table", lambda: table)
    monkeypatch.setattr(procfs, "is_sshd", lambda pid: pid in (10, 11, 12))
    c = ConnectionEvents("h", 1.0)
    assert c.new_listeners() == [10]
    assert c.new_listeners() == []  # followed already
    table[10] = (1, 9)  # restarted under the same pid: a new listener
    assert c.new_listeners() == [10]


def test_a_process_placed_before_stays_in_its_connection_once_out_of_its_tree(tree, db):
    # A daemon the session left behind is reparented: its parents no longer lead to sshd.
    monitor, child = tree
    c = conns()
    c.opened(monitor, procfs.start_time(monitor), "s", "erin")
    c.add([ev(child)], now=100.0)
    c.listeners = {}  # now nothing leads from the child to a listener
    c.add([ev(child)], now=100.1)
    c.add([ev(os.getpid())], now=100.2)  # a process never seen: nowhere to go
    assert [p[1] for p in c.ready(db, now=101.5)] == ["s", "s"]
    assert c.unplaced == 1


def test_a_spool_that_cannot_be_read_leaves_events_waiting(tree, db):
    # The lookup runs inside the tracer's poll: an error there must not end host events.
    monitor, child = tree
    c = conns()
    broken = sqlite3.connect(":memory:")  # no pam_sessions table: every read fails
    c.add([ev(child)], now=100.0, db=broken)
    assert c.ready(broken, now=101.5) == [] and c._count == 1
    db.execute("INSERT INTO pam_sessions VALUES ('c', ?, ?, 'frank', 0)",
               (monitor, sid_of(monitor)))
    assert [p[2] for p in c.ready(db, now=102.0)] == ["frank"]
