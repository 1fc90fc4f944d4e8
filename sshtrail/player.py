"""Replay of a recorded session on the auditor's terminal: timing, pause, speed, seeking, status.

`Recording` is a session's asciicast with what the status line shows (user, host, start) and the
session's commands; `Player` plays it to a binary file object (the terminal, or a test's pipe).
Every byte of the recording goes through `termfilter` before it is written, and the player must
never let the recording act on the viewer's terminal: no clipboard, title, reports, answers into
its input, palette, mouse or paste modes (see termfilter for the list). Seeking restores the
nearest keyframe (`keyframes`) and redraws the screen from the model (`screen.render`): never a
replay from the start.

The library is clock-driven and testable without a terminal: `seek(t)`, `screen_at(t)`,
`advance(now)`, `handle_keys(data)`; `run(keys_fd, wake_fd)` is the interactive loop the CLI
(`cli_play`) wraps with raw mode, signals and the terminal's restoration.

Geometry: the recording is drawn in the top-left ROWSxCOLS of the terminal. When the terminal
has a row to spare, the status line lives below the recording and the scrolling region is kept
to the recording's rows (a `CSI r` of the recording is rewritten so); when it has not, the status
line is shown only while paused, over the last row, which is redrawn from the model on resume.
"""
from __future__ import annotations

import bisect
import io
import os
import re
import select
import time
from dataclasses import dataclass, field
from typing import IO, Callable, Iterable

from . import asciicast, events, screen, termfilter
from .errors import SshtrailError
from .keyframes import Frame, Keyframes
from .right_edge import ABORT, RightEdge

ESC = "\x1b"
SPEEDS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
MIN_SPEED, MAX_SPEED = SPEEDS[0], SPEEDS[-1]
SEEK_SMALL, SEEK_LARGE = 10.0, 60.0
STATUS_EVERY = 0.25  # seconds between status line updates while playing
# On a terminal wider than the recording, once output went past the recording's right edge: the
# screen is drawn from the model when output pauses this long (seconds of the viewer's time),
# or after this long of streaming output.
REDRAW_QUIET, REDRAW_EVERY = 0.05, 0.25


class PlayError(SshtrailError):
    pass


# -- the recording --------------------------------------------------------------------------

@dataclass
class Recording:
    """A session's recording: size, output and resize events (times in seconds from its start,
    as recorded), and what the status line shows."""
    width: int
    height: int
    events: list[tuple[float, str, str]]
    user: str | None = None
    host: str | None = None
    start: float | None = None  # epoch seconds of t=0
    commands: list[tuple[float, str]] = field(default_factory=list)  # (offset, command line)
    idle_time_limit: float | None = None  # the file's own, if it set one


def load(data: bytes | IO[bytes] | Iterable[bytes], *, user: str | None = None,
         host: str | None = None, start: float | None = None,
         session_events: Iterable[dict] = ()) -> Recording:
    """Parse asciicast v2 (strictly) into a Recording. `session_events`: the session's events
    (spool or collector), for the user, host, start and the `session.command`s."""
    if isinstance(data, (bytes, bytearray)):
        data = io.BytesIO(data)
    header, evs = asciicast.read(data)
    out = [(t, code, d) for t, code, d in evs if code in ("o", "r")]
    evlist = list(session_events)
    for ev in evlist:
        user = user or ev.get("login")
        host = host or ev.get("server_hostname") or ev.get("server_id")
    if start is None and isinstance(header.get("timestamp"), (int, float)):
        start = float(header["timestamp"])
    if user is None and isinstance(header.get("title"), str) and header["title"].strip():
        user = header["title"].split()[0]  # write_session's title: "login sid"
    commands = []
    if start is not None:
        for ev in evlist:
            if ev.get("event") == "session.command":
                try:
                    at = events.parse_time(ev["time"]) - start
                except (KeyError, events.EventError):
                    continue
                argv = ev.get("argv") or [ev.get("path", "?")]
                commands.append((at, " ".join(str(a) for a in argv)))
        commands.sort()
    # The file's own limit, unless it is 0 or less: a negative one would make every gap take
    # away play time, so that the player would show nothing and never end.
    limit = header.get("idle_time_limit")
    limit = float(limit) if limit is not None and limit > 0 else None
    return Recording(header["width"], header["height"], out, user, host, start, commands, limit)


