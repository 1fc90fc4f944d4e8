"""The spool: concurrent writers, SIGKILL mid-write, the size cap, claim and acknowledge."""
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from at_once import run_at_once
from sshtrail import events
from sshtrail import wire
from sshtrail.spool import CHUNK_FILE_MIN, SCHEMA_VERSION, Spool, SpoolFull, SpoolError

WRITER = r"""
import sys
from sshtrail import events
from sshtrail.spool import Spool
path, n, tag = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = Spool(path, server_id="h", server_hostname="h", busy_timeout=30)
for i in range(n):
    ev = events.new("user.login", login=f"{tag}-{i}", success=True, method="publickey")
    s.append(ev)
    # Printed only after the commit returned: an acknowledged write.
    print(ev["uid"], flush=True)
"""


def spool(tmp_path, **kw):
    return Spool(tmp_path / "spool" / "spool.db", server_id="h", server_hostname="h", **kw)


def login(name="alice"):
    return events.new("user.login", login=name, success=True, method="publickey")


def test_created_root_only_in_wal_mode(tmp_path):
    s = spool(tmp_path)
    s.append(login())
    assert os.stat(tmp_path / "spool").st_mode & 0o777 == 0o700
    assert os.stat(s.path).st_mode & 0o777 == 0o600
    assert s.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_fifty_concurrent_writers_lose_nothing(tmp_path):
    path = tmp_path / "spool" / "spool.db"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), "20", f"w{i}"],
                              stdout=subprocess.PIPE, text=True) for i in range(50)]
    acked = set()
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        acked.update(out.split())
    assert len(acked) == 1000
    stored = {ev["uid"] for ev in Spool(path).query()}
    assert stored == acked


def test_a_new_spools_first_writers_all_get_in(tmp_path):
    # A new spool's first writers all turn WAL on at once, and SQLite answers all but one
    # "database is locked" without waiting (seen: a login's PAM calls, one of them lost). Eight
    # processes open a new spool at the same instant, 30 times over; before the fix about one
    # round in five lost a writer.
    for round_ in range(30):
        path = tmp_path / f"r{round_}" / "spool.db"
        said = run_at_once(8, lambda i: Spool(path, server_id="h", server_hostname="h")
                           .append(login(f"w{i}")))
        assert said == ["ok"] * 8, f"round {round_}: {said}"
        assert sorted(ev["login"] for ev in Spool(path).query()) == [f"w{i}" for i in range(8)]


def test_writer_killed_mid_write_leaves_readable_spool(tmp_path):
    path = tmp_path / "spool" / "spool.db"
    acked = set()
    for round_ in range(8):
        procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), "100000", f"k{round_}{i}"],
                                  stdout=subprocess.PIPE, text=True) for i in range(4)]
        time.sleep(0.4 + 0.1 * round_)
        for p in procs:
            p.send_signal(signal.SIGKILL)
        for p in procs:
            out, _ = p.communicate()
            acked.update(out.split())
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stored = {ev["uid"] for ev in Spool(path).query()}
    assert acked and acked <= stored  # every acknowledged write survived


def test_invalid_event_is_refused_and_nothing_written(tmp_path):
    s = spool(tmp_path)
    bad = events.new("user.login", login="x", success=False, method="password")  # no error
    with pytest.raises(events.EventError, match="error: required"):
        s.append(login("ok"), bad)
    assert s.count() == 0


def test_duplicate_uid_stored_once(tmp_path):
    s = spool(tmp_path)
    ev = login()
    s.append(ev)
    s.append(dict(ev))
    assert s.count() == 1


def test_unwritable_location_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(SpoolError, match="cannot open"):
        Spool(tmp_path / "file" / "spool.db")


def fill(s, n=2000):
    for i in range(n):
        try:
            s.append(events.new("session.start", sid=f"s{i}", login="u" * 200))
        except SpoolFull:
            return i
    return n


