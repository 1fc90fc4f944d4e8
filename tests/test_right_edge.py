"""RightEdge: where output would act differently on a terminal wider than the recording.

Its promise, checked against the screen model itself: while it says no, a terminal wider than
the recording, fed the same output, shows the recording's screen in its top-left corner, the
cursor where the model has it, and nothing to the right. Where it says "may", a redraw from the
model (and what it carries of a cut sequence) brings the wider terminal back to that."""
from __future__ import annotations

import random

import pytest

from sshtrail import screen
from sshtrail.right_edge import ABORT, RightEdge

W, H = 40, 10  # narrow, so that random output reaches the edge often


@pytest.mark.parametrize("x, text, may, after", [
    (0, "hello", False, 5),
    (35, "hello", False, 40),              # the last column written: a wrap pending, no more
    (35, "hello!", True, None),            # the wrap
    (40, "\r\n", False, 0),
    (40, "\b", True, None),              # pyte steps back from a pending wrap twice
    (0, "\x1b[39C", False, 39),
    (0, "\x1b[40C", True, None),           # the model stops at the edge
    (40, "\x1b[C", True, None),            # a pending wrap's cursor moved on
    (0, "\x1b[5;40H", False, 39),
    (0, "\x1b[5;41H", True, None),
    (0, "\x1b[99G", True, None),
    (30, "\t", False, 32),
    (32, "\t", True, None),                # no tab stop left: the model stops at the last column
    (0, "\x1b[@", True, None),             # an insertion pushes the line's end past the edge
    (0, "\x1b[4hx", True, None),           # so does insert mode
    (0, "ab\x1b[30b", False, 32),          # REP of an ASCII character
    (0, "\u4e2d\x1b[20b", True, None),     # of one that may be wide: 2 + 40 cells
    (0, "\u4e2d" * 20, False, 40),
    (0, "\u4e2d" * 21, True, None),
    (0, "\x1b]0;a title \x07\x1b[1mok\x1b[0m", False, 2),
    (10, "\x1b7\x1b[1;39H\x1b8abc", False, 13),
    (10, "\x1b[r", False, 10),             # margins off: the cursor stays (pyte)
    (10, "\x1b[2;5r", False, 0),           # margins set: home
    (None, "x", True, None),
    (None, "\x1b[3;4Hx", False, 4),
    (0, "\x1b[?3h", True, None),           # 132 columns
    (5, "\x9b5C", False, 10),              # CSI as one character: the model takes it as such
    (0, "\x1b[1\n2Hx", False, 1),          # a control inside a CSI acts, and the CSI goes on
    (0, "\x1b#8", True, None),
])
def test_vectors(x, text, may, after):
    e = RightEdge(W, x, H)
    assert e.feed(text) is may
    assert e.x == after


def test_a_sequence_cut_between_two_pieces_is_carried():
    e = RightEdge(W, 0)
    assert e.feed("ab\x1b[3") is False and e.carry == "\x1b[3"
    assert e.feed("9C") is True  # CUF 39 from column 2
    e = RightEdge(W, 0)
    assert e.feed("\x1b]0;half a ti") is False and e.feed("tle\x1b") is False
    assert e.feed("\\x") is False and e.x == 1
    e = RightEdge(W, 38)
    assert e.feed("abc\x1b[") is True and e.carry == "\x1b["  # carried past a "may" too


def test_a_string_that_never_ends_is_given_up_on_not_held():
    e = RightEdge(W, 0)
    for _ in range(20):
        e.feed("\x1b]0;" if not e.carry else "x" * 8192)
    assert len(e.carry) <= 1 << 16 and e.x is None


# -- the promise, on random output --------------------------------------------------------------

# Characters outside ASCII, one cell wide. (Wide and combining ones: pyte's model of them at the
# right edge and in insert mode holds rows no terminal can show, a wide character's half
# written over; its redraw is then no copy of the model. Their own test is below.)
WIDE_OR_NOT = ["\u00e9t\u00e9", "\u2500" * 3, "\u00a0", "\u00f1"]


# A cursor saved and restored: in the vectors above, not in the random output below.
SAVED = ["\x1b7", "\x1b8", "\x1b[?1049l", "\x1b[?1048l"]


