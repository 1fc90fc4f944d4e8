"""The agent's session server as a wrapper's messages reach it: what it stores and what it
refuses, before anything of it is in the spool. (The whole path, through a real sshd and
wrapper, is in test_recording.py.)"""
import os
import pwd
import shutil
import socket
import subprocess
import sys
import time

import pytest

from sshtrail import config, events, wire
from sshtrail.session_server import PeerRefused, SessionServer
from sshtrail.spool import Spool


@pytest.fixture
def server(tmp_path):
    values = {k.name: k.default for k in config.DEFAULTS}
    values.update({"agent.socket": str(tmp_path / "agent.sock"),
                   "spool.path": str(tmp_path / "spool" / "spool.db")})
    srv = SessionServer(config.Config(values, None))
    srv.spool.start_recording(sid="s1", login="alice", mode="interactive", command="",
                              term="xterm", cols=80, rows=24, started=0.0, wrapper_pid=1,
                              wrapper_start=1)
    yield srv
    srv.server_close()


SESSION = {"sid": "s1", "login": "alice", "pid": 1}


def frames(n: int) -> bytes:
    return wire.FRAME.pack(0.5, b"o", n) + b"x" * n


def test_a_batch_is_stored_and_acknowledged(server):
    reply, _ = server.handle_message(dict(SESSION), 1, 1000, {"type": "frames", "seq": 1},
                                     frames(1000))
    assert reply == {"type": "ack", "seq": 1}
    assert [(k, d) for _, k, d in server.spool.frames("s1")] == [(b"o", b"x" * 1000)]


@pytest.mark.parametrize("seq", [True, 0, -1, 1 << 62, "1", 1.0])
def test_a_batch_without_a_usable_seq_is_refused(server, seq):
    with pytest.raises(wire.ProtocolError, match="valid seq"):
        server.handle_message(dict(SESSION), 1, 1000, {"type": "frames", "seq": seq}, frames(10))
    assert server.spool.recording("s1")["chunks"] == 0


def test_a_batch_bigger_than_a_chunk_may_be_is_refused(server):
    # The collector takes no chunk over wire.MAX_CHUNK: stored, it could never be delivered.
    with pytest.raises(wire.ProtocolError, match="over the"):
        server.handle_message(dict(SESSION), 1, 1000, {"type": "frames", "seq": 1},
                              frames(wire.MAX_CHUNK))
    assert server.spool.recording("s1")["chunks"] == 0
    reply, _ = server.handle_message(dict(SESSION), 1, 1000, {"type": "frames", "seq": 1},
                                     frames(wire.MAX_CHUNK - wire.FRAME.size))
    assert reply == {"type": "ack", "seq": 1}


def pam_call(pam_type="account"):
    from pam_module import hook
    env = {"PAM_TYPE": pam_type, "PAM_USER": "bob", "PAM_SERVICE": "sshd",
           "SSH_CONNECTION": "127.0.0.1 50600 127.0.0.1 22"}
    return hook.PamCall(env, 1, 1700000000.5).message()


def test_pam_calls_are_taken_from_root_only_and_for_this_spool(server):
    mine = dict(pam_call(), spool=server.cfg["spool.path"])
    with pytest.raises(PeerRefused, match="root only"):
        server.handle_message(None, 4242, 1000, mine, b"")
    with pytest.raises(PeerRefused, match="this agent writes"):
        server.handle_message(None, 4242, 0, dict(mine, spool="/elsewhere/spool.db"), b"")
    with pytest.raises(wire.ProtocolError, match="wrong type"):
        server.handle_message(None, 4242, 0, dict(mine, ppid="1"), b"")
    assert not server.spool.db.execute("SELECT count(*) FROM pam_attempts").fetchone()[0]
    assert server.handle_message(None, 4242, 0, mine, b"") == ({"type": "ack", "seq": "pam"}, None)
    assert server.spool.db.execute("SELECT login FROM pam_attempts").fetchall() == [("bob",)]


def test_spool_connections_are_handed_from_one_wrapper_to_the_next(server):
    import threading

    def one_connection(into):
        into.append(server.spool)
        server.release_spool()

    first = server.spool
    server.release_spool()
    seen = []
    t = threading.Thread(target=one_connection, args=(seen,))
    t.start()
    t.join()
    assert seen == [first]  # opened once, used by another thread after (any_thread)
    assert server.spool is first
    # One left in the middle of a transaction (an error half-way) is not handed on.
    first.db.execute("BEGIN IMMEDIATE")
    server.release_spool()
    assert server.spool is not first
    with pytest.raises(Exception, match="closed"):
        first.db.execute("SELECT 1")


