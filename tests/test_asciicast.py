"""asciicast v2: test vectors of the writer, the strict reader's rejections, and interop with
Debian's asciinema (the reference reader and recorder)."""
import io
import random
import shutil

import pytest

from ttyrun import run_on_a_tty

from sshtrail.asciicast import AsciicastError, Writer, read
from sshtrail.errors import SshtrailError


def _record(frames, **header):
    """Bytes of a recording of `frames` [(t, code, data)], default header 80x24."""
    buf = io.BytesIO()
    with Writer(buf, **{"width": 80, "height": 24, **header}) as w:
        for t, code, data in frames:
            w.write(t, code, data)
    return buf.getvalue()


def _events(data):
    header, events = read(io.BytesIO(data))
    return list(events)


# --- writer: test vectors -----------------------------------------------------------------------

def test_vector_full_header_and_every_code():
    got = _record(
        [(0.248848, "o", b"\x1b[1;31mHello \x1b[32mWorld!\x1b[0m\r\n"),
         (1, "o", b"caf\xc3\xa9 \xe2\x82\xac \"q\" \\ \x07\t\x7f\r\n"),
         (1.5, "m", "chapter 1"),
         (2.0000004, "r", "100x30"),
         (3.1, "i", b"exit\r"),
         (3.1000009, "o", b"bye")],
        timestamp=1504467315, command="/bin/bash", title="Démo",
        env={"SHELL": "/bin/bash", "TERM": "xterm-256color"})
    # Raw UTF-8 (ensure_ascii=False, as asciinema writes), control characters escaped, DEL
    # too (what termfilter does not show raw is never written raw); times in fixed notation,
    # at most 6 decimals.
    expected = (
        '{"version": 2, "width": 80, "height": 24, "timestamp": 1504467315, '
        '"command": "/bin/bash", "title": "Démo", '
        '"env": {"SHELL": "/bin/bash", "TERM": "xterm-256color"}}\n'
        r'[0.248848, "o", "\u001b[1;31mHello \u001b[32mWorld!\u001b[0m\r\n"]' "\n"
        '[1.0, "o", "café € \\"q\\" \\\\ \\u0007\\t\\u007f\\r\\n"]\n'
        '[1.5, "m", "chapter 1"]\n'
        '[2.0, "r", "100x30"]\n'
        r'[3.1, "i", "exit\r"]' "\n"
        '[3.100001, "o", "bye"]\n'
    )
    assert got == expected.encode("utf-8")


def test_vector_minimal_header():
    assert _record([]) == b'{"version": 2, "width": 80, "height": 24}\n'


@pytest.mark.parametrize("t, text", [
    (0, "0.0"), (0.000001, "0.000001"), (0.0000004, "0.0"), (12.3, "12.3"),
    (12.000003, "12.000003"), (1234.5678901, "1234.56789"), (86400.5, "86400.5"),
])
def test_vector_time_format(t, text):
    # Never repr()'s "1e-06": fixed notation, trailing zeros cut, always a dot.
    line = _record([(t, "o", b"x")]).splitlines()[1]
    assert line == f'[{text}, "o", "x"]'.encode()


def test_split_utf8_character_comes_out_whole_once():
    data = _record([(1.0, "o", b"caf\xc3"), (2.0, "o", b"\xa9!")])
    assert data.splitlines()[1:] == ['[1.0, "o", "caf"]'.encode(), '[2.0, "o", "é!"]'.encode()]
    assert _events(data) == [(1.0, "o", "caf"), (2.0, "o", "é!")]


def test_frame_holding_only_part_of_a_character_writes_no_event():
    # 😀 = f0 9f 98 80 over four frames: one event, at the time of the frame completing it.
    frames = [(1.0, "o", b"\xf0"), (2.0, "o", b"\x9f"), (3.0, "o", b"\x98"), (4.0, "o", b"\x80")]
    assert _events(_record(frames)) == [(4.0, "o", "😀")]


def test_output_and_input_have_separate_decoders():
    # Input arriving between two halves of an output character must neither take the held
    # output byte nor give it up early.
    frames = [(1.0, "o", b"\xc3"), (1.5, "i", b"\xe2\x82"), (2.0, "o", b"\xa9"),
              (2.5, "i", b"\xac")]
    assert _events(_record(frames)) == [(2.0, "o", "é"), (2.5, "i", "€")]


