"""The upload format's parser (sshtrail.batch.parse): what it takes, what it refuses, and how it
names the line."""
import json

import pytest

from sshtrail import batch, events
from sshtrail.chain import GENESIS, link_hash


def body(seq=1, prev=GENESIS, **fields) -> str:
    ev = events.new("session.command", sid="s1", pid=7, path="/bin/ls", argv=["ls", "-l"],
                    return_code=0, login="alice", at=1_800_000_000.5)
    ev.update(server_id="h1", server_hostname="host1", seq=seq, prev_hash=prev, **fields)
    return events.to_json(ev)


def test_lines_are_kept_byte_for_byte_with_their_chain_hash():
    one = body(1)
    two = body(2, link_hash(one))
    lines = batch.parse(batch.encode([one, two]))
    assert [line.raw for line in lines] == [one, two]
    assert [line.hash for line in lines] == [link_hash(one), link_hash(two)]
    assert [line.seq for line in lines] == [1, 2]
    assert lines[1].prev_hash == link_hash(one)
    assert batch.broken_links(lines) == []


def test_whitespace_around_a_line_is_json_and_kept():
    # json.loads takes it, so the parser does too; the hash is of the bytes as sent.
    padded = " " + body(1) + "\t"
    (line,) = batch.parse(padded.encode() + b"\n")
    assert line.raw == padded and line.hash == link_hash(padded)


@pytest.mark.parametrize("text, message", [
    (body(1) + "x", r"line 1: not valid JSON \(Extra data at column"),
    (body(1)[:-1], r"line 1: not valid JSON \(Expecting"),
    ("[1, 2]", "line 1: event: expected a JSON object, got list"),
    (body(1, prev="A" * 64), "line 1: prev_hash: expected 64 lowercase hex digits"),
    (body(1, prev=GENESIS[:63]), "line 1: prev_hash: expected 64 lowercase hex digits"),
    (body(1, prev="０" * 64), "line 1: prev_hash: expected 64 lowercase hex digits"),
    (body(0), "line 1: seq: expected a positive integer, got 0"),
    (body(1).replace('"time":"2027-01-15T08:00:00.500000Z"', '"time":"2027-01-15"'),
     "line 1: time: '2027-01-15' is not RFC 3339"),
])
def test_bad_lines_are_named(text, message):
    with pytest.raises(batch.BatchError, match=message):
        batch.parse(text.encode() + b"\n")


def test_a_bad_line_after_good_ones_names_its_number():
    good = body(1)
    with pytest.raises(batch.BatchError, match="line 2: not valid JSON"):
        batch.parse(batch.encode([good, "{"]))


def test_seq_must_increase_and_the_batch_must_hold_something():
    with pytest.raises(batch.BatchError, match="line 2: seq 1 does not follow 1"):
        batch.parse(batch.encode([body(1), body(1)]))
    with pytest.raises(batch.BatchError, match="empty"):
        batch.parse(b"")


def test_a_connect_or_listen_is_searched_by_its_address_and_port():
    from collector.ingest import search_text
    ev = {"event": "session.network", "dst_addr": "10.0.0.5", "dst_port": 22, "version": 4}
    assert search_text(ev) == "10.0.0.5:22"
    ev = {"event": "session.listen", "addr": "::1", "port": 8080, "version": 6}
    assert search_text(ev) == "[::1]:8080"
    ev = {"event": "session.network_outcome", "dst_addr": "10.0.0.5", "dst_port": 22,
          "version": 4, "established": False}
    assert search_text(ev) == "10.0.0.5:22"
    assert search_text({"event": "session.network", "dst_addr": None}) == ""


def test_argv_with_a_non_string_is_searched_by_its_strings():
    from collector.ingest import search_text
    ev = json.loads(body(1))
    assert search_text(ev) == "ls -l"
    ev["argv"] = ["ls", 3, "-l"]
    assert search_text(ev) == "ls -l"
