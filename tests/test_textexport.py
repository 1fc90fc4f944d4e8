"""`sshtrail export --format text|json`: the screen as it read, and the session's events; and the
asciicast export still accepted by Debian's asciinema."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sshtrail import asciicast, events, textexport, wire
from sshtrail.spool import Spool
from ttyrun import run_on_a_tty

ROOT = Path(__file__).resolve().parent.parent
E = "\x1b"

VIM_SESSION = [
    (0.1, "alice$ echo \x1b[31mhello\x1b[0m\r\nhello\r\n"),
    (0.5, "alice$ vim notes.txt\r\n"),
    (0.6, f"{E}[?1049h{E}]0;vim{E}\\{E}[1;23r{E}[H{E}[2J"),
    (0.7, "".join(f"{E}[{y};1H~" for y in range(2, 24)) + f"{E}[1;1Hfirst line of notes"),
    (0.8, f"{E}[24;1H{E}[7m\"notes.txt\" 1L{E}[0m{E}[1;20H"),
    (1.0, f" edited{E}[2;1Hsecond line"),
    (1.5, f"{E}[r{E}[?1049l"),
    (1.6, "alice$ ls\r\n" + "".join(f"file{i}\r\n" for i in range(30))),
    (2.0, "alice$ cl"), (2.1, "ear\r\n"), (2.2, f"{E}[H{E}[2J{E}[3J"),
    (2.5, "alice$ exit\r\n"),
]


def cast_bytes(outputs, width=80, height=24) -> bytes:
    buf = io.BytesIO()
    with asciicast.Writer(buf, width=width, height=height, timestamp=1767225600) as w:
        for t, text in outputs:
            w.write(t, "o", text)
    return buf.getvalue()


def text_of(outputs, **kw) -> list[str]:
    out = io.BytesIO()
    textexport.write_text(cast_bytes(outputs, **kw), out)
    return out.getvalue().decode().split("\n")[:-1]


def test_full_screen_program_reads_as_the_screen_showed_it():
    lines = text_of(VIM_SESSION)
    at = lines.index("--- screen at 00:01 ---")
    assert lines[:at] == []  # nothing scrolled off or was cleared before vim left
    screen = lines[at + 1:at + 25]
    assert screen[0] == "first line of notes edited"
    assert screen[1] == "second line"
    assert screen[2:22] == ["~"] * 20
    assert screen[23] == '"notes.txt" 1L'
    rest = lines[at + 25:]
    # The normal screen came back behind vim, then `ls` scrolled it; `clear` dumped the rest.
    assert rest[0] == "alice$ echo hello"
    assert "alice$ vim notes.txt" in rest
    assert [x for x in rest if x.startswith("file")] == [f"file{i}" for i in range(30)]
    assert rest[-2:] == ["alice$ clear", "alice$ exit"]
    assert all("\x1b" not in x and "\x07" not in x for x in lines)
    assert "vim" not in "".join(lines[:at + 1])  # the title went nowhere


def test_split_sequences_and_wrapped_lines():
    text = "x" * 100 + f"\r\n{E}[3"  # a sequence cut across frames
    lines = text_of([(0.1, text), (0.2, "1mred\r\n")], width=40, height=5)
    assert lines == ["x" * 40, "x" * 40, "x" * 20, "red"]


def test_alternate_screen_still_up_at_the_end_is_included():
    lines = text_of([(0.1, "$ top\r\n"), (0.2, f"{E}[?1049h{E}[H{E}[2JPID USER"), (3.0, "")])
    assert lines == ["--- screen at 00:00 ---", "PID USER", "$ top"]


# -- through the CLI, from a spool ------------------------------------------------------------

@pytest.fixture
def spooled(tmp_path):
    cfg = tmp_path / "sshtrail.toml"
    cfg.write_text(f'[spool]\npath = "{tmp_path / "spool.db"}"\n')
    spool = Spool(tmp_path / "spool.db", server_id="h1", server_hostname="web1")
    spool.start_recording(sid="s1", login="alice", mode="interactive", command="", term="xterm",
                          cols=80, rows=24, started=1767225600.0, wrapper_pid=1,
                          wrapper_start=1)
    frames = [(t, b"o", text.encode()) for t, text in VIM_SESSION]
    blob = wire.pack_frames(frames)
    spool.put_chunk("s1", 1, blob, sum(len(f[2]) for f in frames))
    spool.append(events.new("session.command", at=1767225600.5, sid="s1", login="alice",
                            path="/usr/bin/vim", argv=["vim", "notes.txt"], pid=10, ppid=9,
                            return_code=0))
    spool.close()
    return cfg


def export(cfg: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sshtrail.cli", "export", "s1",
                           "--config", str(cfg), *args], cwd=ROOT, capture_output=True,
                          timeout=60)


def test_cli_export_text_json_and_asciicast(spooled, tmp_path):
    r = export(spooled, "--format", "text")
    assert r.returncode == 0, r.stderr
    assert "--- screen at 00:01 ---\nfirst line of notes edited\n" in r.stdout.decode()

    r = export(spooled, "--format", "json")
    assert r.returncode == 0, r.stderr
    evs = [json.loads(line) for line in r.stdout.decode().splitlines()]
    assert [e["event"] for e in evs] == ["session.command"]
    assert evs[0]["argv"] == ["vim", "notes.txt"] and evs[0]["sid"] == "s1"

    out = tmp_path / "s1.cast"
    r = export(spooled, "-o", str(out))
    assert r.returncode == 0, r.stderr
    header, events = asciicast.read(open(out, "rb"))
    assert len(list(events)) == len(VIM_SESSION)
    if shutil.which("asciinema") is None:
        pytest.skip("asciinema not on PATH (Debian package 'asciinema')")
    cat = run_on_a_tty(["asciinema", "cat", str(out)], cwd=tmp_path)
    assert cat.returncode == 0, cat.stderr
    assert cat.stdout.decode() == "".join(text for _, text in VIM_SESSION)
