"""The screen model (sshtrail/screen.py): what it does beyond pyte, checked against pyte's own
way of doing it, and the bounds that keep a hostile recording's replay from running for hours."""
import random

import pyte
import pytest

from sshtrail import screen


def filled(seed: int, cols: int = 30, rows: int = 12) -> tuple[screen.Screen, screen.Stream]:
    rng = random.Random(seed)
    scr, stream = screen.new(cols, rows)
    for y in range(rows):
        if rng.random() < 0.8:
            colour = rng.choice(["", "\x1b[31m", "\x1b[44m", "\x1b[1m"])
            stream.feed(f"\x1b[{y + 1};{rng.randint(1, cols)}H{colour}"
                        + "".join(rng.choice("abc xyz") for _ in range(rng.randint(0, cols)))
                        + "\x1b[0m")
    return scr, stream


def twins(seed: int, region: tuple[int, int] | None = None):
    """The same screen (and scroll region) in our model and in one pyte's own methods will
    change, for comparing the two."""
    ours, stream = filled(seed)
    theirs, _ = filled(seed)
    if region:
        stream.feed(f"\x1b[{region[0]};{region[1]}r")
        theirs.set_margins(*region)
    return ours, stream, theirs


def twins_in_a_region(seed: int):
    """Twins (above), half of them with a random scroll region; and the seed's random numbers."""
    rng = random.Random(seed)
    top = rng.randint(1, 6)
    region = (top, rng.randint(top + 1, 12)) if rng.random() < 0.5 else None
    return rng, region, twins(seed, region)


def reference_scroll(scr: screen.Screen, count: int, up: bool) -> None:
    """SU/SD as an index at the region's bottom (reverse index at its top) per line, with pyte's
    own methods: what the model did before it moved the lines in one go."""
    x, y = scr.cursor.x, scr.cursor.y
    top, bottom = scr.margins or pyte.screens.Margins(0, scr.lines - 1)
    for _ in range(min(count, bottom - top + 1)):
        scr.cursor.y = bottom if up else top
        (pyte.Screen.index if up else pyte.Screen.reverse_index)(scr)
    scr.cursor.x, scr.cursor.y = x, y


@pytest.mark.parametrize("seed", range(40))
def test_scroll_up_and_down_move_the_regions_lines_as_indexes_would(seed):
    rng, region, (ours, stream, theirs) = twins_in_a_region(seed)
    count = rng.choice([1, 2, 5, 11, 12, 13, 9999])
    up = rng.random() < 0.5
    stream.feed(f"\x1b[{rng.randint(1, 12)};{rng.randint(1, 30)}H")
    theirs.cursor.x, theirs.cursor.y = ours.cursor.x, ours.cursor.y
    stream.feed(f"\x1b[{count}{'S' if up else 'T'}")
    reference_scroll(theirs, count, up)
    assert screen.cells(ours) == screen.cells(theirs)
    assert (ours.cursor.x, ours.cursor.y) == (theirs.cursor.x, theirs.cursor.y)


@pytest.mark.parametrize("seed", range(40))
def test_delete_and_insert_lines_move_the_lines_below_the_cursor_as_indexes_would(seed):
    # pyte left a line in place where the one to move into it was not held: `A CSI H CSI M`
    # kept the A, which a terminal blanks.
    rng, region, (ours, stream, theirs) = twins_in_a_region(seed)
    for y in rng.sample(range(12), 4):  # lines not held, among held ones
        ours.buffer.pop(y, None)
        theirs.buffer.pop(y, None)
    count = rng.choice([1, 2, 5, 11, 9999])
    up = rng.random() < 0.5
    y = rng.randint(0, 11)
    stream.feed(f"\x1b[{y + 1};{rng.randint(1, 30)}H\x1b[{count}{'M' if up else 'L'}")
    first, bottom = (region[0] - 1, region[1] - 1) if region else (0, 11)
    if first <= y <= bottom:  # outside the region, nothing moves
        theirs.margins = pyte.screens.Margins(y, bottom)
        reference_scroll(theirs, count, up)
        theirs.cursor.x = 0
    assert screen.cells(ours) == screen.cells(theirs)


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("how", [0, 1, 2, 3])
def test_erase_in_display_blanks_every_cell_in_the_cursors_colours(seed, how):
    rng = random.Random(seed)
    ours, stream, theirs = twins(seed)
    colour = rng.choice(["", "\x1b[44m", "\x1b[7m"])
    move = f"\x1b[{rng.randint(1, 12)};{rng.randint(1, 30)}H{colour}"
    stream.feed(move)
    screen.Stream(theirs).feed(move)
    stream.feed(f"\x1b[{how}J")
    # pyte's erase, then what it leaves out: the cells its lines never held (a terminal fills
    # the whole line with the erasing colour).
    pyte.Screen.erase_in_display(theirs, how)
    y = theirs.cursor.y
    for row in {0: range(y + 1, 12), 1: range(y)}.get(how, range(12)):
        for x in range(30):
            theirs.buffer[row][x] = theirs.cursor.attrs
    assert screen.cells(ours) == screen.cells(theirs)


