"""The terminal-screen model behind replay and the text export: pyte, completed, and its state
as a value.

pyte 0.8 lacks what full-screen programs use every day; `Screen` adds it: the alternate screen
(private modes 47, 1047, 1048, 1049, with a saved cursor per screen as xterm keeps it), scroll
up/down (`CSI S`/`CSI T`), REP (`CSI b`), DEC line drawing in a UTF-8 stream, and tolerance of
parameters pyte would raise on. `Stream` feeds it text that has been through
`sshtrail.termfilter` (which passes only what this model understands).

`snapshot`/`restore` copy the whole state (both buffers, cursor, saved cursors, modes, margins,
charsets, tab stops, size) as a value for keyframes, in well under a millisecond: cells are
immutable pyte `Char`s, so a snapshot copies rows of references, never characters.
`render` turns a state into the escape sequences that redraw a viewer's terminal to show exactly
it. The model must never answer the recording (pyte's DSR/DA replies go nowhere) and never
raise on what a recording holds.
"""
from __future__ import annotations

import logging
import unicodedata
from dataclasses import dataclass
from typing import Any

import pyte
from pyte import graphics as g
from pyte import modes as mo
from pyte.screens import Char, Cursor, Margins, Savepoint, StaticDefaultDict
from wcwidth import wcwidth

log = logging.getLogger(__name__)

ESC = "\x1b"
_ALT_MODES = {47 << 5, 1047 << 5, 1048 << 5, 1049 << 5}
# The largest screen the model keeps: beyond any real terminal (a 4K display in a 6-pixel font
# is ~640 columns by 180 lines). The size is the client's to claim (a window change may say
# 65535x65535), and some work in the model is per line or per cell of the screen: a claimed
# size must not make a replay or a text export run for hours.
MAX_COLUMNS = 1000
MAX_LINES = 500


def _bounded(value: int, most: int) -> int:
    return max(1, min(value, most))


def _single(char: str) -> bool:
    """The character takes one cell."""
    return (" " <= char < "\x7f") or wcwidth(char) == 1


def _drop_columns(buffer, columns: int) -> None:
    """Remove the cells at `columns` and beyond: the screen got narrower."""
    for line in buffer.values():
        for x in [x for x in line if x >= columns]:
            del line[x]


