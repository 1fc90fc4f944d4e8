"""The uploader's own logic, against a scripted HTTPS collector that fails on purpose.

`Collector` below is a failure-injection harness, not the collector: a stdlib HTTPS server on
127.0.0.1 that requires a client certificate from a throwaway CA (collector.ca), records every
request and answers what the test scripted (200, 400, 409, 413, 500, 401, or drops the
connection). End-to-end tests against the real collector live elsewhere.
"""
from __future__ import annotations

import http.server
import json
import os
import random
import re
import signal
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from collections import deque

import pytest

from collector import ca as collector_ca
from sshtrail import batch, config, enroll, events, signing, uploader
from sshtrail.spool import Spool

HOST = "testhost"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- a throwaway PKI and a scripted collector ---------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA with a server certificate for 127.0.0.1, and an enrolled host's identity dir."""
    root = tmp_path_factory.mktemp("pki")
    collector_ca.init(root / "ca", ["127.0.0.1"])
    ca = collector_ca.CA(root / "ca")
    ident = root / "identity"
    ident.mkdir(mode=0o700)
    key = signing.generate_key()
    signing.save_key(key, ident / enroll.HOST_KEY)
    cert = ca.sign_csr(signing.make_csr(key, HOST), HOST, 1)
    (ident / enroll.HOST_CERT).write_text(cert)
    (ident / enroll.CA_CERT).write_text(ca.cert_pem)
    return {"ca": ca, "identity": str(ident), "cert": signing.load_cert(cert),
            "key_pem": (ident / enroll.HOST_KEY).read_text()}


class Request:
    __slots__ = ("method", "path", "headers", "body", "peer_cn", "at", "status")

    def __init__(self, method, path, headers, body, peer_cn):
        self.method, self.path, self.headers, self.body = method, path, headers, body
        self.peer_cn, self.at = peer_cn, time.monotonic()
        self.status = None  # what it was answered; None if dropped

    @property
    def kind(self) -> str:
        if self.path == "/v1/events":
            return "events"
        return "chunk" if "/chunks/" in self.path else "recording"

    @property
    def events(self) -> list[dict]:
        return [json.loads(line) for line in self.body.decode().splitlines()]

    @property
    def seqs(self) -> list[int]:
        return [ev["seq"] for ev in self.events]


class Collector:
    """Answers each request with the next scripted action for its kind ("events", "recording",
    "chunk"), else 200. An action is a status (int), (status, error text), "drop" (close the
    connection without an answer) or "hang" (answer nothing until `release` is set).
    `max_events` / `max_bytes`: answer 413 to an events batch over them."""

    def __init__(self, pki):
        self.requests: list[Request] = []
        self.script = {"events": deque(), "recording": deque(), "chunk": deque()}
        self.max_events = None
        self.max_bytes = None
        self.on_request = None  # called with each Request before it is answered
        self.uids: set[str] = set()
        self.release = threading.Event()
        self.lock = threading.Lock()
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the real one

            def log_message(self, *args):
                pass

            def do_POST(self):
                self._handle()

            do_PUT = do_POST

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                cert = self.connection.getpeercert()
                cn = dict(x[0] for x in cert["subject"])["commonName"]
                req = Request(self.command, self.path, dict(self.headers), body, cn)
                with collector.lock:
                    collector.requests.append(req)
                    script = collector.script[req.kind]
                    action = script.popleft() if script else 200
                if collector.on_request:
                    collector.on_request(req)
                if action == "drop":
                    self.close_connection = True
                    return
                if action == "hang":
                    collector.release.wait(30)
                    self.close_connection = True
                    return
                status, why = action if isinstance(action, tuple) else (action, "scripted")
                if req.kind == "events" and status == 200:
                    if collector.max_events and len(req.seqs) > collector.max_events or (
                            collector.max_bytes and len(body) > collector.max_bytes):
                        status, why = 413, "batch too large"
                if status == 200:
                    answer = {}
                    if req.kind == "events":
                        uids = [ev["uid"] for ev in req.events]
                        with collector.lock:
                            dup = sum(u in collector.uids for u in uids)
                            collector.uids.update(uids)
                        answer = {"stored": len(uids) - dup, "duplicates": dup}
                else:
                    answer = {"error": why}
                data = json.dumps(answer).encode()
                req.status = status
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(pki["ca"].server_cert_path, pki["ca"].server_key_path)
        ctx.load_verify_locations(pki["ca"].cert_path)
        ctx.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: no client certificate, no service
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()

    def answer(self, kind: str, *actions) -> None:
        with self.lock:
            self.script[kind].extend(actions)

    def of(self, kind: str) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.kind == kind]

    def delivered(self) -> list[dict]:
        """Events of every batch that was answered 200, in arrival order (duplicates kept)."""
        return [ev for r in self.of("events") if r.status == 200 for ev in r.events]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def collector(pki):
    c = Collector(pki)
    yield c
    c.close()


