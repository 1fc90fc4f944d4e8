"""Keyframes: snapshots of the screen model along a recording, so that a seek never replays from
the start.

pyte parses about half a megabyte a second here, so a seek into the 40th minute of a busy
session, replayed from the start, would take tens of seconds. `Keyframes` feeds the (filtered)
output through the screen model once and keeps a `screen.Snapshot` every EVERY_BYTES characters
of output or EVERY_SECONDS of recording time that saw output, whichever comes first. The state
at any time T is then the last keyframe at or before T plus at most EVERY_BYTES of output after
it: a few tens of milliseconds, however long the recording. Snapshots share the immutable cells
(pyte `Char`s), so a keyframe costs rows of references, not a copy of the screen's text.

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
                 every_bytes: int = EVERY_BYTES, every_seconds: float = EVERY_SECONDS) -> None:
        self.frames = frames
        self.times = [f.t for f in frames]
        self.every_bytes, self.every_seconds = every_bytes, every_seconds
        self._lock = threading.Lock()
        self._screen, self._stream = screen.new(width, height)
        self.positions: list[int] = [0]  # frame index of each keyframe
        self.snapshots: list[screen.Snapshot] = [screen.snapshot(self._screen)]
        self._next = 0  # the builder's model has applied frames[:_next]
        self._since_bytes = 0
        self._since_t = 0.0
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
                if i > self.positions[-1] and (
                        self._since_bytes >= self.every_bytes
                        or (self._since_bytes and f.t - self._since_t >= self.every_seconds)):
                    self.positions.append(i)
                    self.snapshots.append(screen.snapshot(scr))
                    self._since_bytes, self._since_t = 0, f.t
                apply(scr, stream, f)
                self._since_bytes += len(f.data)
                i += 1
            self._next = i

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
