"""Full-text search at the collector: what appeared on a session's screen, and the commands a
session ran, found by a piece of their text.

What is indexed:
- output: every recording's output frames become lines of screen text (`ScreenText`), each with
  the time its characters appeared. Escape sequences are removed (CSI, OSC, DCS/SOS/PM/APC,
  two-byte ESC); what moves the cursor within the line is followed (\\r, backspace, tab, CSI
  C/D/G, K, P, @, X), so a shell's redrawn command line reads as it finally stood on screen;
  what leaves the line (\\n, vertical moves, cursor positioning, clear screen) ends it. Typed
  commands are found here through the shell's echo: input itself is not recorded by default.
  Lines longer than MAX_LINE characters are cut into several.
- commands: the text of `session.command` (argv joined by spaces) and `exec` (the command)
  events, as ingest gives it (collector.ingest.search_text).

Indexing happens as chunks arrive (collector.ingest.put_chunk), inside the store transaction
that stores the chunk, from the state the previous chunk left (`index_chunk`): a line cut by a
chunk boundary, a UTF-8 character or an escape sequence split between frames, all continue.
The unfinished last line is searchable at once; the next chunk replaces it. A chunk that does
not follow the last one indexed (a gap, or a late retry) starts from a clean line.

How a query matches: the text is taken literally (no operators, no wildcards: `rm -rf /tmp/x`,
`100%` and `"quoted"` mean just those characters) and found as a substring of a line, ignoring
case (Python's str.casefold on both sides, on both backends). It needs 3 characters at least:
the indexes are of character trigrams (SQLite FTS5 `trigram`, PostgreSQL `pg_trgm`). NUL
cannot be searched for on SQLite (it is left out of the query).

A hit's offset is when the whole match was on screen (its last character's frame time), so that
`sshtrail play SID --at OFFSET` shows it; its time is the recording's start plus that offset.

Everything here reads bytes a host sent: it must stay bounded (line length, pending escape
sequence) whatever the output, and never act on what it strips.
"""
from __future__ import annotations

import base64
import binascii
import codecs
import json
import math
import re

from .store import BadQuery, IndexedOutput, Line

MAX_LINE = 4096       # characters; a longer line is indexed in pieces
MAX_PENDING = 4096    # characters of an unfinished escape sequence kept across frames
MIN_QUERY = 3         # characters: the trigram indexes need one trigram
CONTEXT = 200         # characters of a long line shown around the match

_NONPRINT = "\x00-\x1f\x7f-\x9f"
# One token at a time: a run of printable text, a whole escape sequence, or one control.
# The last ESC form excludes the introducers of the longer forms ([ ] P X ^ _), so that their
# unfinished beginnings are not mistaken for a complete two-character sequence.
_TOKEN = re.compile(
    rf"(?P<text>[^{_NONPRINT}]+)"
    r"|\x1b\[(?P<csi>[0-?]*[ -/]*[@-~])"
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)"
    r"|\x1b[PX^_][^\x1b]*\x1b\\"
    r"|\x1b[ -/]*(?P<esc>[0-OQ-WYZ\\`-~])"
    rf"|(?P<ctl>[{_NONPRINT}])")
# An escape sequence that has begun but not ended where the data ends (it goes on next frame).
_UNFINISHED = re.compile(r"\x1b(?:\[[0-?]*[ -/]*|\][^\x07\x1b]*\x1b?|[PX^_][^\x1b]*\x1b?|"
                         r"[ -/]*)\Z")
_STRING_START = re.compile(r"\x1b[\]PX^_]")
# CSI finals that leave the line (cursor up/down/position, scroll, clear screen) end it.
_CSI_BREAK = frozenset("ABEFHdfrSTLM")
_ESC_BREAK = frozenset("DEMc")


