"""collector.ca with real keys and the real SQLite store; sshtrail.enroll against a small TLS
server on 127.0.0.1 that answers as the collector does."""
from __future__ import annotations

import datetime
import http.server
import ipaddress
import json
import os
import shutil
import ssl
import stat
import subprocess
import threading
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from collector import ca as ca_mod
from pki import issue_for_test
from sshtrail import enroll as host_enroll
from sshtrail import signing
from sshtrail.errors import SshtrailError


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki") / "ca"
    ca_mod.init(d, ["localhost", "127.0.0.1", "::1"])
    return d


@pytest.fixture(scope="module")
def ca(ca_dir):
    return ca_mod.CA(ca_dir)


@pytest.fixture
def store(tmp_path):
    from collector.store_sqlite import SqliteStore
    s = SqliteStore(str(tmp_path / "collector.db"))
    yield s
    s.close()


# -- init ------------------------------------------------------------------------------------
def test_init_makes_private_files_and_returns_the_fingerprint(tmp_path):
    d = tmp_path / "ca"
    fp = ca_mod.init(d, ["127.0.0.1", "collector.example"])
    assert _mode(d) == 0o700
    assert sorted(os.listdir(d)) == ["ca.crt", "ca.key", "server.crt", "server.key"]
    assert _mode(d / "ca.key") == 0o600 and _mode(d / "server.key") == 0o600
    assert fp == signing.fingerprint(signing.load_cert((d / "ca.crt").read_bytes()))
    assert ca_mod.CA(d).fingerprint == fp


def test_ca_certificate_is_a_ten_year_ca_that_signs_certificates_only(ca):
    cert = ca.cert
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and not ku.digital_signature
    years = (signing.cert_not_after(cert) - time.time()) / (365.25 * 86400)
    assert 9.9 < years < 10.1
    assert signing.cert_issued_by(cert, cert)


def test_server_certificate_names_ip_and_dns_and_is_for_servers(ca_dir, ca):
    cert = signing.load_cert((ca_dir / "server.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert ipaddress.ip_address("::1") in san.get_values_for_type(x509.IPAddress)
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert signing.cert_issued_by(cert, ca.cert)
    key = signing.load_key(ca_dir / "server.key")
    assert signing.public_key_der(key) == signing.public_key_der(cert)


def test_init_refuses_to_replace_a_ca_unless_forced(tmp_path):
    d = tmp_path / "ca"
    fp = ca_mod.init(d, ["127.0.0.1"])
    before = (d / "ca.key").read_bytes()
    with pytest.raises(ca_mod.CAError, match="a CA already exists .*--force"):
        ca_mod.init(d, ["127.0.0.1"])
    assert (d / "ca.key").read_bytes() == before
    assert ca_mod.init(d, ["127.0.0.1"], force=True) != fp
    assert issubclass(ca_mod.CAError, SshtrailError)


@pytest.mark.parametrize("names", [[], ["has space"], ["https://x"]])
def test_init_refuses_bad_names_and_writes_nothing(tmp_path, names):
    with pytest.raises(ca_mod.CAError, match="name"):
        ca_mod.init(tmp_path / "ca", names)
    assert not (tmp_path / "ca").exists()


def test_ca_without_init_says_run_init(tmp_path):
    with pytest.raises(ca_mod.CAError, match="sshtrail collector init"):
        ca_mod.CA(tmp_path)


# -- sign_csr --------------------------------------------------------------------------------
def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    b = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(b)]) + b


def _der_items(der: bytes) -> list[bytes]:
    """The encoded elements inside a DER SEQUENCE."""
    assert der[0] == 0x30
    i = 1
    if der[i] & 0x80:
        n = der[i] & 0x7F
        i += 1 + n
    else:
        i += 1
    items = []
    while i < len(der):
        start = i
        i += 1
        if der[i] & 0x80:
            n = der[i] & 0x7F
            length = int.from_bytes(der[i + 1:i + 1 + n], "big")
            i += 1 + n
        else:
            length = der[i]
            i += 1
        i += length
        items.append(der[start:i])
    return items