def make_cfg(tmp_path, pki, url, **settings) -> config.Config:
    values = {"spool.path": str(tmp_path / "spool" / "spool.db"), "server_id": HOST,
              "server_hostname": HOST, "upload.url": url, "upload.identity_dir": pki["identity"],
              "upload.timeout": 5.0, "upload.backoff_max": 2.0, "upload.idle_interval": 0.05,
              "upload.batch_events": 10, **settings}
    text = "\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items() if "." not in k)
    sections: dict[str, list[str]] = {}
    for k, v in values.items():
        if "." in k:
            sect, leaf = k.rsplit(".", 1)
            sections.setdefault(sect, []).append(f"{leaf} = {json.dumps(v)}")
    for sect, items in sections.items():
        text += f"\n[{sect}]\n" + "\n".join(items)
    path = tmp_path / "sshtrail.toml"
    path.write_text(text + "\n")
    return config.load(path)


@pytest.fixture
def setup(tmp_path, pki, collector):
    """(cfg, the spool the test writes to, make_uploader(cfg=None, **kw), make_cfg(**settings)
    -- the latter rewrites the test's config file with those settings)."""
    made = []

    def make_cfg_(**settings):
        return make_cfg(tmp_path, pki, collector.url, **settings)

    cfg = make_cfg_()
    spool = Spool.from_config(cfg)

    def make_uploader(cfg_=None, **kw):
        u = uploader.Uploader(cfg_ or cfg, rng=kw.pop("rng", random.Random(1)), **kw)
        made.append(u)
        return u

    yield cfg, spool, make_uploader, make_cfg_
    for u in made:
        u.close()
    spool.close()


def append_logins(spool: Spool, n: int, *, at: float | None = None) -> None:
    for i in range(n):
        spool.append(events.new("user.login", at=at, login=f"u{i}", success=True,
                                method="publickey"))


def drain(u: uploader.Uploader, max_steps: int = 100) -> int:
    """Step until a pass finds nothing to do; the number of passes that did something."""
    for n in range(max_steps):
        if not u.step():
            return n
    raise AssertionError("the uploader never ran out of work")


def sent_states(spool: Spool) -> dict[int, int]:
    """seq -> sent (0 waiting, 1 delivered, 2 set aside), read on a connection of its own
    (the collector's thread asks too)."""
    db = sqlite3.connect(spool.path)
    try:
        return dict(db.execute("SELECT seq, sent FROM events").fetchall())
    finally:
        db.close()


# -- events ----------------------------------------------------------------------------------

def test_events_go_in_seq_order_and_are_acked_only_after_200(setup, collector):
    cfg, spool, make_uploader, _ = setup
    append_logins(spool, 25)
    bodies = [b for (b,) in spool.db.execute("SELECT body FROM events ORDER BY seq")]
    unacked_at_request = []

    def check(req):  # while the collector holds the batch, the spool must not call it sent
        if req.kind == "events":
            unacked_at_request.append(all(sent_states(spool)[s] == 0 for s in req.seqs))
    collector.on_request = check
    u = make_uploader()
    assert drain(u) == 3
    posts = collector.of("events")
    assert [r.seqs for r in posts] == [list(range(1, 11)), list(range(11, 21)),
                                       list(range(21, 26))]
    assert unacked_at_request == [True, True, True]
    # Byte for byte the spool's bodies, as NDJSON.
    assert b"".join(r.body for r in posts) == b"".join(batch.encode([b]) for b in bodies)
    assert all(r.headers["Content-Type"] == batch.MEDIA_TYPE for r in posts)
    assert all(r.peer_cn == HOST for r in posts)  # mutual TLS with the host's certificate
    assert set(sent_states(spool).values()) == {1}
    assert spool.backlog()["events"] == 0