# -- who may hold a connection: anyone may connect, a session's user included ----------------

# A process of another user that opens N connections and says nothing on them: prints how many
# the agent refused at once, then, told to, how many it closed in the end.
SILENT = r"""
import select, socket, sys, time
path, n = sys.argv[1], int(sys.argv[2])
socks = []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX)
    while True:
        try:
            s.connect(path)
            break
        except BlockingIOError:  # the listen backlog is full for a moment
            time.sleep(0.01)
    socks.append(s)
time.sleep(0.5)
held = [s for s in socks if not select.select([s], [], [], 0)[0]]
refused = [s for s in socks if s not in held and b"refused" in s.recv(4096)]
print("held", len(held), "refused", len(refused), flush=True)
sys.stdin.readline()
closed = sum(1 for s in held if select.select([s], [], [], 15)[0] and s.recv(4096) == b"")
print("closed", closed, flush=True)
"""


@pytest.fixture
def serving(tmp_path_factory):
    import tempfile
    import threading
    from pathlib import Path
    d = Path(tempfile.mkdtemp(prefix="sshtrail-sock-"))
    os.chmod(d, 0o755)  # the socket is for every user, and so is the way to it
    values = {k.name: k.default for k in config.DEFAULTS}
    values.update({"agent.socket": str(d / "agent.sock"),
                   "spool.path": str(tmp_path_factory.mktemp("spool") / "spool.db")})
    srv = SessionServer(config.Config(values, None))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.stop()
    shutil.rmtree(d)


