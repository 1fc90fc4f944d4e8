"""The escape-sequence filter between a recording and the auditor's terminal.

A recording is what a possibly hostile user made their terminal print. Replayed raw, it could act
on the auditor's own terminal: write the clipboard (OSC 52), set or report the title, make the
terminal answer into its input (DSR `CSI 6n`, DA `CSI c`/`CSI > c`, DECRQSS and XTGETTCAP in
DCS, window reports `CSI 14t/18t/21t`, ENQ answerback), change the palette or font for good
(OSC 4/10/11/12/50/104), turn on mouse reporting, focus events or bracketed paste, resize the
window, print. `TermFilter` is a streaming state machine over the recording's text that lets
through only what draws on the screen and what the screen model (`sshtrail.screen`) understands,
so that what the auditor sees and what the keyframes and the text export hold agree (the
parameters of a passed CSI are also cut to the number its function takes, and clamped):

- passed: printable text, BS HT LF VT FF CR, SI/SO and the G0/G1 designations `ESC ( 0|A|B`,
  DECSC/DECRC, IND/NEL/RI/HTS, cursor movement, erase, insert/delete, scroll regions
  (`CSI r`), scroll up/down (`CSI S/T`), REP, tab clear, SGR (colon sub-parameters rewritten to
  the `;` form every terminal knows), IRM (`CSI 4h/l`), and the private modes DECOM (6), DECAWM
  (7), DECTCEM (25) and the alternate screen (47, 1047, 1048, 1049);
- rewritten: `CSI s`/`CSI u` to DECSC/DECRC, RIS (`ESC c`) to an explicit reset that keeps the
  viewer's palette, title and keyboard, `CSI ? J/K` to `CSI J/K`, C1 controls (U+009B...) to
  their 7-bit forms or dropped;
- dropped, whole: every OSC, DCS, SOS, PM and APC string (title, clipboard, hyperlinks, palette,
  XTGETTCAP, DECRQSS, sixel), every CSI with a `>`, `<` or `=` marker or an intermediate byte
  (DA2, XTVERSION, modifyOtherKeys, kitty keyboard, DECSCUSR, DECRQM, DECSTR), DSR, DA, window
  operations (`CSI t`), media copy, LEDs, every other private mode (mouse, focus, bracketed paste,
  cursor-key and keypad modes, 132 columns, reverse video), keypad mode `ESC =`, `ESC %`, DECID,
  DECALN (`ESC # 8`, a test pattern: 3 bytes that fill every cell of the screen model, a replay
  of many of them would take hours), and the C0 controls NUL, ENQ, BEL and the rest.

An allowlist, not a blocklist: anything not named above is dropped. A sequence split across
frames is held until it completes, so the output only ever holds whole sequences: the player may
write its status line between two `feed` results. It must never let a byte of a dropped sequence
through, nor raise on any input. A string sequence (OSC/DCS/...) is dropped up to its terminator,
but at most MAX_STRING characters of it: beyond that the filter gives up on it and shows what
follows as text, so that an unterminated `ESC ]` cannot hide the rest of a session from the
auditor.
"""
from __future__ import annotations

import re

ESC = "\x1b"
MAX_STRING = 65536
MAX_CSI = 256  # characters of parameters; beyond that, no real program, only an attempt to choke
MAX_PARAM = 9999  # what pyte clamps to too: REP 99999999 must not stall the viewer's terminal

# C0 controls that draw or move (the rest, NUL ENQ BEL DC1-4 ..., are dropped).
_C0_PASS = frozenset("\x08\x09\x0a\x0b\x0c\x0d\x0e\x0f")

# CSI finals passed as they are when they carry no marker and no intermediate byte. Each is one
# pyte (or sshtrail.screen) understands: @ ICH, A-H cursor, J/K erase, L/M lines, P DCH, S/T
# scroll, X ECH, ` HPA, a HPR, b REP, d VPA, e VPR, f HVP, g TBC, m SGR, r DECSTBM.
_CSI_PASS = frozenset("@ABCDEFGHJKLMPSTX`abdefgmr")

# Private modes (`CSI ? n h/l`) the viewer may be put in: origin, autowrap, cursor visibility,
# alternate screen. Everything else (mouse 9/1000-1006/1015, focus 1004, bracketed paste 2004,
# cursor keys 1, 132 columns 3, reverse video 5, ...) is dropped.
_PRIVATE_MODES = frozenset({6, 7, 25, 47, 1047, 1048, 1049})
_ANSI_MODES = frozenset({4})  # IRM; LNM (20) would change what Enter sends

# G0/G1 designations of the character sets pyte maps: DEC line drawing, UK, US ASCII.
_CHARSETS = frozenset("0AB")

_C1 = {"\x84": ESC + "D", "\x85": ESC + "E", "\x88": ESC + "H", "\x8d": ESC + "M"}

