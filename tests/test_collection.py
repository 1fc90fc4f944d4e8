"""Central collection end to end: a real collector process over real mutual TLS, hosts enrolled
through the real CLI or library, the real uploader (inside the real agent, or on its own), and
`sshtrail verify` over the store. The lab sshd provides real logins and recorded sessions."""
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import time

import pytest
import requests

from collector_proc import CollectorProc, SimHost, enroll_trail
from sshtrail import asciicast, batch, events, signing
from sshtrail.spool import Spool
from sshtrail import config as sconfig
from terminal import PROMPT, Terminal, shell_user
from ttyrun import run_on_a_tty

pytestmark = pytest.mark.integration


@pytest.fixture
def collector():
    c = CollectorProc().start()
    yield c
    c.close()


def spool_events(trail) -> list[dict]:
    spool = Spool.from_config(sconfig.load(trail.config))
    try:
        return [json.loads(b) for (b,) in spool.db.execute("SELECT body FROM events ORDER BY seq")]
    finally:
        spool.close()


def read_cast(data: bytes):
    header, frames = asciicast.read(data.splitlines(keepends=True))
    return header, list(frames)


def test_login_and_recorded_session_reach_the_collector(trail_factory, collector):
    trail = trail_factory()
    enroll_trail(trail, collector)
    user = shell_user(trail.lab)
    term = Terminal(trail.lab, user)
    term.expect(re.escape(PROMPT))
    term.send("echo marker-$((6*7))\r")
    term.expect(rb"marker-42")
    # While the session still runs, its recording is already at the collector.
    start = collector.wait_for(lambda e: len(e) == 1, type="session.start", user=user.login)[0]
    deadline = time.monotonic() + 20
    while True:
        r = collector.get(f"/v1/sessions/{start['sid']}/recording")
        if r.status_code == 200 and b"marker-42" in r.content:
            break
        assert time.monotonic() < deadline, f"no live recording at the collector: {r.status_code}"
        time.sleep(0.2)
    term.send("exit 0\r")
    assert term.wait() == 0

    evs = collector.wait_for(lambda e: any(x["event"] == "session.recording" for x in e),
                             user=user.login, what="session.recording")
    logins = [e for e in evs if e["event"] == "user.login"]
    assert len(logins) == 1 and logins[0]["success"] is True
    assert all(e["server_id"] == "lab-host" for e in evs)
    # The collector's copy is the host's, byte for byte, chain fields included.
    by_uid = {e["uid"]: e for e in spool_events(trail)}
    assert all(by_uid[e["uid"]] == e for e in evs)

    deadline = time.monotonic() + 20
    while True:  # the end of the session reaches the recording too
        cast = collector.get(f"/v1/sessions/{start['sid']}/recording").content
        header, frames = read_cast(cast)
        out = "".join(d for _, c, d in frames if c == "o")
        if "exit" in out:
            break
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert "marker-42" in out and header["title"].startswith(user.login)
    path = trail.dir / "from-collector.cast"
    path.write_bytes(cast)
    r = run_on_a_tty(["asciinema", "cat", str(path)], cwd=trail.dir)
    assert r.returncode == 0 and b"marker-42" in r.stdout

    # The CLI reads the collector too, with a reader token.
    token = trail.dir / "reader.token"
    token.write_text(collector.reader_token)
    r = trail.cli("sessions", "--json", "--collector", collector.url, "--token-file", str(token),
                  "--ca", str(collector.ca_file))
    assert start["sid"] in r.stdout
    r = trail.cli("events", "--json", "--collector", collector.url, "--token-file", str(token),
                  "--ca", str(collector.ca_file), "--user", user.login, "--type", "user.login")
    assert [json.loads(x)["uid"] for x in r.stdout.splitlines()] == [logins[0]["uid"]]
    assert collector.verify().returncode == 0


def test_collector_down_for_a_while_then_everything_arrives_once(trail_factory, collector):
    trail = trail_factory()
    enroll_trail(trail, collector)
    collector.wait_for(lambda e: any(x["event"] == "agent.start" for x in e))
    collector.stop()
    users = [trail.lab.add_user(f"down{i}") for i in range(3)]
    for u in users:
        assert trail.lab.ssh(u, "true").returncode == 0
    trail.wait_for(lambda e: len(e) == 3, type="session.end")
    st = json.loads(trail.cli("status", "--json").stdout)
    assert st["events"] > 0 and st["failures"] > 0 and st["last_error"]
    collector.start()
    mine = spool_events(trail)
    got = collector.wait_for(lambda e: len(e) >= len(mine), what="every spooled event")
    time.sleep(1.0)  # a duplicate would show up now
    got = collector.events()
    uids = [e["uid"] for e in got]
    assert len(uids) == len(set(uids))
    assert set(uids) >= {e["uid"] for e in mine}
    assert collector.verify().returncode == 0