def silent_connections(srv, n: int) -> subprocess.Popen:
    nobody = pwd.getpwnam("nobody")
    p = subprocess.Popen([sys.executable, "-I", "-c", SILENT, srv.cfg["agent.socket"], str(n)],
                         user=nobody.pw_uid, group=nobody.pw_gid, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    return p


def test_a_user_may_hold_only_so_many_silent_connections_and_not_for_long(serving):
    serving.pending_per_uid, serving.hello_timeout = 4, 1.0
    nobody = pwd.getpwnam("nobody").pw_uid
    p = silent_connections(serving, 7)
    try:
        assert p.stdout.readline().split() == ["held", "4", "refused", "3"]
        assert serving._pending == {nobody: 4}
        p.stdin.write("go on\n")
        p.stdin.flush()
        assert p.stdout.readline().split() == ["closed", "4"]  # each after hello_timeout
    finally:
        p.kill()
        p.wait()
    deadline = time.monotonic() + 5
    while serving._pending and time.monotonic() < deadline:
        time.sleep(0.01)
    assert serving._pending == {}  # every connection counted out: none is held against them
    (ev,) = serving.take_refusals()  # one event for the user, however many connections
    assert ev["event"] == "agent.peer_refused" and ev["code"] == "ST9004W"
    assert (ev["user_id"], ev["login"], ev["count"]) == (nobody, "nobody", 7)
    assert "had not said hello yet" in ev["reason"]  # the first: refused as it came in
    events.validate(dict(ev, server_id="h", server_hostname="h"))
    assert serving.take_refusals() == []  # reported once


def test_a_connection_that_says_something_wrong_is_refused_and_counted(serving):
    s = socket.socket(socket.AF_UNIX)
    s.connect(serving.cfg["agent.socket"])
    s.sendall(wire.pack({"type": "frames", "seq": 1}))
    assert b"frames before hello" in s.recv(4096)
    s.close()
    deadline = time.monotonic() + 5
    while not (evs := serving.take_refusals()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [(e["user_id"], e["count"], e["reason"]) for e in evs] == [
        (0, 1, "frames before hello")]


def test_a_first_message_may_not_be_big(serving):
    # Before it has said who it is, a connection may not make the agent buffer megabytes (32 of
    # them per user, for 5 s each): a length over FIRST_MESSAGE_MAX is refused as it is read.
    from sshtrail.session_server import FIRST_MESSAGE_MAX
    s = socket.socket(socket.AF_UNIX)
    s.connect(serving.cfg["agent.socket"])
    s.sendall((FIRST_MESSAGE_MAX + 1).to_bytes(4, "big"))
    reply = s.recv(4096)
    assert b'"type":"refused"' in reply and f"over the {FIRST_MESSAGE_MAX} limit".encode() in reply
    s.close()


def test_dropped_output_is_reported_as_soon_as_a_batch_says_so_once(server):
    session = dict(SESSION)
    for seq, dropped in ((1, 0), (2, 500), (3, 900)):
        header = {"type": "frames", "seq": seq, **({"dropped": dropped} if dropped else {})}
        server.handle_message(session, 1, 1000, header, frames(10))
    (ev,) = server.spool.query(kind="session.recording_failed")
    assert (ev["sid"], ev["dropped_bytes"]) == ("s1", 500)
    assert "being dropped from the recording (500 bytes so far)" in ev["reason"]


def test_a_peer_that_connected_and_ended_is_known_gone_whoever_has_its_pid_now(tmp_path):
    # SO_PEERCRED's pid outlives the process that connected: once it has ended, the pid may be
    # a wrapper's, and /proc would vouch for a connection now held by whoever it left it to.
    from sshtrail.session_server import peer_alive
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(tmp_path / "s"))
    srv.listen(2)
    mine = socket.socket(socket.AF_UNIX)
    mine.connect(str(tmp_path / "s"))
    conn, _ = srv.accept()
    assert peer_alive(conn)
    inherited = socket.socket(socket.AF_UNIX)
    child = os.fork()
    if child == 0:  # connects, and leaves the connection to its parent
        inherited.connect(str(tmp_path / "s"))
        os._exit(0)
    os.waitpid(child, 0)
    conn2, _ = srv.accept()
    assert not peer_alive(conn2)
    for s in (srv, mine, conn, inherited, conn2):
        s.close()


def test_a_hello_from_a_peer_gone_meanwhile_is_refused(server, monkeypatch):
    # Its pid taken by a wrapper of sshd's cannot be staged on one machine: /proc's lineage is
    # made to pass, and the peer reported gone, as peer_alive does in the test above.
    from sshtrail import session_server
    monkeypatch.setattr(session_server, "sshd_monitor_of", lambda pid, uid: (1, None))
    hello = {"type": "hello", "mode": "exec", "command": "true"}
    with pytest.raises(PeerRefused, match=f"process {os.getpid()} ended before its hello"):
        server.handle_message(None, os.getpid(), 0, hello, b"", still_there=lambda: False)
    assert [r["sid"] for r in server.spool.recordings()] == ["s1"]  # none started for it


def test_numbers_past_what_sqlite_stores_are_not_taken(server):
    # SQLite stores 64-bit integers: a bigger count raised OverflowError, which no handler
    # expected, in the middle of a session's end.
    huge = 1 << 70
    server.handle_message(dict(SESSION), 1, 1000, {"type": "frames", "seq": 1,
                                                  "dropped": huge}, frames(10))
    reply, _ = server.handle_message(dict(SESSION), 1, 1000, {
        "type": "end", "exit_status": huge, "bytes_out": huge, "dropped_bytes": huge}, b"")
    assert reply == {"type": "ack", "seq": "end"}
    row = server.spool.recording("s1")
    assert row["ended"] is not None and row["exit_status"] is None


def test_a_spool_locked_past_its_busy_timeout_is_a_spool_error(tmp_path):
    # What the handler answers by dropping the connection, for the wrapper to send again: an
    # sqlite3 error instead ended the session as lost while its wrapper lived on.
    import sqlite3
    from sshtrail.spool import SpoolError
    values = {k.name: k.default for k in config.DEFAULTS}
    values.update({"agent.socket": str(tmp_path / "agent.sock"), "spool.busy_timeout": 0.1,
                   "spool.path": str(tmp_path / "spool" / "spool.db")})
    srv = SessionServer(config.Config(values, None))
    try:
        srv.spool.start_recording(sid="s1", login="alice", mode="interactive", command="",
                                  term="xterm", cols=80, rows=24, started=0.0, wrapper_pid=1,
                                  wrapper_start=1)
        holder = sqlite3.connect(values["spool.path"], isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(SpoolError, match="cannot store recording chunk 1 of s1"):
                srv.handle_message(dict(SESSION), 1, 1000, {"type": "frames", "seq": 1},
                                   frames(10))
            with pytest.raises(SpoolError, match="write failed"):
                srv.spool.start_recording(sid="s2", login="bob", mode="exec", command="",
                                          term="", cols=80, rows=24, started=0.0,
                                          wrapper_pid=2, wrapper_start=2)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        reply, _ = srv.handle_message(dict(SESSION), 1, 1000, {"type": "frames", "seq": 1},
                                      frames(10))
        assert reply == {"type": "ack", "seq": 1}
    finally:
        srv.server_close()