def test_full_spool_prunes_delivered_first(tmp_path):
    s = spool(tmp_path, max_bytes=256 * 1024)
    stored = fill(s)
    assert stored < 2000  # the cap bit
    while (b := s.claim(500)):
        s.ack(b.id)
    assert fill(s, 100) == 100  # delivered events made room
    # ...and the one event fill() was refused earlier is reported, not forgotten.
    assert [e["count"] for e in s.query(kind="spool.dropped")] == [1]
    assert s.count(sent=False) == 101


def test_drop_new_counts_and_reports(tmp_path):
    s = spool(tmp_path, max_bytes=256 * 1024)
    stored = fill(s)
    refused = 5
    for _ in range(refused):
        with pytest.raises(SpoolFull):
            s.append(login("late"))
    first = [ev for ev in s.query(kind="session.start")][:1]
    assert first[0]["sid"] == "s0"  # drop_new keeps the oldest evidence
    while (b := s.claim(500)):
        s.ack(b.id)
    s.append(login("after"))
    dropped = s.query(kind="spool.dropped")
    assert len(dropped) == 1
    assert dropped[0]["count"] == refused + 1  # the one fill() stopped on, plus ours
    assert "drop_new" in dropped[0]["reason"]
    assert stored > 0


def test_drop_oldest_keeps_newest_and_reports(tmp_path):
    s = spool(tmp_path, max_bytes=256 * 1024, on_full="drop_oldest")
    assert fill(s, 3000) == 3000  # never refuses
    sids = [ev["sid"] for ev in s.query(kind="session.start")]
    assert sids[-1] == "s2999" and "s0" not in sids
    dropped = s.query(kind="spool.dropped")
    assert sum(ev["count"] for ev in dropped) == 3000 - len(sids)


def test_claim_ack_and_lease(tmp_path):
    s = spool(tmp_path)
    for i in range(10):
        s.append(login(f"u{i}"))
    b1 = s.claim(4)
    assert [ev["login"] for ev in b1.events] == ["u0", "u1", "u2", "u3"]
    b2 = s.claim(100)
    assert len(b2.events) == 6  # claimed rows are not handed out twice
    assert s.claim(100) is None
    assert s.ack(b1.id) == 4
    # b2's uploader "died": after the lease the same events are claimed again.
    again = s.claim(100, lease=0.0)
    assert [ev["uid"] for ev in again.events] == [ev["uid"] for ev in b2.events]
    s.ack(again.id)
    assert s.count(sent=False) == 0 and s.count(sent=True) == 10


def test_claim_skips_what_another_live_claim_holds(tmp_path):
    s = spool(tmp_path)
    for i in range(10):
        s.append(login(f"u{i}"))
    c1, c2 = s.claim(4), s.claim(2)
    s.release(c1.id)
    c3 = s.claim(100)  # around c2's events, not over them
    assert [ev["login"] for ev in c3.events] == [f"u{i}" for i in (0, 1, 2, 3, 6, 7, 8, 9)]
    assert s.ack(c3.id) == 8 and s.ack(c2.id) == 2
    assert s.claim(100) is None and s.count(sent=True) == 10


def test_spool_of_version_6_keeps_its_events_and_drops_its_claims(tmp_path):
    # Version 6 kept claims in the events' own rows; 7 in a table of their own. A claim in
    # flight across the upgrade is dropped: its events go again (the collector keeps one).
    s = spool(tmp_path)
    for i in range(5):
        s.append(login(f"u{i}"))
    s.ack(s.claim(2).id)
    path = s.path
    s.close()
    db = sqlite3.connect(path)
    db.executescript("DROP TABLE claims; CREATE INDEX events_claim ON events (claim) "
                     "WHERE claim IS NOT NULL; UPDATE events SET claim = 'old', claimed_at = "
                     f"{time.time()} WHERE seq = 3; PRAGMA user_version = 6;")
    db.close()
    s = spool(tmp_path)
    assert s.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert s.db.execute("SELECT count(*) FROM sqlite_master WHERE name = 'events_claim'"
                        ).fetchone()[0] == 0
    b = s.claim(100)
    assert [ev["login"] for ev in b.events] == ["u2", "u3", "u4"]
    assert s.ack(b.id) == 3 and s.count(sent=False) == 0
    s.close()


