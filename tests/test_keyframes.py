"""Keyframes (sshtrail/keyframes.py): what they hold, however much output a recording has, and
that a seek from them lands on the screen a straight replay shows."""
import random

from sshtrail import screen
from sshtrail.keyframes import Frame, Keyframes, apply


def cat_of_a_log(cols: int, nbytes: int, frame: int = 4096) -> list[Frame]:
    """`cat` of a big log: full lines scrolling by, a new pyte Char for every cell, in pty-sized
    reads."""
    rng = random.Random(1)
    text = "".join("".join(rng.choice("abcdefghij ") for _ in range(cols - 1)) + "\r\n"
                   for _ in range(nbytes // cols + 1))
    return [Frame(i / 100, "o", text[at:at + frame]) for i, at in
            enumerate(range(0, len(text), frame))]


def held(k: Keyframes) -> int:
    return sum(len(line) for s in k.snapshots
               for buffer in (s.buffer, s.hidden_buffer or {}) for line in buffer.values())


def test_keyframes_of_a_big_cat_in_a_wide_terminal_hold_a_bounded_number_of_cells():
    # 1.5 MiB at 250x80: every 16 KiB, 96 screens of 20,000 cells (1.9M, ~300 MiB). The bound
    # is keyframes.MAX_CELLS (~160 MiB at most, a cell ~150 bytes once only keyframes hold it).
    frames = cat_of_a_log(250, 3 << 19)
    k = Keyframes(frames, 250, 80)
    k.build()
    assert held(k) <= 1 << 20
    # Thinned, still spread evenly: a seek replays at most twice the unthinned 16 KiB.
    ends = k.positions[1:] + [len(frames)]
    replay = max(sum(len(f.data) for f in frames[a:b - 1]) for a, b in zip(k.positions, ends))
    assert replay <= 32 << 10
    assert len(k.positions) > 20

    rng = random.Random(2)
    # Seeks just before a keyframe replay the most; the others anywhere.
    points = sorted({*(b - 1 for b in rng.sample(ends, 4)), *rng.sample(range(len(frames)), 4)})
    straight, stream = screen.new(250, 80)
    done = 0
    for i in points:
        for f in frames[done:i]:
            apply(straight, stream, f)
        done = i
        seeked = k.state_at(i)[0]
        assert screen.cells(seeked) == screen.cells(straight), f"at frame {i}"
        assert (seeked.cursor.x, seeked.cursor.y) == (straight.cursor.x, straight.cursor.y)


def test_a_screen_larger_than_the_bound_keeps_only_the_start():
    # Past max_cells with one keyframe besides the start: seeks replay from the start, as they
    # would without keyframes, and memory stays bounded.
    frames = cat_of_a_log(80, 64 << 10)
    k = Keyframes(frames, 80, 24, max_cells=1000)
    k.build()
    assert k.positions == [0] and held(k) == 0
    straight, stream = screen.new(80, 24)
    for f in frames:
        apply(straight, stream, f)
    assert screen.cells(k.state_at(len(frames))[0]) == screen.cells(straight)
