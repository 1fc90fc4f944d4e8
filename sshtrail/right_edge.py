"""Where a recording's output would act differently on a terminal wider than the recording.

The player passes a recording's output to the viewer's terminal as it came: exact, and cheap
(drawing every change from the screen model cost seconds of CPU per second of fast output). On a
terminal of the recording's width that is the whole story. On a wider one, what the recording's
terminal did at its right edge the viewer's does elsewhere: a line that wrapped at column 80
runs on to 81, a cursor move past the edge that stopped at column 80 goes further, a tab past the
last tab stop, an insertion that pushed characters off the line. From there on the viewer shows
something the user never saw (readline's redraws of a long command line, a prompt drawn at the
right edge).

`RightEdge` follows the cursor's column through the output as the screen model moves it: it
parses the output as pyte's parser does (sshtrail.screen.Stream), and moves the column as
sshtrail.screen.Screen does. `feed()` says when a piece of output may reach past the edge.
Where it cannot tell (the column after a restored cursor, an insertion, lines inserted in a
scroll region it does not follow), it says "may": the player then draws the screen from the
model instead (player.Player), which costs a redraw, never a wrong screen. After a "may" it
knows nothing until `sync()` gives it the model's state.
"""
from __future__ import annotations

import re
import unicodedata

from wcwidth import wcwidth

ESC, CSI_C1, OSC_C1, ST_C1, BEL, CAN, SUB = "\x1b", "\x9b", "\x9d", "\x9c", "\x07", "\x18", "\x1a"
# The controls pyte acts on, anywhere, even inside a CSI sequence (pyte.Stream.basic).
BASIC = "\x07\x08\t\n\x0b\x0c\r\x0e\x0f"
# What pyte draws as text: everything but what its parser takes one character at a time.
_TEXT = re.compile("[^" + re.escape(ESC + CSI_C1 + OSC_C1 + "\x00\x7f" + BASIC) + "]+")
# Ends whatever sequence a terminal is in the middle of: CAN aborts ESC and CSI sequences, ST
# ends a string. Sent before a redraw when the output passed on so far stopped in the middle of
# a sequence (`carry`): the redraw's own sequences would be read as its continuation.
ABORT = CAN + ESC + "\\"
# A cut sequence kept longer than this (an OSC string that never ends) is not kept whole.
MAX_CARRY = 1 << 16
TAB = 8
# CSI finals pyte ignores and a terminal moves the cursor for (HPA, HPB, CBT, CHT, SCORC): the
# viewer's terminal and the model part ways, at any width. Redrawn from the model.
MOVES_PYTE_IGNORES = "`jZIu"


def _cells(ch: str) -> int:
    """How pyte draws one character: 1 or 2 cells, 0 (it combines with the one before), or -1
    (pyte stops drawing the run here)."""
    w = wcwidth(ch)
    if w > 0:
        return w
    return 0 if w == 0 and unicodedata.combining(ch) else -1


