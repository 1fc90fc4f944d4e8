"""Test vectors for the wrapper-agent protocol and the frame encoding."""
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