def test_agent_killed_during_upload_20_times(trail_factory, collector):
    """Like Teleport's upload chaos test: SIGKILL the agent at random moments while it uploads
    a backlog of events and a recording; in the end the collector has each event exactly once
    and the whole recording."""
    trail = trail_factory()
    user = trail.lab.add_user("chaos")
    # A recording of ~5 MB of output, and thousands of events, spooled while not enrolled.
    argv, env = trail.lab.ssh_argv(user, "head -c 3500000 /dev/urandom | base64", tty=True)
    r = subprocess.run(argv, env=env, capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0
    trail.wait_for(lambda e: any(x["event"] == "session.recording" for x in e), user=user.login)
    spool = Spool.from_config(sconfig.load(trail.config))
    for i in range(0, 6000, 500):
        spool.append(*[events.new("user.login", login=f"bulk{i + j}", success=True,
                                  method="publickey") for j in range(500)])
    spool.close()
    trail.write_config(trail.settings + "\n[upload]\nbatch_events = 300\n")
    enroll_trail(trail, collector)
    rng = random.Random(7)
    for _ in range(20):
        trail.agent.send_signal(signal.SIGKILL)
        trail.agent.wait()
        trail.agent = None
        trail.start_agent()
        time.sleep(rng.uniform(0.05, 0.5))
    mine = spool_events(trail)
    deadline = time.monotonic() + 120
    while len(collector.events(host="lab-host")) < len(mine):
        assert time.monotonic() < deadline, "the upload did not finish"
        time.sleep(0.5)
    trail.stop_agent()
    got = collector.events(host="lab-host")
    uids = [e["uid"] for e in got]
    assert len(uids) == len(set(uids)), "an event arrived twice"
    assert set(uids) >= {e["uid"] for e in mine}
    rec = [e for e in mine if e["event"] == "session.recording"][0]
    local = trail.dir / "local.cast"
    trail.cli("export", rec["sid"], "-o", str(local))
    remote = collector.get(f"/v1/sessions/{rec['sid']}/recording").content
    assert read_cast(remote)[1] == read_cast(local.read_bytes())[1]
    assert collector.verify().returncode == 0


# -- who may write and read -------------------------------------------------------------------

@pytest.fixture
def host(tmp_path, collector):
    h = SimHost(tmp_path / "h1", collector, "host-one")
    h.enroll(collector)
    yield h
    h.close()


def identity(h):
    d = h.cfg["upload.identity_dir"]
    return f"{d}/host.crt", f"{d}/host.key", f"{d}/ca.crt"


def post(collector, body: bytes, *, cert=None, key=None, sign_with=None, headers=None):
    h = {"Content-Type": batch.MEDIA_TYPE, **(headers or {})}
    if sign_with is not None:
        h[batch.SIGNATURE_HEADER] = signing.sign(signing.load_key(sign_with), body)
    return requests.post(collector.url + "/v1/events", data=body, headers=h,
                         verify=str(collector.ca_file), cert=(cert, key) if cert else None,
                         timeout=30)


def chained(h, n: int) -> list[str]:
    """n events through the host's spool (so they are chained), claimed and released: bodies."""
    h.add_logins(n)
    b = h.spool.claim(n)
    h.spool.release(b.id)
    return b.bodies


def stored_count(collector) -> int:
    return len(collector.events())


def test_uploads_need_an_enrolled_unrevoked_host_certificate(tmp_path, collector, host):
    from pki import issue_for_test
    from collector.ca import CA
    body = batch.encode(chained(host, 3))
    cert, key, _ = identity(host)
    # No client certificate.
    r = post(collector, body, sign_with=key)
    assert r.status_code == 401 and "client certificate" in r.json()["error"]
    # Signed by another key than the certificate's.
    other = SimHost(tmp_path / "h2", collector, "host-two")
    other.enroll(collector)
    ocert, okey, _ = identity(other)
    r = post(collector, body, cert=cert, key=key, sign_with=okey)
    assert r.status_code == 401
    # Another host's certificate, sending host-one's events.
    r = post(collector, body, cert=ocert, key=okey, sign_with=okey)
    assert r.status_code == 400 and "may write only" in r.json()["error"]
    # Expired certificate (signed by the right CA): the handshake fails.
    ca = CA(collector.dir / "state")
    now = time.time()
    expired = tmp_path / "expired.crt"
    expired.write_text(issue_for_test(ca, signing.load_key(key), "host-one",
                                      not_before=now - 7200, not_after=now - 3600))
    # (Under TLS 1.3 the server checks the client's certificate after the client thinks the
    # handshake is done: the refusal reaches it as an SSL alert or as a closed connection.)
    with pytest.raises(requests.exceptions.ConnectionError):
        post(collector, body, cert=str(expired), key=key, sign_with=key)
    # A certificate from a CA of someone else's: the handshake fails.
    stranger = CollectorProc()
    try:
        with pytest.raises(requests.exceptions.ConnectionError):
            post(collector, body, cert=str(stranger.dir / "state" / "server.crt"),
                 key=str(stranger.dir / "state" / "server.key"))
    finally:
        stranger.close()
    assert stored_count(collector) == 0
    # The right one works; after revocation it does not.
    assert post(collector, body, cert=cert, key=key, sign_with=key).status_code == 200
    collector.cli("collector", "revoke", "host-one")
    body2 = batch.encode(chained(host, 2)[-2:])
    r = post(collector, body2, cert=cert, key=key, sign_with=key)
    assert r.status_code == 403 and "revoked" in r.json()["error"]
    assert stored_count(collector) == 3
    other.close()


def test_tokens_are_single_use_and_reading_needs_a_reader_token(tmp_path, collector, host):
    from sshtrail.enroll import EnrollError
    token = collector.enroll_token()
    SimHost(tmp_path / "a", collector, "host-a").enroll(collector, token)
    with pytest.raises(EnrollError):
        SimHost(tmp_path / "b", collector, "host-b").enroll(collector, token)
    assert not (tmp_path / "b" / "identity" / "host.crt").exists()
    # Reading: no token, a wrong token, a host certificate: all refused.
    cert, key, _ = identity(host)
    for kw in ({}, {"headers": {"Authorization": "Bearer nope"}}, {"cert": (cert, key)}):
        r = requests.get(collector.url + "/v1/events", verify=str(collector.ca_file), timeout=10,
                         **kw)
        assert r.status_code == 401
    assert collector.get("/v1/events").status_code == 200


def test_bad_batches_get_the_right_status_and_change_nothing(host, collector):
    cert, key, _ = identity(host)
    bodies = chained(host, 4)
    good = batch.encode(bodies[:2])
    assert post(collector, good, cert=cert, key=key, sign_with=key).json() == {
        "stored": 2, "duplicates": 0}
    before = collector.events()
    ev = json.loads(bodies[2])
    del ev["login"]
    cases = {
        "oversized": (b"x" * (9 << 20), 413),
        "truncated": (batch.encode(bodies[2:])[:-40], 400),
        "not JSON": (b"hello\n", 400),
        "wrong schema": (events.to_json(ev).encode() + b"\n", 400),
        "empty": (b"", 400),
    }
    for name, (body, status) in cases.items():
        r = post(collector, body, cert=cert, key=key, sign_with=key)
        assert r.status_code == status, (name, r.text)
        assert r.json()["error"], name
    # A duplicate batch is fine and stores nothing new.
    assert post(collector, good, cert=cert, key=key, sign_with=key).json() == {
        "stored": 0, "duplicates": 2}
    assert collector.events() == before


# -- verify -------------------------------------------------------------------------------------

def test_verify_names_deleted_altered_reordered_and_missing_events(tmp_path, collector, host):
    host.add_logins(30)
    host.drain()
    assert collector.verify().returncode == 0
    collector.stop()
    db = sqlite3.connect(collector.dir / "state" / "collector.db")

    def raw_of(seq):
        return db.execute("SELECT raw FROM events WHERE server_id = 'host-one' AND seq = ?",
                          (seq,)).fetchone()[0]
    # Altered: a login changed in the stored text, searchable column left alone.
    db.execute("UPDATE events SET raw = ? WHERE seq = 5",
               (raw_of(5).replace('"login":"alice"', '"login":"mallory"'),))
    # Reordered: two events' texts swapped.
    r10, r11 = raw_of(10), raw_of(11)
    db.execute("UPDATE events SET raw = ? WHERE seq = 10", (r11,))
    db.execute("UPDATE events SET raw = ? WHERE seq = 11", (r10,))
    # Deleted.
    db.execute("DELETE FROM events WHERE seq = 20")
    db.commit()
    db.close()
    r = collector.verify()
    assert r.returncode == 1, r.stdout
    assert "altered: seq 5" in r.stdout
    assert re.search(r"seq 1[01]", r.stdout)
    assert "gap: seq 20 missing" in r.stdout
    assert "bad_signature" in r.stdout
    r = collector.verify("--host", "host-one")
    assert r.returncode == 1


def test_verify_reports_a_gap_in_what_a_host_sent(collector, host):
    cert, key, _ = identity(host)
    bodies = chained(host, 6)
    for part in (bodies[:2], bodies[4:]):  # 3 and 4 never sent
        assert post(collector, batch.encode(part), cert=cert, key=key,
                    sign_with=key).status_code == 200
    r = collector.verify()
    assert r.returncode == 1 and "seq 3-4 (2 events) missing" in r.stdout


def test_two_collectors_sharing_postgresql_take_uploads_from_several_hosts(tmp_path,
                                                                           postgres_db):
    import shutil
    import threading
    blobs = tmp_path / "recordings"
    c1 = CollectorProc(database=postgres_db, blob_dir=blobs)
    c2 = CollectorProc(database=postgres_db, blob_dir=blobs, init=False)
    shutil.copytree(c1.dir / "state", c2.dir / "state")  # one CA, one service
    hosts = []
    try:
        c1.start()
        c2.start()
        hosts = [SimHost(tmp_path / f"h{i}", c1, f"pg-host-{i}", url=(c1, c2)[i % 2].url)
                 for i in range(4)]
        sent = {}
        for h in hosts:
            h.enroll((c1, c2)[len(sent) % 2])  # tokens and hosts live in the shared database
            sent[h.server_id] = h.add_logins(2500)
        errors = []

        def drain(h):
            try:
                h.drain(timeout=120)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)
        threads = [threading.Thread(target=drain, args=(h,)) for h in hosts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for h in hosts:
            got = [e["uid"] for e in c2.events(host=h.server_id)]
            assert len(got) == len(set(got)) == 2500 and set(got) == set(sent[h.server_id])
        r = c1.verify()
        assert r.returncode == 0, r.stdout
    finally:
        for h in hosts:
            h.close()
        c2.close()
        c1.close()


def test_every_route_is_documented(collector):
    from collector.app import build_app
    from collector import openapi
    app = build_app(None, None, None)
    routes = {(r.path.replace(":int", ""), m.lower()) for r in app.routes for m in r.methods
              if m != "HEAD"}
    documented = {(p, m) for p, ops in openapi.DOCUMENT["paths"].items() for m in ops}
    assert routes == documented
    r = requests.get(collector.url + "/v1/openapi.json", verify=str(collector.ca_file), timeout=10)
    assert r.json()["paths"].keys() == openapi.DOCUMENT["paths"].keys()


def test_collector_connections_have_nagle_off():
    # With Nagle on, a response's body waited for the client's delayed ACK of its headers:
    # ~40 ms on every query and upload.
    import socket

    from collector.serve import ServeError, listen_socket
    lsock = listen_socket("127.0.0.1", 0)
    with lsock, socket.create_connection(lsock.getsockname()):
        conn, _ = lsock.accept()
        with conn:
            assert lsock.proto == socket.IPPROTO_TCP  # asyncio turns Nagle off only then
            assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        with pytest.raises(ServeError, match="cannot listen on 127.0.0.1"):
            listen_socket("127.0.0.1", lsock.getsockname()[1])


def test_worker_over_its_share_of_connections_asks_hosts_to_reconnect():
    # Hosts keep one connection each, so a first uneven split between workers would hold for
    # good: the worker over its share answers writes with `Connection: close`.
    from collector import balance
    from collector.app import Collector
    loads = balance.Loads(2)
    first, second = loads.slot(0), loads.slot(1)
    pid = os.fork()
    if pid == 0:  # the other worker, a process of its own, counting in the shared table
        for _ in range(3):
            second.opened()
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    first.opened()
    assert loads.counts() == [1, 3]
    assert second.over_share() and not first.over_share()
    saved = balance.slot
    try:
        balance.slot = second
        assert Collector._written({"ok": True}).headers["connection"] == "close"
        second.closed()  # 1 and 2: within an even split, rounded up
        assert not second.over_share()
        assert "connection" not in Collector._written({"ok": True}).headers
        balance.slot = None  # one worker alone: nothing to balance
        assert "connection" not in Collector._written({"ok": True}).headers
    finally:
        balance.slot = saved