def _csr_signed_by_another_key(server_id: str) -> str:
    """A CSR carrying one key but signed by another: what someone without the key would send."""
    carried, signer = signing.generate_key(), signing.generate_key()
    der = x509.load_pem_x509_csr(signing.make_csr(carried, server_id).encode()).public_bytes(
        serialization.Encoding.DER)
    info, alg, _sig = _der_items(der)
    sig = signer.sign(info, ec.ECDSA(hashes.SHA256()))
    bitstring = b"\x03" + _der_len(len(sig) + 1) + b"\x00" + sig
    body = info + alg + bitstring
    forged = b"\x30" + _der_len(len(body)) + body
    csr = x509.load_der_x509_csr(forged)  # well-formed, only its signature is wrong
    assert signing.public_key_der(csr.public_key()) == signing.public_key_der(carried)
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def test_sign_csr_issues_a_client_certificate(ca):
    key = signing.generate_key()
    pem = ca.sign_csr(signing.make_csr(key, "web-01"), "web-01", 30)
    cert = signing.load_cert(pem)
    assert signing.cert_server_id(cert) == "web-01"
    assert signing.public_key_der(cert) == signing.public_key_der(key)
    assert signing.cert_issued_by(cert, ca.cert)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    now = time.time()
    assert now - 90 < signing.cert_not_before(cert) < now - 30   # a minute back
    assert abs(signing.cert_not_after(cert) - (now + 30 * 86400)) < 60
    assert cert.serial_number != signing.load_cert(
        ca.sign_csr(signing.make_csr(key, "web-01"), "web-01", 30)).serial_number


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_issued_certificate_verifies_with_openssl_as_a_tls_client(ca, ca_dir, tmp_path):
    key = signing.generate_key()
    (tmp_path / "host.crt").write_text(ca.sign_csr(signing.make_csr(key, "h"), "h", 1))
    out = subprocess.run(["openssl", "verify", "-CAfile", str(ca_dir / "ca.crt"), "-purpose",
                          "sslclient", str(tmp_path / "host.crt")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    out = subprocess.run(["openssl", "verify", "-CAfile", str(ca_dir / "ca.crt"), "-purpose",
                          "sslserver", str(ca_dir / "server.crt")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_sign_csr_refuses_a_csr_signed_by_another_key(ca):
    with pytest.raises(ca_mod.CAError, match="not signed by the key it carries"):
        ca.sign_csr(_csr_signed_by_another_key("web-01"), "web-01", 30)


def test_sign_csr_refuses_another_cn(ca):
    with pytest.raises(ca_mod.CAError, match="for 'web-01', not 'web-02'"):
        ca.sign_csr(signing.make_csr(signing.generate_key(), "web-01"), "web-02", 30)


@pytest.mark.parametrize("bad", ["", "../etc", "a/b", "x" * 129, "tab\there", "é"])
def test_sign_csr_refuses_bad_server_ids(ca, bad):
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, bad or "x")])).sign(
        signing.generate_key(), hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(ca_mod.CAError, match="is not valid"):
        ca.sign_csr(csr, bad, 30)


def test_sign_csr_refuses_garbage_and_non_ecdsa_keys(ca):
    with pytest.raises(ca_mod.CAError, match="not a PEM CSR"):
        ca.sign_csr("hello", "h", 30)
    ed = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "h")])).sign(
        ed25519.Ed25519PrivateKey.generate(), None).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(ca_mod.CAError, match="not for an ECDSA key"):
        ca.sign_csr(ed, "h", 30)
    with pytest.raises(ca_mod.CAError, match="lifetime"):
        ca.sign_csr(signing.make_csr(signing.generate_key(), "h"), "h", 0)


def test_issue_for_test_makes_expired_certificates(ca):
    key = signing.generate_key()
    now = time.time()
    pem = issue_for_test(ca, key, "old", not_before=now - 7200, not_after=now - 3600)
    cert = signing.load_cert(pem)
    assert signing.cert_not_after(cert) == pytest.approx(now - 3600, abs=1)
    assert signing.cert_issued_by(cert, ca.cert)
    assert signing.cert_server_id(cert) == "old"