class Screen(pyte.Screen):
    """A pyte screen with an alternate screen, SU/SD and REP, as xterm behaves."""

    def __init__(self, columns: int, lines: int) -> None:
        self.alternate = False
        self.hidden_buffer: dict | None = None  # the screen not shown (main while in alt)
        self.hidden_saved: Savepoint | None = None
        self.last_char = ""
        super().__init__(_bounded(columns, MAX_COLUMNS), _bounded(lines, MAX_LINES))

    def _new_buffer(self):
        from collections import defaultdict
        return defaultdict(lambda: StaticDefaultDict(self.default_char))

    def reset(self) -> None:
        super().reset()
        self.alternate = False
        self.hidden_buffer = None
        self.hidden_saved = None
        self.savepoints = []

    # -- the saved cursor: one slot per screen (xterm), not pyte's stack ----------------------

    def save_cursor(self) -> None:
        super().save_cursor()
        del self.savepoints[:-1]

    def restore_cursor(self) -> None:
        saved = self.savepoints[-1] if self.savepoints else None
        super().restore_cursor()
        if saved is not None:
            # DECRC may be repeated: the slot stays, and the cursor is a copy of it.
            self.savepoints = [saved]
            self.cursor = Cursor(saved.cursor.x, saved.cursor.y, saved.cursor.attrs)
            self.cursor.hidden = saved.cursor.hidden

    # -- the alternate screen -----------------------------------------------------------------

    def _switch(self, to_alternate: bool) -> None:
        if to_alternate == self.alternate:
            return
        hidden = self.hidden_buffer if self.hidden_buffer is not None else self._new_buffer()
        self.hidden_buffer, self.buffer = self.buffer, hidden
        saved = self.savepoints[-1] if self.savepoints else None
        self.savepoints = [self.hidden_saved] if self.hidden_saved else []
        self.hidden_saved = saved
        self.alternate = to_alternate
        self.dirty.update(range(self.lines))

    def _clear(self) -> None:
        self.buffer.clear()
        self.dirty.update(range(self.lines))

    def set_mode(self, *modes: int, **kwargs: Any) -> None:
        if kwargs.get("private"):
            for m in modes:
                if m == 1049 or m == 1048:
                    self.save_cursor()
                if m in (47, 1047, 1049):
                    self._switch(True)
                if m == 1049:
                    self._clear()
            modes = tuple(m for m in modes if m << 5 not in _ALT_MODES)
        super().set_mode(*modes, **kwargs)

    def reset_mode(self, *modes: int, **kwargs: Any) -> None:
        if kwargs.get("private"):
            for m in modes:
                if m == 1047 and self.alternate:
                    self._clear()
                if m in (47, 1047, 1049):
                    self._switch(False)
                if m == 1049 or m == 1048:
                    self.restore_cursor()
            modes = tuple(m for m in modes if m << 5 not in _ALT_MODES)
        super().reset_mode(*modes, **kwargs)

    def resize(self, lines: int | None = None, columns: int | None = None) -> None:
        lines = _bounded(lines or self.lines, MAX_LINES)
        columns = _bounded(columns or self.columns, MAX_COLUMNS)
        if self.hidden_buffer is not None:
            for y in [y for y in self.hidden_buffer if y >= lines]:
                del self.hidden_buffer[y]
            _drop_columns(self.hidden_buffer, columns)
        if columns < self.columns:
            # Narrower: dropped here, among the cells each line holds. pyte tries every column
            # it drops on every line: a window change from 1000 columns to 1 and back, ~40
            # bytes of recording, cost it half a million steps.
            _drop_columns(self.buffer, columns)
            if lines == self.lines:
                self.dirty.update(range(lines))
                self.set_margins()  # what pyte's resize does last
            self.columns = columns  # so that pyte, below, has no cell left to drop
        super().resize(lines, columns)
        self.tabstops = {t for t in self.tabstops if t < columns}
        self.ensure_hbounds()
        self.ensure_vbounds()

    # -- what pyte lacks or raises on ---------------------------------------------------------

    def draw(self, data: str) -> None:
        if mo.IRM in self.mode:
            self._draw_inserting(data)
        else:
            super().draw(data)
        if data:
            self.last_char = data[-1]

    def _draw_inserting(self, data: str) -> None:
        """Insert mode (IRM): pyte shifts the line right once per character drawn, a step per
        cell held: REP's line of characters cost a line's worth of steps each. The same result,
        one shift per run of single-width characters that stays within the line; anything else
        (a wrap, a wide or combining character) by pyte, a character at a time."""
        shown = data.translate(self.g1_charset if self.charset else self.g0_charset)
        i = 0
        while i < len(data):
            room = self.columns - self.cursor.x
            n = 0
            while n < room and i + n < len(data) and _single(shown[i + n]):
                n += 1
            if n > 1:
                self.insert_characters(n)
                self.mode.discard(mo.IRM)
                try:
                    super().draw(data[i:i + n])
                finally:
                    self.mode.add(mo.IRM)
            else:
                n = 1
                super().draw(data[i])
                if wcwidth(shown[i]) <= 0 and not unicodedata.combining(shown[i]):
                    return  # pyte stops drawing at a character it cannot show
            i += n

    def scroll_up(self, count: int | None = None, *_: Any) -> None:
        self._scroll(count, up=True)

    def scroll_down(self, count: int | None = None, *_: Any) -> None:
        self._scroll(count, up=False)

    def delete_lines(self, count: int | None = None) -> None:
        # DL and IL move the lines from the cursor to the region's bottom, as SU and SD move
        # the region's. pyte left a line in place where the line to move into it was not held
        # (a blank one): `A CSI H CSI M` kept the A.
        top, bottom = self.margins or Margins(0, self.lines - 1)
        if top <= self.cursor.y <= bottom:
            self._scroll(count, up=True, top=self.cursor.y)
            self.carriage_return()

    def insert_lines(self, count: int | None = None) -> None:
        top, bottom = self.margins or Margins(0, self.lines - 1)
        if top <= self.cursor.y <= bottom:
            self._scroll(count, up=False, top=self.cursor.y)
            self.carriage_return()

    def _scroll(self, count: int | None, *, up: bool, top: int | None = None) -> None:
        """SU/SD: the region's lines (from `top`, if given) move `count` up (down), blank ones
        come in, the cursor stays. What an index at the bottom (reverse index at the top) per
        line does, in one move of the lines: per line, `CSI 9999 S` cost lines x lines."""
        first, bottom = self.margins or Margins(0, self.lines - 1)
        top = first if top is None else top
        n = min(count or 1, bottom - top + 1)
        rows = [self.buffer.pop(y, None) for y in range(top, bottom + 1)]
        rows = rows[n:] + [None] * n if up else [None] * n + rows[:len(rows) - n]
        for y, line in enumerate(rows, top):
            if line is not None:
                self.buffer[y] = line
        self.dirty.update(range(top, bottom + 1))

    def cursor_to_line(self, line: int | None = None) -> None:
        if mo.DECOM in self.mode and self.margins is None:
            # Origin mode without margins: the whole screen is the region. pyte raised here
            # (margins.top of None), and the parser's reset dropped the rest of the frame.
            self.cursor.y = (line or 1) - 1
            self.ensure_vbounds()
        else:
            super().cursor_to_line(line)

    def repeat(self, count: int | None = None, *_: Any) -> None:
        # At most a line's worth: programs repeat a character within a line (ncurses' `rep`),
        # and a count of thousands would have each 8 bytes draw a whole screen.
        if self.last_char:
            self.draw(self.last_char * min(count or 1, self.columns))

    def erase_in_display(self, how: int = 0, *args: Any, **kwargs: Any) -> None:
        if how not in (0, 1, 2, 3):
            return
        # Each erased line is replaced by a blank one, in the cursor's colours as terminals
        # erase (a line whose default cell is that blank). pyte set every cell the line ever
        # held instead, so a screen filled once made every later erase cost the whole screen,
        # and the cells it never held kept the default background.
        lines = range(self.cursor.y + 1, self.lines) if how == 0 else \
            range(self.cursor.y) if how == 1 else range(self.lines)
        attrs = self.cursor.attrs
        plain = attrs == self.default_char
        for y in lines:
            if plain:
                self.buffer.pop(y, None)
            else:
                self.buffer[y] = StaticDefaultDict(attrs)
        self.dirty.update(lines)
        if how in (0, 1):
            self.erase_in_line(how)

    def erase_in_line(self, how: int = 0, private: bool = False) -> None:
        if how in (0, 1, 2):
            super().erase_in_line(how)