# -- the timeline ---------------------------------------------------------------------------

class Timeline:
    """Recorded time to play time (idle gaps capped at `idle_limit`), and the filtered frames."""

    def __init__(self, rec: Recording, idle_limit: float | None) -> None:
        self.idle_limit = idle_limit
        self.orig: list[float] = []
        self.play: list[float] = []
        self.frames: list[Frame] = []
        filt = termfilter.TermFilter()
        p = prev = 0.0
        for t, code, data in rec.events:
            gap = max(0.0, t - prev)
            p += min(gap, idle_limit) if idle_limit is not None else gap
            prev = t
            self.orig.append(t)
            self.play.append(p)
            if code == "o":
                text = filt.feed(data)
                if text:
                    self.frames.append(Frame(p, "o", text))
            else:
                self.frames.append(Frame(p, "r", data))
        self.duration = self.play[-1] if self.play else 0.0
        self.dropped = filt.dropped

    def to_play(self, t: float) -> float:
        """A recorded offset as a play time."""
        i = bisect.bisect_right(self.orig, t) - 1
        if i < 0:
            return max(0.0, t) if self.idle_limit is None else min(max(0.0, t), self.idle_limit)
        gap = t - self.orig[i]
        return self.play[i] + (min(gap, self.idle_limit) if self.idle_limit is not None else gap)


def parse_offset(text: str, start: float | None) -> float:
    """`--at`: 90, 90.5, 1:30, 1:02:03, 1h2m3s, 2m30s, or an RFC 3339 time (needs the
    recording's start). Seconds from the start, as recorded."""
    s = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    m = re.fullmatch(r"(?:(\d+):)?(\d+):(\d+(?:\.\d+)?)", s)
    if m:
        return int(m.group(1) or 0) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
    m = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?", s)
    if m and any(m.groups()):
        return int(m.group(1) or 0) * 3600 + int(m.group(2) or 0) * 60 + float(m.group(3) or 0)
    try:
        when = events.parse_time(s)
    except events.EventError:
        raise PlayError(f"--at {text!r}: use an offset like 90, 1:30 or 1h2m, or a UTC time "
                        "like 2026-01-02T03:04:05Z") from None
    if start is None:
        raise PlayError(f"--at {text!r}: the recording has no start time; give an offset "
                        "like 1:30 instead")
    return when - start


def _clock(t: float, tenths: bool = False) -> str:
    t = max(0.0, t)
    h, rest = divmod(int(t), 3600)
    m, s = divmod(rest, 60)
    frac = f".{int(t * 10) % 10}" if tenths else ""
    return f"{h}:{m:02d}:{s:02d}{frac}" if h else f"{m:02d}:{s:02d}{frac}"


_MARGINS = re.compile(r"\x1b\[(\d*)(?:;(\d*))?r")
_KEY = re.compile(r"\x1b\[[0-9;]*[~A-Za-z]|\x1bO[A-Za-z]|.", re.S)


# -- the player -----------------------------------------------------------------------------

