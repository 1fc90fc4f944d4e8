import json

import pytest

from sshtrail import jsontext, termfilter


def dumps(value) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True)


@pytest.mark.parametrize("value", [
    {"login": "al\u00e9 \"q\" \\ \x01 \u00a0 \U0001F600 \ue0b0", "success": False,
     "attempts": 3, "ratio": 0.1, "none": None, "addr.remote": "[::1]:22", "big": 2 ** 70,
     "neg": -2},
    {"argv": ["a", "", "b c"], "nested": {"z": [1, 2.5, True], "a": {}}, "t": (1, "x")},
    "just a string\n", 1e-7, 123456789.125, [], {},
])
def test_to_json_is_exactly_json_dumps(value):
    assert jsontext.to_json(value) == dumps(value)


# What xterm and VTE act on in UTF-8 (U+009D OSC, U+009B CSI, U+0090 DCS), and what prints
# nothing yet changes how the line reads (bidi override, zero-width, line separator, BOM),
# and a lone surrogate, which no terminal encoding can print.
UNSHOWN = "\x7f\x85\x90\x9b\x9c\x9d\x9f\u00ad\u061c\u200b\u200f\u2028\u2029\u202e\u2066\ufeff\ud800"


@pytest.mark.parametrize("value", [
    {"login": "al\u009b31mice", "command": "vim \u009d0;pwned\u0007 x"},
    {"argv": ["rm", "x #\u202e", "caf\u00e9 \u2028"]}, ["\x7f"], "\udce9",
    {"k\u009d": "v"}, UNSHOWN, "é" + UNSHOWN,
])
def test_what_would_act_on_a_terminal_or_hide_is_escaped(value):
    text = jsontext.to_json(value)
    assert termfilter._UNSHOWN.search(text) is None
    text.encode("utf-8")  # lone surrogates too: always valid UTF-8
    assert json.loads(text) == json.loads(dumps(value))  # the same JSON value
    assert termfilter._UNSHOWN.search(jsontext.to_json(value, sort_keys=False)) is None


def test_escapes_are_json_u_escapes():
    assert jsontext.to_json("a\u009db\u202ec\x7f") == '"a\\u009db\\u202ec\\u007f"'
    assert jsontext.to_json({"é": "\ud800"}) == '{"é":"\\ud800"}'


def test_every_unshown_character_fails_the_fast_check():
    # escape_unshown lets a text that str.isprintable() accepts through unsearched: that is
    # only right while every character termfilter calls unshown is non-printable to Python.
    for code in range(0x110000):
        c = chr(code)
        if termfilter._UNSHOWN.match(c):
            assert not c.isprintable(), hex(code)
            assert termfilter._UNSHOWN.search(jsontext.to_json("é" + c)) is None, hex(code)


def test_outer_keys_in_their_own_order():
    header = {"type": "hello", "mode": "x", "nested": {"b": 1, "a": 2}}
    assert jsontext.to_json(header, sort_keys=False) == \
        '{"type":"hello","mode":"x","nested":{"a":2,"b":1}}'


@pytest.mark.parametrize("value", [float("nan"), float("inf"), object(), b"bytes", {1.5}])
def test_what_json_cannot_say_is_refused(value):
    with pytest.raises(jsontext.NotJson, match="no JSON form"):
        jsontext.to_json({"x": value})
