"""Search at the collector: the screen-text extraction as test vectors, then end to end: a real
collector process holding many sessions uploaded by hosts' real uploaders, searched through the
API and the `sshtrail search` CLI."""
from __future__ import annotations

import json
import subprocess
import time

import pytest
import requests

from collector import search
from collector.search import ScreenText, index_chunk
from collector_proc import SSHTRAIL, CollectorProc, SimHost
from sshtrail import events, wire

# -- screen text ------------------------------------------------------------------------------

# (frames as (t, bytes), completed lines as (offset, text), the unfinished line's text or None)
VECTORS = {
    "plain lines": ([(1.0, b"one\r\ntwo\nthree")], [(1.0, "one"), (1.0, "two")], "three"),
    "colours and title stripped": (
        [(1.0, b"\x1b]0;user@h: ~\x07\x1b[01;32muser@h\x1b[00m:\x1b[01;34m~\x1b[00m$ ls\r\n")],
        [(1.0, "user@h:~$ ls")], None),
    "bracketed paste and private modes": (
        [(1.0, b"\x1b[?2004h$ \x1b[?2004lok\r\n")], [(1.0, "$ ok")], None),
    "carriage return overwrites": ([(1.0, b"50%\r100% done\r\n")], [(1.0, "100% done")], None),
    "progress bar keeps the last state": (
        [(1.0, b"[#   ]\r"), (2.0, b"[##  ]\r"), (3.0, b"[####]\r\n")], [(3.0, "[####]")],
        None),
    "backspace and erase": ([(1.0, b"rm -rf /tmpx\b\x1b[K/x\r\n")], [(1.0, "rm -rf /tmp/x")],
                            None),
    "readline redraw: cursor left, insert, delete": (
        [(1.0, b"$ ecoh\x1b[2Dho\r\n$ exxcho\x1b[5D\x1b[2P\r\n$ eco\x1b[1D\x1b[@h\r\n")],
        [(1.0, "$ echo")] * 3, None),
    "utf-8 split across frames": ([(1.0, b"caf\xc3"), (2.0, b"\xa9 \xe2\x82"), (3.0, b"\xac\n")],
                                  [(1.0, "café €")], None),
    "escape split across frames": (
        [(1.0, b"a\x1b["), (2.0, b"31mb\x1b]0;ti"), (3.0, b"tle\x07c\n")], [(1.0, "abc")], None),
    "invalid utf-8 replaced": ([(1.0, b"x\xff\xfey\n")], [(1.0, "x\ufffd\ufffdy")], None),
    "cursor positioning ends a line": ([(1.0, b"top\x1b[5;1Hbottom\x1b[2J")],
                                       [(1.0, "top"), (1.0, "bottom")], None),
    "tabs": ([(1.0, b"a\tb\n")], [(1.0, "a       b")], None),
    "blank lines skipped": ([(1.0, b"\r\n   \r\n\x1b[m\r\nx\r\n")], [(1.0, "x")], None),
    "NUL and bell dropped": ([(1.0, b"a\x00b\x07c\n")], [(1.0, "abc")], None),
    "line begins at its first visible character": (
        [(1.0, b"\r\n"), (2.0, b"   "), (3.0, b"late\r\n")], [(3.0, "   late")], None),
}


@pytest.mark.parametrize("name", VECTORS)
def test_screen_text_vectors(name):
    frames, lines, partial = VECTORS[name]
    screen = ScreenText()
    for t, data in frames:
        screen.feed(t, data)
    assert [(ln.offset, ln.text) for ln in screen.done] == lines
    tail = screen.flush()
    assert (tail.text if tail else None) == partial


@pytest.mark.parametrize("name", VECTORS)
def test_screen_text_resumes_from_its_state_at_every_frame(name):
    """Cutting the frames into chunks anywhere gives the same lines, as across chunks."""
    frames, lines, partial = VECTORS[name]
    state, got, last_partial = None, [], None
    for seq, (t, data) in enumerate(frames, 1):
        out = index_chunk(state, seq, [(t, b"o", data)])
        got += [(ln.offset, ln.text) for ln in out.lines]
        assert out.replaces_partial == (seq > 1)
        state, last_partial = out.state, out.partial
    assert got == lines
    assert (last_partial.text if last_partial else None) == partial