def test_signature_verifies_with_the_hosts_key_over_the_exact_body(setup, collector, pki):
    cfg, spool, make_uploader, _ = setup
    append_logins(spool, 3)
    spool.start_recording(**recording_row("s1"))
    spool.put_chunk("s1", 1, b"\x00\x01frames\xff", 8)
    drain(make_uploader())
    kinds = {r.kind for r in collector.requests}
    assert kinds == {"events", "recording", "chunk"}
    for r in collector.requests:
        sig = r.headers[batch.SIGNATURE_HEADER]
        assert signing.verify(pki["cert"], r.body, sig), r.path
        assert not signing.verify(pki["cert"], r.body + b" ", sig)


@pytest.mark.parametrize("failure", [500, "drop"])
def test_failures_are_retried_with_growing_capped_jittered_backoff_and_nothing_acked(
        setup, collector, failure):
    cfg, spool, make_uploader, _ = setup
    append_logins(spool, 5)
    collector.answer("events", *[failure] * 8)
    u = make_uploader(rng=random.Random(42))
    waits, ceilings = [], []
    for _ in range(8):
        assert u.step() is False
        waits.append(u.wait)
        ceilings.append(u.backoff_ceiling)
        assert set(sent_states(spool).values()) == {0}  # nothing acked, nothing set aside
        assert spool.db.execute("SELECT count(*) FROM claims"
                                ).fetchone()[0] == 0  # released for the retry
    # The ceiling doubles from a quarter second and stops at upload.backoff_max (2 s here);
    # each wait is drawn below it (full jitter).
    assert ceilings == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0]
    assert all(0 <= w <= c for w, c in zip(waits, ceilings))
    assert len({round(w / c, 6) for w, c in zip(waits, ceilings)}) == 8  # jittered
    assert uploader.status(u.cfg)["failures"] == 8
    assert "/v1/events" in uploader.status(u.cfg)["last_error"]
    # The collector comes back: the same events, in order, and then acked.
    assert u.step() is True
    assert u.failures == 0 and u.wait == 0
    posts = collector.of("events")
    assert len(posts) == 9 and all(r.seqs == [1, 2, 3, 4, 5] for r in posts)
    assert set(sent_states(spool).values()) == {1}


def test_run_loop_backs_off_then_delivers(setup, collector, caplog):
    cfg, spool, make_uploader, make_cfg_ = setup
    append_logins(spool, 3)
    collector.answer("events", 503, "drop", 429, 500)
    u = make_uploader(make_cfg_(**{"upload.backoff_max": 0.4}))
    stop = threading.Event()
    t = threading.Thread(target=u.run, args=(stop,))
    t.start()
    try:
        deadline = time.monotonic() + 10
        while spool.backlog()["events"] and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        stop.set()
        t.join(10)
    assert not t.is_alive()
    posts = collector.of("events")
    assert len(posts) == 5 and posts[-1].seqs == [1, 2, 3]
    # The delays it chose (full jitter under a ceiling doubling from 0.25 s to backoff_max),
    # and that it waited them out. Not how long each retry took in all: on a loaded machine a
    # dropped connection alone took 0.4 s to be seen as one.
    waits = [float(m.group(1)) for m in (re.search(r"retrying in ([0-9.]+) s", r.getMessage())
                                         for r in caplog.records) if m]
    ceilings = [0.25, 0.4, 0.4, 0.4]
    assert len(waits) == 4 and all(w <= c + 0.005 for w, c in zip(waits, ceilings)), waits
    gaps = [b.at - a.at for a, b in zip(posts, posts[1:])]
    assert all(g >= w - 0.01 for g, w in zip(gaps, waits)), (gaps, waits)
    assert spool.backlog()["events"] == 0