# -- enrollment tokens -----------------------------------------------------------------------
def _enroll(store, ca, token, server_id="web-01", key=None, **kw):
    key = key or signing.generate_key()
    return ca_mod.enroll(store, ca, token, signing.make_csr(key, server_id), days=30, **kw)


def test_token_carries_the_ca_fingerprint_and_only_its_hash_is_stored(store, ca, tmp_path):
    token = ca_mod.issue_token(store, ca, 60)
    secret, fp = signing.split_token(token)
    assert fp == ca.fingerprint and len(secret) == 34 and secret.startswith("st")  # "st": never an option-like "-"
    store.close()
    # nothing in the database file holds the secret itself
    for name in os.listdir(tmp_path):
        assert secret.encode() not in (tmp_path / name).read_bytes()


def test_enroll_issues_and_records_the_host(store, ca):
    key = signing.generate_key()
    cert_pem, server_id = _enroll(store, ca, ca_mod.issue_token(store, ca, 60), key=key)
    cert = signing.load_cert(cert_pem)
    assert server_id == "web-01" == signing.cert_server_id(cert)
    host = store.host("web-01")
    assert host.cert_serial == signing.cert_serial_hex(cert)
    assert host.cert_pem == cert_pem and not host.revoked
    assert host.not_after == pytest.approx(signing.cert_not_after(cert))
    assert ca_mod.peer_allowed(store, cert) == (True, "web-01", "ok")


def test_enroll_takes_a_bare_secret_too(store, ca):
    secret, _ = signing.split_token(ca_mod.issue_token(store, ca, 60))
    assert _enroll(store, ca, secret)[1] == "web-01"


def test_token_is_single_use(store, ca):
    token = ca_mod.issue_token(store, ca, 60)
    _enroll(store, ca, token, "a")
    with pytest.raises(ca_mod.EnrollError, match="unknown, used or expired.*enroll-token") as e:
        _enroll(store, ca, token, "b")
    assert e.value.status == 403
    assert store.host("b") is None


def test_token_expires(store, ca):
    token = ca_mod.issue_token(store, ca, 60, now=1000.0)
    with pytest.raises(ca_mod.EnrollError, match="unknown, used or expired"):
        _enroll(store, ca, token, now=1061.0)


def test_unknown_and_malformed_tokens(store, ca):
    with pytest.raises(ca_mod.EnrollError, match="unknown, used or expired"):
        _enroll(store, ca, "x" * 32 + "." + ca.fingerprint)
    with pytest.raises(ca_mod.EnrollError, match="malformed") as e:
        _enroll(store, ca, "not a token")
    assert e.value.status == 400 and "not a token" not in str(e.value)
    with pytest.raises(ca_mod.EnrollError, match="another collector's CA"):
        _enroll(store, ca, "x" * 32 + "." + "0" * 64)


def test_a_garbled_csr_does_not_burn_the_token(store, ca):
    token = ca_mod.issue_token(store, ca, 60)
    with pytest.raises(ca_mod.EnrollError, match="not signed by the key it carries") as e:
        ca_mod.enroll(store, ca, token, _csr_signed_by_another_key("web-01"), days=30)
    assert e.value.status == 400
    assert _enroll(store, ca, token)[1] == "web-01"


def test_bound_token_only_for_its_server_id(store, ca):
    token = ca_mod.issue_token(store, ca, 60, server_id="db-1")
    with pytest.raises(ca_mod.EnrollError, match="token is for server_id 'db-1'"):
        _enroll(store, ca, token, "web-01")
    assert store.host("web-01") is None
    # the refused attempt spent it: a bound token is not a guessing oracle for its name
    with pytest.raises(ca_mod.EnrollError, match="unknown, used or expired"):
        _enroll(store, ca, token, "db-1")
    assert _enroll(store, ca, ca_mod.issue_token(store, ca, 60, server_id="db-1"), "db-1")[1] \
        == "db-1"