def test_str_data_goes_through_the_decoder_in_order():
    # A str cannot complete a byte held from the previous frame, but that byte must come out
    # before it (as U+FFFD), neither lost nor after it.
    frames = [(1.0, "o", b"ab\xc3"), (2.0, "o", "é")]
    assert _events(_record(frames)) == [(1.0, "o", "ab"), (2.0, "o", "\ufffdé")]


def test_invalid_bytes_become_replacement_characters():
    events = _events(_record([(1.0, "o", b"ok\xff\xfe end \xc3("), (2.0, "i", b"\x80")]))
    assert events == [(1.0, "o", "ok\ufffd\ufffd end \ufffd("), (2.0, "i", "\ufffd")]


def test_close_flushes_unfinished_character_at_last_time():
    data = _record([(1.0, "o", b"x\xe2\x82"), (2.0, "r", "90x30"), (3.0, "i", b"y\xc3")])
    assert _events(data) == [(1.0, "o", "x"), (2.0, "r", "90x30"), (3.0, "i", "y"),
                             (3.0, "o", "\ufffd"), (3.0, "i", "\ufffd")]


@pytest.mark.parametrize("seed", range(20))
def test_arbitrary_frame_cuts_lose_and_duplicate_nothing(seed):
    rng = random.Random(seed)
    stream = ("héllo wörld € 😀 ✓ \x1b[1;32mok\x1b[0m\r\n".encode() * 3
              + b"\xff\xc3(\xe2\x82 end \xf0\x9f")  # invalid and truncated sequences too
    cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(1, 25)))
    pieces = [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])]
    events = _events(_record([(i / 10, "o", p) for i, p in enumerate(pieces)]))
    assert "".join(d for _, _, d in events) == stream.decode("utf-8", errors="replace")


def test_round_trip():
    frames = [(0.1, "o", "$ ls\r\n"), (0.5, "i", "ls\r"), (0.5, "o", "a  b  ñ\r\n"),
              (1.25, "m", ""), (2.0, "r", "132x43"), (2.75, "o", "\x1b[2J")]
    header_fields = {"timestamp": 1700000000, "command": "/bin/sh -l", "title": "t",
                     "env": {"SHELL": "/bin/sh", "TERM": "xterm"}}
    header, events = read(io.BytesIO(_record(frames, **header_fields)))
    assert header == {"version": 2, "width": 80, "height": 24, **header_fields}
    assert list(events) == frames


@pytest.mark.parametrize("t, code, data, fragment", [
    (0.5, "o", b"x", "before the previous event"),
    (-1.0, "o", b"x", ">= 0"),
    (float("nan"), "o", b"x", "finite"),
    (True, "o", b"x", "finite number"),
    (2.0, "r", "80 x 24", "COLSxROWS"),
    (2.0, "r", "0x24", "COLSxROWS"),
    (2.0, "r", b"80x24", "COLSxROWS"),
    (2.0, "m", b"label", "marker data"),
    (2.0, "o", 42, "bytes or str"),
    (2.0, "x", "?", "unknown event code"),
])
def test_writer_rejects_caller_bugs_and_writes_nothing(t, code, data, fragment):
    buf = io.BytesIO()
    w = Writer(buf, width=80, height=24)
    w.write(1.0, "o", b"a")
    before = buf.getvalue()
    with pytest.raises(ValueError, match=fragment):
        w.write(t, code, data)
    assert buf.getvalue() == before


def test_writer_rejects_bad_header_and_write_after_close():
    for kwargs in ({"width": 0, "height": 24}, {"width": 80, "height": True},
                   {"width": 80, "height": 24, "timestamp": 1.5},
                   {"width": 80, "height": 24, "env": {"TERM": None}}):
        with pytest.raises(ValueError):
            Writer(io.BytesIO(), **kwargs)
    w = Writer(io.BytesIO(), width=80, height=24)
    w.close()
    w.close()  # twice is harmless
    with pytest.raises(ValueError, match="closed"):
        w.write(1.0, "o", b"x")


# --- reader: accepted input ---------------------------------------------------------------------