def test_screen_text_keeps_when_each_character_appeared():
    screen = ScreenText()
    screen.feed(1.0, b"$ ")
    for i, c in enumerate(b"rm -rf /tmp/x"):
        screen.feed(2.0 + i / 10, bytes([c]))
    screen.feed(9.0, b"\r\n")
    [line] = screen.done
    assert line.offset == 1.0 and line.text == "$ rm -rf /tmp/x"
    offset, shown = search.output_hit(line.text, line.offset, line.marks, "rm -rf /tmp/x")
    assert offset == pytest.approx(3.2) and shown == line.text
    assert search.output_hit(line.text, line.offset, line.marks, "$ r")[0] == 2.0


def test_screen_text_stays_bounded():
    screen = ScreenText()
    screen.feed(1.0, b"x" * (search.MAX_LINE * 2 + 10))
    assert [len(ln.text) for ln in screen.done] == [search.MAX_LINE] * 2
    # A clipboard write of megabytes, unterminated for a while: kept small, then skipped whole.
    screen = ScreenText()
    screen.feed(1.0, b"before\x1b]52;c;" + b"A" * 100_000)
    assert len(screen.state()) < 2 * search.MAX_PENDING
    screen.feed(2.0, b"A" * 100_000 + b"\x07after\n")
    assert [ln.text for ln in screen.done] == ["beforeafter"]


def test_long_lines_are_shown_around_the_match():
    text = "a" * 1000 + "NEEDLE" + "b" * 1000
    shown = search.context(text, (1000, 1006))
    assert "NEEDLE" in shown and len(shown) <= search.CONTEXT + 2
    assert shown.startswith("…") and shown.endswith("…")


# -- end to end ---------------------------------------------------------------------------------

NOW = time.time()
HOUR = 3600.0


def record(host: SimHost, sid: str, login: str, started: float, chunks: list[list]) -> None:
    """A recording in the host's spool, as the agent writes it: chunks of (t, bytes) frames."""
    host.spool.start_recording(sid=sid, login=login, mode="shell", command="", term="xterm",
                               cols=80, rows=24, started=started, wrapper_pid=1, wrapper_start=1)
    for seq, frames in enumerate(chunks, 1):
        add_chunk(host, sid, seq, frames)


def add_chunk(host: SimHost, sid: str, seq: int, frames: list) -> None:
    blob = wire.pack_frames([(t, b"o", data) for t, data in frames])
    assert host.spool.put_chunk(sid, seq, blob, sum(len(d) for _, d in frames))


