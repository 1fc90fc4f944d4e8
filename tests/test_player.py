"""The player: seeking equals a straight replay (the engine as a library, and the real
`sshtrail play` under a pseudo-terminal whose screen is emulated by feeding what the player
wrote to a screen model), pause, speed, the terminal given back on q/Ctrl-C/SIGTERM, nothing
dangerous reaching the viewer, and the size check."""
from __future__ import annotations

import io
import os
import random
import re
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import ptyprocess
import pytest

from sshtrail import asciicast, player, screen
from sshtrail import keyframes
from sshtrail.keyframes import apply

ROOT = Path(__file__).resolve().parent.parent
# Every key at its default: playing a file needs none. /dev/null reads as an empty file.
EMPTY_CONFIG = Path(os.devnull)
W, H = 80, 24


# -- a generated session ------------------------------------------------------------------------

PROMPT = "\x1b[1;32malice@web1\x1b[0m:\x1b[1;34m~/src\x1b[0m$ "
DANGEROUS = [
    "\x1b]52;c;cm0gLXJmIH4K\x07",            # clipboard write
    "\x1b]0;pwned title\x07",                 # title set
    "\x1b]2;other\x1b\\",                     # title set, ST-terminated
    "\x1b[21t", "\x1b[14t", "\x1b[18t",       # title / size reports
    "\x1b[5n", "\x1b[6n", "\x1b[?6n",         # device status reports
    "\x1b[c", "\x1b[>c", "\x1b[0c",           # device attributes
    "\x1bP$qm\x1b\\",                         # DECRQSS
    "\x1bP+q544e\x1b\\",                      # XTGETTCAP
    "\x1b]4;1;rgb:ff/00/00\x07", "\x1b]11;?\x07", "\x1b]104\x07",  # palette
    "\x1b]50;fixed\x07",                      # font
    "\x1b[?1000h", "\x1b[?1006h", "\x1b[?2004h", "\x1b[?1004h",    # mouse, paste, focus
    "\x1b]8;;http://evil/\x1b\\link\x1b]8;;\x1b\\",               # hyperlink (text stays)
    "\x05",                                   # ENQ answerback
]