@pytest.mark.parametrize("status", [400, 409])
def test_refused_batch_is_set_aside_alone_and_reported_next(setup, collector, status):
    cfg, spool, make_uploader, _ = setup
    append_logins(spool, 25)
    collector.answer("events", 200, (status, "line 3: seq: expected a positive integer"))
    u = make_uploader()
    drain(u)
    states = sent_states(spool)
    assert [states[s] for s in range(1, 11)] == [1] * 10
    assert [states[s] for s in range(11, 21)] == [2] * 10  # dead letter, kept in the spool
    assert [states[s] for s in range(21, 27)] == [1] * 6
    posts = collector.of("events")
    assert [r.seqs for r in posts] == [list(range(1, 11)), list(range(11, 21)),
                                       list(range(21, 27))]
    # The next batch carries the report of what was set aside, and why.
    report = posts[2].events[-1]
    assert report["event"] == "upload.rejected"
    assert (report["first_seq"], report["last_seq"], report["count"]) == (11, 20, 10)
    assert "line 3: seq: expected a positive integer" in report["reason"]
    st = uploader.status(cfg)
    assert st["rejected"] == 10 and st["events"] == 0 and st["failures"] == 0
    assert "seq 11-20" in st["last_error"]


def test_413_halves_the_batch_until_it_fits(setup, collector):
    cfg, spool, make_uploader, _ = setup
    append_logins(spool, 10)
    collector.max_events = 3
    u = make_uploader()
    drain(u)
    posts = collector.of("events")
    sizes = [len(r.seqs) for r in posts]
    assert sizes[:3] == [10, 5, 2]  # halved on each 413
    accepted = [r for r in posts if len(r.seqs) <= 3]
    assert [s for r in accepted for s in r.seqs] == list(range(1, 11))
    assert set(sent_states(spool).values()) == {1}
    assert spool.backlog()["rejected"] == 0


def test_a_single_event_too_large_is_set_aside_and_the_rest_flows(setup, collector):
    cfg, spool, make_uploader, _ = setup
    append_logins(spool, 2)
    spool.append(events.new("user.login", login="big", success=True, method="publickey",
                            message="x" * 20000))
    append_logins(spool, 2)
    collector.max_bytes = 10000
    drain(make_uploader())
    states = sent_states(spool)
    assert states[3] == 2 and [states[s] for s in (1, 2, 4, 5, 6)] == [1] * 5
    report = [ev for ev in collector.delivered() if ev["event"] == "upload.rejected"]
    assert len(report) == 1 and report[0]["first_seq"] == report[0]["last_seq"] == 3
    assert "too large" in report[0]["reason"]


@pytest.mark.parametrize("status", [401, 403])
def test_identity_refused_is_never_dead_lettered(setup, collector, status, caplog):
    cfg, spool, make_uploader, _ = setup
    append_logins(spool, 4)
    collector.answer("events", *[(status, "certificate revoked for testhost")] * 3)
    u = make_uploader()
    with caplog.at_level("ERROR", logger="sshtrail.uploader"):
        for n in range(1, 4):
            assert u.step() is False
            assert u.failures == n and u.wait <= u.backoff_ceiling
            assert set(sent_states(spool).values()) == {0}
    assert "certificate revoked for testhost" in caplog.text
    assert uploader.status(cfg)["rejected"] == 0
    assert "certificate revoked" in uploader.status(cfg)["last_error"]
    assert u.step() is True
    assert set(sent_states(spool).values()) == {1}
    assert [r.seqs for r in collector.of("events")] == [[1, 2, 3, 4]] * 4


def test_logs_carry_neither_key_material_nor_bodies(setup, collector, pki, caplog):
    cfg, spool, make_uploader, _ = setup
    append_logins(spool, 12)
    collector.answer("events", 500, "drop", (400, "bad"), 401, (413, "too big"))
    with caplog.at_level("DEBUG", logger="sshtrail.uploader"):
        u = make_uploader()
        for _ in range(10):
            u.step()
    text = caplog.text
    assert text  # it did log
    key_lines = [ln for ln in pki["key_pem"].splitlines() if ln and "-----" not in ln]
    assert not any(ln in text for ln in key_lines)
    for (body,) in spool.db.execute("SELECT body FROM events"):
        assert json.loads(body)["uid"] not in text


# -- recordings ------------------------------------------------------------------------------

def recording_row(sid: str) -> dict:
    return dict(sid=sid, login="alice", mode="interactive", command="", term="xterm",
                cols=80, rows=24, started=time.time(), wrapper_pid=4242, wrapper_start=1)


