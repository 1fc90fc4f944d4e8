"""Test vectors for the event model: codes, uid ordering, time format, strict validation."""
import json

import pytest

from sshtrail import events


def full(kind, **fields):
    ev = events.new(kind, **fields)
    ev.update(server_id="host-1", server_hostname="host-1.example")
    return ev


def test_uid_is_uuid7_and_sorts_by_time():
    a = events.new_uid(1_700_000_000_000_000_000)
    b = events.new_uid(1_700_000_000_001_000_000)
    assert a[14] == "7" and a[19] in "89ab"  # version 7, RFC 9562 variant
    assert a < b
    assert len({events.new_uid() for _ in range(10_000)}) == 10_000


@pytest.mark.parametrize("epoch,text", [
    (0, "1970-01-01T00:00:00.000000Z"),
    (1_764_000_000.123456, "2025-11-24T16:00:00.123456Z"),
    (1.9999999, "1970-01-01T00:00:02.000000Z"),
])
def test_time_vectors(epoch, text):
    assert events.format_time(epoch) == text
    assert events.parse_time(text) == pytest.approx(round(epoch, 6))


def test_login_failure_gets_warning_code_and_needs_error():
    ev = full("user.login", login="alice", success=False, method="password", error="bad_password")
    assert ev["code"] == "T1000W"
    events.validate(ev)
    del ev["error"]
    with pytest.raises(events.EventError, match="^error: required"):
        events.validate(ev)


def test_json_round_trip():
    ev = full("session.start", sid="s1", login="alice", **{"addr.remote": "127.0.0.1:22"})
    assert events.from_json(events.to_json(ev)) == ev


@pytest.mark.parametrize("mutate,message", [
    (lambda e: e.update(event="user.logon"), r"^event: unknown type 'user.logon'"),
    (lambda e: e.pop("login"), r"^login: required field missing"),
    (lambda e: e.pop("server_id"), r"^server_id: required field missing"),
    (lambda e: e.update(success="yes"), r"^success: expected bool"),
    (lambda e: e.update(time="yesterday"), r"^time: 'yesterday' is not RFC 3339"),
    (lambda e: e.update(code="T2000I"), r"^code: 'T2000I' does not match user.login"),
    (lambda e: e.update(sid=7), r"^sid: expected str"),
])
def test_validation_names_the_field(mutate, message):
    ev = full("user.login", login="alice", success=True, method="publickey")
    mutate(ev)
    with pytest.raises(events.EventError, match=message):
        events.validate(ev)


def test_int_fields_refuse_bools():
    ev = full("ebpf.lost", count=True)
    with pytest.raises(events.EventError, match="count: expected int"):
        events.validate(ev)


def test_unknown_type_refused_at_creation():
    with pytest.raises(events.EventError, match="unknown type"):
        events.new("login.ok")


def test_from_json_rejects_garbage():
    with pytest.raises(events.EventError, match="not valid JSON"):
        events.from_json("{")
    with pytest.raises(events.EventError, match="expected a JSON object"):
        events.from_json(json.dumps([1]))


def test_parse_time_agrees_with_calendar_across_dates():
    import calendar
    import random
    rnd = random.Random(7)
    for _ in range(2000):
        t = rnd.randrange(-2_000_000_000, 8_000_000_000) + rnd.randrange(1_000_000) / 1e6
        assert events.parse_time(events.format_time(t)) == pytest.approx(round(t, 6), abs=1e-6)
    assert events.parse_time("2024-02-29T00:00:00Z") == calendar.timegm((2024, 2, 29, 0, 0, 0))
    for bad in ("2023-02-29T00:00:00Z", "2024-13-01T00:00:00Z", "2024-01-01T24:00:00Z",
                "2024-01-01T00:00:00", "2024-01-01T00:00:00.abcZ", "2024-01-01 00:00:00Z",
                # Unicode digits int() would take; before and after the day is cached.
                "２０２４-01-01T00:00:00.000000Z", "2024-01-01T0１:00:00.000000Z",
                "2024-01-01T00:00:00.00000１Z", "2024-01-01T24:00:00.000000Z",
                "2024-01-01T00:00:00.000000z"):
        events.parse_time("2024-01-01T00:00:00.000000Z")  # the day in the fast path's cache
        with pytest.raises(events.EventError):
            events.parse_time(bad)