def generate(seed: int = 1, minutes: float = 5.0, width: int = W, height: int = H):
    """(t, text) output events of a shell session with a full-screen editor (alternate screen,
    scroll region, reverse index, insert/delete lines), a top-like redraw loop, colours, lines
    that wrap, clears, idle gaps and dangerous sequences, cut at random into frames (sequences
    split across frames)."""
    rng = random.Random(seed)
    out: list[tuple[float, str]] = []
    t = 0.0

    def emit(text: str, dt: float = 0.05) -> None:
        nonlocal t
        while text:
            cut = rng.randint(1, 200)
            t += rng.uniform(0, dt)
            out.append((round(t, 6), text[:cut]))
            text = text[cut:]

    def shell() -> None:
        cmd = rng.choice(["ls -la", "cat /etc/os-release", "git log --oneline", "dmesg | tail",
                          "ps aux"])
        emit(PROMPT)
        for ch in cmd:
            emit(ch, 0.15)
        emit("\r\n")
        for i in range(rng.randint(1, 40)):
            n = rng.randint(0, 140)  # some wrap
            colour = rng.choice(["", "\x1b[31m", "\x1b[1;33m", "\x1b[38;5;208m",
                                 "\x1b[48;2;10;20;30m", "\x1b[7m"])
            word = "".join(rng.choice("abcdefghij klmnop/._-") for _ in range(n))
            emit(f"{colour}{word}\x1b[0m\r\n", 0.01)
        if rng.random() < 0.3:
            emit(rng.choice(DANGEROUS) + "after\r\n")
        if rng.random() < 0.1:
            emit("\x1b[H\x1b[2J\x1b[3J")

    def editor() -> None:
        emit(PROMPT + "vim notes.txt\r\n")
        emit("\x1b[?1049h\x1b[22;0;0t\x1b[1;%dr\x1b[H\x1b[2J" % (height - 1))
        lines = [f"line {i} " + "x" * rng.randint(0, 60) for i in range(200)]
        for y in range(height - 1):
            emit(f"\x1b[{y + 1};1H\x1b[33m{y + 1:3d}\x1b[0m {lines[y]}\x1b[K", 0.005)
        emit(f"\x1b[{height};1H\x1b[7m notes.txt \x1b[0m\x1b[K\x1b[1;5H")
        top = 0
        for _ in range(rng.randint(5, 30)):
            op = rng.random()
            if op < 0.4:  # scroll down one line in the region
                top = min(top + 1, len(lines) - height)
                emit(f"\x1b[{height - 1};1H\n\x1b[33m{top + height - 1:3d}\x1b[0m "
                     f"{lines[top + height - 2]}\x1b[K", 0.3)
            elif op < 0.6:  # scroll up with reverse index
                emit(f"\x1b[1;1H\x1bM\x1b[33m{top:3d}\x1b[0m {lines[max(top - 1, 0)]}\x1b[K",
                     0.3)
            elif op < 0.75:
                emit(f"\x1b[{rng.randint(2, height - 2)};1H\x1b[L inserted\x1b[K", 0.3)
            elif op < 0.85:
                emit(f"\x1b[{rng.randint(2, height - 2)};1H\x1b[2M", 0.3)
            elif op < 0.92:
                emit(f"\x1b[{rng.choice('ST')}", 0.3)
            else:
                emit(f"\x1b[{rng.randint(1, height - 1)};{rng.randint(1, width)}H"
                     f"\x1b[1;31mtyped\x1b[0m", 0.3)
        emit("\x1b[r\x1b[?1049l\x1b[23;0;0t")

    def top_like() -> None:
        emit("\x1b[?1049h\x1b[?25l")
        for frame in range(rng.randint(3, 10)):
            rows = [f"\x1b[7m  PID USER  %CPU  COMMAND{' ' * 50}\x1b[0m"]
            rows += [f"{rng.randint(1, 99999):5d} root  {rng.random() * 100:4.1f}  worker/{i}"
                     for i in range(height - 3)]
            emit("\x1b[H" + "\x1b[K\r\n".join(rows) + "\x1b[J", 1.0)
        emit("\x1b[?25h\x1b[?1049l")

    end = minutes * 60
    while t < end:
        r = rng.random()
        if r < 0.6:
            shell()
        elif r < 0.8:
            editor()
        else:
            top_like()
        if rng.random() < 0.2:
            t += rng.uniform(5, 30)  # the user thinks
    return out


def write_cast(path: Path, outputs, width: int = W, height: int = H, **header) -> Path:
    with open(path, "wb") as f, asciicast.Writer(f, width=width, height=height,
                                                 timestamp=1767225600, **header) as w:
        for t, text in outputs:
            w.write(t, "o", text)
    return path


@pytest.fixture(scope="module")
def long_cast(tmp_path_factory) -> Path:
    return write_cast(tmp_path_factory.mktemp("cast") / "long.cast", generate())


def load(path: Path) -> player.Recording:
    with open(path, "rb") as f:
        return player.load(f)


class Viewer:
    """The viewer's terminal, emulated: a binary file the player writes to, parsed by a screen
    model with an alternate screen (pyte lacks one)."""

    def __init__(self, cols: int = W, rows: int = H) -> None:
        self.screen, self.stream = screen.new(cols, rows)
        self.raw = bytearray()
        self._decoder = __import__("codecs").getincrementaldecoder("utf-8")("replace")

    def write(self, data: bytes) -> None:
        self.raw += data
        self.stream.feed(self._decoder.decode(bytes(data)))

    def flush(self) -> None:
        pass


def same_screen(viewer: screen.Screen, model: screen.Screen, rows: int = H) -> None:
    assert screen.cells(viewer)[:rows] == screen.cells(model)[:rows]
    assert viewer.display[:rows] == model.display[:rows]
    assert (viewer.cursor.x, viewer.cursor.y) == (model.cursor.x, model.cursor.y)
    assert viewer.cursor.attrs == model.cursor.attrs