def recording(s, sid):
    s.start_recording(sid=sid, login="u", mode="interactive", command="", term="xterm", cols=80,
                      rows=24, started=time.time(), wrapper_pid=1, wrapper_start=1)


def frames_blob(text: bytes) -> bytes:
    return wire.pack_frames([(0.5, b"o", text), (0.75, b"o", b"\xff\x00 not UTF-8")])


BIG = b"x" * CHUNK_FILE_MIN  # a streaming session's batch: in a file


def test_chunk_bytes_go_in_a_file_of_their_own(tmp_path):
    s = spool(tmp_path)
    sid = "0000002a-1234-8abc-9def-0123456789ab"
    recording(s, sid)
    blob = frames_blob(b"ls -l\r\n" + BIG)
    assert s.put_chunk(sid, 1, blob, 20) and not s.put_chunk(sid, 1, blob, 20)  # a retry
    path = os.path.join(s.chunk_dir, f"{sid}.1")
    assert open(path, "rb").read() == blob and os.stat(path).st_mode & 0o777 == 0o600
    assert os.stat(s.chunk_dir).st_mode & 0o777 == 0o700
    assert s.db.execute("SELECT length(data), size FROM recording_chunks").fetchall() == \
        [(0, len(blob))]
    assert list(s.frames(sid)) == wire.unpack_frames(blob)
    assert s.unsent_chunks() == [(sid, 1, blob)]
    assert s.backlog()["chunk_bytes"] == len(blob)
    assert s.recording(sid)["stored_bytes"] == len(blob)
    os.unlink(path)  # gone by hand: said, not read as an empty recording
    assert s.unsent_chunks() == [(sid, 1, None)]
    with pytest.raises(SpoolError, match=f"chunk 1's file {path} is gone"):
        list(s.frames(sid))