class Player:
    """Plays `rec` to `out` (a binary file object). Times are play times (seconds from the
    start, idle gaps capped at `idle_limit`).

    `term_size` (cols, rows) is the viewer's terminal; None: the recording's size, no spare
    row. `clock` is for tests."""

    def __init__(self, rec: Recording, out: IO[bytes], *, speed: float = 1.0,
                 idle_limit: float | None = None, status: bool = True,
                 commands: bool = False, term_size: tuple[int, int] | None = None,
                 clock: Callable[[], float] = time.monotonic, stay: bool = False,
                 paused: bool = False) -> None:
        self.rec, self.out, self.clock = rec, out, clock
        if idle_limit is None:
            idle_limit = rec.idle_time_limit
        self.timeline = Timeline(rec, idle_limit)
        self.frames = self.timeline.frames
        self.duration = self.timeline.duration
        self.keyframes = Keyframes(self.frames, rec.width, rec.height)
        self.speed = min(max(speed, MIN_SPEED), MAX_SPEED)
        self.show_status, self.show_commands, self.stay = status, commands, stay
        self.commands = [(self.timeline.to_play(t), c) for t, c in rec.commands]
        self.term_cols, self.term_rows = term_size or (rec.width, rec.height)
        self.paused = paused
        self.done = False  # quit, or the end reached
        self.message = ""  # a notice in the status line (resize, size mismatch)
        self._anchor_pos, self._anchor_wall = 0.0, clock()
        self._written = 0  # frames[:_written] are on the viewer's screen
        self._model: tuple[screen.Screen, screen.Stream] | None = None
        self._model_index = 0
        self._overlay = False  # the status line covers the recording's last row
        self._last_status = 0.0
        self._height = rec.height  # the recording's current size (it may resize)
        self._width = rec.width
        # On a terminal wider than the recording: where output would act differently at the
        # recording's right edge (set by every redraw from the model; None: not wider).
        self._edge: RightEdge | None = None
        self._stale_since: float | None = None  # since when the viewer needs a redraw

    # -- time ---------------------------------------------------------------------------------

    @property
    def position(self) -> float:
        if self.paused:
            return self._anchor_pos
        pos = self._anchor_pos + (self.clock() - self._anchor_wall) * self.speed
        return min(pos, self.duration)

    def _anchor(self, pos: float) -> None:
        self._anchor_pos, self._anchor_wall = pos, self.clock()

    def set_speed(self, speed: float) -> None:
        self._anchor(self.position)
        self.speed = min(max(speed, MIN_SPEED), MAX_SPEED)

    def faster(self) -> None:
        self.set_speed(next((s for s in SPEEDS if s > self.speed), MAX_SPEED))

    def slower(self) -> None:
        self.set_speed(next((s for s in reversed(SPEEDS) if s < self.speed), MIN_SPEED))

    def toggle_pause(self) -> None:
        self._anchor(self.position)
        self.paused = not self.paused
        if not self.paused:
            self._lift_overlay()
        self.draw_status(force=True)

    # -- the screen model ---------------------------------------------------------------------

    def screen_at(self, t: float) -> screen.Screen:
        """The screen as it is at play time t (a fresh model; nothing is written)."""
        return self.keyframes.state_at(self.keyframes.end_index(t))[0]

    def _live_model(self) -> screen.Screen:
        """A model of what the viewer's terminal shows now: the one kept, caught up."""
        target = self._written
        gap = sum(len(f.data) for f in self.frames[self._model_index:target]) \
            if self._model is not None and self._model_index <= target else None
        if gap is None or gap > 2 * self.keyframes.every_bytes:
            self._model = self.keyframes.state_at(target)
        else:
            from .keyframes import apply
            scr, stream = self._model
            for f in self.frames[self._model_index:target]:
                apply(scr, stream, f)
        self._model_index = target
        return self._model[0]

    # -- output -------------------------------------------------------------------------------

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text.encode("utf-8", "replace"))
            self.out.flush()

    @property
    def _confine(self) -> int | None:
        # The terminal is taller than the recording: keep scrolling inside the recording's rows,
        # or a newline on its last row would move into the status line instead of scrolling.
        return self._height if self.term_rows > self._height else None

    def _confined(self, text: str) -> str:
        rows = self._confine
        if rows is None or "r" not in text:
            return text

        def fix(m: re.Match) -> str:
            top = int(m.group(1) or 1)
            bottom = int(m.group(2) or 0) or rows
            return f"{ESC}[{top};{min(bottom, rows)}r"
        return _MARGINS.sub(fix, text)

    def _frames_text(self, start: int, stop: int) -> tuple[str, bool]:
        """The output of frames[start:stop], and whether the recording resized among them."""
        parts = []
        resized = False
        for f in self.frames[start:stop]:
            if f.kind == "o":
                parts.append(f.data)
            else:
                self._resized(f.data)
                resized = True
        return self._confined("".join(parts)), resized

    def _show(self, start: int, stop: int) -> None:
        """Put frames[start:stop] on the viewer's screen, as they came. On a terminal wider
        than the recording, where they act differently than they did on the recording's
        (RightEdge), the screen is drawn from the model soon after (_redraw_if_due): at once
        when output pauses, at most every REDRAW_EVERY seconds while it streams (drawing
        after every piece of a stream of long lines cost the model's time on every byte)."""
        text, resized = self._frames_text(start, stop)
        self._written = stop
        self._write(text)
        if self.term_cols <= self._width:
            self._edge, self._stale = None, False
            return
        edge = self._edge
        if edge is None:  # it became wider than the recording: where its parser is, not known
            edge = self._edge = RightEdge(self._width, None, self._height)
            self._stale = True
        if edge.feed(text) or resized:
            self._stale = True

    def _redraw_if_due(self, wait: float, force: bool = False) -> None:
        """Draw the screen from the model if what was passed on has gone past the recording's
        edge, and output pauses (the next frame is `wait` seconds away), or it has streamed on
        for REDRAW_EVERY seconds since, or `force`."""
        if not self._stale or not (force or wait > REDRAW_QUIET
                                   or self.clock() - self._stale_since >= REDRAW_EVERY):
            return
        edge = self._edge
        scr = self._live_model()
        # What the viewer's terminal is in the middle of (a sequence the frames cut) ends
        # first, and follows the redraw again, for the next frames to finish as the model will.
        self._write((ABORT if edge.carry else "") + render(scr, self._confine) + edge.carry)
        edge.sync(scr)
        self._stale = False
        self.draw_status(force=True)

    @property
    def _stale(self) -> bool:
        return self._stale_since is not None

    @_stale.setter
    def _stale(self, stale: bool) -> None:
        if not stale:
            self._stale_since = None
        elif self._stale_since is None:
            self._stale_since = self.clock()

    def _edge_from(self, scr: screen.Screen) -> None:
        """After a redraw from the model `scr` at the start of a frame: on a terminal wider than
        the recording, follow its right edge from there."""
        self._stale = False
        if self.term_cols <= scr.columns:
            self._edge = None
        else:
            self._edge = RightEdge(scr.columns, lines=scr.lines)
            self._edge.sync(scr)

    def _resized(self, size: str) -> None:
        cols, rows = (int(v) for v in size.split("x"))
        self._width, self._height = cols, rows
        self.message = f"resized to {cols}x{rows}"
        if cols > self.term_cols or rows > self.term_rows:
            self.message += f" > terminal {self.term_cols}x{self.term_rows}: cut"

    def start(self, at: float = 0.0) -> None:
        """Draw the screen at play time `at` and start the clock there."""
        self.seek(at)

    def seek(self, t: float) -> None:
        """Show the screen at play time t: nearest keyframe, what follows, one redraw."""
        t = min(max(0.0, t), self.duration)
        index = self.keyframes.end_index(t)
        scr, stream = self.keyframes.state_at(index)
        self._model, self._model_index = (scr, stream), index
        self._written = index
        self._width, self._height = scr.columns, scr.lines
        self._overlay = False
        self._write(render(scr, self._confine))
        self._edge_from(scr)
        self._anchor(t)
        self.draw_status(force=True)

    def advance(self) -> float:
        """Write what is due by now; the seconds until the next frame is due (inf: none)."""
        pos = self.position
        stop = self.keyframes.end_index(pos)
        if stop > self._written:
            if self._overlay:
                self._lift_overlay()
            self._show(self._written, stop)
        if self._written >= len(self.frames) and pos >= self.duration:
            self._redraw_if_due(0.0, force=True)
            if not self.stay:
                self.done = True
            elif not self.paused:
                self.toggle_pause()  # stay at the end, paused, for a seek back
            return float("inf")
        if self.paused:
            self._redraw_if_due(0.0, force=True)
            return float("inf")
        nxt = self.frames[self._written].t if self._written < len(self.frames) else self.duration
        wait = max(0.0, (nxt - pos) / self.speed)
        self._redraw_if_due(wait)
        return wait

    def step(self) -> None:
        """One frame forward (paused: the position moves to that frame)."""
        if self._written >= len(self.frames):
            return
        f = self.frames[self._written]
        self._anchor(f.t)
        if self._overlay:
            self._lift_overlay()
        self._show(self._written, self._written + 1)
        self._redraw_if_due(0.0, force=True)
        self.draw_status(force=True)

    # -- the status line ----------------------------------------------------------------------

    def status_text(self) -> str:
        pos = self.position
        state = "paused" if self.paused else "playing"
        speed = f"{self.speed:g}x"
        who = f"{self.rec.user or '?'}@{self.rec.host or '?'}"
        when = events.format_time(self.rec.start)[:19].replace("T", " ") + "Z" \
            if self.rec.start is not None else "?"
        parts = [f"[{state}] {_clock(pos, True)} / {_clock(self.duration)}", speed, who, when]
        if self.show_commands:
            i = bisect.bisect_right([c[0] for c in self.commands], pos) - 1
            if i >= 0:
                parts.append("$ " + self.commands[i][1])
        if self.message:
            parts.append(self.message)
        # User, host and command lines come from the session: shown, never interpreted.
        return termfilter.field("  ".join(parts), mark="?")

    def draw_status(self, force: bool = False) -> None:
        if not self.show_status:
            return
        now = self.clock()
        if not force and now - self._last_status < STATUS_EVERY:
            return
        self._last_status = now
        spare = self.term_rows > self._height
        if not spare and not self.paused:
            return
        row = self._height + 1 if spare else self._height
        scr = self._live_model()
        text = self.status_text()[:max(1, self.term_cols - 1)]
        self._write(status_line(scr, row, text))
        self._overlay = not spare

    def _lift_overlay(self) -> None:
        if not self._overlay:
            return
        self._overlay = False
        scr = self._live_model()
        self._write(redraw_row(scr, self._height - 1))

    # -- keys and the loop --------------------------------------------------------------------

    def seek_by(self, delta: float) -> None:
        self.seek(self.position + delta)

    def handle_keys(self, data: str) -> None:
        for m in _KEY.finditer(data):
            k = m.group()
            if k in ("q", "Q", "\x03", "\x04"):
                self.done = True
                return
            if k == " ":
                self.toggle_pause()
            elif k in ("+", "="):
                self.faster()
                self.draw_status(force=True)
            elif k in ("-", "_"):
                self.slower()
                self.draw_status(force=True)
            elif k == "." and self.paused:
                self.step()
            elif k in ("\x1b[C", "\x1bOC", "l"):
                self.seek_by(SEEK_SMALL)
            elif k in ("\x1b[D", "\x1bOD", "h"):
                self.seek_by(-SEEK_SMALL)
            elif k in ("\x1b[A", "\x1bOA", "\x1b[6~", "k"):
                self.seek_by(SEEK_LARGE)
            elif k in ("\x1b[B", "\x1bOB", "\x1b[5~", "j"):
                self.seek_by(-SEEK_LARGE)

    def run(self, keys_fd: int, wake_fd: int | None = None,
            on_wake: Callable[[bytes], None] | None = None) -> None:
        """The interactive loop: until q, the end (unless `stay`), or `on_wake` sets done.
        `wake_fd`: signals as bytes (signal.set_wakeup_fd), handed to `on_wake`."""
        self.keyframes.build_in_background()
        try:
            fds = [keys_fd] + ([wake_fd] if wake_fd is not None else [])
            while not self.done:
                wait = self.advance()
                if self.done:
                    break
                self.draw_status()
                if self.show_status and not self.paused:
                    wait = min(wait, STATUS_EVERY)
                ready, _, _ = select.select(fds, [], [], min(wait, 1.0))
                if wake_fd is not None and wake_fd in ready:
                    data = os.read(wake_fd, 64)
                    if on_wake is not None:
                        on_wake(data)
                if keys_fd in ready:
                    data = os.read(keys_fd, 1024)
                    if not data:
                        break
                    self.handle_keys(data.decode("utf-8", "replace"))
        finally:
            self.keyframes.stop()

    def restore_sequence(self) -> str:
        """What the terminal needs when the player leaves: the recording's modes undone, the
        cursor below the recording and shown (last)."""
        try:
            self._redraw_if_due(0.0, force=True)
            self._lift_overlay()
            scr = self._live_model()
        except Exception:  # noqa: BLE001 - leaving after an error: restore what we can
            scr = None
        out = []
        # Unconditional when the model is unknown: on the normal screen it only moves the cursor.
        if scr is None or scr.alternate:
            out.append(f"{ESC}[?1049l")
        out.append(f"{ESC}[0m{ESC}[r{ESC}[?6l{ESC}[4l{ESC}[?7h{ESC}(B\x0f")
        if self.term_rows > self._height:  # below the recording, over the status line
            out.append(f"{ESC}[{self._height + 1};1H{ESC}[J")
        elif scr is not None and not scr.alternate:
            # Where the recording left the cursor (as after `cat`), on a line of its own.
            out.append(f"{ESC}[{scr.cursor.y + 1};{min(scr.cursor.x, scr.columns - 1) + 1}H")
            out.append("\r" if scr.cursor.x == 0 else "\r\n")
        elif scr is not None:
            out.append("\r\n")  # leaving the alternate screen put the cursor back
        else:
            out.append(f"{ESC}[{self.term_rows};1H\r\n")
        out.append(f"{ESC}[?25h")
        return "".join(out)