def test_already_enrolled_is_refused_until_revoked(store, ca):
    first, _ = _enroll(store, ca, ca_mod.issue_token(store, ca, 60))
    with pytest.raises(ca_mod.EnrollError,
                       match=r"already enrolled; revoke it first with `sshtrail collector "
                             r"revoke web-01`") as e:
        _enroll(store, ca, ca_mod.issue_token(store, ca, 60))
    assert e.value.status == 409
    assert store.host("web-01").cert_pem == first
    assert store.revoke("web-01")
    second, _ = _enroll(store, ca, ca_mod.issue_token(store, ca, 60))
    host = store.host("web-01")
    assert not host.revoked and host.cert_pem == second != first


def test_issue_token_validates(store, ca):
    with pytest.raises(ca_mod.CAError, match="not valid"):
        ca_mod.issue_token(store, ca, 60, server_id="../x")
    with pytest.raises(ca_mod.CAError, match="positive"):
        ca_mod.issue_token(store, ca, 0)


# -- readers ---------------------------------------------------------------------------------
def test_reader_tokens(store):
    token = ca_mod.issue_reader_token(store, "alice")
    assert ca_mod.check_reader(store, token) == "alice"
    for bad in ["", token[:-1], token + "x", None, 7, "x" * 10_000]:
        assert ca_mod.check_reader(store, bad) is None
    with pytest.raises(ca_mod.CAError, match="reader name"):
        ca_mod.issue_reader_token(store, "")


# -- peer_allowed ----------------------------------------------------------------------------
def test_peer_allowed_refuses_unknown_revoked_and_superseded(store, ca):
    stranger = issue_for_test(ca, signing.generate_key(), "stranger",
                              not_before=time.time() - 60, not_after=time.time() + 3600)
    ok, sid, reason = ca_mod.peer_allowed(store, stranger)
    assert (ok, sid) == (False, "stranger") and "not enrolled" in reason

    old_pem, _ = _enroll(store, ca, ca_mod.issue_token(store, ca, 60))
    assert ca_mod.peer_allowed(store, old_pem)[0]
    store.revoke("web-01")
    ok, sid, reason = ca_mod.peer_allowed(store, old_pem)
    assert (ok, sid) == (False, "web-01") and "revoked" in reason

    new_pem, _ = _enroll(store, ca, ca_mod.issue_token(store, ca, 60))
    ok, sid, reason = ca_mod.peer_allowed(store, old_pem)
    assert not ok and "superseded" in reason
    assert ca_mod.peer_allowed(store, new_pem) == (True, "web-01", "ok")
    der = signing.load_cert(new_pem).public_bytes(serialization.Encoding.DER)
    assert ca_mod.peer_allowed(store, der)[0]


def test_peer_allowed_refuses_expired_and_missing_certificates(store, ca):
    key = signing.generate_key()
    now = time.time()
    pem = issue_for_test(ca, key, "old", not_before=now - 7200, not_after=now - 3600)
    cert = signing.load_cert(pem)
    store.put_host("old", signing.cert_serial_hex(cert), pem, signing.cert_not_after(cert), now)
    ok, _, reason = ca_mod.peer_allowed(store, pem)
    assert not ok and "expired" in reason
    assert ca_mod.peer_allowed(store, None)[0] is False
    assert ca_mod.peer_allowed(store, "garbage")[0] is False


def test_peer_allowed_refuses_a_copy_with_the_same_serial_and_cn(store, ca):
    # What a peer could present were TLS misconfigured: its own self-made certificate with the
    # host's public CN and serial.
    pem, _ = _enroll(store, ca, ca_mod.issue_token(store, ca, 60))
    real = signing.load_cert(pem)
    k = signing.generate_key()
    now = datetime.datetime.now(datetime.timezone.utc)
    fake = (x509.CertificateBuilder().subject_name(real.subject).issuer_name(real.issuer)
            .public_key(k.public_key()).serial_number(real.serial_number)
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(k, hashes.SHA256()))
    ok, _, reason = ca_mod.peer_allowed(store, fake)
    assert not ok and "not the one issued" in reason