HEADER = b'{"version": 2, "width": 80, "height": 24}\n'


def test_reader_accepts_trailing_blank_lines_and_missing_final_newline():
    assert _events(HEADER + b'[1, "o", "a"]\n\n  \n') == [(1.0, "o", "a")]
    assert _events(HEADER + b'[1, "o", "a"]') == [(1.0, "o", "a")]
    assert _events(HEADER) == []


def test_reader_accepts_asciinema_2_header_with_nulls_and_unknown_keys():
    # asciinema 2.x writes "env": {"SHELL": null} when SHELL is unset; "theme" is optional v2.
    header_line = (b'{"version": 2, "width": 80, "height": 24, "timestamp": 1504467315, '
                   b'"idle_time_limit": 2.5, "title": null, '
                   b'"env": {"SHELL": null, "TERM": "xterm"}, "theme": {"fg": "#d0d0d0"}}\n')
    header, events = read(io.BytesIO(header_line + b'[0.5, "m", ""]\n'))
    assert header["env"] == {"SHELL": None, "TERM": "xterm"} and header["theme"]["fg"] == "#d0d0d0"
    assert list(events) == [(0.5, "m", "")]


def test_reader_accepts_text_lines_and_returns_float_times():
    header, events = read(io.StringIO(HEADER.decode() + '[0, "o", "é"]\n[0, "r", "1x1"]\n'))
    events = list(events)
    assert events == [(0.0, "o", "é"), (0.0, "r", "1x1")]
    assert all(type(t) is float for t, _, _ in events)


def test_reader_yields_good_events_before_the_bad_line():
    header, events = read(io.BytesIO(HEADER + b'[1, "o", "a"]\n[2, "o", 3]\n'))
    assert next(events) == (1.0, "o", "a")
    with pytest.raises(AsciicastError, match=r"^line 3: "):
        next(events)


# --- reader: every rejection names the line -----------------------------------------------------

def _ev(*lines):
    return HEADER + b"".join(line + b"\n" for line in lines)