# RIS would reset the viewer's whole terminal (palette, title stack, keyboard modes, in some
# even the font); this is the part of it that concerns the screen.
RESET = (ESC + "[?1049l" + ESC + "[0m" + ESC + "[4l" + ESC + "[?6l" + ESC + "[?7h"
         + ESC + "[?25h" + ESC + "(B" + "\x0f" + ESC + "[r" + ESC + "[H" + ESC + "[2J")

_GROUND, _ESCAPE, _ESC_INTER, _CSI, _STRING, _STRING_ESC = range(6)

_TEXT = re.compile(r"[^\x00-\x1f\x7f-\x9f]+")

# What must not reach the auditor's terminal inside a one-line field (a login, a command line,
# a path): the C0 and C1 controls, and the characters that print nothing yet change how the
# line reads: bidi overrides, embeddings, isolates and marks (`rm x #\u202e` shows the rest of
# the row reversed), zero-width and invisible characters, soft hyphen, line and paragraph
# separators, interlinear annotation; and lone surrogates, which no terminal encoding can print.
_UNSHOWN = re.compile("[\x00-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e"
                      "\u2060-\u206f\ud800-\udfff\ufeff\ufff9-\ufffb]")


def _escaped(m: re.Match) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def field(text, *, mark: str | None = None) -> str:
    """`text` (a value from the session or the network) for one line of the auditor's terminal:
    each control or invisible character named as \\xNN / \\uNNNN, or replaced by `mark`."""
    return _UNSHOWN.sub(mark if mark is not None else _escaped, str(text))