# -- the host side, against a small TLS server answering as the collector ----------------------
class _Collector(http.server.BaseHTTPRequestHandler):
    ca = store = None

    def log_message(self, *args):
        pass

    def _answer(self, status, body, ctype="application/json"):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/v1/ca":
            self._answer(200, self.ca.cert_pem, "application/x-pem-file")
        else:
            self._answer(404, json.dumps({"error": "not found"}))

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        try:
            cert_pem, _ = ca_mod.enroll(self.store, self.ca, req["token"], req["csr"], days=30)
        except ca_mod.EnrollError as e:
            self._answer(e.status, json.dumps({"error": str(e)}))
            return
        self._answer(200, json.dumps({"certificate": cert_pem}))


@pytest.fixture
def collector(ca, ca_dir, store):
    handler = type("Handler", (_Collector,), {"ca": ca, "store": store})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(ca_dir / "server.crt", ca_dir / "server.key")
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_host_enrolls_and_keeps_key_cert_and_ca(collector, store, ca, tmp_path):
    ident = tmp_path / "identity"
    token = ca_mod.issue_token(store, ca, 60)
    result = host_enroll.enroll(collector, token, "web-01", ident)
    assert _mode(ident) == 0o700
    assert sorted(os.listdir(ident)) == sorted([host_enroll.HOST_KEY, host_enroll.HOST_CERT,
                                                host_enroll.CA_CERT, host_enroll.URL_FILE])
    assert _mode(ident / "host.key") == 0o600 and _mode(ident / "host.crt") == 0o600
    key = signing.load_key(ident / "host.key")
    cert = signing.load_cert((ident / "host.crt").read_bytes())
    assert signing.public_key_der(cert) == signing.public_key_der(key)
    assert (ident / "ca.crt").read_text() == ca.cert_pem
    assert result == {"server_id": "web-01", "not_after": signing.cert_not_after(cert),
                      "fingerprint": signing.fingerprint(cert), "ca_fingerprint": ca.fingerprint}
    assert store.host("web-01").cert_serial == signing.cert_serial_hex(cert)

    # enrolling again (after a revoke) keeps the host's key
    store.revoke("web-01")
    host_enroll.enroll(collector, ca_mod.issue_token(store, ca, 60), "web-01", ident)
    assert signing.public_key_der(signing.load_key(ident / "host.key")) \
        == signing.public_key_der(key)
    assert (ident / "host.crt").read_bytes() != signing.cert_pem(cert).encode()


def test_host_refuses_a_collector_whose_ca_is_not_the_tokens(collector, ca, tmp_path):
    other = ca_mod.init(tmp_path / "other-ca", ["127.0.0.1"])
    ident = tmp_path / "identity"
    token = "s" * 32 + "." + other
    with pytest.raises(host_enroll.EnrollError) as e:
        host_enroll.enroll(collector, token, "web-01", ident)
    msg = str(e.value)
    assert other in msg and ca.fingerprint in msg
    assert "nothing was written" in msg and "s" * 32 not in msg
    assert not ident.exists()


def test_host_shows_the_collectors_refusal_without_the_token(collector, store, ca, tmp_path):
    token = ca_mod.issue_token(store, ca, 60)
    host_enroll.enroll(collector, token, "web-01", tmp_path / "a")
    with pytest.raises(host_enroll.EnrollError, match=r"HTTP 403.*unknown, used or expired") as e:
        host_enroll.enroll(collector, token, "web-02", tmp_path / "b")
    assert token.partition(".")[0] not in str(e.value)
    assert not (tmp_path / "b" / "host.crt").exists()
    assert not (tmp_path / "b" / "host.key").exists()


def test_host_refuses_plain_http_and_tokens_without_fingerprint(tmp_path):
    with pytest.raises(host_enroll.EnrollError, match="https://"):
        host_enroll.enroll("http://127.0.0.1:1", "s" * 32 + "." + "0" * 64, "h", tmp_path / "i")
    with pytest.raises(host_enroll.EnrollError, match="no CA fingerprint"):
        host_enroll.enroll("https://127.0.0.1:1", "s" * 32, "h", tmp_path / "i")
    assert not (tmp_path / "i").exists()