REJECTED = [
    # header
    ("empty file", b"", 1, "missing header"),
    ("blank header", b"\n" + b'[1, "o", "a"]\n', 1, "missing header"),
    ("header not JSON", b"{version: 2}\n", 1, "invalid JSON"),
    ("header not UTF-8", b'{"version": 2, "width": 80, "height": 24, "title": "\xff"}\n', 1,
     "not UTF-8"),
    ("header array", b"[2, 80, 24]\n", 1, "not a JSON object"),
    ("header null", b"null\n", 1, "not a JSON object"),
    ("no version", b'{"width": 80, "height": 24}\n', 1, "no version"),
    ("version 1", b'{"version": 1, "width": 80, "height": 24}\n', 1, "version is 1"),
    ("version 3", b'{"version": 3, "term": {"cols": 80, "rows": 24}}\n', 1, "version is 3"),
    ("version string", b'{"version": "2", "width": 80, "height": 24}\n', 1, "version is '2'"),
    ("version float", b'{"version": 2.0, "width": 80, "height": 24}\n', 1, "version is 2.0"),
    ("no width", b'{"version": 2, "height": 24}\n', 1, "no width"),
    ("no height", b'{"version": 2, "width": 80}\n', 1, "no height"),
    ("width zero", b'{"version": 2, "width": 0, "height": 24}\n', 1, "width must be a positive"),
    ("width negative", b'{"version": 2, "width": -80, "height": 24}\n', 1, "width must be"),
    ("width string", b'{"version": 2, "width": "80", "height": 24}\n', 1, "width must be"),
    ("width float", b'{"version": 2, "width": 80.5, "height": 24}\n', 1, "width must be"),
    ("width bool", b'{"version": 2, "width": true, "height": 24}\n', 1, "width must be"),
    ("height null", b'{"version": 2, "width": 80, "height": null}\n', 1, "height must be"),
    ("timestamp string", b'{"version": 2, "width": 80, "height": 24, "timestamp": "now"}\n', 1,
     "timestamp must be a number"),
    # json reads 1e400 as inf, and a 400-digit integer as an int no float holds
    ("timestamp 1e400", b'{"version": 2, "width": 80, "height": 24, "timestamp": 1e400}\n', 1,
     "timestamp is out of range (not a finite number)"),
    ("timestamp -1e400", b'{"version": 2, "width": 80, "height": 24, "timestamp": -1e400}\n',
     1, "timestamp is out of range"),
    ("duration 1e400", b'{"version": 2, "width": 80, "height": 24, "duration": 1e400}\n', 1,
     "duration is out of range"),
    ("idle_time_limit 1e400",
     b'{"version": 2, "width": 80, "height": 24, "idle_time_limit": 1e400}\n', 1,
     "idle_time_limit is out of range"),
    ("timestamp huge int",
     b'{"version": 2, "width": 80, "height": 24, "timestamp": 1' + b"0" * 400 + b'}\n', 1,
     "timestamp is out of range"),
    ("env not object", b'{"version": 2, "width": 80, "height": 24, "env": "TERM=xterm"}\n', 1,
     "env must be"),
    # events
    ("event not JSON", _ev(b'[1, "o", "a"', ), 2, "invalid JSON"),
    ("event not UTF-8", _ev(b'[1, "o", "\xff"]'), 2, "not UTF-8"),
    ("event object", _ev(b'[1, "o", "a"]', b'{"t": 1}'), 3, "not a JSON array but an object"),
    ("event null", _ev(b"null"), 2, "not a JSON array but null"),
    ("event string", _ev(b'"o"'), 2, "not a JSON array but a string"),
    ("two elements", _ev(b'[1, "o"]'), 2, "has 2 elements, expected 3"),
    ("four elements", _ev(b'[1, "o", "a", "b"]'), 2, "has 4 elements, expected 3"),
    ("time string", _ev(b'["1.0", "o", "a"]'), 2, "time must be a number"),
    ("time bool", _ev(b'[true, "o", "a"]'), 2, "time must be a number"),
    ("time null", _ev(b'[null, "o", "a"]'), 2, "time must be a number"),
    ("time NaN", _ev(b'[NaN, "o", "a"]'), 2, "NaN"),
    ("time Infinity", _ev(b'[Infinity, "o", "a"]'), 2, "Infinity"),
    ("time 1e400", _ev(b'[1, "o", "a"]', b'[1e400, "o", "b"]'), 3,
     "time is out of range (not a finite number)"),
    ("time huge int", _ev(b'[1' + b"0" * 400 + b', "o", "a"]'), 2, "time is out of range"),
    ("time negative", _ev(b'[-0.5, "o", "a"]'), 2, "negative"),
    ("time decreasing", _ev(b'[1, "o", "a"]', b'[2.5, "o", "b"]', b'[2.4, "o", "c"]'), 4,
     "time 2.4 is before the previous event's time 2.5"),
    ("unknown code", _ev(b'[1, "x", "a"]'), 2, "unknown event code 'x'"),
    ("long code", _ev(b'[1, "output", "a"]'), 2, "unknown event code 'output'"),
    ("numeric code", _ev(b'[1, 1, "a"]'), 2, "unknown event code 1"),
    ("data number", _ev(b'[1, "o", 42]'), 2, "data of a 'o' event must be a string"),
    ("data null", _ev(b'[1, "i", null]'), 2, "must be a string"),
    ("data array", _ev(b'[1, "m", ["a"]]'), 2, "must be a string"),
    ("resize no rows", _ev(b'[1, "r", "80x"]'), 2, "resize data '80x' is not COLSxROWS"),
    ("resize spaces", _ev(b'[1, "r", "80 x 24"]'), 2, "not COLSxROWS"),
    ("resize capital X", _ev(b'[1, "r", "80X24"]'), 2, "not COLSxROWS"),
    ("resize trailing", _ev(b'[1, "r", "80x24 "]'), 2, "not COLSxROWS"),
    ("resize zero", _ev(b'[1, "r", "0x24"]'), 2, "not COLSxROWS"),
    ("resize non-ASCII digits", _ev('[1, "r", "٨٠x24"]'.encode()), 2, "not COLSxROWS"),
    ("resize number", _ev(b'[1, "r", 80]'), 2, "must be a string"),
    ("blank line between events", _ev(b'[1, "o", "a"]', b"", b'[2, "o", "b"]'), 3,
     "blank line between events"),
]


