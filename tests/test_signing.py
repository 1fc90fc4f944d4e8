"""sshtrail.signing with real keys: key files, CSRs, signatures and what an attacker can send."""
from __future__ import annotations

import base64
import datetime
import hashlib
import os
import stat
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from sshtrail import signing
from sshtrail.errors import SshtrailError


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _self_signed(key, cn="h1"):
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(0x1f2e3d)
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))


# -- key files -------------------------------------------------------------------------------
def test_save_key_is_0600_and_loads_back(tmp_path):
    key = signing.generate_key()
    path = tmp_path / "host.key"
    signing.save_key(key, path)
    assert _mode(path) == 0o600
    assert signing.public_key_der(signing.load_key(path)) == signing.public_key_der(key)
    assert isinstance(key.curve, ec.SECP256R1)
    assert os.listdir(tmp_path) == ["host.key"]  # no temporary file left


def test_save_key_is_never_readable_by_others_even_while_written(tmp_path):
    # Watch the directory while keys are written under a wide-open umask: every file that ever
    # appears there, temporary or final, must already be 0600.
    old_umask = os.umask(0)
    seen, stop = set(), threading.Event()

    def watch():
        while not stop.is_set():
            for name in os.listdir(tmp_path):
                try:
                    seen.add(_mode(tmp_path / name))
                except FileNotFoundError:
                    pass

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(50):
            signing.save_key(signing.generate_key(), tmp_path / "host.key")
    finally:
        stop.set()
        watcher.join()
        os.umask(old_umask)
    assert seen == {0o600}


def test_save_key_replaces_a_wider_file_with_a_0600_one(tmp_path):
    path = tmp_path / "host.key"
    path.write_text("old")
    os.chmod(path, 0o644)
    signing.save_key(signing.generate_key(), path)
    assert _mode(path) == 0o600


def test_load_key_missing_says_enroll(tmp_path):
    with pytest.raises(signing.SigningError, match="no private key at .*sshtrail enroll"):
        signing.load_key(tmp_path / "nope.key")
    assert issubclass(signing.SigningError, SshtrailError)


def test_load_key_not_a_key_does_not_quote_the_file(tmp_path):
    path = tmp_path / "host.key"
    path.write_text("-----BEGIN PRIVATE KEY-----\nSECRETSTUFF\n-----END PRIVATE KEY-----\n")
    os.chmod(path, 0o600)
    with pytest.raises(signing.SigningError) as e:
        signing.load_key(path)
    assert "not an unencrypted PEM private key" in str(e.value)
    assert "SECRETSTUFF" not in str(e.value)


def test_load_key_refuses_a_key_others_can_read(tmp_path):
    path = tmp_path / "host.key"
    signing.save_key(signing.generate_key(), path)
    os.chmod(path, 0o644)
    with pytest.raises(signing.SigningError, match="chmod 600"):
        signing.load_key(path)


