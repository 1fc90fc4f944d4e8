"""The wrapper's side of the agent protocol, against a stand-in agent on a real unix socket."""
import os
import socket
import threading
import time

from session_wrapper.agent_client import AgentClient, default_hello
from sshtrail import wire


def listening(path, backlog: int) -> socket.socket:
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(backlog)
    return srv


def stand_in_agent(path):
    """Welcomes one wrapper, acknowledges every batch; returns the batches it got."""
    srv = listening(path, 1)
    batches = []

    def serve():
        conn, _ = srv.accept()
        reader = wire.Reader()
        with conn, srv:
            while (msgs := reader.recv_from(conn)) is not None:
                for header, payload in msgs:
                    if header["type"] == "hello":
                        conn.sendall(wire.pack({"type": "welcome", "sid": "s1"}))
                    elif header["type"] == "frames":
                        batches.append(payload)
                        conn.sendall(wire.pack({"type": "ack", "seq": header["seq"]}))
                    elif header["type"] == "end":
                        conn.sendall(wire.pack({"type": "ack", "seq": "end"}))
                        return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return batches, thread


def test_no_batch_outgrows_what_a_chunk_may_hold(tmp_path):
    # batch_bytes is an operator's setting; a chunk over wire.MAX_CHUNK could never be stored
    # by the agent nor taken by the collector, so the client seals before that, whatever it says.
    batches, thread = stand_in_agent(tmp_path / "agent.sock")
    client = AgentClient(str(tmp_path / "agent.sock"), default_hello("interactive", "", 80, 24),
                         batch_s=60.0, batch_bytes=64 << 20, buffer_bytes=256 << 20)
    assert client.connect()
    read = b"x" * 65536  # the most one read of the relay brings
    for i in range(200):
        client.add(b"o" if i % 7 else b"i", read)
    assert client.finish({"exit_status": 0}, timeout=10.0)
    thread.join(10)
    assert len(batches) > 1 and max(map(len, batches)) <= wire.MAX_CHUNK
    got = [(kind, data) for b in batches for _, kind, data in wire.unpack_frames(b)]
    assert sum(len(data) for _, data in got) == 200 * len(read)  # nothing lost on the way
    assert sum(kind == b"i" for kind, _ in got) == len([i for i in range(200) if i % 7 == 0])


def test_a_busy_agent_socket_is_waited_for_not_taken_for_an_absent_agent(tmp_path):
    # A unix socket whose backlog is full refuses a connect (EAGAIN) instead of queueing it: a
    # burst of logins (their PAM calls and wrappers) must not leave sessions unrecorded.
    path = str(tmp_path / "agent.sock")
    srv = listening(path, 0)
    fillers = []
    while True:  # connections nobody has accepted yet, up to the backlog
        c = socket.socket(socket.AF_UNIX)
        c.setblocking(False)
        try:
            c.connect(path)
        except BlockingIOError:
            c.close()
            break
        fillers.append(c)
    hello = default_hello("interactive", "", 80, 24)
    assert not AgentClient(path, hello, batch_s=1, batch_bytes=1 << 20,
                           buffer_bytes=1 << 20).connect(timeout=0.2)

    accepted = []

    def accept_later():
        time.sleep(0.3)
        accepted.extend(srv.accept()[0] for _ in fillers)  # queued first, taken first
        conn, _ = srv.accept()
        accepted.append(conn)
        conn.settimeout(2)
        if wire.Reader().recv_from(conn):
            conn.sendall(wire.pack({"type": "welcome", "sid": "s1"}))

    thread = threading.Thread(target=accept_later, daemon=True)
    thread.start()
    client = AgentClient(path, hello, batch_s=1, batch_bytes=1 << 20, buffer_bytes=1 << 20)
    assert client.connect(timeout=5.0), client.error
    assert client.sid == "s1"
    thread.join(5)
    for c in accepted + fillers + [srv]:
        c.close()


def test_output_read_within_the_window_joins_its_frame_and_a_batch_says_when_it_is_due(tmp_path):
    # The relay adds every read (4 KiB on a pty); reads within COALESCE_S of an output frame's
    # start join that frame, whose header gets its length only when it closes.
    batches, thread = stand_in_agent(tmp_path / "agent.sock")
    client = AgentClient(str(tmp_path / "agent.sock"), default_hello("interactive", "", 80, 24),
                         batch_s=0.05, batch_bytes=1 << 20, buffer_bytes=1 << 20)
    assert client.connect()
    t0 = client.t0
    assert client.wake_at is None  # nothing pending: the relay may sleep as long as it likes
    client.add(b"o", b"ab", t0 + 1.000)
    assert client.wake_at == t0 + 1.000 + 0.05  # the batch is due batch_s after it began
    client.add(b"o", b"cd", t0 + 1.009)  # within COALESCE_S (10 ms) of the frame's start
    client.add(b"r", b"100x30", t0 + 1.0095)  # closes the output frame
    client.add(b"o", b"ef", t0 + 1.011)
    client.add(b"i", b"q", t0 + 1.012)
    client.add(b"o", b"gh", t0 + 1.022)
    client.add(b"o", b"ij", t0 + 1.031)
    client.add(b"o", b"kl", t0 + 1.033)  # past the window of the frame before
    client.add(b"o", b"mn", t0 + 1.034)  # still open when the batch is sealed
    assert client.wake_at == t0 + 1.05  # later frames do not move the batch's due time
    client.seal()
    assert client.wake_at is None
    assert client.finish({"exit_status": 0}, timeout=10.0)
    thread.join(10)
    frames = [(round(t, 4), kind, data) for b in batches for t, kind, data in wire.unpack_frames(b)]
    assert frames == [(1.0, b"o", b"abcd"), (1.0095, b"r", b"100x30"), (1.011, b"o", b"ef"),
                      (1.012, b"i", b"q"), (1.022, b"o", b"ghij"), (1.033, b"o", b"klmn")]