def test_recordings_ship_while_the_session_runs(setup, collector):
    cfg, spool, make_uploader, _ = setup
    spool.start_recording(**recording_row("s1"))
    spool.put_chunk("s1", 1, b"chunk-one\x00\xff", 11)
    u = make_uploader()
    drain(u)
    kinds = [(r.kind, r.path) for r in collector.requests]
    assert kinds == [("recording", "/v1/recordings/s1"), ("chunk", "/v1/recordings/s1/chunks/1")]
    meta = json.loads(collector.requests[0].body)
    assert meta["sid"] == "s1" and meta["ended"] is None  # still running
    assert "version" not in meta and "synced" not in meta
    assert meta["chunks"] == 1 and meta["stored_bytes"] == len(b"chunk-one\x00\xff")
    chunk = collector.requests[1]
    assert chunk.body == b"chunk-one\x00\xff"
    assert chunk.headers["Content-Type"] == "application/octet-stream"
    assert chunk.method == "PUT" and collector.requests[0].method == "PUT"
    assert spool.backlog()["chunks"] == 0 and spool.unsynced_recordings() == []

    # More output while it runs: the changed row and the new chunk, nothing twice.
    spool.put_chunk("s1", 2, b"chunk-two", 9)
    drain(u)
    assert [r.path for r in collector.requests[2:]] == ["/v1/recordings/s1",
                                                        "/v1/recordings/s1/chunks/2"]
    assert json.loads(collector.requests[2].body)["chunks"] == 2
    # Its end: the final row (and the events that go with it).
    spool.end_recording("s1", events.new("session.recording", sid="s1", login="alice"),
                        ended=time.time(), exit_status=0, end_reason="exited")
    drain(u)
    final = [r for r in collector.requests[4:] if r.kind == "recording"]
    assert len(final) == 1 and json.loads(final[0].body)["end_reason"] == "exited"
    assert [ev["event"] for ev in collector.delivered()] == ["session.recording"]
    assert spool.recording("s1")["synced"] == spool.recording("s1")["version"]


def test_recording_failures_are_retried_and_refusals_do_not_block_the_rest(setup, collector):
    cfg, spool, make_uploader, _ = setup
    spool.start_recording(**recording_row("s1"))
    for seq in (1, 2, 3):
        spool.put_chunk("s1", seq, f"c{seq}".encode(), 2)
    collector.answer("recording", 500)
    collector.answer("chunk", (400, "bad frames"), "drop")
    u = make_uploader()
    assert u.step() is False and u.failures == 1  # metadata 500: nothing else tried
    assert collector.requests[-1].kind == "recording"
    # The row goes; chunk 1 is refused (kept, skipped, logged); chunk 2 meets a dropped
    # connection: the pass ends there, to be retried after a backoff.
    assert u.step() is True
    assert u.failures == 1 and "Connection aborted" in uploader.status(cfg)["last_error"]
    assert spool.unsynced_recordings() == []
    drain(u)
    chunks = [r.path.rsplit("/", 1)[1] for r in collector.of("chunk")]
    assert chunks == ["1", "2", "2", "3"]
    assert spool.backlog()["chunks"] == 1  # the refused one stays in the spool, unsent


def test_a_pass_ships_some_of_each_so_nothing_starves(setup, collector):
    cfg, spool, make_uploader, _ = setup
    spool.start_recording(**recording_row("big"))
    for seq in range(1, 41):
        spool.put_chunk("big", seq, os.urandom(1000), 1000)
    append_logins(spool, 5)
    u = make_uploader()
    assert u.step() is True
    chunks = collector.of("chunk")
    assert 0 < len(chunks) <= uploader.CHUNKS_PER_STEP
    assert [r.seqs for r in collector.of("events")] == [[1, 2, 3, 4, 5]]
    drain(u)
    assert spool.backlog()["chunks"] == 0 and len(collector.of("chunk")) == 40


# -- crashes ---------------------------------------------------------------------------------

KILLED_UPLOADER = r"""
import sys
from sshtrail import config, uploader
u = uploader.Uploader(config.load(sys.argv[1]))
u.step()
"""