def noise(i: int) -> list:
    # Near misses of what the test looks for, and ordinary output.
    return [(0.5, f"user{i}@box:~$ ".encode()), (1.0, b"rm -rf /tmp/y\r\nrm -r /tmp/x\r\n"),
            (2.0, f"total {i}\r\ndrwxr-xr-x 2 root root 4096 sshtrail-needle-7f3\r\n".encode())]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """30 recorded sessions on three hosts, uploaded; which session holds what."""
    base = tmp_path_factory.mktemp("search")
    (base / "collector").mkdir()
    collector = CollectorProc(directory=base / "collector").start()
    hosts = {name: SimHost(base / name, collector, name) for name in ("host-a", "host-b", "host-c")}
    for h in hosts.values():
        h.enroll(collector)
        h.add_logins(1, login="nobody")  # events tell the collector each host's hostname
    sids = {}
    for n, (name, h) in enumerate(hosts.items()):
        for i in range(10):
            sid = f"{name}-session-{i:02d}"
            record(h, sid, f"user{i}", NOW - 2 * HOUR - i * 60, [noise(n * 10 + i)])
    # An old session on host-a where a program printed the needle.
    sids["old"] = "host-a-old"
    record(hosts["host-a"], "host-a-old", "alice", NOW - 3 * 24 * HOUR,
           [[(0.5, b"alice@host-a:~$ ./build\r\n"),
             (12.25, b"artifact sshtrail-needle-7f3a ok\r\n")]])
    # bob typed `rm -rf /tmp/x` (the shell echoing each key), cut by a chunk boundary, and the
    # collector restarted between the two chunks; the command also ran (an ebpf event).
    sids["typed"] = "host-b-typed"
    typed = [(5.0 + k * 0.05, bytes([c])) for k, c in enumerate(b"rm -rf /tmp/x")]
    record(hosts["host-b"], "host-b-typed", "bob", NOW - 1 * HOUR,
           [[(1.0, b"\x1b[01;32mbob@host-b\x1b[00m:~$ ")] + typed[:6]])
    hosts["host-b"].drain()
    collector.stop()
    collector.start()
    add_chunk(hosts["host-b"], "host-b-typed", 2, typed[6:] + [(5.9, b"\r\n"),
                                                              (6.0, b"bob@host-b:~$ ")])
    hosts["host-b"].spool.append(events.new(
        "session.command", at=NOW - 1 * HOUR + 5.75, sid="host-b-typed", login="bob", pid=4242,
        path="/usr/bin/rm", argv=["rm", "-rf", "/tmp/x"], return_code=0))
    # carol's program printed the needle, in the middle of a line of other output.
    sids["printed"] = "host-c-printed"
    record(hosts["host-c"], "host-c-printed", "carol", NOW - 0.5 * HOUR,
           [[(0.25, b"carol@host-c:~$ ./run\r\n")],
            [(7.5, b"\x1b[33mstatus:\x1b[0m found sshtrail-needle-7f3a in cache\r\n")]])
    for h in hosts.values():
        h.drain()
    token = base / "reader.token"
    token.write_text(collector.reader_token)
    yield {"collector": collector, "sids": sids, "token": token, "hosts": hosts,
           "typed_at": typed[-1][0]}
    for h in hosts.values():
        h.close()
    collector.close()


def cli(fleet, *args, check=True) -> subprocess.CompletedProcess:
    c = fleet["collector"]
    r = subprocess.run(SSHTRAIL + ["search", "--config", str(c.config), *args, "--collector",
                                   c.url, "--token-file", str(fleet["token"]), "--ca",
                                   str(c.ca_file)], capture_output=True, text=True, timeout=60)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def found(fleet, *args) -> list[tuple]:
    r = cli(fleet, *args, "--json")
    return [(h["kind"], h["sid"], h["offset"]) for h in map(json.loads, r.stdout.splitlines())]


@pytest.mark.integration
def test_typed_command_is_found_by_its_echo_and_its_event(fleet):
    r = cli(fleet, "rm -rf /tmp/x", "--json")
    hits = [json.loads(x) for x in r.stdout.splitlines()]
    assert {h["sid"] for h in hits} == {fleet["sids"]["typed"]}  # and in no other session
    by_kind = {h["kind"]: h for h in hits}
    assert len(hits) == 2 and set(by_kind) == {"output", "command"}
    out = by_kind["output"]
    # Whole on screen when its last key was echoed, in chunk 2, after the restart.
    assert out["offset"] == pytest.approx(fleet["typed_at"], abs=1e-3)
    assert out["line"] == "bob@host-b:~$ rm -rf /tmp/x"
    assert (out["login"], out["server_id"], out["server_hostname"]) == (
        "bob", "host-b", "host-b.test")
    start = NOW - 1 * HOUR
    assert events.parse_time(out["time"]) == pytest.approx(start + fleet["typed_at"], abs=1e-3)
    cmd = by_kind["command"]
    assert cmd["offset"] == pytest.approx(5.75, abs=1e-3) and cmd["line"] == "rm -rf /tmp/x"
    # Newest first: the command ran after the echo.
    assert hits[0]["kind"] == "command"


@pytest.mark.integration
def test_printed_string_is_found_with_its_session_and_offset(fleet):
    sids = fleet["sids"]
    assert found(fleet, "SSHTRAIL-needle-7F3A") == [("output", sids["printed"], 7.5),
                                                   ("output", sids["old"], 12.25)]
    r = cli(fleet, "sshtrail-needle-7f3a", "--kind", "output")
    assert f"sshtrail play {sids['printed']} --at 7.5" in r.stdout
    assert "status: found sshtrail-needle-7f3a in cache" in r.stdout
    assert "carol@host-c.test" in r.stdout


