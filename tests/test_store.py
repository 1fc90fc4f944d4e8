"""The conformance suite of collector stores: every test of `store` runs against SQLite and
against a real PostgreSQL server (tests/pg.py), and both must behave alike. Then what only
PostgreSQL promises (several collector processes on one database), and the blob store.
"""
from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
import time

import psycopg
import pytest

from at_once import run_at_once
from collector.blobs import BlobError, BlobNotFound, DirBlobStore, compress, decompress
from collector.search import index_chunk
from collector.store import (BatchProof, EventQuery, SearchQuery, StoreConflict, StoreError,
                             StoredEvent)
from collector.store_postgres import PostgresStore
from collector.store_sqlite import SCHEMA_VERSION, SqliteStore
from sshtrail.chain import GENESIS, link_hash
from sshtrail.events import format_time, new_uid

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def make_events(server_id: str, seqs, *, t0: float = T0, step: float = 1.0, login="alice",
                kind="exec", sid="s1", hostname=None, text="ls -l", prev=GENESIS, **extra):
    """Events of one host, chained, one per seq, `step` seconds apart."""
    out = []
    for i, seq in enumerate(seqs):
        body = {"event": kind, "uid": new_uid(), "time": format_time(t0 + i * step),
                "server_id": server_id, "server_hostname": hostname or server_id + ".example",
                "seq": seq, "prev_hash": prev, "login": login, "sid": sid, "n": seq, **extra}
        raw = json.dumps(body)
        ev = StoredEvent(server_id=server_id, uid=body["uid"], seq=seq, prev_hash=prev,
                         hash=link_hash(raw), time=body["time"], event=kind, login=login,
                         sid=sid, server_hostname=body["server_hostname"], text=text, raw=raw)
        out.append(ev)
        prev = ev.hash
    return out


def on_server(events, server_id: str) -> list[StoredEvent]:
    """The same events (same uids, seqs, times) as sent by another host."""
    out = []
    for e in events:
        raw = json.dumps({**json.loads(e.raw), "server_id": server_id})
        out.append(StoredEvent(**{**e.__dict__, "server_id": server_id, "raw": raw,
                                  "hash": link_hash(raw)}))
    return out


def proof_of(events, signature="c2ln", received=None) -> BatchProof:
    return BatchProof(server_id=events[0].server_id, first_seq=events[0].seq,
                      last_seq=events[-1].seq, count=len(events), signature=signature,
                      cert_serial="0a1b", received=received or time.time())


def ingest(store, events, **kw):
    return store.ingest(events, proof_of(events, **kw))


def all_events(store, **filters) -> list[dict]:
    """Every event matching `filters`, page by page."""
    out, after = [], None
    while True:
        page = store.query(EventQuery(limit=7, after=after, **filters))
        out += page.events
        if page.next is None:
            return out
        after = page.next


def ns(events) -> list:
    return [(e["server_id"], e["n"]) for e in events]


# -- ingest ---------------------------------------------------------------------------------

def test_ingest_keeps_every_column_as_sent(store):
    evs = make_events("h1", range(1, 6))
    r = ingest(store, evs)
    assert (r.stored, r.duplicates) == (5, 0)
    assert store.chain("h1") == evs
    assert store.event_hash("h1", 3) == evs[2].hash
    assert store.event_hash("h1", 6) is None
    assert store.event_hash("h2", 3) is None


def test_retried_batch_stores_nothing_twice(store):
    evs = make_events("h1", range(1, 9))
    assert ingest(store, evs[:5]).stored == 5
    r = ingest(store, evs[:5])
    assert (r.stored, r.duplicates) == (0, 5)
    r = ingest(store, evs[2:])  # overlaps what is stored: only the rest is new
    assert (r.stored, r.duplicates) == (3, 3)
    assert [e.seq for e in store.chain("h1")] == list(range(1, 9))
    assert len(all_events(store)) == 8


def test_same_uid_from_another_server_is_another_event(store):
    a = make_events("h1", [1, 2])
    b = on_server(a, "h2")
    assert ingest(store, a).stored == 2
    r = ingest(store, b)
    assert (r.stored, r.duplicates) == (2, 0)
    # Same time and uid: server_id breaks the tie.
    assert ns(all_events(store)) == [("h1", 1), ("h2", 1), ("h1", 2), ("h2", 2)]
    assert store.chain("h2") == b


def test_seq_conflict_mid_batch_stores_nothing_of_the_batch(store):
    store.put_host("h1", "01", "PEM", T0 + 1e6, T0)
    first = make_events("h1", [1, 2, 3])
    ingest(store, first)
    tenth = make_events("h1", [10], t0=T0 + 100)
    ingest(store, tenth)
    before = (store.chain("h1"), store.proofs("h1"), store.host("h1"))
    # 4 and 5 are new, 10 is another event than the stored 10, 11 and 12 are new
    batch = (make_events("h1", [4, 5], t0=T0 + 10, prev=first[-1].hash)
             + make_events("h1", [10, 11, 12], t0=T0 + 200))
    with pytest.raises(StoreConflict, match=r"seq 10"):
        ingest(store, batch, signature="b3RoZXI=")
    assert (store.chain("h1"), store.proofs("h1"), store.host("h1")) == before
    assert store.host("h1").last_seq == 10
    assert len(all_events(store)) == 4


def test_same_uid_with_another_body_is_a_conflict(store):
    evs = make_events("h1", [1, 2])
    ingest(store, evs)
    changed = StoredEvent(**{**evs[1].__dict__, "raw": evs[1].raw + " ", "hash": "f" * 64})
    with pytest.raises(StoreConflict, match=evs[1].uid):
        ingest(store, [changed])
    moved = StoredEvent(**{**evs[1].__dict__, "seq": 3})  # the same uid claiming another seq
    with pytest.raises(StoreConflict):
        ingest(store, [moved])
    assert store.chain("h1") == evs