class ScreenText:
    """Lines of screen text from output frames, fed in order; resumable from `state()`."""

    def __init__(self, state: str | None = None):
        self.cells: list[str] = []      # the current line, one character per cell
        self.times: list[float] = []    # when each cell was last written
        self.col = 0
        self.pending = ""               # an escape sequence not finished yet
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.done: list[Line] = []
        if state:
            self._load(json.loads(state))

    # -- state across chunks -------------------------------------------------------------------
    def state(self, **extra) -> str:
        undecoded, _ = self._decoder.getstate()
        return json.dumps({"cells": "".join(self.cells), "runs": _runs(self.times),
                           "col": self.col, "pending": self.pending,
                           "utf8": base64.b64encode(undecoded).decode(), **extra},
                          separators=(",", ":"))

    def _load(self, st: dict) -> None:
        self.cells = list(st["cells"])
        self.times = _expand(st["runs"], len(self.cells))
        self.col = st["col"]
        self.pending = st["pending"]
        self._decoder.setstate((base64.b64decode(st["utf8"]), 0))

    # -- feeding -------------------------------------------------------------------------------
    def feed(self, t: float, data: bytes) -> None:
        """One output frame: `data` appeared at `t` seconds into the recording."""
        s = self.pending + self._decoder.decode(data)
        self.pending = ""
        pos, n = 0, len(s)
        while pos < n:
            m = _TOKEN.match(s, pos)
            kind = m.lastgroup
            if kind == "text":
                self._write(m.group(kind), t)
            elif kind == "csi":
                self._csi(m.group(kind), t)
            elif kind == "esc":
                if m.group(kind) in _ESC_BREAK:
                    self._end_line()
            elif kind == "ctl":
                c = m.group(kind)
                if c == "\x1b" and _UNFINISHED.match(s, pos):
                    self._keep_pending(s[pos:])
                    return
                self._control(c, t)
            # else: OSC or a DCS-like string, dropped whole
            pos = m.end()

    def _keep_pending(self, rest: str) -> None:
        if len(rest) > MAX_PENDING:
            # A huge string sequence (a clipboard write, an image): keep only its introducer
            # (and a trailing ESC that may start its terminator), so the rest is still skipped.
            m = _STRING_START.match(rest)
            rest = (m.group() + ("\x1b" if rest.endswith("\x1b") else "")) if m else ""
        self.pending = rest

    def flush(self) -> Line | None:
        """The unfinished line as it stands (not ended: feeding may go on)."""
        return self._line()

    # -- the line ------------------------------------------------------------------------------
    def _write(self, text: str, t: float) -> None:
        while text:
            room = MAX_LINE - self.col
            if room <= 0:
                self._end_line()
                continue
            part, text = text[:room], text[room:]
            cells, times, col = self.cells, self.times, self.col
            if col > len(cells):
                pad = col - len(cells)
                cells.extend(" " * pad)
                times.extend([t] * pad)
            end = col + len(part)
            cells[col:end] = part
            times[col:end] = [t] * len(part)
            self.col = end

    def _control(self, c: str, t: float) -> None:
        if c == "\n" or c == "\x0b" or c == "\x0c":
            self._end_line()
        elif c == "\r":
            self.col = 0
        elif c == "\b":
            self.col = max(0, self.col - 1)
        elif c == "\t":
            stop = min((self.col // 8 + 1) * 8, MAX_LINE)
            if stop > len(self.cells):
                self._write(" " * (stop - max(self.col, len(self.cells))), t)
            self.col = stop
        # other controls (BEL, SO/SI, C1) change nothing on the line

    def _csi(self, seq: str, t: float) -> None:
        final, params = seq[-1], seq[:-1]
        if params[:1] in ("?", ">", "<", "=") or final == "m":
            return  # private modes and colours: nothing on the line moves
        try:
            n = int(params.split(";")[0] or 0)
        except ValueError:
            n = 0
        n = min(n, MAX_LINE)
        cells, times = self.cells, self.times
        if final == "C":
            self.col = min(self.col + max(n, 1), MAX_LINE)
        elif final == "D":
            self.col = max(0, self.col - max(n, 1))
        elif final in "G`":
            self.col = max(n, 1) - 1
        elif final == "K" or (final == "J" and n == 0):
            if n == 0:
                del cells[self.col:], times[self.col:]
            elif n == 1:
                stop = min(self.col + 1, len(cells))
                cells[:stop] = " " * stop
            else:
                cells[:] = " " * len(cells)
        elif final == "P":
            del cells[self.col:self.col + max(n, 1)], times[self.col:self.col + max(n, 1)]
        elif final == "@":
            if self.col < len(cells):
                k = max(n, 1)
                cells[self.col:self.col] = " " * k
                times[self.col:self.col] = [t] * k
                del cells[MAX_LINE:], times[MAX_LINE:]
        elif final == "X":
            stop = min(self.col + max(n, 1), len(cells))
            cells[self.col:stop] = " " * max(0, stop - self.col)
        elif final in _CSI_BREAK or final == "J":
            self._end_line()

    def _line(self) -> Line | None:
        text = "".join(self.cells).rstrip()
        if not text.strip():
            return None
        times = self.times[:len(text)]
        if times.count(times[0]) == len(times):  # printed at once: the common case, kept cheap
            return Line(offset=times[0], text=text)
        # The line began when its first visible character appeared.
        first = min(tm for ch, tm in zip(text, times) if not ch.isspace())
        return Line(offset=first, text=text, marks=marks(times, first))

    def _end_line(self) -> None:
        line = self._line()
        if line is not None:
            self.done.append(line)
        self.cells, self.times, self.col = [], [], 0


def index_chunk(state: str | None, seq: int, frames) -> IndexedOutput:
    """What chunk `seq` (its (t, kind, data) frames) adds to the index, continuing `state`
    (the stored text state of its recording, None before the first)."""
    try:
        st = json.loads(state) if state else None
        follows = st is not None and st.get("seq") == seq - 1
        late = st is not None and seq <= st.get("seq", -1)
        screen = ScreenText(state if follows else None)
    except (ValueError, TypeError, KeyError, AttributeError, binascii.Error):
        # Not a state this code wrote (another version's): the chunk starts a clean line.
        follows, late, screen = False, False, ScreenText()
    for t, kind, data in frames:
        if kind == b"o":
            screen.feed(t, data)
    lines, tail = screen.done, screen.flush()
    if late:
        # An old chunk coming again after later ones (a retry of one the store lost): its
        # lines stand alone, and the state of the later chunks stays as it is.
        return IndexedOutput(lines + ([tail] if tail else []), None, None, False)
    return IndexedOutput(lines, tail, screen.state(seq=seq), follows)


# -- per-character times ----------------------------------------------------------------------
# A line's characters mostly appeared at once (a program printed it). Typed ones came one frame
# each, through the shell's echo: `marks` keeps those times, as "COL:T" runs, so a hit can say
# when the matched text itself was complete on screen. Empty when all came at the line's time.

def _fmt(t: float) -> str:
    return f"{t:.6f}".rstrip("0").rstrip(".")


def _runs(times: list[float]) -> list:
    out, last = [], None
    for col, t in enumerate(times):
        if t != last:
            out.append([col, t])
            last = t
    return out


def _expand(runs: list, n: int) -> list[float]:
    times: list[float] = []
    for i, (col, t) in enumerate(runs):
        stop = runs[i + 1][0] if i + 1 < len(runs) else n
        times.extend([t] * (stop - col))
    return times[:n]


def marks(times: list[float], first: float) -> str:
    runs = _runs(times)
    if len(runs) == 1 and runs[0][1] == first:
        return ""
    return " ".join(f"{col}:{_fmt(t)}" for col, t in runs)


def parse_marks(text: str, n: int, offset: float) -> list[float]:
    if not text:
        return [offset] * n
    runs = []
    for part in text.split():
        col, _, t = part.partition(":")
        runs.append([int(col), float(t)])
    return _expand(runs, n)


# -- queries --------------------------------------------------------------------------------------

def fold_query(text: str) -> str:
    """The query as the indexes see it: case-folded; StoreError when too short to index."""
    folded = text.casefold()
    if len(folded) < MIN_QUERY:
        raise BadQuery(f"search text {text!r} is too short: give at least {MIN_QUERY} "
                         "characters")
    return folded


def fts_phrase(folded: str) -> str:
    """An FTS5 query matching `folded` literally: one quoted phrase (a trigram phrase is a
    substring), double quotes doubled, NUL (which ends an FTS5 query) left out."""
    return '"' + folded.replace("\x00", "").replace('"', '""') + '"'


def glob_pattern(folded: str) -> str:
    """A GLOB pattern matching `folded` literally anywhere (FTS5 trigram serves GLOB)."""
    esc = re.sub(r"([*?\[])", r"[\1]", folded.replace("\x00", ""))
    return f"*{esc}*"


def _find(text: str, folded_query: str) -> tuple[int, int] | None:
    """(start, stop) in `text` of the first case-folded match, or None."""
    folded, where = [], []
    for i, ch in enumerate(text):
        f = ch.casefold()
        folded.append(f)
        where.extend([i] * len(f))
    at = "".join(folded).find(folded_query)
    if at < 0:
        return None
    return where[at], where[at + len(folded_query) - 1] + 1


def output_hit(text: str, offset: float, marks_text: str, folded_query: str
               ) -> tuple[float, str]:
    """(offset when the match was whole on screen, the line to show) of an output line."""
    span = _find(text, folded_query)
    if span is None:  # matched the index but not here (a folding corner case): the line's time
        return offset, context(text, None)
    times = parse_marks(marks_text, len(text), offset)
    return max(times[span[0]:span[1]] or [offset]), context(text, span)


def command_hit(text: str, folded_query: str) -> str:
    return context(text, _find(text, folded_query))


def context(text: str, span: tuple[int, int] | None) -> str:
    """The line, or CONTEXT characters of it around the match, marked with … where cut."""
    if len(text) <= CONTEXT:
        return text
    start = 0 if span is None else max(0, min(span[0] - CONTEXT // 3, len(text) - CONTEXT))
    stop = start + CONTEXT
    return ("…" if start else "") + text[start:stop] + ("…" if stop < len(text) else "")


def ceil_us(t: float) -> float:
    """An offset as the API gives it: whole microseconds, rounded up, so that playing up to it
    includes the frame it came from."""
    return math.ceil(round(t * 1e6, 3)) / 1e6


# Newest first: ordered by (ts, kind, server_id, ord) descending, where ts is the line's start
# (epoch microseconds; -1 when unknown) and ord the output line's id or the command's seq.
def encode_cursor(key: tuple[int, str, str, int]) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(key)).encode()).decode()


def decode_cursor(cursor: str) -> tuple[int, str, str, int]:
    try:
        ts, kind, server_id, ord_ = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        if (type(ts) is int and kind in ("command", "output") and isinstance(server_id, str)
                and type(ord_) is int):
            return ts, kind, server_id, ord_
    except (ValueError, TypeError, binascii.Error):
        pass
    raise BadQuery(f"search cursor {cursor[:80]!r} is not one this collector gave out: pass "
                     "the `next` of the previous page unchanged")
