"""Compact JSON text, written without the json package: `import json` brings re and enum with
it (~3 ms), and every PAM call and every session wrapper starts a Python that writes JSON (events,
the wire protocol's headers). Only string escaping comes from json's C half.

to_json(v) is byte for byte json.dumps(v, separators=(",", ":"), ensure_ascii=False,
sort_keys=True) (tests/test_jsontext.py). This module imports nothing else of sshtrail but its
errors, so that the wrapper, which needs only this, does not load the event table with it.
"""
from __future__ import annotations

from _json import encode_basestring as quote

from .errors import SshtrailError


class NotJson(SshtrailError, ValueError):
    pass


def to_json(value, *, sort_keys: bool = True) -> str:
    """sort_keys=False: an outer object's keys in their own order (the wire protocol's headers);
    nested ones are sorted either way."""
    if sort_keys or not isinstance(value, dict):
        return _encode(value)
    return "{" + ",".join(quote(str(k)) + ":" + _encode(v) for k, v in value.items()) + "}"


def _encode(v) -> str:
    if isinstance(v, str):
        return quote(v)
    if v is True:
        return "true"
    if v is False:
        return "false"
    if v is None:
        return "null"
    if isinstance(v, int):
        return int.__repr__(v)
    if isinstance(v, float):
        if v != v or v in (float("inf"), float("-inf")):
            raise NotJson(f"{v!r} has no JSON form")
        return float.__repr__(v)
    if isinstance(v, dict):
        return "{" + ",".join(quote(str(k)) + ":" + _encode(v[k]) for k in sorted(v)) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_encode(x) for x in v) + "]"
    raise NotJson(f"a {type(v).__name__} ({v!r}) has no JSON form")