class Stream(pyte.Stream):
    """pyte's parser, with the sequences `Screen` adds, and charsets honoured (pyte ignores
    `ESC ( 0` in a UTF-8 stream; terminals do not, and ncurses draws boxes with it)."""

    csi = {**pyte.Stream.csi, "S": "scroll_up", "T": "scroll_down", "b": "repeat"}
    events = pyte.Stream.events | {"scroll_up", "scroll_down", "repeat"}

    def __init__(self, screen: Screen) -> None:
        super().__init__(screen)
        self.use_utf8 = False

    def feed(self, data: str) -> None:
        try:
            super().feed(data)
        except Exception:  # a pyte bug must not stop a replay; the parser has reset itself
            log.debug("screen model: pyte raised on %r", data[:80], exc_info=True)


def new(columns: int, lines: int) -> tuple[Screen, Stream]:
    screen = Screen(columns, lines)
    return screen, Stream(screen)


# -- the state as a value -----------------------------------------------------------------------

def _copy_buffer(buffer) -> dict:
    out = {}
    for y, line in buffer.items():
        if line or line.default != _BLANK:
            copy = StaticDefaultDict(line.default)
            copy.update(line)
            out[y] = copy
    return out


def _copy_cursor(c: Cursor) -> Cursor:
    n = Cursor(c.x, c.y, c.attrs)
    n.hidden = c.hidden
    return n


def _copy_saved(s: Savepoint | None) -> Savepoint | None:
    return s._replace(cursor=_copy_cursor(s.cursor)) if s is not None else None


@dataclass(frozen=True)
class Snapshot:
    columns: int
    lines: int
    buffer: dict
    hidden_buffer: dict | None
    alternate: bool
    cursor: Cursor
    saved: Savepoint | None
    hidden_saved: Savepoint | None
    mode: frozenset
    margins: Margins | None
    charset: int
    g0: str
    g1: str
    tabstops: frozenset
    last_char: str


def snapshot(s: Screen) -> Snapshot:
    return Snapshot(
        s.columns, s.lines, _copy_buffer(s.buffer),
        _copy_buffer(s.hidden_buffer) if s.hidden_buffer is not None else None, s.alternate,
        _copy_cursor(s.cursor), _copy_saved(s.savepoints[-1] if s.savepoints else None),
        _copy_saved(s.hidden_saved), frozenset(s.mode), s.margins, s.charset, s.g0_charset,
        s.g1_charset, frozenset(s.tabstops), s.last_char)