@pytest.mark.integration
def test_filters_user_host_since(fleet):
    sids = fleet["sids"]
    needle = "sshtrail-needle-7f3a"
    assert found(fleet, needle, "--user", "alice") == [("output", sids["old"], 12.25)]
    assert found(fleet, needle, "--user", "bob") == []
    assert found(fleet, needle, "--host", "host-a.test") == [("output", sids["old"], 12.25)]
    assert found(fleet, needle, "--host", "host-c") == [("output", sids["printed"], 7.5)]
    assert found(fleet, needle, "--since", "1d") == [("output", sids["printed"], 7.5)]
    assert found(fleet, "rm -rf /tmp/x", "--kind", "command", "--since", "2h") == [
        ("command", sids["typed"], pytest.approx(5.75, abs=1e-3))]
    # Many hits, paged by the client: every noise session once.
    hits = found(fleet, "rm -r /tmp/x", "--limit", "1000")
    assert len(hits) == 30 and len({s for _, s, _ in hits}) == 30


@pytest.mark.integration
def test_search_needs_a_reader_token_and_a_real_query(fleet):
    c = fleet["collector"]
    r = requests.get(c.url + "/v1/search", params={"q": "rm -rf"}, verify=str(c.ca_file),
                     timeout=10)
    assert r.status_code == 401
    r = requests.get(c.url + "/v1/search", params={"q": "rm -rf"}, verify=str(c.ca_file),
                     timeout=10, headers={"Authorization": "Bearer not-a-token"})
    assert r.status_code == 401
    assert c.get("/v1/search", q="rm").status_code == 400
    assert c.get("/v1/search", q="rm -rf", before="junk").status_code == 400
    assert c.get("/v1/search", q="rm -rf", kind="input").status_code == 400
    r = c.get("/v1/search", q="rm -rf /tmp/x", limit=1)
    assert r.status_code == 200 and len(r.json()["hits"]) == 1 and r.json()["next"]
    r = subprocess.run(SSHTRAIL + ["search", "--config", str(c.config), "rm -rf", "--collector",
                                   c.url, "--ca", str(c.ca_file)], capture_output=True,
                       text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert r.returncode != 0 and "reader token" in r.stderr
    r = cli(fleet, "no such text anywhere", check=False)
    assert r.returncode == 1 and "no match" in r.stderr


@pytest.mark.integration
def test_play_at_a_hits_offset_shows_that_line(fleet):
    """The search answer is a place to open: `sshtrail play SID --at OFFSET` (from the
    collector) shows the line there; later, the line has scrolled away."""
    from test_player import Tty
    host = fleet["hosts"]["host-c"]
    record(host, "host-c-scrolled", "dave", NOW - 0.2 * HOUR,
           [[(0.5, b"dave@host-c:~$ ./job\r\n"), (3.0, b"needle-for-play-91 appeared\r\n")],
            [(6.0 + i * 0.01, f"filler line {i}\r\n".encode()) for i in range(60)]])
    host.drain()
    hits = [json.loads(x) for x in cli(fleet, "needle-for-play-91", "--json").stdout.splitlines()]
    assert [(h["sid"], h["offset"]) for h in hits] == [("host-c-scrolled", 3.0)]
    c = fleet["collector"]
    remote = ["--paused", "--no-status", "--collector", c.url, "--token-file",
              str(fleet["token"]), "--ca", str(c.ca_file)]

    def screen_at(at: str) -> list[str]:
        t = Tty(["host-c-scrolled", "--at", at, *remote])
        try:
            t.pump(10, until=lambda: any("dave@host-c" in line or "filler" in line
                                         for line in t.viewer.screen.display))
            t.pump(0.3)
            return list(t.viewer.screen.display)
        finally:
            t.key("q", settle=0)
            t.finish()
    assert any("needle-for-play-91 appeared" in line for line in screen_at(str(hits[0]["offset"])))
    assert not any("needle-for-play-91" in line for line in screen_at("6.6"))