def hostile(rng: random.Random, n: int) -> str:
    """Output that goes to the edge and past it every way the model knows, and some it does not."""
    def text(k):
        return "".join(rng.choice("abcdefghij -_.") for _ in range(k))
    makers = [
        lambda: text(rng.randint(1, 8)), lambda: text(rng.randint(20, 90)),
        lambda: rng.choice(WIDE_OR_NOT),
        lambda: "\r", lambda: "\n", lambda: "\r\n", lambda: "\b", lambda: "\t" * rng.randint(1, 3),
        lambda: f"\x1b[{rng.randint(0, 50)}{rng.choice('CDaEF@PXKJbLM')}",
        lambda: f"\x1b[{rng.randint(1, H + 2)};{rng.randint(1, W + 10)}{rng.choice('Hf')}",
        lambda: f"\x1b[{rng.randint(1, W + 10)}{rng.choice('G`' + chr(39))}",
        lambda: f"\x1b[{rng.randint(1, H)}d",
        lambda: rng.choice(["\x1b[4h", "\x1b[4l", "\x1b[?7l", "\x1b[?7h", "\x1b[20h", "\x1b[20l",
                            "\x1bH", "\x1b[g", "\x1b[3g", "\x1b[2;6r",
                            "\x1b[r", "\x1b[?1049h", "\x1b[?1047l", "\x1b[?6h", "\x1b[?6l",
                            "\x1bc", "\x1b[s", "\x1b[u", "\x1b[Z", "\x1b[2I", "\x1bD", "\x1bM",
                            "\x1bE", "\x1b(B", "\x1b[1;31m",
                            "\x1b[0m", "\x1b]0;title\x07", "\x1b]2;t\x1b\\", "\x9b3C",
                            "\x1b[1\r2H", "\x1b[3\x18", "\x07", "\x1b[?25l"]),
    ]
    return "".join(rng.choice(makers)() for _ in range(n))


def shows_the_model(wide: screen.Screen, model: screen.Screen) -> None:
    """What is where: characters and the cursor. Not their colours, nor charsets, which the
    output here never shifts; nor a saved cursor, which it never restores (SAVED): a redraw
    gives a terminal's saved cursor the model's position, and not always its colours and
    charsets, whatever the width (a restore after a seek has the same limit)."""
    assert wide.alternate == model.alternate
    for y in range(H):
        row = [wide.buffer[y][x].data for x in range(wide.columns)]
        assert row[:W] == [model.buffer[y][x].data for x in range(W)], y
        assert all(c == " " for c in row[W:]), (y, "".join(row[W:]))
    assert (wide.cursor.x, wide.cursor.y) == (model.cursor.x, model.cursor.y)


@pytest.mark.parametrize("seed", range(40))
def test_while_it_says_no_a_wider_terminal_shows_what_the_model_shows(seed):
    rng = random.Random(seed)
    model, model_stream = screen.new(W, H)
    wide, wide_stream = screen.new(W + rng.choice([1, 7, 40]), H)
    edge = RightEdge(W, 0, H)
    out = hostile(rng, 400)
    pos, redraws, passed = 0, 0, 0
    while pos < len(out):
        piece = out[pos:pos + rng.randint(1, 30)]  # sequences cut anywhere
        pos += len(piece)
        model_stream.feed(piece)
        wide_stream.feed(piece)  # as the player does: passed on as it came, and redrawn from
        if edge.feed(piece):     # the model where it says so (what a sequence cut holds, again)
            wide_stream.feed((ABORT if edge.carry else "") + screen.render(screen.snapshot(model))
                             + edge.carry)
            edge.sync(model)
            redraws += 1
        else:
            passed += 1
        if not edge.carry:  # mid-sequence, neither has acted on it yet
            shows_the_model(wide, model)
            assert edge.x in (None, model.cursor.x)  # where it knows the column, it is right
    assert redraws > 10 and passed > 10  # both ways were taken, many times


def test_without_it_a_wider_terminal_shows_something_else():
    # The check above can fail: the same output passed on as it came, with no redraws.
    failures = 0
    for seed in range(10):
        rng = random.Random(seed)
        model, model_stream = screen.new(W, H)
        wide, wide_stream = screen.new(W + 7, H)
        out = hostile(rng, 400)
        model_stream.feed(out)
        wide_stream.feed(out)
        try:
            shows_the_model(wide, model)
        except AssertionError:
            failures += 1
    assert failures >= 8