def restore(s: Screen, snap: Snapshot) -> None:
    s.columns, s.lines = snap.columns, snap.lines
    s.buffer = s._new_buffer()
    s.buffer.update(_copy_buffer(snap.buffer))
    if snap.hidden_buffer is not None:
        s.hidden_buffer = s._new_buffer()
        s.hidden_buffer.update(_copy_buffer(snap.hidden_buffer))
    else:
        s.hidden_buffer = None
    s.alternate = snap.alternate
    s.cursor = _copy_cursor(snap.cursor)
    s.savepoints = [_copy_saved(snap.saved)] if snap.saved else []
    s.hidden_saved = _copy_saved(snap.hidden_saved)
    s.mode = set(snap.mode)
    s.margins = snap.margins
    s.charset, s.g0_charset, s.g1_charset = snap.charset, snap.g0, snap.g1
    s.tabstops = set(snap.tabstops)
    s.last_char = snap.last_char
    s.dirty.update(range(s.lines))


def restored(snap: Snapshot) -> tuple[Screen, Stream]:
    screen, stream = new(snap.columns, snap.lines)
    restore(screen, snap)
    return screen, stream


# -- drawing a state on a viewer's terminal -----------------------------------------------------

def _color_codes() -> tuple[dict, dict]:
    fg = {v: str(k) for k, v in {**g.FG_ANSI, **g.FG_AIXTERM}.items()}
    bg = {v: str(k) for k, v in {**g.BG_ANSI, **g.BG_AIXTERM}.items()}
    for i, hexa in reversed(list(enumerate(g.FG_BG_256))):
        fg.setdefault(hexa, f"38;5;{i}")
        bg.setdefault(hexa, f"48;5;{i}")
    return fg, bg


_FG, _BG = _color_codes()


def _color(value: str, table: dict, base: int) -> str:
    code = table.get(value)
    if code is not None:
        return code
    try:  # 24-bit colour: pyte keeps it as rrggbb
        r, gr, b = int(value[0:2], 16), int(value[2:4], 16), int(value[4:6], 16)
        return f"{base};2;{r};{gr};{b}"
    except ValueError:
        return str(base + 1)  # 39/49: default


def sgr(c: Char) -> str:
    """The SGR sequence that sets exactly the attributes of `c`."""
    parts = ["0"]
    for flag, code in (("bold", "1"), ("italics", "3"), ("underscore", "4"), ("blink", "5"),
                       ("reverse", "7"), ("strikethrough", "9")):
        if getattr(c, flag):
            parts.append(code)
    if c.fg != "default":
        parts.append(_color(c.fg, _FG, 38))
    if c.bg != "default":
        parts.append(_color(c.bg, _BG, 48))
    return f"{ESC}[{';'.join(parts)}m"


_BLANK = Char(" ")  # a cell no one wrote or erased in colour


def _attrs(c: Char) -> Char:
    return c._replace(data=" ")


def _draw_rows(buffer, columns: int, lines: int, out: list[str]) -> None:
    for y in range(lines):
        line = buffer.get(y)
        if line or line is not None and line.default != _BLANK:
            draw_line(line, columns, y, out)


def draw_line(line, columns: int, y: int, out: list[str]) -> None:
    """Row `y` (0-based) as cells with their attributes, onto a blank row of the viewer's. A row
    erased in colour (its default cell not the blank one) is erased so first: the viewer's
    terminal fills it with the colour, as the recorded one did."""
    blank = line.default
    if blank != _BLANK:
        out.append(f"{ESC}[{y + 1};1H{sgr(blank)}{ESC}[2K")
    last = max((x for x, c in line.items() if x < columns and c != blank), default=-1)
    if last < 0:
        if blank != _BLANK:
            out.append(f"{ESC}[0m")
        return
    out.append(f"{ESC}[{y + 1};1H")
    current = None
    x = 0
    while x <= last:
        c = line[x]
        attrs = _attrs(c)
        if attrs != current:
            out.append(sgr(c))
            current = attrs
        if c.data == "":  # the stub after a wide character whose first cell was overwritten
            out.append(" ")
        else:
            nxt = line.get(x + 1)
            if nxt is not None and nxt.data == "":
                out.append(c.data)
                x += 1  # the wide character covers it
            elif c.data.isascii() or wcwidth(c.data[0]) != 2:
                out.append(c.data)
            else:
                # A wide character whose right half was written over (pyte's insert mode can
                # leave one): drawn, it would push the rest of the row along. A terminal shows
                # a space there.
                out.append(" ")
        x += 1
    out.append(f"{ESC}[0m")