def test_batch_of_another_server_is_refused(store):
    evs = make_events("h1", [1]) + make_events("h2", [2])
    with pytest.raises(StoreError, match="h2"):
        store.ingest(evs, proof_of(evs[:1]))
    assert store.chain("h1") == [] and store.chain("h2") == []


def test_host_head_only_grows(store):
    store.put_host("h1", "01", "PEM", T0 + 1e6, T0)
    assert (store.host("h1").last_seq, store.host("h1").last_hash) == (0, GENESIS)
    evs = make_events("h1", range(1, 7))
    ingest(store, evs[4:])       # a later batch arrives first
    ingest(store, evs[:2])       # then an older one
    assert (store.host("h1").last_seq, store.host("h1").last_hash) == (6, evs[5].hash)
    ingest(store, evs[4:])       # a retry changes nothing
    assert store.host("h1").last_seq == 6


def test_proofs_in_first_seq_order_and_not_repeated_by_a_retry(store):
    evs = make_events("h1", range(1, 10))
    p3 = ingest(store, evs[6:], received=T0 + 3)
    assert p3.stored == 3
    ingest(store, evs[:3], signature="AAAA", received=T0 + 1)
    ingest(store, evs[3:6], signature="BBBB", received=T0 + 2)
    ingest(store, evs[3:6], signature="BBBB", received=T0 + 4)  # a retry of the same batch
    proofs = store.proofs("h1")
    assert [(p.first_seq, p.last_seq, p.count, p.signature) for p in proofs] == [
        (1, 3, 3, "AAAA"), (4, 6, 3, "BBBB"), (7, 9, 3, "c2ln")]
    assert proofs[0].received == T0 + 1 and proofs[0].cert_serial == "0a1b"
    assert store.proofs("h2") == []


def test_chain_in_seq_order_from_after_seq(store):
    evs = make_events("h1", range(1, 21))
    ingest(store, evs[10:])
    ingest(store, evs[:10])
    assert [e.seq for e in store.chain("h1")] == list(range(1, 21))
    assert [e.seq for e in store.chain("h1", after_seq=15)] == [16, 17, 18, 19, 20]
    assert [e.seq for e in store.chain("h1", after_seq=3, limit=4)] == [4, 5, 6, 7]


def test_empty_batch_stores_nothing(store):
    r = store.ingest([], BatchProof("h1", 0, 0, 0, "", "", T0))
    assert (r.stored, r.duplicates) == (0, 0)
    assert store.proofs("h1") == []


def test_nul_in_searched_columns_is_stored(store):
    # A hostile host can put NUL in any string; the batch must still be storable.
    evs = make_events("h1", [1], login="ev\x00il", text="cat /tmp/a\x00b")
    assert ingest(store, evs).stored == 1
    assert ns(all_events(store, text="/tmp/a")) == [("h1", 1)]


def test_threads_ingest_into_one_store(store):
    hosts = [f"h{i}" for i in range(4)]
    batches = {h: make_events(h, range(1, 201)) for h in hosts}
    errors = []

    def run(h):
        try:
            for i in range(0, 200, 20):
                ingest(store, batches[h][i:i + 20])
                ingest(store, batches[h][i:i + 10])  # and a retry of half of it
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(h,)) for h in hosts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for h in hosts:
        assert store.chain(h) == batches[h]
    assert len(all_events(store)) == 800


def test_workers_opening_a_new_sqlite_store_at_once_all_get_in(tmp_path):
    # The collector's workers start together, and on a first run the store is new: all of them
    # turn WAL on at once, which SQLite refuses at once to all but one unless the turn is
    # retried (sshtrail.wal). Eight processes open a new store at the same instant and ingest a
    # batch each, 30 times over; without the retry about one opening in fifty failed.
    for round_ in range(30):
        path = tmp_path / f"r{round_}.db"

        def worker(i):
            store = SqliteStore(path)
            ingest(store, make_events(f"h{i}", range(1, 4)))
            store.close()
        said = run_at_once(8, worker)
        assert said == ["ok"] * 8, f"round {round_}: {said}"
        store = SqliteStore(path)
        try:
            assert sorted(ns(all_events(store))) == sorted((f"h{i}", n) for i in range(8)
                                                           for n in range(1, 4))
        finally:
            store.close()


# -- query ----------------------------------------------------------------------------------

@pytest.fixture
def loaded(store):
    """A small fleet's events: two hosts, two users, several types and texts."""
    ingest(store, make_events("h1", [1, 2, 3], t0=T0, login="alice", sid="s1",
                              text="make -j4"))
    ingest(store, make_events("h1", [4, 5], t0=T0 + 10, login="bob", sid="s2",
                              kind="session.command", text="grep 100% /var/log/x"))
    ingest(store, make_events("h2", [1, 2], t0=T0 + 5, login="alice", sid="s3",
                              hostname="web-2", kind="session.disk", text="/etc/STRASSE_a_b"))
    ingest(store, make_events("h2", [3], t0=T0 + 20, login="bob", sid="s3", hostname="web-2",
                              kind="user.login", text="1000 axb"))
    return store