def shows_the_recording(shown: screen.Screen, model: screen.Screen) -> None:
    """A terminal wider than the recording (W x H) shows its characters top left, nothing to
    their right, and the cursor where the model has it."""
    for y in range(H):
        row = [shown.buffer[y][x].data for x in range(shown.columns)]
        assert row[:W] == [model.buffer[y][x].data for x in range(W)], y
        assert set(row[W:]) == {" "}, (y, "".join(row[W:]))
    assert (shown.cursor.x, shown.cursor.y) == (model.cursor.x, model.cursor.y)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the seek engine, as a library --------------------------------------------------------------

def test_screen_at_equals_a_straight_replay_for_many_times(long_cast):
    p = player.Player(load(long_cast), io.BytesIO(), status=False)
    assert p.duration > 240 and len(p.keyframes.frames) > 1000
    rng = random.Random(7)
    times = sorted([rng.uniform(0, p.duration) for _ in range(60)]
                   + [p.frames[i].t for i in rng.sample(range(len(p.frames)), 30)]
                   + [0.0, p.duration])
    straight, stream = screen.new(W, H)
    done = 0
    alt_seen = 0
    for t in times:
        while done < len(p.frames) and p.frames[done].t <= t:
            apply(straight, stream, p.frames[done])
            done += 1
        seeked = p.screen_at(t)
        assert screen.cells(seeked) == screen.cells(straight), f"at {t}"
        assert (seeked.cursor.x, seeked.cursor.y, seeked.alternate) == \
            (straight.cursor.x, straight.cursor.y, straight.alternate)
        alt_seen += straight.alternate
    assert len(p.keyframes.positions) > 20
    assert alt_seen > 5, "the generated session should spend time in full-screen programs"


def test_seek_redraws_the_viewers_terminal_as_a_straight_replay_shows_it(long_cast):
    clock = FakeClock()
    viewer = Viewer()
    p = player.Player(load(long_cast), viewer, status=False, clock=clock)
    p.start(0.0)
    rng = random.Random(3)
    for _ in range(25):
        # Play a little, as the loop would...
        clock.now += rng.uniform(0, 8)
        p.advance()
        same_screen(viewer.screen, p.screen_at(p.position))
        # ...then seek anywhere, back or forward.
        target = rng.uniform(0, p.duration)
        p.seek(target)
        same_screen(viewer.screen, p.screen_at(target))
        assert viewer.screen.alternate == p.screen_at(target).alternate
    assert p.keyframes.complete or len(p.keyframes.positions) > 1


def test_seek_is_fast_in_a_long_recording(long_cast, monkeypatch):
    # Counted in work, not seconds (bench/replay has the times): a seek replays at most what
    # follows its keyframe, a keyframe's spacing and a frame, never the recording up to it.
    p = player.Player(load(long_cast), io.BytesIO(), status=False)
    p.keyframes.build()
    replayed = []
    real_apply = keyframes.apply

    def counting(scr, stream, frame):
        replayed[-1] += len(frame.data)
        real_apply(scr, stream, frame)
    monkeypatch.setattr(keyframes, "apply", counting)
    rng = random.Random(5)
    most = p.keyframes.every_bytes + max(len(f.data) for f in p.frames)
    far = 0
    for _ in range(20):
        replayed.append(0)
        t = rng.uniform(0, p.duration)
        p.seek(t)
        assert replayed[-1] <= most, (t, replayed[-1], most)
        far += sum(len(f.data) for f in p.frames[:p.keyframes.end_index(t)]) > 2 * most
    assert far >= 5  # seeks to where a replay from the start would have done more