def _place_saved(saved: Savepoint | None, out: list[str]) -> None:
    if saved is None:
        # None saved: a restore goes home (pyte). The terminal's slot may hold a cursor saved
        # before a seek: put home there.
        out.append(f"{ESC}[?6l{ESC}[?7h{ESC}[H{ESC}[0m{ESC}[?25h{ESC}(B{ESC})0\x0f{ESC}7"
                   f"{ESC}[?7l{ESC}[?25l")
        return
    c = saved.cursor
    out.append(f"{ESC}[?6l{ESC}[?7{'h' if saved.wrap else 'l'}")
    out.append(f"{ESC}[{c.y + 1};{min(c.x, 10**4) + 1}H{sgr(c.attrs)}")
    out.append(f"{ESC}[?25{'l' if c.hidden else 'h'}")  # pyte saves visibility with the cursor
    out.append(_charsets(saved.g0_charset, saved.g1_charset, saved.charset))
    out.append(ESC + "7")
    out.append(f"{ESC}(B\x0f{ESC}[?7l{ESC}[?25l")


def _charsets(g0: str, g1: str, charset: int) -> str:
    name = {m: k for k, m in pyte.charsets.MAPS.items()}
    return f"{ESC}({name.get(g0, 'B')}{ESC}){name.get(g1, '0')}" + ("\x0e" if charset else "\x0f")


def pending_wrap(line, columns: int, row: int) -> str:
    """The cursor after the last column of `line`, on screen row `row` (1-based), as writing
    that column leaves it: by writing it again (the wide character it is the right half of, or
    the right half would become a space)."""
    cell = line[columns - 1] if line is not None else _BLANK
    column = columns
    left = line[columns - 2].data if line is not None and columns > 1 else ""
    if cell.data == "" and left and wcwidth(left[0]) == 2:
        column, cell = columns - 1, line[columns - 2]
    return f"{ESC}[{row};{column}H{sgr(cell)}{cell.data or ' '}"


def render(snap: Snapshot, scroll_rows: int | None = None) -> str:
    """Escape sequences that bring a viewer's terminal, in whatever state the recording left it,
    to show `snap`: its screen (and the main screen behind an alternate one), cursor and saved
    cursors, modes, margins and charsets. `scroll_rows` as in termfilter.TermFilter."""
    out = [f"{ESC}[?1049l{ESC}[0m{ESC}[4l{ESC}[20l{ESC}[?6l{ESC}[?7l{ESC}[?25l",
           f"{ESC}[1;{scroll_rows}r" if scroll_rows else f"{ESC}[r",
           f"{ESC}(B{ESC})0\x0f{ESC}[H{ESC}[2J"]
    main, main_saved = ((snap.hidden_buffer or {}), snap.hidden_saved) if snap.alternate else \
        (snap.buffer, snap.saved)
    _draw_rows(main, snap.columns, snap.lines, out)
    _place_saved(main_saved, out)
    if snap.alternate:
        # 1047, not 1049: 1049 saves the cursor as it switches, over the main screen's saved
        # cursor just placed (its charsets, say, which leaving the alternate screen restores).
        out.append(f"{ESC}[?1047h{ESC}[0m{ESC}[2J")
        _draw_rows(snap.buffer, snap.columns, snap.lines, out)
        _place_saved(snap.saved, out)
    # Always: the terminal's may not be its defaults (a redraw earlier set others).
    out.append(f"{ESC}[3g")
    out += [f"{ESC}[1;{t + 1}H{ESC}H" for t in sorted(snap.tabstops)]
    if snap.margins is not None:
        bottom = snap.margins.bottom + 1
        out.append(f"{ESC}[{snap.margins.top + 1};{min(bottom, scroll_rows or bottom)}r")
    out.append(f"{ESC}[?7{'h' if mo.DECAWM in snap.mode else 'l'}")
    if mo.LNM in snap.mode:
        out.append(f"{ESC}[20h")
    c = snap.cursor
    top = snap.margins.top if snap.margins is not None and mo.DECOM in snap.mode else 0
    if mo.DECOM in snap.mode:
        out.append(f"{ESC}[?6h")
    if c.x >= snap.columns:
        out.append(pending_wrap(snap.buffer.get(c.y), snap.columns, c.y - top + 1))
    else:
        out.append(f"{ESC}[{c.y - top + 1};{c.x + 1}H")
    if mo.IRM in snap.mode:  # after that cell: written in insert mode, it would push one along
        out.append(f"{ESC}[4h")
    # Last: the cells above hold characters already mapped, a line-drawing G0 must not map them
    # again.
    out.append(_charsets(snap.g0, snap.g1, snap.charset))
    out.append(sgr(c.attrs))
    if not c.hidden:
        out.append(f"{ESC}[?25h")
    return "".join(out)


def cells(s: Screen) -> list[list[Char]]:
    """Every cell of the shown screen, attributes included (for comparing two screens)."""
    return [[s.buffer[y][x] for x in range(s.columns)] for y in range(s.lines)]