class RightEdge:
    """The cursor's column as the screen model moves it through a recording `columns` wide
    and `lines` high. `feed(text)` is True when the text may act differently on a wider
    terminal."""

    def __init__(self, columns: int, x: int | None = 0, lines: int = 24) -> None:
        self.carry = ""  # the text of a sequence the last piece cut, not yet finished
        self._fsm = self._parser()
        next(self._fsm)
        self._plain = True
        self.reset(columns, x, lines)

    def reset(self, columns: int, x: int | None, lines: int = 24) -> None:
        """Start again at column x (None: not known), in the default modes. A cut sequence is
        kept: the model's parser is in the middle of it too."""
        self.columns, self.lines = columns, lines
        self.x = x
        self.saved: int | None = 0  # ESC 7's column; with none saved, ESC 8 goes home
        self.insert = False  # IRM
        self.newline = False  # LNM: a line feed returns the carriage too
        self.origin = False  # DECOM: a cursor move outside the scroll region is ignored
        # The tab stops (None: not known), as the model has them; a wider terminal has others
        # past the edge.
        self.tabs: set[int] | None = set(range(TAB, columns, TAB))
        self.last_char: str | None = ""  # what REP repeats (None: not known)
        self._past = False

    def sync(self, scr) -> None:
        """Start again from the screen model `scr` (a screen.Screen), after the viewer's
        terminal was redrawn from it (screen.render, which sets its modes as the model has
        them)."""
        from pyte import modes as mo
        self.reset(scr.columns, scr.cursor.x, scr.lines)
        self.insert = mo.IRM in scr.mode
        self.newline = mo.LNM in scr.mode
        self.origin = mo.DECOM in scr.mode
        self.tabs = set(scr.tabstops)
        self.saved = scr.savepoints[-1].cursor.x if scr.savepoints else 0
        # The viewer's terminal repeats (REP) the last character the redraw drew, not the
        # model's last_char: not known.
        self.last_char = None

    def feed(self, text: str) -> bool:
        """True if `text` may act differently on a wider terminal. Either way, the parser's
        state goes on to the next piece; a sequence the text ends in the middle of is kept in
        `carry` (the viewer's terminal needs it again after a redraw)."""
        seq = self.carry
        send, match_text = self._fsm.send, _TEXT.match
        offset, end = 0, len(text)
        while offset < end:
            if self._plain:
                m = match_text(text, offset)
                if m is not None:
                    if not self._past:
                        self._draw(m.group())
                    offset = m.end()
                    continue
                self._plain = False
            ch = text[offset]
            offset += 1
            if len(seq) <= MAX_CARRY:  # past it, given up on: not grown for ever
                seq += ch
            self._plain = bool(send(ch))
            if self._plain:
                seq = ""
        self.carry = seq if len(seq) <= MAX_CARRY else ""
        past, self._past = self._past, False
        if past:
            self.x = None  # until a sync says where the model put it
        elif len(seq) > MAX_CARRY:
            self.x = None
        return past

    # -- the parser: pyte.Stream._parser_fsm's states, acting on the column alone ------------

    def _parser(self):
        basic = self._control
        while True:
            ch = yield True
            if ch == ESC:
                ch = yield False
                if ch == "[":
                    ch = CSI_C1
                elif ch == "]":
                    ch = OSC_C1
                else:
                    if ch == "#":
                        if (yield False) == "8":
                            self._beyond()  # DECALN fills the screen, past the edge too
                    elif ch in "%()":
                        yield False  # a charset: no width changes
                    else:
                        self._esc(ch)
                    continue
            if ch in BASIC:
                basic(ch)
            elif ch == CSI_C1:
                params: list[int] = []
                current = ""
                private = False
                while True:
                    ch = yield False
                    if ch == "?":
                        private = True
                    elif ch in BASIC and ch not in "\x0e\x0f":
                        basic(ch)
                    elif ch in " >":
                        pass
                    elif ch in (CAN, SUB):
                        self._draw(ch)  # as pyte: draws nothing, but REP repeats it
                        break
                    elif ch.isdigit():
                        current += ch
                    elif ch == "$":
                        yield False
                        break
                    else:
                        params.append(min(int(current or 0), 9999))
                        if ch == ";":
                            current = ""
                        else:
                            self._csi(ch, params, private)
                            break
            elif ch == OSC_C1:
                code = yield False
                if code in "RP":
                    continue
                while True:
                    ch = yield False
                    if ch == ESC:
                        ch += yield False
                    if ch in (ESC + "\\", ST_C1, BEL):
                        break
            elif ch not in "\x00\x7f":
                self._draw(ch)

    # -- what moves the column: as screen.Screen moves it --------------------------------------

    def _beyond(self) -> None:
        self._past = True

    def _draw(self, run: str) -> None:
        if self._past:
            return
        x, columns = self.x, self.columns
        if x is None or self.insert:
            self._beyond()
            return
        self.last_char = run[-1]
        if run.isascii() and run.isprintable():
            if x + len(run) > columns:
                self._beyond()
            else:
                self.x = x + len(run)
            return
        for ch in run:
            if x == columns:
                # Any character after the last column (one that combines, or pyte cannot draw,
                # included) wraps the line first.
                self._beyond()
                return
            w = _cells(ch)
            if w < 0:
                break
            if w and x + w > columns:
                # A wrap (or, without autowrap, the last column written over), or a wide
                # character that does not fit: past the edge.
                self._beyond()
                return
            x += w
        self.x = x  # == columns: the last column written, a wrap pending (as pyte keeps it)

    def _control(self, c: str) -> None:
        if self._past:
            return
        x = self.x
        if c == "\r":
            self.x = 0
        elif c in "\n\x0b\x0c":
            if self.newline:
                self.x = 0
        elif c == "\b":
            self._back(1)
        elif c == "\t":
            stop = None if x is None or self.tabs is None else \
                min((t for t in self.tabs if t > x), default=None)
            if stop is None:
                self._beyond()  # the model stops at the last column; a wider terminal goes on
            else:
                self.x = stop
        # BEL, SO, SI: the column stays

    def _back(self, n: int) -> None:
        x = self.x
        if x is None:
            return
        if x == self.columns:
            # pyte steps back from a pending wrap as from the last column; on a wider
            # terminal the cursor is one column further.
            self._beyond()
            return
        self.x = max(0, min(x - n, self.columns - 1))

    def _esc(self, ch: str) -> None:
        if self._past:
            return
        if ch == "7":
            self.saved = self.x
        elif ch == "8":
            self.x = self.saved
        elif ch == "E":  # pyte takes NEL for a line feed
            self._control("\n")
        elif ch == "c":  # RIS (the model's last character stays, for REP)
            last = self.last_char
            self.reset(self.columns, 0, self.lines)
            self.last_char = last
        elif ch == "H":  # HTS
            if self.x is None or self.tabs is None:
                self.tabs = None
            else:
                self.tabs.add(self.x)
        # IND, RI, keypad modes, the rest pyte ignores: the column stays

    def _csi(self, final: str, params: list[int], private: bool) -> None:
        if self._past:
            return
        n = params[0] or 1 if params else 1
        x = self.x
        if private:
            if final in "hl":
                self._private_modes(params, final == "h")
            return  # the rest pyte ignores, or reports
        if final in "Ca":  # CUF, HPR
            if x is None or x + n > self.columns - 1:
                self._beyond()  # the model stops at the edge
            else:
                self.x = x + n
        elif final == "D":
            self._back(n)
        elif final in "G'":  # CHA (and pyte's HPA)
            self._to_column(n)
        elif final in "Hf":
            self._to_column(params[1] or 1 if len(params) > 1 else 1, row_too=True)
        elif final in "EF":  # CNL, CPL
            self.x = 0
        elif final == "@":  # ICH pushes the line's end past the edge
            self._beyond()
        elif final == "b":  # REP
            # The model repeats at most a line's worth, a terminal all of them: past the edge
            # either way when there are more than a line's worth.
            if self.last_char is None:
                self._beyond()
            elif self.last_char:
                self._draw(self.last_char * min(n, self.columns + 1))
        elif final in "LM":
            # IL and DL return the carriage if the cursor is in the scroll region, which this
            # does not follow.
            self.x = None
        elif final == "g":  # TBC
            how = params[0] if params else 0
            if how == 3:
                self.tabs = set()
            elif how == 0 and self.tabs is not None:
                if x is None:
                    self.tabs = None
                else:
                    self.tabs.discard(x)
        elif final in "hl":
            on = final == "h"
            for a in params:
                if a == 4:
                    self.insert = on
                elif a == 20:
                    self.newline = on
        elif final == "r":
            self._margins(params)
        elif final in MOVES_PYTE_IGNORES:
            self._beyond()
        # rows, erasing, scrolling, colours, reports, and what pyte ignores: the column stays

    def _margins(self, params: list[int]) -> None:
        """DECSTBM homes the cursor where the margins it sets are valid (pyte's set_margins)."""
        top = params[0] if params else 0
        bottom = params[1] if len(params) > 1 else None
        if not top and bottom is None:
            return  # margins off; the cursor stays
        if not top or bottom is None:
            self.x = None  # one of them is the current margin's, not followed here
            return
        top, bottom = (max(0, min(v - 1, self.lines - 1)) for v in (top, bottom))
        if bottom - top >= 1:
            self.x = 0

    def _private_modes(self, params: list[int], on: bool) -> None:
        for a in params:
            if a == 3:  # DECCOLM: pyte switches to 132 columns
                self._beyond()
            elif a == 6:  # DECOM homes the cursor, set or reset
                self.origin = on
                self.x = 0
            elif a in (47, 1047, 1048, 1049):
                # The other screen has a saved cursor of its own; 1048 and 1049 save the
                # cursor, and restore one when reset.
                self.saved = None
                if not on and a in (1048, 1049):
                    self.x = None

    def _to_column(self, column: int, row_too: bool = False) -> None:
        if column > self.columns:
            self._beyond()
        elif row_too and self.origin:
            self.x = None  # pyte ignores a move to a row outside the scroll region
        else:
            self.x = column - 1