def test_load_key_refuses_a_non_ecdsa_key(tmp_path):
    path = tmp_path / "host.key"
    signing.write_atomic(path, ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    with pytest.raises(signing.SigningError, match="not an ECDSA key"):
        signing.load_key(path)


def test_load_key_unreadable(tmp_path):
    if os.geteuid() == 0:
        # root reads any file; a directory in place of the file gives the same kind of OSError
        path = tmp_path / "host.key"
        path.mkdir()
    else:
        path = tmp_path / "host.key"
        signing.save_key(signing.generate_key(), path)
        os.chmod(path, 0)
    with pytest.raises(signing.SigningError, match="cannot read the private key"):
        signing.load_key(path)


# -- CSR -------------------------------------------------------------------------------------
def test_csr_carries_server_id_as_cn_and_is_self_signed():
    key = signing.generate_key()
    csr = x509.load_pem_x509_csr(signing.make_csr(key, "web-01.example").encode())
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "web-01.example"
    assert csr.is_signature_valid
    assert signing.public_key_der(csr.public_key()) == signing.public_key_der(key)


@pytest.mark.parametrize("bad", ["", "a/b", "../x", "x" * 129, "a b", "é", "a\n"])
def test_csr_refuses_bad_server_id(bad):
    with pytest.raises(signing.SigningError, match="not valid"):
        signing.make_csr(signing.generate_key(), bad)


# -- signatures ------------------------------------------------------------------------------
def test_sign_verify_round_trip_with_key_and_cert():
    key = signing.generate_key()
    data = b'{"seq":1}\n{"seq":2}\n'
    sig = signing.sign(key, data)
    base64.b64decode(sig, validate=True)
    assert signing.verify(key.public_key(), data, sig)
    assert signing.verify(_self_signed(key), data, sig)
    assert signing.verify(key.public_key(), data, sig.encode())


def test_verify_detects_a_flipped_byte_in_data():
    key = signing.generate_key()
    data = bytearray(b"some batch body\n")
    sig = signing.sign(key, bytes(data))
    for i in range(len(data)):
        changed = bytearray(data)
        changed[i] ^= 0x01
        assert not signing.verify(key.public_key(), bytes(changed), sig)


def test_verify_detects_a_flipped_byte_in_signature():
    key = signing.generate_key()
    data = b"body"
    raw = base64.b64decode(signing.sign(key, data))
    for i in range(len(raw)):
        changed = bytearray(raw)
        changed[i] ^= 0x80
        assert not signing.verify(key.public_key(), data, base64.b64encode(changed).decode())


def test_verify_with_the_wrong_key_is_false():
    data = b"body"
    sig = signing.sign(signing.generate_key(), data)
    assert not signing.verify(signing.generate_key().public_key(), data, sig)


@pytest.mark.parametrize("garbage", [
    "", "not base64!!", "====", "AAAA", "é", "A" * 10_000, None, 12, b"\xff\xfe", "QUJD\n",
    base64.b64encode(b"\x30\x06\x02\x01\x01\x02\x01\x01").decode(),
])
def test_verify_never_raises_on_garbage(garbage):
    assert signing.verify(signing.generate_key().public_key(), b"body", garbage) is False


def test_verify_never_raises_on_a_non_ecdsa_key_or_odd_data():
    key = signing.generate_key()
    sig = signing.sign(key, b"body")
    assert signing.verify(ed25519.Ed25519PrivateKey.generate().public_key(), b"body", sig) is False
    assert signing.verify(None, b"body", sig) is False
    assert signing.verify(key.public_key(), "body", sig) is False
    assert signing.verify(key.public_key(), None, sig) is False


# -- certificates ----------------------------------------------------------------------------
def test_cert_helpers():
    key = signing.generate_key()
    cert = _self_signed(key, cn="db-7")
    pem = signing.cert_pem(cert)
    der = cert.public_bytes(serialization.Encoding.DER)
    assert signing.load_cert(pem) == cert
    assert signing.load_cert(pem.encode()) == cert
    assert signing.load_cert(der) == cert
    assert signing.cert_server_id(cert) == "db-7"
    assert signing.cert_serial_hex(cert) == "1f2e3d"
    assert abs(signing.cert_not_after(cert) - signing.cert_not_before(cert) - 86400) < 1
    assert signing.fingerprint(cert) == hashlib.sha256(der).hexdigest()
    assert signing.cert_issued_by(cert, cert)
    assert not signing.cert_issued_by(cert, _self_signed(signing.generate_key(), cn="db-7"))


@pytest.mark.parametrize("bad", ["", "hello", b"\x30\x03\x02\x01\x01",
                                 "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"])
def test_load_cert_refuses_garbage(bad):
    with pytest.raises(signing.SigningError, match="not an X.509 certificate"):
        signing.load_cert(bad)


def test_split_token():
    fp = "ab" * 32
    assert signing.split_token(f"{'s' * 32}.{fp}") == ("s" * 32, fp)
    assert signing.split_token(f" {'s' * 32}.{fp}\n") == ("s" * 32, fp)
    assert signing.split_token("s" * 32) == ("s" * 32, None)
    for bad in ["", "short.x", f"{'s' * 32}.{fp[:-1]}", f"{'s' * 32}.{fp.upper()}",
                f"{'s' * 32}.{fp}.x", f"s*s{'s' * 32}", None]:
        with pytest.raises(signing.SigningError, match="malformed|not text") as e:
            signing.split_token(bad)
        assert "s" * 16 not in str(e.value)
