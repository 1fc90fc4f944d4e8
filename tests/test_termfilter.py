"""The terminal filter: a table of what passes, what is rewritten and what is removed, and the
same table cut at every position (sequences split across frames)."""
from __future__ import annotations

import random

import pytest

from sshtrail import termfilter
from sshtrail.termfilter import TermFilter, filter_text

E = "\x1b"

PASS = [
    ("plain text, UTF-8 ✓ 漢字", "plain text, UTF-8 ✓ 漢字"),
    ("a\r\nb\tc\x08d", "a\r\nb\tc\x08d"),
    (f"{E}[31mred{E}[0m {E}[1;38;5;208mX{E}[48;2;1;2;3mY{E}[m", None),
    (f"{E}[H{E}[2J{E}[3J{E}[K{E}[1K{E}[2K", None),
    (f"{E}[10;20H{E}[5A{E}[B{E}[3C{E}[D{E}[E{E}[F{E}[12G{E}[7d{E}[3;4f", None),
    (f"{E}[2L{E}[M{E}[3@{E}[P{E}[4X{E}[2S{E}[T{E}[5b{E}[3g{E}[a{E}[e{E}[5`", None),
    (f"{E}[1;20r{E}[r", None),                                  # scroll regions
    (f"{E}[?1049h{E}[?1049l{E}[?47h{E}[?1047l{E}[?1048h", None),   # alternate screen
    (f"{E}[?25l{E}[?25h{E}[?7l{E}[?6h{E}[4h{E}[4l", None),
    (f"{E}7{E}8{E}D{E}E{E}M{E}H", None),
    (f"{E}(0lqk{E}(B{E})0\x0e\x0f", None),                     # DEC line drawing
]

REWRITTEN = [
    (f"{E}[s{E}[u", f"{E}7{E}8"),
    (f"{E}[38:2::255:0:0mX", f"{E}[38;2;255;0;0mX"),
    (f"{E}[38:5:208;4:3mX", f"{E}[38;5;208;4mX"),
    (f"{E}[?2J", f"{E}[2J"),
    (f"{E}[1;2;3H", f"{E}[1;2H"),                              # pyte raises on extra params
    (f"{E}[99999999b", f"{E}[9999b"),
    (f"{E}[?1000;1049;2004h", f"{E}[?1049h"),                  # mouse and paste out, alt in
    ("\x9b31mX", f"{E}[31mX"),                                 # C1 CSI
    ("a\x85b", f"a{E}Eb"),
    (f"{E}c", termfilter.RESET),                               # RIS: the screen part only
    (f"{E}[5\nA", f"\n{E}[5A"),                                # C0 inside CSI acts at once
]

REMOVED = [
    f"{E}]52;c;cm0gLXJmIH4K\x07",          # clipboard write
    f"{E}]52;p;?{E}\\",                    # clipboard read
    f"{E}]0;title\x07", f"{E}]2;title{E}\\", f"{E}]1;icon\x07",
    f"{E}]4;1;rgb:ff/00/00\x07", f"{E}]10;?\x07", f"{E}]11;#000\x07", f"{E}]12;red\x07",
    f"{E}]104\x07", f"{E}]50;fixed\x07", f"{E}]7;file://h/p\x07", f"{E}]133;A\x07",
    f"{E}]1337;File=x\x07", f"{E}]777;notify;a;b\x07",
    "\x9d0;title\x9c",                      # C1 OSC ... ST
    f"{E}P$qm{E}\\", f"{E}P+q544e{E}\\", f"{E}Pq#0;2;0;0;0~-{E}\\",  # DECRQSS, XTGETTCAP, sixel
    "\x90$qm\x9c", f"{E}_apc{E}\\", f"{E}^pm{E}\\", f"{E}Xsos{E}\\",
    f"{E}[5n", f"{E}[6n", f"{E}[?6n", f"{E}[?15n",           # DSR
    f"{E}[c", f"{E}[0c", f"{E}[>c", f"{E}[>0c", f"{E}[=c",  # DA1, DA2, DA3
    f"{E}[14t", f"{E}[18t", f"{E}[21t", f"{E}[20t", f"{E}[8;100;200t", f"{E}[22;0t",
    f"{E}[>0q", f"{E}[2 q", f"{E}[$p", f"{E}[?1$p", f"{E}[!p", f"{E}[x", f"{E}[1q",
    f"{E}[>4;1m", f"{E}[>1u", f"{E}[<u", f"{E}[=1;1u", f"{E}[?u", f"{E}[?4m",
    f"{E}[?1000h", f"{E}[?1002h", f"{E}[?1003h", f"{E}[?1006h", f"{E}[?1015h", f"{E}[?9h",
    f"{E}[?2004h", f"{E}[?1004h", f"{E}[?1h", f"{E}[?3h", f"{E}[?5h", f"{E}[?1034h",
    f"{E}[?2026h", f"{E}[20h", f"{E}[5i", f"{E}[0i", f"{E}[1;5s",
    f"{E}=", f"{E}>", f"{E}Z", f"{E}%G", f"{E}#3", f"{E}(%5", f"{E}N", f"{E}n",
    f"{E}#8",                               # DECALN: a whole screen of work in 3 bytes
    "\x05", "\x07", "\x00", "\x7f", "\x11", "\x96", "\x9a",
]