def test_pause_stops_time_and_speed_changes_the_pace():
    clock = FakeClock()
    rec = player.Recording(W, H, [(float(i), "o", f"{i}\r\n") for i in range(100)])
    p = player.Player(rec, io.BytesIO(), status=False, clock=clock)
    p.start(0.0)
    clock.now += 2
    assert p.position == pytest.approx(2)
    p.toggle_pause()
    clock.now += 50
    assert p.position == pytest.approx(2)
    p.toggle_pause()
    p.faster()
    p.faster()  # 4x
    clock.now += 1
    assert p.position == pytest.approx(6)
    for _ in range(10):
        p.faster()
    assert p.speed == 16
    for _ in range(10):
        p.slower()
    assert p.speed == 0.25


def test_idle_limit_caps_gaps_and_at_offsets_map_onto_it():
    rec = player.Recording(W, H, [(0.0, "o", "a"), (100.0, "o", "b"), (101.0, "o", "c")],
                           start=1767225600.0)
    p = player.Player(rec, io.BytesIO(), status=False, idle_limit=2)
    assert p.duration == pytest.approx(3)
    assert p.timeline.to_play(100.5) == pytest.approx(2.5)
    assert player.parse_offset("1:30", None) == 90
    assert player.parse_offset("1h2m", None) == 3720
    assert player.parse_offset("90", None) == 90
    assert player.parse_offset("2026-01-01T00:01:00Z", 1767225600.0) == 60
    with pytest.raises(player.PlayError):
        player.parse_offset("soon", None)


@pytest.mark.parametrize("limit", [-3, 0, -0.5])
def test_a_files_idle_limit_of_zero_or_less_is_ignored(limit):
    # Negative, it made every gap take away play time: the player showed nothing, never ended.
    rec = player.load(b'{"version": 2, "width": 80, "height": 24, "idle_time_limit": %s}\n'
                      b'[1.0, "o", "a"]\n[5.0, "o", "b"]\n' % str(limit).encode())
    assert rec.idle_time_limit is None
    p = player.Player(rec, io.BytesIO(), status=False)
    assert p.duration == pytest.approx(5) and [f.t for f in p.frames] == [1.0, 5.0]
    rec = player.load(b'{"version": 2, "width": 80, "height": 24, "idle_time_limit": 1.5}\n')
    assert rec.idle_time_limit == 1.5


@pytest.mark.parametrize("limit", ["-1", "0", "nan"])
def test_cli_refuses_an_idle_limit_of_zero_or_less(tmp_path, limit):
    cast = write_cast(tmp_path / "s.cast", [(1.0, "a"), (5.0, "b")])
    r = subprocess.run([sys.executable, "-m", "sshtrail.cli", "play", str(cast), "--idle-limit",
                        limit, "--config", str(EMPTY_CONFIG)], cwd=ROOT, capture_output=True,
                       timeout=60)
    assert r.returncode == 1 and r.stdout == b""
    assert r.stderr.decode() == (f"sshtrail: --idle-limit {float(limit):g}: use a number of "
                                 "seconds above 0, e.g. --idle-limit 2\n")


def test_status_line_shows_user_host_start_and_commands():
    rec = player.load(
        b'{"version": 2, "width": 80, "height": 24, "timestamp": 1767225600}\n'
        b'[0.5, "o", "$ "]\n[3.0, "o", "done\\r\\n"]\n',
        session_events=[{"event": "session.start", "login": "bob", "server_hostname": "db1",
                         "time": "2026-01-01T00:00:00Z"},
                        {"event": "session.command", "time": "2026-01-01T00:00:01.000000Z",
                         "argv": ["rm", "-rf", "/tmp/\x1b]52;c;eA==\x07x #\u202etxt"]}])
    clock = FakeClock()
    p = player.Player(rec, io.BytesIO(), commands=True, clock=clock, term_size=(80, 25))
    p.start(0)
    assert "$ " not in p.status_text()
    clock.now += 2
    text = p.status_text()
    assert "bob@db1" in text and "2026-01-01 00:00:00Z" in text and "00:02.0 / 00:03" in text
    assert "$ rm -rf /tmp/" in text and "\x1b" not in text and "\x07" not in text
    assert "x #?txt" in text  # a right-to-left override would show the line's end reversed


