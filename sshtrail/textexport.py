"""`sshtrail export --format text`: a recording as plain text, the way its screen read, for grep
and tickets.

The output is put through the terminal filter and a screen model (sshtrail.screen), and the
transcript is what a person watching would have read, in order:

- a line of the normal screen, when it scrolls off the top (as a terminal's scrollback keeps it);
- the whole normal screen, when the program clears it (`clear`, `CSI 2J`, `CSI H CSI J`, RIS),
  so nothing shown is lost;
- the whole alternate screen of a full-screen program (vim, less, top), each time it leaves the
  alternate screen or clears it, under a line `--- screen at MM:SS ---` (the time in the
  recording): what the program showed last before it went away or redrew;
- at the end, the alternate screen if one is still up, then the normal screen.

Trailing blanks are cut, and blank rows at the bottom of a screen are left out. No escape
sequence and no control character reaches the text (everything goes through the screen model,
and only its characters come out). A line the terminal wrapped comes out as two lines, as the
screen showed it. It must never raise on what a session printed.
"""
from __future__ import annotations

import io
from typing import IO, Iterable, Iterator

from pyte.screens import StaticDefaultDict

from . import asciicast, screen, termfilter


def _clock(t: float) -> str:
    m, s = divmod(int(max(0.0, t)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _row_text(line, columns: int) -> str:
    """The row's characters, trailing blanks cut, from the cells the line holds: a line erased
    in colour holds none, yet reading its every column made each later erase cost the whole
    screen (`CSI 44m CSI 2J`, then `CSI 2J` over and over)."""
    blank = line.default.data  # what a column the line does not hold reads as
    if blank.strip():  # no line of the model's has such a blank: it would show in every column
        return "".join(line[x].data for x in range(columns)).rstrip()
    if not line:
        return ""
    held = sorted(x for x in line if 0 <= x < columns)
    text = [blank] * (held[-1] + 1 if held else 0)
    for x in held:
        text[x] = line[x].data
    return "".join(text).rstrip()


class _TranscriptScreen(screen.Screen):
    """The screen model, telling `emit` what leaves it."""

    def __init__(self, columns: int, lines: int, emit) -> None:
        self.emit = emit
        self.now = 0.0
        super().__init__(columns, lines)

    def rows(self) -> list[str]:
        rows = [_row_text(self.buffer[y], self.columns) if y in self.buffer else ""
                for y in range(self.lines)]
        while rows and not rows[-1]:
            rows.pop()
        return rows

    def _dump(self) -> None:
        rows = self.rows()
        if not rows:
            return
        if self.alternate:
            self.emit(f"--- screen at {_clock(self.now)} ---")
        for r in rows:
            self.emit(r)

    def _scrolls_off(self) -> bool:
        top = self.margins.top if self.margins is not None else 0
        return not self.alternate and top == 0

    def index(self) -> None:
        bottom = self.margins.bottom if self.margins is not None else self.lines - 1
        if self.cursor.y == bottom and self._scrolls_off():
            self.emit(_row_text(self.buffer[0], self.columns) if 0 in self.buffer else "")
        super().index()

    def scroll_up(self, count=None, *args) -> None:
        if not self._scrolls_off():
            super().scroll_up(count)
            return
        bottom = self.margins.bottom if self.margins is not None else self.lines - 1
        for y in range(min(count or 1, bottom + 1)):
            self.emit(_row_text(self.buffer[y], self.columns) if y in self.buffer else "")
        # The model's one move of the lines: an index per line cost lines x lines for
        # `CSI 9999 S`. But the indexes left every line above the bottom held, if empty, and
        # pyte's delete-lines leaves a line in place when the one to move in is not held
        # (`A CSI H CSI M` keeps the A): hold them as the indexes did, so the text is the same.
        super().scroll_up(count)
        blank = self.default_char
        for y in range(bottom):
            if y not in self.buffer:
                self.buffer[y] = StaticDefaultDict(blank)

    def erase_in_display(self, how: int = 0, *args, **kwargs) -> None:
        if how in (2, 3) or (how == 0 and self.cursor.x == 0 and self.cursor.y == 0):
            self._dump()
        super().erase_in_display(how)

    def reset(self) -> None:
        if hasattr(self, "emit") and hasattr(self, "alternate"):
            if self.alternate:
                self._dump()
                self._switch(False)
            self._dump()
        super().reset()

    def reset_mode(self, *modes: int, **kwargs) -> None:
        if kwargs.get("private") and self.alternate and any(m in (47, 1047, 1049) for m in modes):
            self._dump()
        super().reset_mode(*modes, **kwargs)


def transcript(width: int, height: int, events: Iterable[tuple[float, str, str]]
               ) -> Iterator[str]:
    """The text lines of a recording (asciicast events), in the order they left the screen."""
    pending: list[str] = []
    scr = _TranscriptScreen(width, height, pending.append)
    stream = screen.Stream(scr)
    filt = termfilter.TermFilter()
    for t, code, data in events:
        scr.now = t
        if code == "o":
            stream.feed(filt.feed(data))
        elif code == "r":
            cols, rows = (int(v) for v in data.split("x"))
            scr.resize(rows, cols)
        if pending:
            yield from pending
            pending.clear()
    if scr.alternate:
        scr._dump()
        scr._switch(False)
    pending += scr.rows()
    yield from pending


def write_text(cast: bytes | IO[bytes], out: IO[bytes]) -> None:
    """An asciicast recording (bytes or a binary file) as UTF-8 text lines to `out`."""
    if isinstance(cast, (bytes, bytearray)):
        cast = io.BytesIO(cast)
    header, events = asciicast.read(cast)
    for line in transcript(header["width"], header["height"], events):
        out.write(line.encode("utf-8", "replace") + b"\n")
