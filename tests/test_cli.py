"""The `sshtrail` command as an auditor runs it: what reaches their terminal, and how bad input
and failures are answered (a clear message, a non-zero exit, no traceback, nothing half-written)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sshtrail import events, termfilter, wire
from sshtrail.spool import Spool

ROOT = Path(__file__).resolve().parent.parent

# Recorded by a hostile user: C1 controls (xterm and VTE act on U+009D as on ESC ], on U+009B
# as on ESC [ even in UTF-8), a bidi override, a zero-width space, a line separator.
LOGIN = "al\u009b31mice"
COMMAND = "vim \u009d0;pwned\u0007 x \u202e"
OUTPUT = "\u009d52;c;aGVsbG8=\u009c C1 OSC\r\nbidi \u202e rev\u200bersed \u2028\r\n"


def make_spool(path: Path, frames=None, sid="s1") -> Path:
    cfg = path / "sshtrail.toml"
    cfg.write_text(f'[spool]\npath = "{path / "spool.db"}"\n')
    spool = Spool(path / "spool.db", server_id="h1", server_hostname="web1")
    spool.start_recording(sid=sid, login=LOGIN, mode="interactive", command=COMMAND,
                          term="xterm", cols=80, rows=24, started=1767225600.0,
                          wrapper_pid=1, wrapper_start=1)
    if frames is None:
        frames = [(0.1, b"o", OUTPUT.encode()), (0.2, b"o", b"done\r\n")]
    if frames:
        spool.put_chunk(sid, 1, wire.pack_frames(frames),
                        sum(len(f[2]) for f in frames if f[1] == b"o"))
    spool.append(events.new("session.command", at=1767225600.5, sid=sid, login=LOGIN,
                            path="/usr/bin/vim", argv=["vim", "\u009d0;x\u0007", "\u202e"],
                            pid=10, ppid=9, return_code=0))
    spool.close()
    return cfg


@pytest.fixture
def spooled(tmp_path):
    return make_spool(tmp_path)


def sshtrail(cfg: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sshtrail.cli", *args, "--config", str(cfg)],
                          cwd=ROOT, capture_output=True, timeout=60, **kw)


def assert_terminal_safe(out: bytes) -> None:
    text = out.decode("utf-8")
    found = termfilter._UNSHOWN.findall(text.replace("\n", ""))
    assert not found, found


# -- 1. nothing recorded acts on the auditor's terminal through JSON -----------------------------

def test_sessions_json_escapes_c1_and_bidi(spooled):
    r = sshtrail(spooled, "sessions", "--json")
    assert r.returncode == 0, r.stderr
    assert_terminal_safe(r.stdout)
    [row] = [json.loads(line) for line in r.stdout.decode().splitlines()]
    assert (row["login"], row["command"]) == (LOGIN, COMMAND)


def test_events_json_escapes_c1_and_bidi(spooled):
    r = sshtrail(spooled, "events", "--json")
    assert r.returncode == 0, r.stderr
    assert_terminal_safe(r.stdout)
    [ev] = [json.loads(line) for line in r.stdout.decode().splitlines()]
    assert ev["login"] == LOGIN and ev["argv"] == ["vim", "\u009d0;x\u0007", "\u202e"]


@pytest.mark.parametrize("fmt", ["asciicast", "json"])
def test_export_to_stdout_escapes_c1_and_bidi(spooled, fmt):
    r = sshtrail(spooled, "export", "s1", "--format", fmt)
    assert r.returncode == 0, r.stderr
    assert_terminal_safe(r.stdout)
    lines = [json.loads(line) for line in r.stdout.decode().splitlines()]
    if fmt == "asciicast":
        assert lines[0]["command"] == COMMAND
        assert "".join(e[2] for e in lines[1:]) == OUTPUT + "done\r\n"


# -- export: bad input answered, nothing half-written, nothing written through a planted link --

def test_export_output_is_not_written_through_a_planted_symlink(spooled, tmp_path):
    # A shared directory: another user plants symlinks at every name the export could use
    # beside its output, pointing at a file root must not overwrite.
    shared = tmp_path / "shared"
    shared.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    out = shared / "s.cast"
    proc = subprocess.Popen(["sleep", "0"])
    proc.wait()
    for pid in range(proc.pid, proc.pid + 300):  # the old name: OUTPUT.part-<pid>
        (shared / f"s.cast.part-{pid}").symlink_to(victim)
    r = sshtrail(spooled, "export", "s1", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert victim.read_bytes() == b"precious"
    assert not out.is_symlink() and out.read_bytes().startswith(b'{"version": 2')
    assert sorted(p.name for p in shared.iterdir() if not p.is_symlink()) == ["s.cast"]


def test_export_output_replaces_a_symlink_at_its_name_not_its_target(spooled, tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    out = tmp_path / "s.cast"
    out.symlink_to(victim)
    r = sshtrail(spooled, "export", "s1", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert victim.read_bytes() == b"precious" and not out.is_symlink()


def test_export_output_has_the_mode_of_a_plain_file(spooled, tmp_path):
    out = tmp_path / "s.cast"
    r = sshtrail(spooled, "export", "s1", "-o", str(out), preexec_fn=lambda: os.umask(0o027))
    assert r.returncode == 0, r.stderr
    assert out.stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize("where, says", [
    ("missing/dir/x.cast", "cannot write .*missing/dir/x.cast: .*missing/dir: No such file"),
    ("", "is a directory: name a file in it, e.g. .*/s1.cast"),
])
def test_export_to_a_path_it_cannot_write_says_so(spooled, tmp_path, where, says):
    r = sshtrail(spooled, "export", "s1", "-o", str(tmp_path / where))
    assert r.returncode == 2
    err = r.stderr.decode()
    assert err.startswith("sshtrail: ") and err.count("\n") == 1 and re.search(says, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spool.db", "sshtrail.toml"]


def test_export_into_a_closed_pipe_stops_quietly(tmp_path):
    # `sshtrail export SID | head -c100`: more than a pipe holds, and the reader goes away.
    cfg = make_spool(tmp_path, frames=[(i / 10, b"o", b"x" * 60000 + b"\r\n")
                                       for i in range(40)])
    proc = subprocess.Popen([sys.executable, "-m", "sshtrail.cli", "export", "s1",
                             "--config", str(cfg)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout.read(100).startswith(b'{"version": 2')
    proc.stdout.close()
    assert proc.wait(timeout=60) == 128 + signal.SIGPIPE  # as a tool SIGPIPE killed
    assert proc.stderr.read() == b""


def test_export_of_a_session_that_does_not_exist_says_so_in_every_format(spooled):
    for fmt in ("asciicast", "text", "json"):
        r = sshtrail(spooled, "export", "NOSUCH", "--format", fmt)
        assert (r.returncode, r.stdout) == (2, b""), fmt
        assert b"'NOSUCH'" in r.stderr and b"`sshtrail sessions`" in r.stderr, fmt


@pytest.mark.parametrize("damage", ["cut", "inf"])
def test_export_of_a_damaged_recording_says_which_chunk_and_leaves_no_file(tmp_path, damage):
    if damage == "cut":  # a chunk file cut short on disk
        cfg = make_spool(tmp_path, frames=[(0.1, b"o", b"x" * 70000)])
        [chunk] = (tmp_path / "spool.db.chunks").iterdir()
        with open(chunk, "r+b") as f:
            f.truncate(1000)
    else:  # a time no asciicast can hold
        cfg = make_spool(tmp_path, frames=[(0.1, b"o", b"hi\r\n"), (float("inf"), b"o", b"x")])
    out = tmp_path / "out" / "s.cast"
    out.parent.mkdir()
    r = sshtrail(cfg, "export", "s1", "-o", str(out))
    err = r.stderr.decode()
    assert r.returncode == 1 and err.count("\n") == 1, err
    assert err.startswith("sshtrail: recording s1: chunk 1 ") and "damaged" in err, err
    assert list(out.parent.iterdir()) == []


def test_play_takes_a_name_alone_as_a_session_id_not_a_file_of_that_name(tmp_path, monkeypatch):
    # A file dropped in the auditor's working directory under a session's id was played in the
    # session's place.
    import argparse
    from sshtrail import cli_play, config
    cfg_path = make_spool(tmp_path)
    (tmp_path / "s1").write_bytes(b'{"version": 2, "width": 80, "height": 24}\n'
                                  b'[0.1, "o", "forged"]\n')
    monkeypatch.chdir(tmp_path)
    cfg = config.load(str(cfg_path))
    args = argparse.Namespace(session="s1", collector=None, host=None)
    shown = "".join(d for _, _, d in cli_play.fetch(args, cfg).events)
    assert "done" in shown and "forged" not in shown
    forged = "".join(d for _, _, d in cli_play.fetch(
        argparse.Namespace(session="./s1", collector=None, host=None), cfg).events)
    assert "forged" in forged
    (tmp_path / "other").write_bytes(b"")
    with pytest.raises(Exception, match=r"no recording 'other' in the spool; to play the file "
                                        r"of that name, say \./other"):
        cli_play.fetch(argparse.Namespace(session="other", collector=None, host=None), cfg)


def test_a_recording_the_spool_no_longer_holds_whole_is_said_to_be_so(tmp_path):
    # Delivered chunks are pruned when the spool needs room, and output past a full spool is
    # dropped: an export from the spool then started mid-session without a word.
    cfg = make_spool(tmp_path, frames=[])
    spool = Spool(tmp_path / "spool.db", server_id="h1")
    for seq in (1, 2, 3):
        spool.put_chunk("s1", seq, wire.pack_frames([(seq, b"o", f"part{seq}\r\n".encode())]), 7)
    spool.mark_chunk_sent("s1", 1)
    spool.db.execute("DELETE FROM recording_chunks WHERE sid = 's1' AND seq = 1")
    spool.db.execute("UPDATE recordings SET dropped_bytes = 500 WHERE sid = 's1'")
    spool.close()
    r = sshtrail(cfg, "export", "s1")
    assert r.returncode == 0 and b"part1" not in r.stdout and b"part2" in r.stdout
    assert r.stderr.decode() == (
        "sshtrail: recording s1 is not whole in this spool: 1 of its 3 chunks of output were "
        "delivered to the collector and pruned here (`--collector URL` has them); 500 bytes of "
        "its output were never recorded (the spool was full; its session.recording_failed "
        "events say so)\n")
    r = sshtrail(cfg, "sessions")
    assert b"21B*" in r.stdout and b"* not whole in this spool" in r.stdout
    (row,) = [json.loads(line) for line in sshtrail(cfg, "sessions", "--json").stdout.splitlines()]
    assert row["missing"].startswith("1 of its 3 chunks")


# -- --config before the command, as the usage line shows it ----------------------------------

@pytest.mark.parametrize("where", ["before", "after"])
def test_config_is_taken_before_the_command_as_after_it(spooled, where):
    # It was parsed, then overwritten by the command's own --config default: the command read
    # the host's default spool instead, and said nothing was recorded.
    args = (["--config", str(spooled), "sessions", "--json"] if where == "before"
            else ["sessions", "--json", "--config", str(spooled)])
    r = subprocess.run([sys.executable, "-m", "sshtrail.cli", *args], cwd=ROOT,
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    [row] = [json.loads(line) for line in r.stdout.decode().splitlines()]
    assert row["login"] == LOGIN


# -- an exec session without a command ----------------------------------------------------------

def test_a_login_shell_on_pipes_is_named_as_such_not_as_an_empty_command(tmp_path):
    # `ssh -T host`: sshd runs the login shell, which reads its commands from the client's
    # stdin. Its exec event's command is "", which the tables showed as `` (or as nothing).
    cfg = tmp_path / "sshtrail.toml"
    cfg.write_text(f'[spool]\npath = "{tmp_path / "spool.db"}"\n')
    spool = Spool(tmp_path / "spool.db", server_id="h1", server_hostname="web1")
    spool.start_recording(sid="s1", login="alice", mode="exec", command="", term="",
                          cols=0, rows=0, started=1767225600.0, wrapper_pid=1, wrapper_start=1)
    spool.append(events.new("exec", at=1767225601.0, sid="s1", login="alice", command="",
                            exit_status=3, bytes_in=20, bytes_out=13))
    spool.close()
    for args in (["events"], ["sessions"]):
        r = sshtrail(cfg, *args)
        assert r.returncode == 0, r.stderr
        [line] = [x for x in r.stdout.decode().splitlines() if "alice" in x]
        assert "(no command: the login shell, reading commands from stdin)" in line, line
    r = sshtrail(cfg, "events", "--json")
    assert json.loads(r.stdout)["command"] == ""  # the event itself says what came
