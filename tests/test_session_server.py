"""The agent's session server as a wrapper's messages reach it: what it stores and what it
refuses, before anything of it is in the spool. (The whole path, through a real sshd and
wrapper, is in test_recording.py.)"""
import pytest

from sshtrail import config, wire
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