def test_nothing_the_recording_wrote_below_it_outlives_the_status_line():
    # On a taller terminal, a recording's cursor move past its rows left text under the status
    # line, where it read as the player's own.
    rec = player.load(b'{"version": 2, "width": 80, "height": 24}\n'
                      b'[0.5, "o", "$ \\u001b[30;1HNOTE FROM SSHTRAIL: session verified"]\n'
                      b'[3.0, "o", "done"]\n')
    clock = FakeClock()
    viewer = Viewer(80, 40)
    p = player.Player(rec, viewer, clock=clock, term_size=(80, 40))
    p.start(0)
    clock.now += 1
    p.advance()
    assert "NOTE FROM SSHTRAIL" in viewer.screen.display[29]  # written, as it came...
    p.draw_status(force=True)
    assert not any("NOTE" in line for line in viewer.screen.display)  # ...and gone
    assert "00:01.0 / 00:03" in viewer.screen.display[24]


def test_on_a_wider_terminal_the_viewer_shows_what_the_recording_showed(long_cast):
    # Output passed on as it came wraps at the viewer's width, not the recording's: the
    # generated session's long lines ran on past column 80, and its cursor with them. Where
    # output acts differently at the recording's right edge, the player now draws from the
    # model (sshtrail.right_edge) once output pauses: then the recording's rows are on the
    # screen, and nothing to their right.
    rec = load(long_cast)
    clock = FakeClock()
    viewer = Viewer(W + 30, H + 2)
    p = player.Player(rec, viewer, clock=clock, term_size=(W + 30, H + 2))
    p.start(0)
    rng = random.Random(5)
    checks = 0
    while not p.done:
        clock.now += rng.uniform(0.05, 3.0)
        p.advance()
        if p._stale:
            continue  # output streams on: redrawn once it pauses (or within REDRAW_EVERY)
        shows_the_recording(viewer.screen, p.keyframes.state_at(p._written)[0])
        checks += 1
    assert checks > 100 and viewer.raw.count(b"\x1b[2J") > 20  # redrawn, many times


# -- the real CLI under a pseudo-terminal ------------------------------------------------------

class Tty:
    """`sshtrail play ...` on a pty of ours; what it writes is fed to an emulated terminal."""

    def __init__(self, args: list[str], cols: int = W, rows: int = H, env: dict | None = None):
        argv = [sys.executable, "-m", "sshtrail.cli", "play", *args]
        self.viewer = Viewer(cols, rows)
        self.p = ptyprocess.PtyProcess.spawn(
            argv, cwd=str(ROOT), dimensions=(rows, cols),
            env=dict(os.environ, TERM="xterm", SSHTRAIL_CONFIG=str(EMPTY_CONFIG), **(env or {})))
        self.p.delayafterclose = 0.02
        self.saved = termios.tcgetattr(self.p.fd)

    def pump(self, seconds: float = 0.0, until=None) -> None:
        deadline = time.monotonic() + seconds
        while True:
            if until is not None and until():
                return
            if time.monotonic() > deadline and (until is None):
                return
            if until is not None and time.monotonic() > deadline:
                raise AssertionError(f"timed out; screen: {self.viewer.screen.display}")
            import select
            r, _, _ = select.select([self.p.fd], [], [], 0.02)
            if r:
                try:
                    self.viewer.write(os.read(self.p.fd, 65536))
                except OSError:
                    return

    def key(self, data: str, settle: float = 0.4) -> None:
        self.p.write(data.encode())
        self.pump(settle)

    def finish(self, timeout: float = 20.0) -> int:
        deadline = time.monotonic() + timeout
        while self.p.isalive() and time.monotonic() < deadline:
            self.pump(0.05)
        self.pump(0.1)
        if self.p.isalive():
            self.p.kill(signal.SIGKILL)
            raise AssertionError("the player did not exit")
        self.p.wait()
        return self.p.exitstatus if self.p.exitstatus is not None else -self.p.signalstatus

    def cooked(self) -> bool:
        attrs = termios.tcgetattr(self.p.fd)
        return bool(attrs[3] & termios.ECHO) and bool(attrs[3] & termios.ICANON)

    def status(self) -> str:
        return self.viewer.screen.display[-1]

    def quit(self) -> None:
        """q, as the auditor leaves: exit 0, the terminal given back in cooked mode."""
        self.key("q", 0)
        assert self.finish() == 0
        assert self.cooked()

    def __enter__(self) -> "Tty":
        return self

    def __exit__(self, *exc) -> None:
        if self.p.isalive():  # a failed test leaves no player behind
            self.p.kill(signal.SIGKILL)


