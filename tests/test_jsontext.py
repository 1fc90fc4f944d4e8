import json

import pytest

from sshtrail import jsontext


def dumps(value) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True)


@pytest.mark.parametrize("value", [
    {"login": "al\u00e9 \"q\" \\ \x01 \u2028 \U0001F600", "success": False, "attempts": 3,
     "ratio": 0.1, "none": None, "addr.remote": "[::1]:22", "big": 2 ** 70, "neg": -2},
    {"argv": ["a", "", "b c"], "nested": {"z": [1, 2.5, True], "a": {}}, "t": (1, "x")},
    "just a string\n", 1e-7, 123456789.125, [], {},
])
def test_to_json_is_exactly_json_dumps(value):
    assert jsontext.to_json(value) == dumps(value)


def test_outer_keys_in_their_own_order():
    header = {"type": "hello", "mode": "x", "nested": {"b": 1, "a": 2}}
    assert jsontext.to_json(header, sort_keys=False) == \
        '{"type":"hello","mode":"x","nested":{"a":2,"b":1}}'


@pytest.mark.parametrize("value", [float("nan"), float("inf"), object(), b"bytes", {1.5}])
def test_what_json_cannot_say_is_refused(value):
    with pytest.raises(jsontext.NotJson, match="no JSON form"):
        jsontext.to_json({"x": value})