@pytest.mark.parametrize("filters, expected", [
    ({}, [("h1", 1), ("h1", 2), ("h1", 3), ("h2", 1), ("h2", 2), ("h1", 4), ("h1", 5),
          ("h2", 3)]),
    ({"since": T0 + 2}, [("h1", 3), ("h2", 1), ("h2", 2), ("h1", 4), ("h1", 5), ("h2", 3)]),
    ({"until": T0 + 2}, [("h1", 1), ("h1", 2)]),
    ({"since": T0 + 5, "until": T0 + 11}, [("h2", 1), ("h2", 2), ("h1", 4)]),
    ({"types": ["session.disk", "user.login"]}, [("h2", 1), ("h2", 2), ("h2", 3)]),
    ({"login": "bob"}, [("h1", 4), ("h1", 5), ("h2", 3)]),
    ({"login": "bob", "since": T0 + 11}, [("h1", 5), ("h2", 3)]),
    ({"server_id": "h2"}, [("h2", 1), ("h2", 2), ("h2", 3)]),
    ({"server_id": "web-2"}, [("h2", 1), ("h2", 2), ("h2", 3)]),
    ({"server_id": "h1.example", "login": "alice"}, [("h1", 1), ("h1", 2), ("h1", 3)]),
    ({"sid": "s3"}, [("h2", 1), ("h2", 2), ("h2", 3)]),
    ({"text": "MAKE"}, [("h1", 1), ("h1", 2), ("h1", 3)]),
    ({"text": "straße"}, [("h2", 1), ("h2", 2)]),  # case-insensitive beyond ASCII
    ({"text": "100%"}, [("h1", 4), ("h1", 5)]),    # % is literal, "1000" does not match
    ({"text": "a_b"}, [("h2", 1), ("h2", 2)]),     # _ is literal, "axb" does not match
    ({"text": "\\"}, []),
    ({"login": "carol"}, []),
])
def test_query_filters(loaded, filters, expected):
    assert ns(all_events(loaded, **filters)) == expected
    page = loaded.query(EventQuery(limit=100, **filters))
    assert ns(page.events) == expected and page.next is None


def test_query_returns_events_as_sent(loaded):
    first = loaded.query(EventQuery(limit=1)).events[0]
    assert first == json.loads(loaded.chain("h1")[0].raw)


def test_time_order_is_time_not_text(store):
    # Fewer fraction digits, or none, sort wrongly as text ("05Z" > "05.5Z").
    evs = make_events("h1", [1, 2, 3])
    times = ["2026-01-01T00:00:05Z", "2026-01-01T00:00:05.5Z", "2026-01-01T00:00:04.999999Z"]
    evs = [StoredEvent(**{**e.__dict__, "time": t, "raw": json.dumps({"n": e.seq,
                                                                        "server_id": "h1"})})
           for e, t in zip(evs, times)]
    ingest(store, evs)
    assert ns(all_events(store)) == [("h1", 3), ("h1", 1), ("h1", 2)]
    assert ns(all_events(store, since=T0 + 5, until=T0 + 5.5)) == [("h1", 1)]