def test_a_refused_wrapper_neither_asks_again_nor_holds_output(tmp_path):
    # The agent refuses from the wrapper's kernel credentials, which do not change: asking
    # again every second would only fill its log, and output held for it would never go.
    path = str(tmp_path / "agent.sock")
    srv = listening(path, 8)
    hellos = []

    def refuse():
        with srv:
            srv.settimeout(3.0)
            try:
                while True:
                    conn, _ = srv.accept()
                    with conn:
                        hellos.extend(wire.Reader().recv_from(conn) or [])
                        conn.sendall(wire.pack({"type": "refused", "reason": "not started by sshd"}))
            except OSError:
                pass

    thread = threading.Thread(target=refuse, daemon=True)
    thread.start()
    client = AgentClient(path, default_hello("interactive", "", 80, 24), batch_s=0.01,
                         batch_bytes=1 << 20, buffer_bytes=1 << 20)
    assert not client.connect() and client.refused == "not started by sshd"
    client.add(b"o", b"output nobody will take")
    assert client.wake_at is None  # no batch, no retry: the relay sleeps until it has work
    client._next_retry = 0.0
    client.tick()
    assert client.sock is None and client.dropped_bytes == len(b"output nobody will take")
    assert not client.finish({"exit_status": 0}, timeout=1.0)
    thread.join(5)
    assert len(hellos) == 1


def test_a_lost_agent_is_asked_again_with_nothing_to_deliver(tmp_path):
    # A session that prints nothing still comes back to a restarted agent within a second: the
    # resume tells it the session lives on, and its tracer follows the session again.
    path = str(tmp_path / "agent.sock")
    hellos = []

    def agent(srv, answer: bool):
        with srv:
            conn, _ = srv.accept()
            with conn:
                (header, _), = wire.Reader().recv_from(conn)
                hellos.append(header)
                conn.sendall(wire.pack({"type": "welcome", "sid": "s1"}))
                if answer:
                    conn.recv(1)  # until the wrapper goes
    first = threading.Thread(target=agent, args=(listening(path, 1), False), daemon=True)
    first.start()
    client = AgentClient(path, default_hello("exec", "sleep 60", 80, 24), batch_s=0.05,
                         batch_bytes=1 << 20, buffer_bytes=1 << 20)
    assert client.connect()
    first.join(5)  # that agent is gone
    client.pump_read()
    assert client.sock is None and client.lost_agent
    assert client.wake_at is not None and client.wake_at <= time.monotonic() + 1.0
    os.unlink(path)
    second = threading.Thread(target=agent, args=(listening(path, 1), True), daemon=True)
    second.start()
    time.sleep(max(0.0, client.wake_at - time.monotonic()))
    client.tick()
    assert client.sock is not None
    assert [h.get("resume") for h in hellos] == [None, "s1"]
    client.sock.close()
    second.join(5)


def test_a_batch_after_output_was_dropped_says_how_much_so_far(tmp_path):
    # The total goes with the end, which a killed wrapper never sends: every batch sealed after
    # a drop carries the count so far, and the agent reports the first at once.
    client = AgentClient(str(tmp_path / "nobody.sock"), default_hello("interactive", "", 80, 24),
                         batch_s=60.0, batch_bytes=1 << 20, buffer_bytes=1000)
    assert not client.connect()  # no agent: batches wait, as for a slow one
    client.add(b"o", b"a" * 800)
    client.seal()
    client.add(b"o", b"b" * 500)  # over buffer_bytes with the 800 waiting: dropped
    client.add(b"o", b"c" * 100)
    client.seal()
    headers = [wire.Reader().feed(msg)[0][0] for msg, _ in client._unacked.values()]
    assert headers == [{"type": "frames", "seq": 1}, {"type": "frames", "seq": 2, "dropped": 500}]


def test_a_hello_fits_the_agents_first_message_limit_whatever_the_command(monkeypatch):
    from sshtrail.session_server import FIRST_MESSAGE_MAX
    # The longest command sshd hands over (128 KiB, one string of the environment), of the
    # characters JSON writes longest (\u001b: 6 bytes each), and bytes that are not UTF-8.
    monkeypatch.setenv("TERM", "\x1b" * 131071)
    for command in ("\x1b" * 131071, "é" * 65535, "caf\udce9" * 32767):
        hello = default_hello("exec", command, 0, 0)
        assert len(wire.pack(hello)) < FIRST_MESSAGE_MAX
        assert hello["command"] == command[:wire.COMMAND_MAX].replace("\udce9", "\ufffd")
        assert hello["command_bytes"] == len(command.encode("utf-8", "surrogateescape"))
        assert len(hello["term"]) == wire.TERM_MAX
    assert "command_bytes" not in default_hello("exec", "x" * wire.COMMAND_MAX, 0, 0)