def render(scr: screen.Screen, confine: int | None) -> str:
    return screen.render(screen.snapshot(scr), confine)


def _reposition(scr: screen.Screen) -> str:
    """Put the cursor, attributes, modes and charsets back as the model has them, after the
    player drew outside the recording (the recording's saved cursor slot is left alone)."""
    from pyte import modes as mo
    out = [f"{ESC}[?7{'h' if mo.DECAWM in scr.mode else 'l'}"]
    c = scr.cursor
    top = scr.margins.top if scr.margins is not None and mo.DECOM in scr.mode else 0
    if mo.DECOM in scr.mode:
        out.append(f"{ESC}[?6h")
    if c.x >= scr.columns:
        out.append(screen.pending_wrap(scr.buffer[c.y], scr.columns, c.y - top + 1))
    else:
        out.append(f"{ESC}[{c.y - top + 1};{c.x + 1}H")
    if mo.IRM in scr.mode:
        out.append(f"{ESC}[4h")
    out.append(screen._charsets(scr.g0_charset, scr.g1_charset, scr.charset))
    out.append(screen.sgr(c.attrs))
    if not c.hidden:
        out.append(f"{ESC}[?25h")
    return "".join(out)


def _leave(scr: screen.Screen) -> str:
    from pyte import modes as mo
    return (f"{ESC}[?25l" + (f"{ESC}[?6l" if mo.DECOM in scr.mode else "")
            + (f"{ESC}[4l" if mo.IRM in scr.mode else "") + f"{ESC}(B\x0f{ESC}[?7l")


def status_line(scr: screen.Screen, row: int, text: str) -> str:
    """The status line at `row`, and nothing below it: the recording's output goes to the
    terminal as it came, and a cursor move past its rows (`CSI 30;1H` in a 24-row recording,
    on a taller terminal) could leave text there that reads as the player's own."""
    return (_leave(scr) + f"{ESC}[{row};1H{ESC}[0;7m{text}{ESC}[0m{ESC}[J" + _reposition(scr))


def redraw_row(scr: screen.Screen, y: int) -> str:
    """Row y (0-based) of the model, drawn over whatever covers it."""
    out: list[str] = [_leave(scr), f"{ESC}[{y + 1};1H{ESC}[0m{ESC}[2K"]
    screen.draw_line(scr.buffer[y], scr.columns, y, out)
    return "".join(out) + _reposition(scr)