def test_batch_in_flight_when_the_uploader_is_killed_is_sent_again_by_the_next_one(
        setup, collector, tmp_path):
    cfg, spool, make_uploader, _ = setup
    append_logins(spool, 5)
    collector.answer("events", "hang")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_UPLOADER,
                             str(tmp_path / "sshtrail.toml")], cwd=REPO)
    try:
        deadline = time.monotonic() + 20
        while not collector.of("events") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert collector.of("events"), "the uploader never sent its batch"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    append_logins(spool, 2)  # written after the crash
    # The claim survived the process: the batch is the spool's, not anybody's memory.
    claimed = spool.db.execute("SELECT count(*) FROM claims").fetchone()
    assert claimed[0] == 5

    # The next uploader (a restarted agent: one per spool) takes the dead one's claim at once.
    u = make_uploader(lease=60.0)
    drain(u)
    again = collector.of("events")[1:]
    assert [s for r in again for s in r.seqs] == [1, 2, 3, 4, 5, 6, 7]
    assert set(sent_states(spool).values()) == {1}


def test_a_claim_dropped_without_ack_is_sent_again(setup, collector):
    cfg, spool, make_uploader, _ = setup
    append_logins(spool, 4)
    dead = make_uploader()
    assert dead.spool.claim(10, dead.lease) is not None
    dead.close()  # "crashed": no ack, no release
    del dead
    u = make_uploader(lease=60.0)
    assert u.step() is True
    assert [r.seqs for r in collector.of("events")] == [[1, 2, 3, 4]]
    assert set(sent_states(spool).values()) == {1}


# -- status ----------------------------------------------------------------------------------

def test_status_figures(setup, collector, tmp_path, pki):
    cfg, spool, make_uploader, make_cfg_ = setup
    st = uploader.status(cfg)
    assert st["events"] == 0 and st["lag"] == 0.0 and st["last_success"] is None
    assert st["identity"] is True and st["url"] == collector.url and st["failures"] == 0
    now = time.time()
    append_logins(spool, 3, at=now - 100)
    spool.start_recording(**recording_row("s1"))
    spool.put_chunk("s1", 1, b"x" * 123, 123)
    collector.answer("recording", 500)
    u = make_uploader()
    u.step()
    st = uploader.status(cfg, now=now)
    assert st["events"] == 3 and st["chunks"] == 1 and st["chunk_bytes"] == 123
    assert 99.9 <= st["lag"] <= 100.1
    assert st["failures"] == 1 and "HTTP 500" in st["last_error"]
    assert now - 5 < st["last_error_time"] <= time.time()
    drain(u)
    st = uploader.status(cfg)
    assert st["events"] == 0 and st["chunks"] == 0 and st["lag"] == 0.0
    assert st["failures"] == 0 and time.time() - 5 < st["last_success"] <= time.time()
    # A host not enrolled says so.
    bare = make_cfg_(**{"upload.identity_dir": str(tmp_path / "nothing")})
    assert uploader.status(bare)["identity"] is False


def test_no_identity_is_a_failure_that_backs_off(setup, collector, tmp_path):
    cfg, spool, make_uploader, make_cfg_ = setup
    append_logins(spool, 1)
    u = make_uploader(make_cfg_(**{"upload.identity_dir": str(tmp_path / "nothing")}))
    assert u.step() is False and u.failures == 1
    assert "sshtrail enroll" in uploader.status(cfg)["last_error"]
    assert collector.requests == []


# -- in the agent ----------------------------------------------------------------------------

def test_the_agent_runs_the_uploader_when_upload_url_is_set(tmp_path, pki, collector):
    from sshtrail import agent
    cfg = make_cfg(tmp_path, pki, collector.url, **{
        "ebpf.enabled": False, "agent.socket": str(tmp_path / "agent.sock"),
        "sshd_log.path": str(tmp_path / "auth.log")})
    stop = threading.Event()
    t = threading.Thread(target=agent.run, args=(cfg, stop))
    t.start()
    try:
        deadline = time.monotonic() + 20
        while "agent.start" not in [ev["event"] for ev in collector.delivered()] \
                and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        t.join(30)
    assert not t.is_alive()
    assert "agent.start" in [ev["event"] for ev in collector.delivered()]
    assert not any(th.name == "uploader" and th.is_alive() for th in threading.enumerate())