@pytest.mark.parametrize("seed", range(20))
def test_a_screen_erased_in_colour_redraws_as_it_was(seed):
    # What render() writes, fed to a fresh model, must show every cell as the recorded screen.
    rng = random.Random(seed)
    ours, stream = filled(seed)
    stream.feed(f"\x1b[{rng.randint(1, 12)};{rng.randint(1, 30)}H\x1b[44m\x1b[{rng.choice('012')}J"
                f"\x1b[0;31mred\x1b[{rng.randint(1, 12)};1H\x1b[0mplain\x1b[45m\x1b[K")
    viewer, viewer_stream = screen.new(30, 12)
    viewer_stream.feed(screen.render(screen.snapshot(ours)))
    assert screen.cells(viewer) == screen.cells(ours)
    again, _ = screen.restored(screen.snapshot(ours))  # and a keyframe keeps it
    assert screen.cells(again) == screen.cells(ours)


def test_a_claimed_size_is_bounded():
    scr, stream = screen.new(65535, 65535)
    assert (scr.columns, scr.lines) == (screen.MAX_COLUMNS, screen.MAX_LINES)
    scr.resize(65535, 65535)
    assert (scr.columns, scr.lines) == (screen.MAX_COLUMNS, screen.MAX_LINES)
    scr.resize(24, 80)
    assert (scr.columns, scr.lines) == (80, 24)
    scr.resize(-5, -5)  # a hand-made recording may say anything; the model stays usable
    assert scr.columns >= 1 and scr.lines >= 1
    stream.feed("still works")


def test_rep_repeats_at_most_a_lines_worth():
    scr, stream = screen.new(20, 5)
    stream.feed("\x1b[3;5Hx\x1b[9999b")
    text = "".join(scr.display)
    # 1 + 20 repeats from column 5: the rest of row 3, wrapping onto row 4, no further.
    assert text.count("x") == 21 and scr.display[4].strip() == ""
    assert scr.display[2] == " " * 4 + "x" * 16 and scr.display[3] == "x" * 5 + " " * 15


@pytest.mark.parametrize("seed", range(40))
def test_a_resize_keeps_what_pytes_resize_keeps(seed):
    rng = random.Random(seed)
    ours, stream, theirs = twins(seed, (3, 9) if rng.random() < 0.5 else None)
    stream.feed("\x1b[5;20H")
    theirs.cursor.x, theirs.cursor.y = ours.cursor.x, ours.cursor.y
    lines, columns = rng.choice([12, 5, 20]), rng.choice([30, 1, 7, 29, 50])
    ours.resize(lines, columns)
    pyte.Screen.resize(theirs, lines, columns)
    assert (ours.lines, ours.columns, ours.margins) == (theirs.lines, theirs.columns, theirs.margins)
    assert screen.cells(ours) == screen.cells(theirs)
    assert {y: dict(line) for y, line in ours.buffer.items() if line} == \
        {y: dict(line) for y, line in theirs.buffer.items() if line}