@pytest.mark.parametrize("text,expected", PASS)
def test_passes(text, expected):
    assert filter_text(text) == (text if expected is None else expected)


@pytest.mark.parametrize("text,expected", REWRITTEN)
def test_rewrites(text, expected):
    assert filter_text(text) == expected


@pytest.mark.parametrize("seq", REMOVED)
def test_removes_whole_and_keeps_the_text_around(seq):
    assert filter_text(f"before{seq}after") == "beforeafter"


def test_hyperlink_keeps_its_text():
    assert filter_text(f"{E}]8;;http://x/{E}\\click{E}]8;;{E}\\") == "click"


def _table_text() -> tuple[str, str]:
    parts_in, parts_out = [], []
    for text, expected in PASS + REWRITTEN:
        parts_in.append(text + "|")
        parts_out.append((text if expected is None else expected) + "|")
    for seq in REMOVED:
        parts_in.append(f"<{seq}>")
        parts_out.append("<>")
    return "".join(parts_in), "".join(parts_out)


@pytest.mark.parametrize("seed", range(20))
def test_any_cut_gives_the_same_output_and_only_whole_sequences(seed):
    text, expected = _table_text()
    rng = random.Random(seed)
    f = TermFilter()
    pieces, i = [], 0
    while i < len(text):
        n = rng.randint(1, 12) if seed else 1  # seed 0: one character at a time
        pieces.append(f.feed(text[i:i + n]))
        i += n
    assert "".join(pieces) + f.flush() == expected
    for piece in pieces:  # a status line may be written between any two
        assert filter_text(piece) == piece.replace(f"{E}c", "")


def test_unterminated_string_hides_at_most_max_string():
    hidden = "x" * (termfilter.MAX_STRING + 10)
    out = filter_text(f"{E}]0;{hidden}\r\nvisible")
    assert out.endswith("x\r\nvisible") and len(out) < 40  # the rest is shown


def test_never_raises_on_noise():
    rng = random.Random(0)
    alphabet = "\x1b[]P\\;?>:0123456789mhlrHJ\x07\x9b\x9d\x9c\x18ab "
    f = TermFilter()
    for _ in range(2000):
        out = f.feed("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))))
        assert "\x07" not in out and f"{E}]" not in out and f"{E}P" not in out


# -- one-line fields (logins, command lines, paths) -----------------------------------------

@pytest.mark.parametrize("raw,shown", [
    ("rm -rf ~/x", "rm -rf ~/x"),
    ("café ☕ 日本", "café ☕ 日本"),                                 # printable: as it is
    ("a\x1b]52;c;eA==\x07b", "a\\x1b]52;c;eA==\\x07b"),                 # controls
    ("a\x9b6nb", "a\\x9b6nb"),                                           # C1 CSI
    ("rm x #\u202eexe.txt", "rm x #\\u202eexe.txt"),                     # right-to-left override
    ("\u2066sh\u2069 \u200f", "\\u2066sh\\u2069 \\u200f"),             # isolates, RLM
    ("ro\u200bot\u00ad\ufeff", "ro\\u200bot\\xad\\ufeff"),               # invisible
    ("one\u2028two", "one\\u2028two"),                                   # line separator
    ("caf\udce9", "caf\\udce9"),                                         # undecodable byte
])
def test_a_field_shows_every_character_that_would_act_or_hide(raw, shown):
    assert termfilter.field(raw) == shown


def test_a_field_marked_keeps_its_length_per_character():
    assert termfilter.field("a\x1b\u202eb\udce9", mark="?") == "a??b?"