class TermFilter:
    """Feed the recording's output text in pieces; get back what is safe to write."""

    def __init__(self) -> None:
        self.dropped = 0  # sequences dropped, for tests and the curious
        self._state = _GROUND
        self._buf: list[str] = []  # the sequence being collected
        self._len = 0
        self._string_kind = ""

    def feed(self, text: str) -> str:
        out: list[str] = []
        i, n = 0, len(text)
        while i < n:
            state = self._state
            if state == _GROUND:
                m = _TEXT.match(text, i)
                if m:
                    out.append(m.group())
                    i = m.end()
                    continue
                self._ground_control(text[i], out)
            elif state == _STRING or state == _STRING_ESC:
                # Find the terminator fast: strings may be long (OSC 52 carries a clipboard).
                i = self._string(text, i, out)
                continue
            else:
                self._sequence_char(text[i], out)
            i += 1
        return "".join(out)

    def flush(self) -> str:
        """The end of the recording: an unfinished sequence is dropped."""
        if self._state != _GROUND:
            self.dropped += 1
        self._reset()
        return ""

    # -- states -------------------------------------------------------------------------------

    def _reset(self) -> None:
        self._state = _GROUND
        self._buf = []
        self._len = 0

    def _ground_control(self, c: str, out: list[str]) -> None:
        if c == ESC:
            self._state, self._buf, self._len = _ESCAPE, [], 0
        elif c in _C0_PASS:
            out.append(c)
        elif c == "\x9b":
            self._state, self._buf, self._len = _CSI, [], 0
        elif c in "\x90\x98\x9d\x9e\x9f":  # DCS SOS OSC PM APC
            self._start_string(c)
        elif c in _C1:
            out.append(_C1[c])
        else:
            self.dropped += 1

    def _start_string(self, kind: str) -> None:
        self._state, self._string_kind, self._len = _STRING, kind, 0

    def _string(self, text: str, i: int, out: list[str]) -> int:
        n = len(text)
        while i < n:
            c = text[i]
            if self._state == _STRING_ESC:
                if c == "\\":  # ST
                    self.dropped += 1
                    self._reset()
                    return i + 1
                # ESC ends the string (xterm) and starts a new sequence.
                self.dropped += 1
                self._reset()
                self._state = _ESCAPE
                continue
            if c == "\x07" or c == "\x9c":  # BEL (OSC only, but harmless for the others) or ST
                self.dropped += 1
                self._reset()
                return i + 1
            if c == ESC:
                self._state = _STRING_ESC
            elif c == "\x18" or c == "\x1a":  # CAN/SUB abort the string
                self.dropped += 1
                self._reset()
                return i + 1
            else:
                self._len += 1
                if self._len > MAX_STRING:
                    # Give up: what follows is shown, so an endless string hides nothing.
                    self.dropped += 1
                    self._reset()
                    return i + 1
            i += 1
        return i

    def _sequence_char(self, c: str, out: list[str]) -> None:
        state = self._state
        if c == "\x18" or c == "\x1a":  # CAN/SUB: abort the sequence
            self.dropped += 1
            self._reset()
            return
        if c == ESC:  # an ESC inside a sequence abandons it and starts another
            self.dropped += 1
            self._reset()
            self._state = _ESCAPE
            return
        if c < " " and state in (_ESCAPE, _CSI, _ESC_INTER):
            # C0 controls inside a sequence act at once (VT spec; pyte does the same).
            if c in _C0_PASS:
                out.append(c)
            return
        if state == _ESCAPE:
            self._escape(c, out)
        elif state == _ESC_INTER:
            self._buf.append(c)
            if "\x20" <= c <= "\x2f":
                if len(self._buf) > 4:
                    self.dropped += 1
                    self._reset()
                return
            self._esc_final("".join(self._buf), out)
        elif state == _CSI:
            self._buf.append(c)
            self._len += 1
            if "\x40" <= c <= "\x7e":
                self._csi("".join(self._buf), out)
                self._reset()
            elif not ("\x20" <= c <= "\x3f") or self._len > MAX_CSI:
                self.dropped += 1
                self._reset()

    def _escape(self, c: str, out: list[str]) -> None:
        if c == "[":
            self._state, self._buf, self._len = _CSI, [], 0
        elif c in "]PX^_":  # OSC DCS SOS PM APC
            self._start_string(c)
        elif "\x20" <= c <= "\x2f":
            self._state, self._buf = _ESC_INTER, [c]
        else:
            self._esc_final(c, out)

    def _esc_final(self, seq: str, out: list[str]) -> None:
        self._reset()
        if seq in ("7", "8", "D", "E", "H", "M"):
            out.append(ESC + seq)
        elif seq == "c":
            out.append(RESET)
        elif len(seq) == 2 and seq[0] in "()" and seq[1] in _CHARSETS:
            out.append(ESC + seq)
        else:
            self.dropped += 1

    def _modes(self, marker: str, params: str, final: str, allowed: frozenset,
               out: list[str]) -> None:
        """Set/reset mode: the allowed modes of the list pass, the rest are dropped."""
        modes = [p for p in params.split(";") if p.isdigit() and int(p) in allowed]
        if modes:
            out.append(f"{ESC}[{marker}{';'.join(str(int(p)) for p in modes)}{final}")
        else:
            self.dropped += 1

    def _csi(self, seq: str, out: list[str]) -> None:
        final, body = seq[-1], seq[:-1]
        marker = body[:1] if body[:1] in ("?", ">", "<", "=") else ""
        params = body[len(marker):]
        if any(ch in "<=>?" or "\x20" <= ch <= "\x2f" for ch in params):
            self.dropped += 1  # an intermediate byte, or a marker out of place
            return
        if marker == "?":
            if final in "hl":
                self._modes("?", params, final, _PRIVATE_MODES, out)
            elif final in "JK" and ":" not in params:
                out.append(f"{ESC}[{_clamp(params.split(';')[0])}{final}")
            else:
                self.dropped += 1
            return
        if marker:
            self.dropped += 1
            return
        if final in "hl":
            self._modes("", params, final, _ANSI_MODES, out)
        elif final in "su" and not params:
            out.append(ESC + ("7" if final == "s" else "8"))
        elif final == "m":
            out.append(f"{ESC}[{_sgr(params)}m")
        elif final in _CSI_PASS and ":" not in params:
            # No more parameters than the function takes: pyte raises on extra ones.
            keep = 2 if final in "Hfr" else 1
            out.append(f"{ESC}[{_clamp(';'.join(params.split(';')[:keep]))}{final}")
        else:
            self.dropped += 1


def _clamp(params: str) -> str:
    if not params:
        return ""
    return ";".join(str(min(int(p), MAX_PARAM)) if p.isdigit() else "" for p in params.split(";"))


def _sgr(params: str) -> str:
    """SGR parameters in the `;` form: `38:2::255:0:0` becomes `38;2;255;0;0`, `4:3` (curly
    underline) `4`; pyte, like older terminals, reads a colon as the end of the sequence."""
    if ":" not in params:
        return _clamp(params)
    out = []
    for group in params.split(";"):
        sub = group.split(":")
        if len(sub) == 1:
            out.append(sub[0])
        elif sub[0] in ("38", "48") and len(sub) >= 3 and sub[1] == "5":
            out += [sub[0], "5", sub[2]]
        elif sub[0] in ("38", "48") and sub[1] == "2" and len(sub) >= 5:
            rgb = sub[-3:]  # 38:2:CS:r:g:b or 38:2:r:g:b
            out += [sub[0], "2", *rgb]
        elif sub[0] in ("38", "48", "58"):
            continue
        else:
            out.append(sub[0])
    return _clamp(";".join(p for p in out if p == "" or p.isdigit()))


def filter_text(text: str) -> str:
    """The whole of `text` filtered (an unfinished sequence at the end is dropped)."""
    f = TermFilter()
    return f.feed(text) + f.flush()
