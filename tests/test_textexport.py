"""`sshtrail export --format text|json`: the screen as it read, and the session's events; and the
asciicast export still accepted by Debian's asciinema."""
from __future__ import annotations

import io
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sshtrail import asciicast, events, screen, termfilter, textexport, wire
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


def test_lines_deleted_after_a_scroll_up_read_as_before():
    # pyte's delete-lines leaves a line in place when the one to move in is not held, and the
    # scroll up (one move of the lines) must leave them held as the indexes it replaced did:
    # else `two` stayed on the screen.
    assert text_of([(0.1, f"one\r\ntwo{E}[S{E}[H{E}[2M")], width=20, height=5) == ["one"]


# -- the same text as the export's first way of reading the screen -------------------------------

def _old_row_text(line, columns: int) -> str:
    return "".join(line[x].data for x in range(columns)).rstrip()


class OldTranscriptScreen(textexport._TranscriptScreen):
    """The text export as first written: every column of a row read, SU as one index per line.
    Slow on hostile output (a review found it quadratic), and the reference for what the export
    writes: the faster way must write the same text for any recording."""

    def rows(self) -> list[str]:
        rows = [_old_row_text(self.buffer[y], self.columns) if y in self.buffer else ""
                for y in range(self.lines)]
        while rows and not rows[-1]:
            rows.pop()
        return rows

    def index(self) -> None:
        bottom = self.margins.bottom if self.margins is not None else self.lines - 1
        if self.cursor.y == bottom and self._scrolls_off():
            self.emit(_old_row_text(self.buffer[0], self.columns) if 0 in self.buffer else "")
        screen.Screen.index(self)

    def scroll_up(self, count=None, *args) -> None:
        if self._scrolls_off():
            bottom = self.margins.bottom if self.margins is not None else self.lines - 1
            for y in range(min(count or 1, bottom + 1)):
                self.emit(_old_row_text(self.buffer[y], self.columns) if y in self.buffer else "")
            x, cy = self.cursor.x, self.cursor.y
            for _ in range(min(count or 1, bottom + 1)):
                self.cursor.y = bottom
                screen.Screen.index(self)
            self.cursor.x, self.cursor.y = x, cy
            return
        screen.Screen.scroll_up(self, count)


def random_output(rng: random.Random, width: int, height: int) -> str:
    """Output of a session that does a bit of everything the export treats apart: colours and
    erases in them, scroll regions and SU/SD, the alternate screens, wide and combining
    characters, insert mode, wrapping, resets."""
    def n():
        return rng.choice(["", "0", "1", "2", "3", str(height), str(height + 1), "9999"])
    pieces = [
        lambda: "".join(rng.choice("ab yz  ") for _ in range(rng.randint(1, 2 * width))),
        lambda: rng.choice(["漢字", "e\u0301", "\U0001f600", "\u00e9", "\t", "\b", "\x0e#\x0f"]),
        lambda: rng.choice(["\r\n", "\n", "\r", "\x1bD", "\x1bE", "\x1bM"]) * rng.randint(1, 3),
        lambda: rng.choice(["\x1b[31m", "\x1b[44m", "\x1b[0m", "\x1b[7m", "\x1b[48;5;200m"]),
        lambda: f"\x1b[{rng.randint(0, height + 1)};{rng.randint(0, width + 1)}H",
        lambda: f"\x1b[{n()}{rng.choice('ABCDdG')}",
        lambda: f"\x1b[{rng.choice(['', '0', '1', '2', '3'])}J",
        lambda: f"\x1b[{rng.choice(['', '0', '1', '2'])}K",
        lambda: f"\x1b[{n()}{rng.choice('SSSTLMX@Pb')}",
        lambda: f"\x1b[{rng.randint(0, height)};{rng.randint(0, height + 1)}r",
        lambda: "\x1b[r",
        lambda: f"\x1b[?{rng.choice(['47', '1047', '1048', '1049'])}{rng.choice('hl')}",
        lambda: f"\x1b[{rng.choice(['4', '?6', '?7'])}{rng.choice('hl')}",
        lambda: rng.choice(["\x1bc", "\x1b#8", "\x1b7", "\x1b8", "\x1b(0", "\x1b(B"]),
    ]
    return "".join(rng.choice(pieces)() for _ in range(rng.randint(1, 200)))


def random_recording(seed: int):
    rng = random.Random(seed)
    width, height = rng.randint(1, 30), rng.randint(1, 12)
    recording, t = [], 0.0
    for _ in range(rng.randint(1, 8)):
        t += rng.choice([0.1, 1.0, 70.0])
        if rng.random() < 0.15:
            recording.append((t, "r", f"{rng.randint(1, 30)}x{rng.randint(1, 12)}"))
            continue
        data = random_output(rng, width, height)
        cut = rng.randint(0, len(data))  # a sequence may be cut across frames
        recording += [(t, "o", data[:cut]), (t, "o", data[cut:])]
    return width, height, recording


@pytest.mark.parametrize("seed", range(300))
def test_the_text_is_what_reading_every_column_made_it(seed, monkeypatch):
    width, height, recording = random_recording(seed)
    text = list(textexport.transcript(width, height, recording))
    monkeypatch.setattr(textexport, "_TranscriptScreen", OldTranscriptScreen)
    assert text == list(textexport.transcript(width, height, recording))


# -- what it costs on output made to cost the most -------------------------------------------

def steps(run) -> int:
    """Python calls and lines that run() goes through: work counted the same on any machine, for
    a bound no timing could keep in a test."""
    count = 0

    def trace(frame, event, arg):
        nonlocal count
        count += 1
        return trace

    before = sys.gettrace()
    sys.settrace(trace)
    try:
        run()
    finally:
        sys.settrace(before)
    return count


HOSTILE = {  # what comes once, then the unit repeated (as in bench/replay)
    "erase display": ("", "x\x1b[2J"),
    "erase display in colour": ("", "\x1b[44mx\x1b[2J"),
    "erase display after one in colour": ("\x1b[44m\x1b[2J", "\x1b[2J"),
    "scroll up 9999": ("", "\x1b[9999S"),
    "scroll up 9999 under a line": ("", "x\x1b[9999S"),
    "alternate screen": ("", "x\x1b[?1049hy\x1b[?1049l"),
    "REP 9999": ("", "x\x1b[9999b"),
}


@pytest.mark.parametrize("size", [(80, 24), (250, 80)], ids=["80x24", "250x80"])
@pytest.mark.parametrize("name", HOSTILE)
def test_the_export_costs_a_few_times_what_the_screen_model_costs(name, size):
    """On top of the screen model, the export reads out what leaves the screen: at most a few
    times the model's own work, at any size. It read every column of every held line on each
    erase (35x the model at 80x24, 178x at 250x80, after one erase in colour) and scrolled up
    by one index per line (33x, 231x)."""
    setup, unit = HOSTILE[name]

    def work(scr, stream) -> int:
        filt = termfilter.TermFilter()
        stream.feed(filt.feed(setup))
        return steps(lambda: stream.feed(filt.feed(unit * 30)))

    model = work(*screen.new(*size))
    scr = textexport._TranscriptScreen(*size, [].append)
    assert work(scr, screen.Stream(scr)) < 8 * model


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