def test_paging_returns_every_event_once_in_time_uid_order(store):
    # Ties everywhere: many events share a time, and both hosts send the very same uids.
    a = make_events("h1", range(1, 41), step=0.25)
    a = [StoredEvent(**{**e.__dict__, "time": format_time(T0 + (e.seq // 4))}) for e in a]
    b = on_server(a[:17], "h2")
    ingest(store, a)
    ingest(store, b)
    by_key = {}
    for e in a + b:
        by_key[(e.server_id, json.loads(e.raw)["n"])] = (e.time, e.uid, e.server_id)
    expected = sorted(by_key, key=by_key.get)
    for limit in (1, 3, 7, 57, 100):
        got, after, pages = [], None, 0
        while True:
            page = store.query(EventQuery(limit=limit, after=after))
            got += ns(page.events)
            pages += 1
            if page.next is None:
                break
            after = page.next
        assert [(s, n) for s, n in got] == [(s, n) for s, n in expected], limit
        assert pages == -(-57 // limit), limit


def test_paging_with_a_filter(loaded):
    got = []
    after = None
    while True:
        page = loaded.query(EventQuery(login="alice", limit=2, after=after))
        got += ns(page.events)
        assert len(page.events) <= 2
        if not page.next:
            break
        after = page.next
    assert got == [("h1", 1), ("h1", 2), ("h1", 3), ("h2", 1), ("h2", 2)]


def test_bad_cursor_and_limit_are_refused(loaded):
    with pytest.raises(StoreError, match="cursor"):
        loaded.query(EventQuery(after="not-a-cursor"))
    with pytest.raises(StoreError, match="limit"):
        loaded.query(EventQuery(limit=0))


# -- findings -------------------------------------------------------------------------------

def test_findings_oldest_first(store):
    store.add_finding("h1", "broken_link", "seq 7: prev_hash does not match seq 6", T0 + 2)
    store.add_finding("h1", "gap", "seq 9 missing", T0 + 1)
    store.add_finding("h2", "gap", "seq 2 missing", T0)
    store.add_finding("h1", "gap", "seq 12 missing", T0 + 2)
    assert store.findings("h1") == [
        ("gap", "seq 9 missing", T0 + 1),
        ("broken_link", "seq 7: prev_hash does not match seq 6", T0 + 2),
        ("gap", "seq 12 missing", T0 + 2)]
    assert store.findings("h3") == []


# -- recordings -----------------------------------------------------------------------------

def test_recording_upsert_and_chunks(store):
    assert store.recording("h1", "s1") is None
    store.put_recording("h1", "s1", {"login": "alice", "cols": 80}, T0)
    assert store.put_chunk("h1", "s1", 2, 300, 30) is True
    assert store.put_chunk("h1", "s1", 1, 100, 10) is True
    assert store.put_chunk("h1", "s1", 1, 100, 10) is False  # a retried upload
    store.put_recording("h1", "s1", {"login": "alice", "cols": 80, "ended": True}, T0 + 9)
    rec = store.recording("h1", "s1")
    assert rec == {"server_id": "h1", "sid": "s1", "updated": T0 + 9, "chunks": [1, 2],
                   "bytes": 400, "meta": {"login": "alice", "cols": 80, "ended": True}}
    assert store.recording(None, "s1") == rec
    assert store.recording("h2", "s1") is None
    assert store.recording(None, "nope") is None


def test_recording_without_chunks(store):
    store.put_recording("h1", "s9", {"login": "bob"}, T0)
    rec = store.recording(None, "s9")
    assert (rec["chunks"], rec["bytes"], rec["server_id"]) == ([], 0, "h1")


def test_sessions_newest_first_and_filtered(store):
    store.put_recording("h1", "s1", {"login": "alice"}, T0 + 1)
    store.put_recording("h1", "s2", {"login": "bob"}, T0 + 3)
    store.put_recording("h2", "s3", {"login": "alice", "server_hostname": "web-2"}, T0 + 2)
    store.put_chunk("h2", "s3", 1, 50, 5)
    store.put_chunk("h2", "s3", 2, 70, 7)

    def keys(rows):
        return [(r["server_id"], r["sid"]) for r in rows]

    assert keys(store.sessions()) == [("h1", "s2"), ("h2", "s3"), ("h1", "s1")]
    assert store.sessions(login="alice")[0] == {
        "server_id": "h2", "sid": "s3", "meta": {"login": "alice", "server_hostname": "web-2"},
        "updated": T0 + 2, "bytes": 120}
    assert keys(store.sessions(login="alice")) == [("h2", "s3"), ("h1", "s1")]
    assert keys(store.sessions(since=T0 + 2)) == [("h1", "s2"), ("h2", "s3")]
    assert keys(store.sessions(server_id="h1")) == [("h1", "s2"), ("h1", "s1")]
    assert keys(store.sessions(server_id="web-2")) == [("h2", "s3")]
    assert keys(store.sessions(limit=1)) == [("h1", "s2")]
    store.put_recording("h1", "s1", {"login": "alice"}, T0 + 5)  # s1 went on
    assert keys(store.sessions(limit=1)) == [("h1", "s1")]


# -- search ---------------------------------------------------------------------------------

def put_output(store, server_id, sid, seq, frames) -> bool:
    """A chunk of output frames, indexed as collector.ingest does it."""
    return store.put_chunk(server_id, sid, seq, 100, 10,
                           lambda state: index_chunk(state, seq, frames))


def hits(store, text, **kw):
    page = store.search(SearchQuery(text=text, **kw))
    return [(h.kind, h.server_id, h.sid, h.offset, h.line) for h in page.hits]


def test_search_finds_output_with_its_offset_and_time(store):
    store.put_recording("h1", "s1", {"login": "alice", "server_hostname": "web-1",
                                     "started": T0}, T0)
    typed = [(2.0 + i / 10, b"o", bytes([c])) for i, c in enumerate(b"rm -rf /tmp/x")]
    assert put_output(store, "h1", "s1", 0, [(1.0, b"o", b"\x1b[1malice@web-1\x1b[0m:~$ ")]
                      + typed + [(3.5, b"o", b"\r\n")])
    page = store.search(SearchQuery(text="rm -rf /tmp/x"))
    [h] = page.hits
    assert (h.kind, h.server_id, h.sid, h.login, h.hostname, h.uid) == (
        "output", "h1", "s1", "alice", "web-1", None)
    assert h.line == "alice@web-1:~$ rm -rf /tmp/x"
    assert h.offset == 3.2 and h.time == T0 + 3.2  # when its last character was echoed
    assert page.next is None
    assert hits(store, "RM -RF") == [("output", "h1", "s1", 2.5, h.line)]
    assert hits(store, "alice@") == [("output", "h1", "s1", 1.0, h.line)]
    assert hits(store, "rm -rf /tmp/y") == []


def test_search_does_not_index_a_retried_chunk_twice(store):
    store.put_recording("h1", "s1", {"login": "alice", "started": T0}, T0)
    frames = [(0.5, b"o", b"marker-42 printed\r\n")]
    assert put_output(store, "h1", "s1", 0, frames) is True
    assert put_output(store, "h1", "s1", 0, frames) is False
    assert hits(store, "marker-42") == [("output", "h1", "s1", 0.5, "marker-42 printed")]


def test_search_line_across_chunks_and_unfinished_line(store):
    store.put_recording("h1", "s1", {"login": "alice", "started": T0}, T0)
    put_output(store, "h1", "s1", 0, [(1.0, b"o", b"first line\r\nhalf of a lo")])
    # The unfinished line is searchable at once.
    assert hits(store, "half of") == [("output", "h1", "s1", 1.0, "half of a lo")]
    put_output(store, "h1", "s1", 1, [(2.0, b"o", b"ng line\r\nprompt$ \xe2\x82")])
    # ... and replaced when it completes: found once, whole.
    assert hits(store, "half of") == [("output", "h1", "s1", 1.0, "half of a long line")]
    assert hits(store, "a long line") == [("output", "h1", "s1", 2.0, "half of a long line")]
    put_output(store, "h1", "s1", 2, [(3.0, b"o", b"\xacuro\r\n")])  # UTF-8 split across chunks
    assert hits(store, "€uro") == [("output", "h1", "s1", 3.0, "prompt$ €uro")]
    assert hits(store, "prompt") == [("output", "h1", "s1", 2.0, "prompt$ €uro")]
    # A chunk after a gap starts a clean line; the unfinished one before it stays found.
    put_output(store, "h1", "s1", 3, [(4.0, b"o", b"tail without end")])
    put_output(store, "h1", "s1", 5, [(6.0, b"o", b" and more\r\n")])
    assert [x[4] for x in hits(store, "without end")] == ["tail without end"]
    assert [x[4] for x in hits(store, "and more")] == [" and more"]
    # A late chunk (retried after later ones) is indexed on its own; the state goes on.
    put_output(store, "h1", "s1", 4, [(5.0, b"o", b"late one")])
    put_output(store, "h1", "s1", 6, [(7.0, b"o", b"after\r\n")])
    assert [x[4] for x in hits(store, "late one")] == ["late one"]
    assert [x[4] for x in hits(store, "after")] == ["after"]


def test_search_finds_commands_with_their_offset(store):
    store.put_recording("h1", "s1", {"login": "bob", "started": T0}, T0)
    ingest(store, make_events("h1", [1, 2], t0=T0 + 7, login="bob", sid="s1",
                              kind="session.command", text="/usr/bin/rm -rf /tmp/x"))
    ingest(store, make_events("h1", [3], t0=T0 + 20, login="bob", sid="s9", kind="exec",
                              text="scp -t /tmp/x", prev="x"))
    ingest(store, make_events("h1", [4], t0=T0 + 30, login="bob", sid="s1",
                              kind="session.disk", text="/tmp/x", prev="y"))
    got = store.search(SearchQuery(text="/tmp/x")).hits
    assert [(h.kind, h.sid, h.offset, h.line, h.login) for h in got] == [
        ("command", "s9", None, "scp -t /tmp/x", "bob"),             # no recording: no offset
        ("command", "s1", 8.0, "/usr/bin/rm -rf /tmp/x", "bob"),
        ("command", "s1", 7.0, "/usr/bin/rm -rf /tmp/x", "bob")]
    assert got[0].time == T0 + 20 and got[0].uid and got[0].hostname == "h1.example"


def test_search_stores_a_retried_command_batch_once(store):
    evs = make_events("h1", [1, 2], kind="exec", text="make install")
    ingest(store, evs)
    ingest(store, evs)
    assert len(hits(store, "install")) == 2


@pytest.fixture
def fleet(store):
    """Output and commands of two hosts, two users, at known times."""
    store.put_recording("h1", "a1", {"login": "alice", "server_hostname": "web-1",
                                     "started": T0}, T0)
    store.put_recording("h2", "b1", {"login": "bob", "server_hostname": "db-1",
                                     "started": T0 + 100}, T0 + 100)
    put_output(store, "h1", "a1", 0, [(float(i), b"o", f"deploy step {i}\r\n".encode())
                                     for i in range(5)])
    put_output(store, "h2", "b1", 0, [(float(i), b"o", f"deploy STEP {i} ok\r\n".encode())
                                     for i in range(3)])
    ingest(store, make_events("h2", [1], t0=T0 + 150, login="bob", sid="b1",
                              kind="session.command", hostname="db-1", text="deploy step 9"))
    return store


def test_search_newest_first_across_kinds(fleet):
    assert [(k, s, o) for k, _, s, o, _ in hits(fleet, "deploy step")] == [
        ("command", "b1", 50.0), ("output", "b1", 2.0), ("output", "b1", 1.0),
        ("output", "b1", 0.0), ("output", "a1", 4.0), ("output", "a1", 3.0),
        ("output", "a1", 2.0), ("output", "a1", 1.0), ("output", "a1", 0.0)]


@pytest.mark.parametrize("filters, expected", [
    ({"login": "alice"}, ["a1"] * 5),
    ({"server_id": "h2"}, ["b1"] * 4),
    ({"server_id": "db-1"}, ["b1"] * 4),
    ({"server_id": "web-1", "login": "bob"}, []),
    ({"since": T0 + 101}, ["b1"] * 3),
    ({"since": T0 + 3, "until": T0 + 101}, ["b1", "a1", "a1"]),
    ({"kinds": ("command",)}, ["b1"]),
    ({"kinds": ("output",), "login": "bob"}, ["b1"] * 3),
    ({"kinds": ()}, []),
])
def test_search_filters(fleet, filters, expected):
    assert [x[2] for x in hits(fleet, "deploy step", **filters)] == expected


def test_search_names_the_host_of_output_by_its_events(store):
    # Hosts do not put their hostname in a recording's metadata; their events carry it.
    store.put_recording("h3", "c1", {"login": "carol", "started": T0}, T0)
    put_output(store, "h3", "c1", 1, [(1.0, b"o", b"hello there\r\n")])
    ingest(store, make_events("h3", [1], kind="user.login", hostname="mail-3", text=""))
    [h] = store.search(SearchQuery(text="hello", server_id="mail-3")).hits
    assert (h.server_id, h.hostname, h.login) == ("h3", "mail-3", "carol")


def test_search_pages_newest_first(fleet):
    everything = hits(fleet, "deploy", limit=100)
    for limit in (1, 2, 4, 9):
        got, before = [], None
        while True:
            page = fleet.search(SearchQuery(text="deploy", limit=limit, before=before))
            got += [(h.kind, h.server_id, h.sid, h.offset, h.line) for h in page.hits]
            if page.next is None:
                break
            before = page.next
        assert got == everything, limit
    assert len(everything) == 9


def test_search_text_is_literal_and_case_folded(store):
    store.put_recording("h1", "s1", {"login": "alice", "started": T0}, T0)
    put_output(store, "h1", "s1", 0, [(1.0, b"o", "grep 100% STRASSE a_b \"q\" Ünï [x]*?\r\n"
                                       "1000 axb a**b\r\n".encode())])
    line = 'grep 100% STRASSE a_b "q" Ünï [x]*?'
    for text in ("100%", "straße", "a_b", '"q"', "üNÏ", "STRASSE A_B", "[x]*?", "x]*"):
        assert [x[4] for x in hits(store, text)] == [line], text
    for text in ("0%_", "OR 1", "a*b", "a?b", "[ax]xb", "ï [x]?"):
        assert hits(store, text) == [], text
    for short in ("ab", "", " %"):
        with pytest.raises(StoreError, match="too short"):
            store.search(SearchQuery(text=short))
    with pytest.raises(StoreError, match="cursor"):
        store.search(SearchQuery(text="grep", before="nope"))


def test_search_of_control_characters_and_nul(store):
    ingest(store, make_events("h1", [1], kind="exec", text="echo \x1b]52;c;AAAA\x07 a\x00b"))
    [h] = store.search(SearchQuery(text="echo \x1b]52")).hits
    assert h.line.startswith("echo \x1b]52") and h.offset is None


# -- enrollment, hosts, readers -------------------------------------------------------------

def test_enroll_token_is_single_use(store):
    store.add_enroll_token("t1", T0 + 60, "h1")
    store.add_enroll_token("t2", T0 + 60, None)
    assert store.use_enroll_token("t1", T0) == (True, "h1")
    assert store.use_enroll_token("t1", T0) == (False, None)
    assert store.use_enroll_token("t2", T0 + 1) == (True, None)
    assert store.use_enroll_token("nope", T0) == (False, None)
    with pytest.raises(StoreError, match="already exists"):
        store.add_enroll_token("t1", T0 + 600, None)  # must not make a used token new again
    assert store.use_enroll_token("t1", T0) == (False, None)


def test_expired_enroll_token_is_refused(store):
    store.add_enroll_token("t1", T0 + 60, None)
    assert store.use_enroll_token("t1", T0 + 60) == (False, None)
    assert store.use_enroll_token("t1", T0 + 61) == (False, None)


def test_enroll_token_used_at_once_by_threads_wins_once(store):
    n = 8
    for round_ in range(5):
        token = f"tok{round_}"
        store.add_enroll_token(token, T0 + 60, "h1")
        barrier = threading.Barrier(n)
        results = []

        def use():
            barrier.wait()
            results.append(store.use_enroll_token(token, T0))

        threads = [threading.Thread(target=use) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results, key=str) == [(False, None)] * (n - 1) + [(True, "h1")]


def test_hosts_put_revoke_and_reenroll(store):
    assert store.host("h1") is None and store.hosts() == []
    assert store.revoke("h1") is False
    store.put_host("h2", "02", "PEM2", T0 + 100, T0)
    store.put_host("h1", "01", "PEM1", T0 + 100, T0)
    h = store.host("h1")
    assert (h.server_id, h.cert_serial, h.cert_pem, h.not_after, h.enrolled, h.revoked,
            h.last_seq, h.last_hash) == ("h1", "01", "PEM1", T0 + 100, T0, False, 0, GENESIS)
    evs = make_events("h1", [1, 2])
    ingest(store, evs)
    assert store.revoke("h1") is True
    assert store.host("h1").revoked is True
    assert store.host("h2").revoked is False
    store.put_host("h1", "03", "PEM3", T0 + 200, T0 + 50)  # a new certificate
    h = store.host("h1")
    assert (h.cert_serial, h.cert_pem, h.not_after, h.enrolled, h.revoked, h.last_seq,
            h.last_hash) == ("03", "PEM3", T0 + 200, T0 + 50, False, 2, evs[1].hash)
    assert [x.server_id for x in store.hosts()] == ["h1", "h2"]


def test_readers(store):
    store.add_reader("rt1", "ops dashboard", T0)
    assert store.reader("rt1") == "ops dashboard"
    assert store.reader("rt2") is None
    with pytest.raises(StoreError, match="already exists"):
        store.add_reader("rt1", "someone else", T0)
    assert store.reader("rt1") == "ops dashboard"


# -- SQLite only ----------------------------------------------------------------------------

def test_sqlite_file_survives_reopen_and_is_wal_with_a_schema_version(tmp_path):
    path = tmp_path / "store.db"
    s = SqliteStore(path)
    evs = make_events("h1", [1, 2])
    ingest(s, evs)
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.chain("h1")
    s = SqliteStore(path)
    assert s.chain("h1") == evs
    s.close()
    c = sqlite3.connect(path)
    assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert c.execute("PRAGMA user_version").fetchone()[0] >= 1
    assert c.execute("PRAGMA page_size").fetchone()[0] == 16384
    c.close()


def test_sqlite_refuses_what_it_cannot_use(tmp_path):
    with pytest.raises(StoreError, match=str(tmp_path / "missing")):
        SqliteStore(tmp_path / "missing" / "store.db")
    other = tmp_path / "other.db"
    c = sqlite3.connect(other)
    c.execute("CREATE TABLE x (y)")
    c.commit()
    c.close()
    with pytest.raises(StoreError, match="not an sshtrail store"):
        SqliteStore(other)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is no database at all" * 100)
    with pytest.raises(StoreError, match=str(junk)):
        SqliteStore(junk)
    newer = tmp_path / "newer.db"
    c = sqlite3.connect(newer)
    c.execute("PRAGMA user_version=99")
    c.close()
    with pytest.raises(StoreError, match="upgrade"):
        SqliteStore(newer)


def test_two_sqlite_stores_on_one_file_ingest_at_once(tmp_path):
    # Two collector processes on one file (or one after a restart) wait for each other.
    path = tmp_path / "store.db"
    stores = [SqliteStore(path), SqliteStore(path)]
    batches = {h: make_events(h, range(1, 301)) for h in ("h1", "h2")}
    errors = []

    def run(s, h):
        try:
            for i in range(0, 300, 30):
                ingest(s, batches[h][i:i + 30])
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(s, h)) for s, h in zip(stores, batches)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for h in batches:
        assert stores[0].chain(h) == batches[h]
    for s in stores:
        s.close()


def test_sqlite_writers_queue_on_the_lock_file(tmp_path):
    # Every writer, of any process, takes <file>-writer first: one holding it holds the others
    # up (readers go on), and they go on once it lets go.
    path = tmp_path / "store.db"
    s = SqliteStore(path)
    evs = make_events("h1", [1, 2])
    done = threading.Event()
    with open(f"{path}-writer", "rb+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        t = threading.Thread(target=lambda: (ingest(s, evs), done.set()))
        t.start()
        assert not done.wait(0.5)
        assert s.chain("h1") == []
        fcntl.flock(held, fcntl.LOCK_UN)
        t.join(30)
    assert done.is_set()
    assert s.chain("h1") == evs
    s.close()


def test_sqlite_store_of_version_1_gets_its_commands_indexed(tmp_path):
    path = tmp_path / "store.db"
    s = SqliteStore(path)
    s.close()
    # What version 1 was: no search tables.
    c = sqlite3.connect(path)
    for kind, name in c.execute("SELECT type, name FROM sqlite_master WHERE name LIKE "
                                "'output%' OR name LIKE 'command%' OR name LIKE 'events_to%'"
                                ).fetchall():
        if kind in ("table", "view", "trigger") and "fts_" not in name:
            c.execute(f"DROP {kind.upper()} IF EXISTS {name}")
    c.execute("PRAGMA user_version=1")
    c.commit()
    c.close()
    c = sqlite3.connect(path)
    ev = make_events("h1", [1], kind="exec", text="make clean")[0]
    c.execute("INSERT INTO events (server_id, uid, seq, prev_hash, hash, time, ts, event, login, "
              "sid, server_hostname, text, raw) VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?, ?, ?, ?, ?)",
              (ev.server_id, ev.uid, ev.seq, ev.prev_hash, ev.hash, ev.time, ev.event, ev.login,
               ev.sid, ev.server_hostname, ev.text, ev.raw))
    c.commit()
    c.close()
    s = SqliteStore(path)
    assert [x[4] for x in hits(s, "clean")] == ["make clean"]
    s.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] \
        == SCHEMA_VERSION


def test_sqlite_store_of_version_2_merges_its_command_index_16_at_a_time(tmp_path):
    path = tmp_path / "store.db"
    s = SqliteStore(path)
    ingest(s, make_events("h1", [1, 2], kind="exec", text="make clean"))
    s.close()
    c = sqlite3.connect(path)
    c.execute("DELETE FROM command_fts_config WHERE k = 'automerge'")  # what version 2 was
    c.execute("PRAGMA user_version=2")
    c.commit()
    c.close()
    s = SqliteStore(path)
    ingest(s, make_events("h1", [3], kind="exec", text="make clean", prev=s.chain("h1")[-1].hash))
    assert len(hits(s, "clean")) == 3
    s.close()
    c = sqlite3.connect(path)
    assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    assert c.execute("SELECT v FROM command_fts_config WHERE k = 'automerge'").fetchone() == (16,)


# -- PostgreSQL only ------------------------------------------------------------------------

def test_two_postgres_processes_ingest_at_once_without_loss(postgres_db):
    # Two stores stand in for two collector processes: each has its own connections. They
    # store different hosts' batches, and also race each other with the same batches (a host
    # retrying to the other process while the first one still works on it).
    first = [None, None]
    errors = []

    def open_store(i):
        try:
            first[i] = PostgresStore(postgres_db)  # both create the schema at once
        except Exception as e:
            errors.append(e)

    openers = [threading.Thread(target=open_store, args=(i,)) for i in range(2)]
    for t in openers:
        t.start()
    for t in openers:
        t.join()
    assert errors == []
    a, b = first
    hosts = [f"h{i}" for i in range(6)]
    batches = {h: make_events(h, range(1, 501)) for h in hosts}
    totals = {"stored": 0, "duplicates": 0}
    lock = threading.Lock()

    def run(s, h):
        try:
            for i in range(0, 500, 50):
                r = ingest(s, batches[h][i:i + 50], signature="c2ln")
                with lock:
                    totals["stored"] += r.stored
                    totals["duplicates"] += r.duplicates
        except Exception as e:
            errors.append(e)

    jobs = [(a if i % 2 else b, h) for i, h in enumerate(hosts)]
    jobs += [(b, "h0"), (a, "h1")]  # the racing duplicates
    threads = [threading.Thread(target=run, args=j) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert totals == {"stored": 3000, "duplicates": 1000}
    for h in hosts:
        assert a.chain(h) == batches[h]
        assert b.event_hash(h, 500) == batches[h][-1].hash
        assert len(a.proofs(h)) == 10
    with psycopg.connect(postgres_db) as c:
        heads = c.execute("SELECT server_id, last_seq FROM heads ORDER BY 1").fetchall()
    assert heads == [(h, 500) for h in hosts]
    a.close()
    b.close()


def test_postgres_errors_name_the_database_but_not_the_password(postgres_server):
    url = f"postgresql://postgres:s3cr3tpw@127.0.0.1:{postgres_server.port}/no_such_db"
    with pytest.raises(StoreError) as info:
        PostgresStore(url)
    msg = str(info.value)
    assert "s3cr3tpw" not in msg
    assert f"postgresql://postgres@127.0.0.1:{postgres_server.port}/no_such_db" in msg
    assert "no_such_db" in msg and "does not exist" in msg


def test_postgres_refuses_a_newer_schema(postgres_db):
    PostgresStore(postgres_db).close()
    with psycopg.connect(postgres_db, autocommit=True) as c:
        c.execute("UPDATE sshtrail_schema SET version = 99")
    with pytest.raises(StoreError, match="upgrade"):
        PostgresStore(postgres_db)


# -- blobs ----------------------------------------------------------------------------------

def _files(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, _, fs in os.walk(root) for f in fs)


def test_blob_round_trip_and_replace(tmp_path):
    blobs = DirBlobStore(tmp_path / "blobs")
    assert not blobs.exists("h1/s1/000001")
    blobs.put("h1/s1/000001", b"first")
    blobs.put("h1/s1/000002", b"")
    assert blobs.get("h1/s1/000001") == b"first" and blobs.get("h1/s1/000002") == b""
    blobs.put("h1/s1/000001", b"second")
    assert blobs.get("h1/s1/000001") == b"second"
    assert blobs.exists("h1/s1/000001") and not blobs.exists("h1/s1")
    with pytest.raises(BlobNotFound):
        blobs.get("h1/s1/000003")
    assert _files(tmp_path / "blobs") == ["h1/s1/000001", "h1/s1/000002"]


@pytest.mark.parametrize("key", [
    "../x", "h1/../../x", "/etc/passwd", "h1/./x", "h1//x", "", ".", "..", "h1/s1/",
    "h1\x00/x", "h1/s\\1", "h1/s 1", "h1/ü",
])
def test_blob_keys_that_could_escape_are_refused(tmp_path, key):
    blobs = DirBlobStore(tmp_path / "blobs")
    for call in (lambda: blobs.put(key, b"x"), lambda: blobs.get(key),
                 lambda: blobs.exists(key)):
        with pytest.raises(BlobError, match="refused|empty"):
            call()
    assert _files(tmp_path) == []


def test_blob_write_leaves_no_temp_files(tmp_path):
    blobs = DirBlobStore(tmp_path / "blobs")
    threads = [threading.Thread(target=lambda i=i: [blobs.put(f"h{i % 2}/s/{n:06d}", b"x" * n)
                                                    for n in range(50)]) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    blobs.put("h0/taken", b"a file")
    with pytest.raises(BlobError, match="h0/taken/1"):
        blobs.put("h0/taken/1", b"under a file")  # cannot work: its parent is a file
    (tmp_path / "blobs" / "h1" / "full").mkdir()
    with pytest.raises(BlobError, match="h1/full"):
        blobs.put("h1/full", b"over a directory")  # the rename fails after the temp is written
    names = _files(tmp_path / "blobs")
    assert len(names) == 101 and not [n for n in names if "~tmp" in n]


def test_compression(tmp_path):
    data = b"\x1b[32muser@host\x1b[0m:~$ ls -l\r\n" * 2000
    packed = compress(data)
    assert len(packed) < len(data) // 20
    assert decompress(packed) == data
    assert decompress(compress(b"")) == b""
    with pytest.raises(BlobError, match="zstandard"):
        decompress(packed[:-4])
    with pytest.raises(BlobError, match="zstandard"):
        decompress(b"not compressed")


def test_event_times_read_exactly():
    from collector.store_sqlite import time_us
    from sshtrail.events import parse_time
    for t in ["2026-01-01T00:00:00.000000Z", "2024-02-29T23:59:59.999999Z",
              "1999-12-31T12:34:56.000001Z", "2026-01-01T00:00:05Z", "2026-01-01T00:00:05.5Z",
              "1970-01-01T00:00:00.000000Z"]:
        assert time_us(t) == round(parse_time(t) * 1e6), t
    assert time_us("2026-03-04T05:06:07.123456Z") - time_us("2026-03-04T00:00:00.000000Z") \
        == ((5 * 60 + 6) * 60 + 7) * 1_000_000 + 123456
    for bad in ["2026-02-30T00:00:00.000000Z", "2026-01-01T24:00:00.000000Z",
                "2026-01-01 00:00:00.000000Z", "2026-01-01T00:00:00.000000+01:00", ""]:
        with pytest.raises(StoreError, match="RFC 3339"):
            time_us(bad)


def test_server_filter_follows_each_event_hostname(store):
    ingest(store, make_events("h3", [1, 2], hostname="old-name"))
    ingest(store, make_events("h3", [3], t0=T0 + 10, hostname="new-name"))
    ingest(store, make_events("h4", [1], t0=T0 + 20, hostname="new-name"))  # reused name
    assert ns(all_events(store, server_id="h3")) == [("h3", 1), ("h3", 2), ("h3", 3)]
    assert ns(all_events(store, server_id="old-name")) == [("h3", 1), ("h3", 2)]
    assert ns(all_events(store, server_id="new-name")) == [("h3", 3), ("h4", 1)]
    assert ns(all_events(store, server_id="h5")) == []


def test_postgres_connections_do_not_outlive_threads(postgres_db):
    # The collector's worker threads come and go; the server's connection slots must not fill.
    from collector.pool import MAX_IDLE
    s = PostgresStore(postgres_db)
    for _ in range(5):
        threads = [threading.Thread(target=s.hosts) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    dbname = postgres_db.rsplit("/", 1)[1]
    count = "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()"
    # autocommit: pg_stat_activity is read once per transaction
    with psycopg.connect(postgres_db, autocommit=True) as c:
        assert 1 <= c.execute(count, (dbname,)).fetchone()[0] <= MAX_IDLE
        s.close()
        for _ in range(50):  # the server notices the closed sockets a moment later
            if c.execute(count, (dbname,)).fetchone()[0] == 0:
                break
            time.sleep(0.05)
        assert c.execute(count, (dbname,)).fetchone()[0] == 0
