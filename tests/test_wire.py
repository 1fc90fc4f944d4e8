"""Test vectors for the wrapper-agent protocol and the frame encoding."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sshtrail import wire


def test_message_vector():
    assert wire.pack({"type": "ack", "seq": 3}) == b'\x00\x00\x00\x17{"type":"ack","seq":3}\n'
    assert wire.pack({"type": "x"}, b"\xff\x00") == b'\x00\x00\x00\x0f{"type":"x"}\n\xff\x00'


def test_reader_reassembles_split_messages():
    data = wire.pack({"type": "a"}, b"one") + wire.pack({"type": "b"}, b"\n\ntwo\n")
    r = wire.Reader()
    got = []
    for i in range(len(data)):
        got += r.feed(data[i:i + 1])
    assert got == [({"type": "a"}, b"one"), ({"type": "b"}, b"\n\ntwo\n")]


@pytest.mark.parametrize("data,message", [
    (b"\xff\xff\xff\xff", "over the"),
    (b"\x00\x00\x00\x03abc", "not a JSON object with a type"),
    (b"\x00\x00\x00\x03[]\n", "not a JSON object with a type"),
    (b"\x00\x00\x00\x0c{\"type\": 1}\n", "not a JSON object with a type"),
])
def test_reader_rejects_garbage(data, message):
    with pytest.raises(wire.ProtocolError, match=message):
        wire.Reader().feed(data)


def message(head: bytes) -> bytes:
    return len(head + b"\n").to_bytes(4, "big") + head + b"\n"


@pytest.mark.parametrize("head", [
    b'{"type":"x","v":NaN}', b'{"type":"x","v":Infinity}', b'{"type":"x"} {}',
    b'{"type":"x",}', b'{"type":"x"', b"\xff{}", b"[" * 100_000 + b"]" * 100_000,
    # json takes a lone surrogate, which no store and no terminal can; a surrogate pair is fine
    b'{"type":"hello","command":"caf\\udce9"}', b'{"type":"x","v":["\\uD800"]}',
])
def test_reader_rejects_headers_json_would_not_take_or_we_do_not(head):
    with pytest.raises(wire.ProtocolError, match="not a JSON object with a type"):
        wire.Reader().feed(message(head))


def test_headers_read_as_json_reads_them():
    for head in (b' {"type": "hello", "n": -1.5e3, "ok": true, "no": null, "l": [1, "\\u00e9"]}\t',
                 b'{"type":"x","v":"\\ud83d\\ude00 \\\\udce9"}',
                 '{"type":"ré","big":123456789012345678901234567890}'.encode()):
        [(header, payload)] = wire.Reader().feed(message(head))
        assert header == json.loads(head) and payload == b""
    # and what pack writes, json reads back as it was
    hello = {"type": "hello", "command": "vim é\n", "cols": 80, "late": None}
    [(header, _)] = wire.Reader().feed(wire.pack(hello))
    assert header == hello == json.loads(wire.pack(hello)[4:-1])


def test_the_wrapper_starts_without_the_json_package():
    # Every session pays for what the wrapper imports: json (with re) was 9 ms of it, the
    # enum wrappers of signal.py and socket.py 5 ms more, ctypes (for prctl) 4.5 ms.
    root = Path(__file__).resolve().parent.parent
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import session_wrapper.session, "
            "session_wrapper.agent_client, session_wrapper.pty_relay, session_wrapper.passthrough, "
            "sshtrail.config; session_wrapper.session.make_undumpable(); print(sorted(m for m in "
            "('json', 're', 'enum', 'signal', 'socket', 'ctypes') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(root)], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"


def test_frames_vector_and_round_trip():
    frames = [(0.0, b"o", b"hi\r\n"), (0.5, b"r", b"100x30"), (1.25, b"o", b"\xc3")]
    blob = wire.pack_frames(frames)
    assert blob[:13] == b"\x00\x00\x00\x00\x00\x00\x00\x00o\x00\x00\x00\x04"
    assert wire.unpack_frames(blob) == frames


@pytest.mark.parametrize("blob,message", [
    (b"\x00" * 5, "truncated frame header"),
    (b"\x00" * 8 + b"x" + b"\x00\x00\x00\x00", "unknown frame kind"),
    (b"\x00" * 8 + b"o" + b"\x00\x00\x00\x09abc", "claims 9 bytes, 3 left"),
    (b"\xbf\xf0" + b"\x00" * 6 + b"o" + b"\x00" * 4, "has time -1.0"),
    # Not finite: no export can write it (asciicast times are finite), no player reach it.
    (wire.FRAME.pack(float("inf"), b"o", 0), "has time inf"),
    (wire.FRAME.pack(float("-inf"), b"o", 0), "has time -inf"),
    (wire.FRAME.pack(float("nan"), b"o", 0), "has time nan"),
])
def test_bad_frames(blob, message):
    with pytest.raises(wire.ProtocolError, match=message):
        wire.unpack_frames(blob)


def test_output_size_checks_without_copying():
    blob = wire.pack_frames([(0.0, b"o", b"hi\r\n"), (0.5, b"r", b"100x30"), (1.25, b"o", b"\xc3")])
    assert wire.output_size(memoryview(blob)) == 5
    for bad, message in [(b"\x00" * 5, "truncated frame header"),
                         (b"\x00" * 8 + b"o" + b"\x00\x00\x00\x09abc", "claims 9 bytes, 3 left")]:
        with pytest.raises(wire.ProtocolError, match=message):
            wire.output_size(bad)


def test_reader_receives_from_a_socket_messages_bigger_than_its_buffer():
    import socket
    a, b = socket.socketpair()
    big = bytes(range(256)) * 1000
    data = wire.pack({"type": "a"}, big) + wire.pack({"type": "b"}, b"x")
    r = wire.Reader(1024)
    got = []
    with a, b:
        for i in range(0, len(data), 7000):
            a.sendall(data[i:i + 7000])
            got += r.recv_from(b)
        a.close()
        assert r.recv_from(b) is None
    assert got == [({"type": "a"}, big), ({"type": "b"}, b"x")]
