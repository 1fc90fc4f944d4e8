"""Compact JSON text, written without the json package: `import json` brings re and enum with
it (~3 ms), and every PAM call and every session wrapper starts a Python that writes JSON (events,
the wire protocol's headers). Only string escaping comes from json's C half.

to_json(v) is json.dumps(v, separators=(",", ":"), ensure_ascii=False, sort_keys=True), byte
for byte, except that what `escape_unshown` escapes is written as \\uXXXX (tests/test_jsontext.py).
This module imports nothing else of sshtrail but its errors (and, for the rare text that needs
it, termfilter's table), so that the wrapper, which needs only this, does not load the event
table with it.

Whatever sshtrail writes as JSON may end up on an auditor's terminal (`sshtrail events --json`,
an export to stdout), and its strings come from the session and the network: it must never hold
a character that the terminal acts on or that hides in the text.
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
        return escape_unshown(_encode(value))
    return escape_unshown(
        "{" + ",".join(quote(str(k)) + ":" + _encode(v) for k, v in value.items()) + "}")


def escape_unshown(text: str) -> str:
    """A JSON text with each character that termfilter does not show raw (sshtrail.termfilter.
    field: DEL and the C1 controls, bidi controls, zero-width and invisible characters, line
    separators, lone surrogates) written as a \\uXXXX escape: still the same JSON value.

    xterm and VTE act on C1 controls even in UTF-8 (U+009D starts an OSC, U+009B a CSI), which
    JSON, escaping only C0, would let through raw. Such characters can only stand inside a
    string, where a raw character and its escape mean the same, so the whole text is rewritten
    at once."""
    if text.isascii():
        # The usual case, and O(1): JSON has escaped the C0 controls already, DEL is left.
        return text if "\x7f" not in text else text.replace("\x7f", "\\u007f")
    if text.isprintable():
        # Every character termfilter calls unshown is non-printable to str.isprintable (all of
        # Unicode is checked in tests/test_jsontext.py): a text that passes holds none, and the
        # check is a C loop, several times faster than the regular expression.
        return text
    from .termfilter import _UNSHOWN  # imports re: only for the rare text that gets here
    return _UNSHOWN.sub(_u_escape, text)


def _u_escape(m) -> str:
    return f"\\u{ord(m.group()):04x}"


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