def _status_pos(line: str) -> float:
    m = re.search(r"(\d\d):(\d\d)\.(\d) /", line)
    assert m, line
    return int(m.group(1)) * 60 + int(m.group(2)) + int(m.group(3)) / 10


def test_cli_seeks_with_keys_equal_a_straight_replay(long_cast):
    rec = load(long_cast)
    model = player.Player(rec, io.BytesIO(), status=False)
    with Tty([str(long_cast), "--at", "100", "--paused", "--no-status"]) as t:
        t.pump(10, until=lambda: t.viewer.raw.count(b"\x1b[2J") >= 1 and
               screen.cells(t.viewer.screen) == screen.cells(model.screen_at(100)))
        same_screen(t.viewer.screen, model.screen_at(100))
        expected = 100.0
        for key, delta in (("\x1b[C", 10), ("\x1b[C", 10), ("\x1b[D", -10), ("\x1b[A", 60),
                           ("\x1b[B", -60), ("\x1b[6~", 60), ("\x1b[5~", -60)):
            expected += delta
            t.p.write(key.encode())
            want = model.screen_at(expected)
            t.pump(10, until=lambda: screen.cells(t.viewer.screen) == screen.cells(want)
                   and (t.viewer.screen.cursor.x, t.viewer.screen.cursor.y)
                   == (want.cursor.x, want.cursor.y))
            same_screen(t.viewer.screen, want)
        t.quit()
        assert t.viewer.raw.endswith(b"\x1b[?25h")


def test_cli_pause_stops_time_and_status_line_shows_it(tmp_path):
    cast = write_cast(tmp_path / "s.cast", [(i * 0.5, f"line {i}\r\n") for i in range(200)])
    with Tty([str(cast)], rows=H + 1) as t:
        t.pump(10, until=lambda: "[playing]" in t.status())
        t.pump(1.0)
        t.key(" ")
        assert "[paused]" in t.status()
        first = _status_pos(t.status())
        assert first > 0.5
        screen_before = t.viewer.screen.display
        t.pump(1.5)
        assert _status_pos(t.status()) == first
        assert t.viewer.screen.display == screen_before
        t.key(" ")
        t.pump(1.2)
        assert _status_pos(t.status()) > first + 0.5
        assert "alice" not in t.status() and "@" in t.status()
        t.quit()


def test_cli_on_a_wider_terminal_shows_the_recordings_screen(tmp_path):
    # The real command on a terminal 30 columns wider: a command line typed past the edge
    # (readline's wrap), a cursor move far right, tabs past the last stop. At the end, paused
    # (--stay), the recording's screen, and nothing to its right.
    out = [(0.1, PROMPT)]
    t_ = 0.1
    for ch in "echo " + "y" * 100:
        t_ += 0.002
        out.append((t_, ch))
    out += [(t_ + 0.01, "\r\n" + "y" * 100 + "\r\n"),
            (t_ + 0.02, "right\x1b[200C|\r\n" + "a\tb\tc\td\te\tf\tg\th\ti\tj\tk\tl\r\n"),
            (t_ + 0.03, PROMPT)]
    cast = write_cast(tmp_path / "wide.cast", out)
    model = player.Player(load(cast), io.BytesIO(), status=False)
    want = model.screen_at(model.duration)
    with Tty([str(cast), "--stay"], cols=W + 30, rows=H + 1) as t:
        t.pump(20, until=lambda: "[paused]" in t.status())
        shows_the_recording(t.viewer.screen, want)
        t.quit()