def test_a_damaged_chunk_is_a_spool_error_naming_the_recording_and_the_chunk(tmp_path):
    # A chunk file cut short on disk (a full disk, a crash, a hand): wire.ProtocolError is no
    # SshtrailError, so the CLI showed a traceback.
    s = spool(tmp_path)
    recording(s, "r1")
    s.put_chunk("r1", 1, frames_blob(b"ls\r\n"), 4)
    s.put_chunk("r1", 2, frames_blob(BIG), len(BIG))
    path = os.path.join(s.chunk_dir, "r1.2")
    with open(path, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(SpoolError, match=f"recording r1: chunk 2 \\({path}\\) is damaged: "
                                         "frame at byte 0 claims"):
        list(s.frames("r1"))


def test_small_chunks_stay_in_their_rows(tmp_path):
    # An interactive session's batches: a few bytes every batch_ms. A file each would be an
    # inode, a create and an unlink per keystroke.
    s = spool(tmp_path)
    recording(s, "r1")
    small, big = frames_blob(b"ls\r\n"), frames_blob(BIG)
    assert s.put_chunk("r1", 1, small, 4) and s.put_chunk("r1", 2, big, len(BIG))
    assert s.db.execute("SELECT seq, length(data), size FROM recording_chunks ORDER BY seq"
                        ).fetchall() == [(1, len(small), None), (2, 0, len(big))]
    assert os.listdir(s.chunk_dir) == ["r1.2"]
    assert list(s.frames("r1")) == wire.unpack_frames(small) + wire.unpack_frames(big)
    assert s.unsent_chunks() == [("r1", 1, small), ("r1", 2, big)]


def test_cap_counts_chunk_files_and_pruning_deletes_them(tmp_path):
    s = spool(tmp_path, max_bytes=500_000)
    recording(s, "r1")
    assert s._used_bytes() < 100_000  # the database alone stays far under the cap
    chunk = b"\x00" * 100_000
    assert all(s.put_chunk("r1", seq, chunk, len(chunk)) for seq in (1, 2, 3))
    # With 300,000 bytes in files, one more would pass the nine tenths recordings may fill.
    assert not s.put_chunk("r1", 4, chunk, len(chunk))
    assert s.recording("r1")["dropped_bytes"] == len(chunk)
    s.mark_chunk_sent("r1", 1)
    s.mark_chunk_sent("r1", 2)
    assert s.put_chunk("r1", 5, chunk, len(chunk))  # delivered chunks made way, files and all
    assert sorted(os.listdir(s.chunk_dir)) == ["r1.3", "r1.5"]
    assert [seq for (seq,) in s.db.execute("SELECT seq FROM recording_chunks")] == [3, 5]
    assert s._chunk_file_bytes() == 2 * len(chunk)


def test_chunk_file_that_cannot_be_written_stores_nothing_and_says_why(tmp_path):
    s = spool(tmp_path)
    recording(s, "r1")
    with open(s.chunk_dir, "w") as f:  # in the way of the directory, like a full disk would be
        f.write("x")
    with pytest.raises(SpoolError, match="cannot write recording chunk 1 of r1"):
        s.put_chunk("r1", 1, BIG, 4)
    assert s.db.execute("SELECT count(*) FROM recording_chunks").fetchone()[0] == 0
    assert s.recording("r1")["stored_bytes"] == 0 and s._chunk_file_bytes() == 0
    os.unlink(s.chunk_dir)
    assert s.put_chunk("r1", 1, BIG, 4)  # the wrapper's re-send, once there is room


def test_agent_start_sweeps_chunk_files_without_a_row(tmp_path):
    s = spool(tmp_path)
    recording(s, "r1")
    s.put_chunk("r1", 1, BIG, 4)
    with open(os.path.join(s.chunk_dir, "r1.2"), "wb") as f:
        f.write(b"written by an agent killed before its row committed")
    assert s.sweep_chunk_files() == 1
    assert os.listdir(s.chunk_dir) == ["r1.1"]


def test_spool_of_version_7_keeps_chunks_in_their_rows(tmp_path):
    s = spool(tmp_path)
    recording(s, "r1")
    path = s.path
    s.close()
    db = sqlite3.connect(path)  # what version 7 was: no size column, bytes in the row
    blob = frames_blob(b"old\r\n")
    db.executescript("DROP TABLE recording_chunks; CREATE TABLE recording_chunks (sid TEXT NOT "
                     "NULL, seq INTEGER NOT NULL, data BLOB NOT NULL, sent INTEGER NOT NULL "
                     "DEFAULT 0, PRIMARY KEY (sid, seq)); PRAGMA user_version = 7;")
    db.execute("INSERT INTO recording_chunks (sid, seq, data) VALUES ('r1', 1, ?)", (blob,))
    db.commit()
    db.close()
    s = spool(tmp_path)
    assert s.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    new = frames_blob(b"new\r\n" + BIG)
    s.put_chunk("r1", 2, new, 4)
    assert s.unsent_chunks() == [("r1", 1, blob), ("r1", 2, new)]
    assert list(s.frames("r1")) == wire.unpack_frames(blob) + wire.unpack_frames(new)
    assert os.listdir(s.chunk_dir) == ["r1.2"]


def test_query_filters(tmp_path):
    s = spool(tmp_path)
    old = events.new("user.login", at=time.time() - 3600, login="alice", success=True, method="password")
    s.append(old, login("bob"), events.new("session.start", sid="x", login="alice"))
    assert [e["login"] for e in s.query(login="alice")] == ["alice", "alice"]
    assert len(s.query(kind="user.login")) == 2
    assert [e["login"] for e in s.query(since=time.time() - 60, kind="user.login")] == ["bob"]


def test_recordings_leave_room_for_events(tmp_path):
    s = spool(tmp_path, max_bytes=300 * 1024)
    s.start_recording(sid="r1", login="u", mode="interactive", command="", term="xterm", cols=80,
                      rows=24, started=time.time(), wrapper_pid=1, wrapper_start=1)
    chunk = b"\x00" * 20_000
    stored = [s.put_chunk("r1", seq, chunk, len(chunk)) for seq in range(1, 40)]
    assert stored[0] and not stored[-1]  # the cap bit
    rec = s.recording("r1")
    assert rec["dropped_bytes"] == stored.count(False) * len(chunk)
    s.append(login("after-the-flood"))  # events still fit
    assert s.query(login="after-the-flood")