@pytest.mark.parametrize("data, lineno, fragment", [r[1:] for r in REJECTED],
                         ids=[r[0] for r in REJECTED])
def test_reader_rejects(data, lineno, fragment):
    with pytest.raises(AsciicastError) as exc:
        header, events = read(io.BytesIO(data))
        list(events)
    message = str(exc.value)
    assert message.startswith(f"line {lineno}: "), message
    assert fragment in message, message
    assert isinstance(exc.value, SshtrailError)  # the CLI prints it instead of a traceback


# --- interop with Debian's asciinema ------------------------------------------------------------

needs_asciinema = pytest.mark.skipif(
    shutil.which("asciinema") is None,
    reason="asciinema not on PATH (Debian package 'asciinema'): it is the reference reader")


@needs_asciinema
def test_asciinema_cat_prints_exactly_the_output_stream(tmp_path):
    output = [b"\x1b[1;31mred\x1b[0m \x1b[38;5;82mgreen\x1b[0m\r\n", b"caf\xc3", b"\xa9 na\xc3",
              b"\xafve \xe2\x9c", b"\x93 \xf0\x9f\x98", b"\x80 \xe6\x97\xa5\xe6\x9c\xac\r\n",
              b"tab\there \"quoted\" back\\slash\x07\r\n"]
    frames = [(0.1 * i, "o", chunk) for i, chunk in enumerate(output)]
    # Not output: must not reach `cat`'s stdout.
    frames[3:3] = [(0.3, "r", "100x30"), (0.3, "i", b"secret\r"), (0.3, "m", "here")]
    path = tmp_path / "demo.cast"
    path.write_bytes(_record(frames, env={"SHELL": "/bin/bash", "TERM": "xterm-256color"}))

    result = run_on_a_tty(["asciinema", "cat", str(path)], cwd=tmp_path)

    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout == b"".join(output)


@needs_asciinema
def test_strict_reader_accepts_what_asciinema_rec_writes(tmp_path):
    script = r"printf '\033[31m\303\251t\303\251\033[0m\n'; sleep 0.1; printf 'done\n'"
    result = run_on_a_tty(["asciinema", "rec", "-q", "-c", script, "rec.cast"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr.decode(errors="replace")

    with open(tmp_path / "rec.cast", "rb") as f:
        header, events = read(f)
        events = list(events)
    assert (header["version"], header["width"], header["height"]) == (2, 80, 24)
    # The pty turns \n into \r\n.
    assert "".join(d for _, c, d in events if c == "o") == "\x1b[31mété\x1b[0m\r\ndone\r\n"


# What xterm and VTE act on in UTF-8 (U+009D starts an OSC, U+009B a CSI), and what hides in a
# line (bidi override, zero-width space, line separator): written escaped, read back the same.
HOSTILE = ["\u009d52;c;aGVsbG8=\u009c C1 OSC\r\n", "\u009b31mred \u202e reversed\r\n",
           "zero\u200bwidth \u2028 \ufeff del\x7f\r\n"]


def test_c1_bidi_and_invisible_characters_are_escaped_and_read_back_the_same():
    data = _record([(0.1 * i, "o", text) for i, text in enumerate(HOSTILE)],
                   command="vim \u009d0;pwned\u0007 x", title="al\u009b31mice s1")
    for raw in ("\u009d", "\u009b", "\u009c", "\u202e", "\u200b", "\u2028", "\ufeff", "\x7f"):
        assert raw.encode() not in data
    assert b"\\u009d52;c;" in data and b"\\u202e" in data
    header, events = read(io.BytesIO(data))
    assert header["command"] == "vim \u009d0;pwned\u0007 x"
    assert header["title"] == "al\u009b31mice s1"
    assert [d for _, _, d in events] == HOSTILE


@needs_asciinema
def test_asciinema_cat_reads_the_escaped_characters(tmp_path):
    path = tmp_path / "c1.cast"
    path.write_bytes(_record([(0.1 * i, "o", text) for i, text in enumerate(HOSTILE)]))
    result = run_on_a_tty(["asciinema", "cat", str(path)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout == "".join(HOSTILE).encode()