def _timed_run(cast: Path, speed: str) -> float:
    t = Tty([str(cast), "--speed", speed, "--no-status"])
    start = time.monotonic()
    try:
        assert t.finish() == 0
    finally:
        if t.p.isalive():
            t.p.kill(signal.SIGKILL)
    assert "tick 15" in "\n".join(t.viewer.screen.display)
    return time.monotonic() - start


def test_cli_speed_changes_the_pace(tmp_path):
    cast = write_cast(tmp_path / "s.cast", [(i * 0.2, f"tick {i}\r\n") for i in range(16)])
    normal = _timed_run(cast, "1")   # 3 s of recording
    fast = _timed_run(cast, "4")     # about 0.75 s
    assert normal >= 2.9
    assert fast < normal * 0.6
    assert fast >= 0.7


@pytest.mark.parametrize("how", ["q", "ctrl-c", "sigterm", "sigint"])
def test_cli_gives_the_terminal_back(tmp_path, how):
    cast = write_cast(tmp_path / "s.cast", [
        (0.1, "\x1b[?1049h\x1b[?25l\x1b[31mfull screen\x1b[?7l\x1b[1;10r"),
        (60.0, "never\r\n")])
    t = Tty([str(cast)])
    try:
        t.pump(10, until=lambda: "full screen" in "".join(t.viewer.screen.display))
        assert not t.cooked()  # raw while playing
        if how == "q":
            t.p.write(b"q")
        elif how == "ctrl-c":
            t.p.write(b"\x03")
        elif how == "sigterm":
            t.p.kill(signal.SIGTERM)
        else:
            t.p.kill(signal.SIGINT)
        assert t.finish() == 0
        assert t.cooked()
        assert t.viewer.raw.endswith(b"\x1b[?25h")
        assert not t.viewer.screen.alternate
        assert not t.viewer.screen.cursor.hidden
        assert "never" not in "".join(t.viewer.screen.display)
    finally:
        if t.p.isalive():
            t.p.kill(signal.SIGKILL)


def test_cli_dangerous_sequences_never_reach_the_viewer(tmp_path):
    text = "".join(f"row {i} {seq}ok {i}\r\n" for i, seq in enumerate(DANGEROUS))
    # Cut everywhere: sequences split across frames.
    outputs = [(i * 0.001, text[i:i + 3]) for i in range(0, len(text), 3)]
    cast = write_cast(tmp_path / "evil.cast", outputs, height=40)
    t = Tty([str(cast), "--no-status"], rows=40)
    try:
        assert t.finish() == 0
    finally:
        if t.p.isalive():
            t.p.kill(signal.SIGKILL)
    raw = bytes(t.viewer.raw)
    for bad in (b"\x1b]", b"\x1bP", b"\x07", b"\x05", b"[6n", b"[5n", b"[c", b"[>c", b"[0c",
                b"[21t", b"[14t", b"[18t", b"[?1000h", b"[?1006h", b"[?2004h", b"[?1004h",
                b"\x9d", b"\x90", b"cm0gLXJmIH4K", b"pwned", b"evil"):
        assert bad not in raw, bad
    shown = t.viewer.screen.display
    for i in range(len(DANGEROUS)):
        assert any(line.startswith(f"row {i} ") and line.rstrip().endswith(f"ok {i}")
                   for line in shown), (i, shown)
    assert any("linkok" in line for line in shown)


def test_cli_says_when_the_recording_is_larger_than_the_terminal(tmp_path):
    cast = write_cast(tmp_path / "big.cast", [(0.1, "wide\r\n")], width=120, height=40)
    t = Tty([str(cast)], cols=80, rows=24)
    assert t.finish() != 0
    shown = "\n".join(t.viewer.screen.display)
    assert "120x40" in shown and "80x24" in shown and "--ignore-size" in shown
    t = Tty([str(cast), "--ignore-size"], cols=80, rows=24)
    assert t.finish() == 0
    assert "wide" in "\n".join(t.viewer.screen.display)
