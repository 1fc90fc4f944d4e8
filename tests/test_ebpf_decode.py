"""ebpf/decode.py on records laid out as probes.c writes them (no BPF needed): the vectors are
built from the ctypes mirror of `struct connect_event`, with the port as the sockaddr holds it
(network byte order) and the address's 16 bytes."""
import ctypes as ct
import socket

from ebpf import decode


def record(kind: int, ret: int, family: int, port: int, addr: bytes) -> bytes:
    e = decode.ConnectEvent()
    e.h.ts_ns, e.h.ret, e.h.kind, e.h.key, e.h.pid, e.h.ppid = 2_000_000_000, ret, kind, 7, 41, 40
    e.h.comm = b"sshd"
    e.family = family
    e.port = int.from_bytes(port.to_bytes(2, "big"), "little")  # as read from the sockaddr
    ct.memmove(e.addr, addr.ljust(16, b"\0"), 16)
    return bytes(e)


def test_a_connects_outcome_decodes_to_established_or_not():
    d = decode.Decoder(time_offset=1_700_000_000.0)
    ok = d.decode(record(decode.EV_CONNECTED, 0, decode.AF_INET, 22, bytes([10, 0, 0, 5])))
    assert ok == {"kind": "connected", "key": 7, "pid": 41, "ppid": 40, "comm": "sshd",
                  "time": 1_700_000_002.0, "ret": 0, "family": 4, "dst_addr": "10.0.0.5",
                  "dst_port": 22, "established": True}
    v6 = socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    failed = d.decode(record(decode.EV_CONNECTED, -1, decode.AF_INET6, 8443, v6))
    assert (failed["dst_addr"], failed["dst_port"], failed["established"]) == (
        "2001:db8::1", 8443, False)


def test_a_connect_and_a_listen_keep_their_own_kinds():
    d = decode.Decoder(time_offset=0.0)
    c = d.decode(record(decode.EV_CONNECT, -115, decode.AF_INET, 443, bytes([127, 0, 0, 1])))
    assert c["kind"] == "connect" and c["ret"] == -115 and "established" not in c
    listen = d.decode(record(decode.EV_LISTEN, 0, decode.AF_INET, 2222, bytes(4)))
    assert (listen["kind"], listen["addr"], listen["port"]) == ("listen", "0.0.0.0", 2222)