@pytest.mark.parametrize("seed", range(60))
def test_drawing_in_insert_mode_does_what_pytes_per_character_draw_does(seed):
    # pyte shifts the line once per character under IRM: REP's line of characters cost a line
    # of steps each. The model shifts once per run of characters that stays within the line.
    rng = random.Random(seed)
    ours, stream, theirs = twins(seed)
    stream.feed("\x1b[4h")
    theirs.set_mode(pyte.modes.IRM)
    if rng.random() < 0.3:
        stream.feed("\x1b[?7l")  # no autowrap: the last column is overwritten
        theirs.reset_mode(pyte.modes.DECAWM >> 5, private=True)
    for _ in range(rng.randint(1, 4)):
        x, y = rng.randint(0, 30), rng.randint(0, 11)
        ours.cursor.x, ours.cursor.y = theirs.cursor.x, theirs.cursor.y = x, y
        data = "".join(rng.choice(["a", "b", "xyz", " ", "中", "\u0301", "\x00", "é"])
                       for _ in range(rng.randint(0, 40)))
        ours.draw(data)
        pyte.Screen.draw(theirs, data)
        assert screen.cells(ours) == screen.cells(theirs), repr(data)
        assert (ours.cursor.x, ours.cursor.y) == (theirs.cursor.x, theirs.cursor.y)


def test_rep_in_insert_mode_shifts_the_line_once():
    scr, stream = screen.new(1000, 5)
    stream.feed("y" * 999 + "\x1b[1;1H\x1b[4hx\x1b[9999b")
    row = lambda: "".join(c.data for c in screen.cells(scr)[0])  # noqa: E731
    assert row() == "x" * 1000
    calls = []
    shift = scr.insert_characters
    scr.insert_characters = lambda n=None: (calls.append(n), shift(n))
    stream.feed("\x1b[1;1Hz\x1b[9999b")
    # `z`, then 999 more in one shift; REP's last one wraps to the next line, and is pyte's.
    assert calls == [1, 999, 1] and row() == "z" * 1000


# -- a redraw, and the saved cursors after it ---------------------------------------------------

def _after_redraw(before_viewer: str, recording: str, then: str):
    """The model fed `recording`; a viewer's terminal in another state (`before_viewer`)
    redrawn from it; both fed `then`: (model, viewer)."""
    model, stream = screen.new(40, 10)
    stream.feed(recording)
    viewer, vstream = screen.new(40, 10)
    vstream.feed(before_viewer)
    vstream.feed(screen.render(screen.snapshot(model)))
    stream.feed(then)
    vstream.feed(then)
    return model, viewer


def test_leaving_the_alternate_screen_after_a_redraw_restores_the_main_screens_saved_cursor():
    # The redraw entered the alternate screen with 1049, which saves the cursor as it switches:
    # over the main screen's saved cursor it had just placed (here: line drawing in G0).
    model, viewer = _after_redraw("", "\x1b[3;7H\x1b(0\x1b[?1049hvim\x1b(B", "\x1b[?1049lqq")
    assert (viewer.cursor.x, viewer.cursor.y) == (model.cursor.x, model.cursor.y) == (8, 2)
    assert viewer.display[2] == model.display[2] == "      ──" + " " * 32


def test_a_restore_with_nothing_saved_after_a_redraw_goes_home_as_in_the_recording():
    # The viewer's terminal had a cursor saved before a seek; the recording has none saved at
    # the point sought to, and its restore goes home. The redraw left the viewer's slot as it was.
    model, viewer = _after_redraw("\x1b[5;9H\x1b7", "text", "\x1b8X")
    assert (viewer.cursor.x, viewer.cursor.y) == (model.cursor.x, model.cursor.y) == (1, 0)
    assert viewer.display[0] == model.display[0]


def test_a_redraw_keeps_a_wide_character_at_the_right_edge_whole():
    # The cursor after a wide character in the last two columns: the redraw wrote the last
    # column again to put it there, a space over the character's right half.
    model, viewer = _after_redraw("", "\x1b[1;39H\u4e2d", "")
    assert screen.cells(viewer)[0] == screen.cells(model)[0]
    assert (viewer.cursor.x, viewer.cursor.y) == (model.cursor.x, model.cursor.y) == (40, 0)


def test_a_redraw_of_a_wide_character_written_half_over_does_not_push_the_row_along():
    # pyte keeps the left half when the right one is written over; drawn as it is, the wide
    # character took both columns and the rest of the row came one column late.
    model, viewer = _after_redraw("", "\x1b[1;5H\u4e2d\x1b[1;6Hxyz", "")
    assert viewer.display[0][4:9] == " xyz "
    assert [model.buffer[0][x].data for x in range(4, 8)] == ["\u4e2d", "x", "y", "z"]
