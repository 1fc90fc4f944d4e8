"""Keyframes: snapshots of the screen model along a recording, so that a seek never replays from
the start.

pyte parses about half a megabyte a second here, so a seek into the 40th minute of a busy
session, replayed from the start, would take tens of seconds. `Keyframes` feeds the (filtered)
output through the screen model once and keeps a `screen.Snapshot` every EVERY_BYTES characters
of output or EVERY_SECONDS of recording time that saw output, whichever comes first. The state
at any time T is then the last keyframe at or before T plus at most `every_bytes` of output
after it: a few tens of milliseconds at 16 KiB.

Snapshots share unchanged cells (pyte `Char`s), but a keyframe still costs its cells: ~40 bytes
each, ~150 once the screen has scrolled them away and only keyframes hold them. So keyframes
every 16 KiB of a `cat` of a big log, in a wide terminal, took gigabytes (20 MiB at 250x80: 3.5
GiB). All keyframes together hold at most MAX_CELLS cells: past it every other one is dropped
and the spacing doubles, which keeps them evenly spread. A seek's replay stays below
`every_bytes`, which grows only with output large against MAX_CELLS / (cells of a screen):
after 20 MiB of `cat`, 64 KiB at 80x24 (~0.1 s a seek), 512 KiB at 250x80 (~1.3 s); after 4 MiB
at the largest screen, 2 MiB (~9 s): slow seeks in such recordings, not a host out of memory;
unbounded, those keyframes took 0.4, 3.5 and 4.7 GiB.

The index is built incrementally (`extend_to`), from a background thread while the player runs
(`build_in_background`); `state_at` extends it as far as it needs first, so it is always right,
only slower before the index got there. Thread-safe; it never writes anywhere.
"""
from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass

from . import screen

EVERY_BYTES = 16384
EVERY_SECONDS = 5.0
# ~160 MiB at most (peak, bench/replay). A one-hour session at 80x24 needs ~1.3M (thinned once:
# seeks still well under 200 ms); one screen of the largest model (screen.MAX_COLUMNS x
# MAX_LINES) holds 500,000.
MAX_CELLS = 1 << 20


def cells(snap: screen.Snapshot) -> int:
    """What a snapshot holds, counted in cells. A row is a dict of its own (~500 bytes: 4 cells),
    and cursor, modes and tab stops take a few KiB (32 cells): a blank screen is not free."""
    rows = [*snap.buffer.values(), *(snap.hidden_buffer or {}).values()]
    return 32 + sum(len(line) + 4 for line in rows)


@dataclass
class Frame:
    """One step of the timeline: output text (already filtered) or a resize."""
    t: float  # play time, seconds (idle gaps already capped)
    kind: str  # "o" or "r"
    data: str  # filtered output, or "COLSxROWS"


def apply(scr: screen.Screen, stream: screen.Stream, frame: Frame) -> None:
    if frame.kind == "o":
        stream.feed(frame.data)
    else:
        cols, rows = (int(v) for v in frame.data.split("x"))
        scr.resize(rows, cols)


class Keyframes:
    """Snapshots of the screen along `frames`: `index[i]` is the state before frames[i]."""

    def __init__(self, frames: list[Frame], width: int, height: int, *,
                 every_bytes: int = EVERY_BYTES, every_seconds: float = EVERY_SECONDS,
                 max_cells: int = MAX_CELLS) -> None:
        self.frames = frames
        self.times = [f.t for f in frames]
        self.every_bytes, self.every_seconds = every_bytes, every_seconds
        self.max_cells = max_cells
        self._lock = threading.Lock()
        self._screen, self._stream = screen.new(width, height)
        self.positions: list[int] = [0]  # frame index of each keyframe
        self.snapshots: list[screen.Snapshot] = [screen.snapshot(self._screen)]
        self.offsets: list[int] = [0]  # characters of output before each keyframe
        self.sizes: list[int] = [cells(self.snapshots[0])]
        self.held = self.sizes[0]  # cells, by all keyframes together
        self._next = 0  # the builder's model has applied frames[:_next]
        self._done_bytes = 0  # characters of output in frames[:_next]
        self._stop = False
        self._thread: threading.Thread | None = None

    @property
    def complete(self) -> bool:
        return self._next >= len(self.frames)

    def extend_to(self, index: int, budget: int | None = None) -> None:
        """Build keyframes until the model has applied frames[:index] (or `budget` frames)."""
        with self._lock:
            stop = min(index, len(self.frames))
            if budget is not None:
                stop = min(stop, self._next + budget)
            scr, stream, frames = self._screen, self._stream, self.frames
            i = self._next
            while i < stop:
                f = frames[i]
                since = self._done_bytes - self.offsets[-1]
                if i > self.positions[-1] and (
                        since >= self.every_bytes or (
                            since and f.t - self.times[self.positions[-1]] >= self.every_seconds)):
                    self._keep(i, screen.snapshot(scr))
                apply(scr, stream, f)
                self._done_bytes += len(f.data)
                i += 1
            self._next = i

    def _keep(self, i: int, snap: screen.Snapshot) -> None:
        self.positions.append(i)
        self.snapshots.append(snap)
        self.offsets.append(self._done_bytes)
        self.sizes.append(cells(snap))
        self.held += self.sizes[-1]
        while self.held > self.max_cells and len(self.positions) > 1:
            # Every other one (the start stays): the gaps, each under every_bytes, pair up.
            for kept in (self.positions, self.snapshots, self.offsets, self.sizes):
                kept[:] = kept[::2]
            self.held = sum(self.sizes)
            self.every_bytes *= 2
            self.every_seconds *= 2

    def build(self) -> None:
        self.extend_to(len(self.frames))

    def build_in_background(self) -> None:
        def run() -> None:
            # In small steps, so a seek waiting for the lock waits for one step at most.
            while not self._stop and not self.complete:
                self.extend_to(len(self.frames), budget=64)
        self._thread = threading.Thread(target=run, name="keyframes", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        if self._thread is not None:
            self._thread.join()

    def end_index(self, t: float) -> int:
        """How many frames have played by play time t (frames at exactly t included)."""
        return bisect.bisect_right(self.times, t)

    def state_at(self, index: int) -> tuple[screen.Screen, screen.Stream]:
        """A fresh model in the state after frames[:index]: the nearest keyframe, then what
        follows it."""
        self.extend_to(index)
        with self._lock:
            k = bisect.bisect_right(self.positions, index) - 1
            start, snap = self.positions[k], self.snapshots[k]
        scr, stream = screen.restored(snap)
        for f in self.frames[start:index]:
            apply(scr, stream, f)
        return scr, stream
