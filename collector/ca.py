"""The collector's certificate authority: who may upload, and as which host.

`init` makes the CA and the collector's own server certificate once. Hosts enroll with a
single-use token an operator issued (`issue_token`): they send a CSR for a key they made
themselves, and get back a client certificate whose CN is their server_id. `peer_allowed` then
decides, per request, whether the certificate TLS accepted is still this host's current one.
Auditors read with bearer tokens (`issue_reader_token`).

Must never: store or log a token secret (the store keeps sha256 of it only), log key material,
copy extensions a CSR asks for into a certificate (only what `issue_cert` sets is issued), or
issue a certificate for a server_id that could name a path outside the collector's directory.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sshtrail import signing
from sshtrail.errors import SshtrailError
from sshtrail.sha import sha256

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
SERVER_KEY = "server.key"
SERVER_CERT = "server.crt"
CA_DAYS = 3650
# No command renews the server certificate yet, and every host pins the CA (not the server
# certificate): it lives as long as the CA, and `init --force` replaces both.
SERVER_DAYS = CA_DAYS
# Clocks of hosts and collector differ a little; a certificate valid only from this very second
# would be refused by a host whose clock is behind.
BACKDATE = datetime.timedelta(minutes=1)
MAX_CSR_BYTES = 16 << 10
TOKEN_USED_MESSAGE = ("token is unknown, used or expired: issue a new one with "
                      "`sshtrail collector enroll-token`")


class CAError(SshtrailError):
    """The CA cannot be made, loaded or cannot issue what was asked; the message says why."""


class EnrollError(CAError):
    """An enrollment refused; `status` is the HTTP status to answer with (400 bad request,
    403 token not accepted, 409 host already enrolled)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _hash_secret(secret: str) -> str:
    return sha256(secret.encode()).hexdigest()


def _now_dt(now: float | None) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(time.time() if now is None else now,
                                           tz=datetime.timezone.utc)


def check_server_id(server_id) -> str:
    if not signing.is_server_id(server_id):
        raise CAError(f"server_id {server_id!r} is not valid: 1-128 characters of "
                      "A-Z a-z 0-9 . _ - (it becomes a directory name and a label)")
    return server_id


# -- making the CA ---------------------------------------------------------------------------
def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sshtrail"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    if not names:
        raise CAError("the server certificate needs at least one name: the host names and "
                      "addresses hosts reach the collector by (collector.names)")
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
            continue
        except ValueError:
            pass
        if not name or not name.isascii() or any(c.isspace() or c in "/:@" for c in name):
            raise CAError(f"{name!r} is neither an IP address nor a DNS name: list the names "
                          "hosts reach the collector by (collector.names)")
        entries.append(x509.DNSName(name.lower()))
    return x509.SubjectAlternativeName(entries)


def _make_ca(now: datetime.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = signing.generate_key()
    # A random suffix tells two CAs apart in error messages and `openssl x509 -text`.
    name = _name(f"sshtrail collector CA {secrets.token_hex(4)}")
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(ca_key, ca_cert: x509.Certificate, public_key, subject: x509.Name,
          not_before: datetime.datetime, not_after: datetime.datetime,
          usage: x509.ObjectIdentifier, san: x509.SubjectAlternativeName | None = None
          ) -> x509.Certificate:
    """An end-entity certificate; the only place certificate contents are decided."""
    builder = (x509.CertificateBuilder()
               .subject_name(subject).issuer_name(ca_cert.subject)
               .public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(not_before).not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key),
                              critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca_cert.public_key()), critical=False))
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _cert_bytes(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def init(directory: str | os.PathLike, names: list[str], *, force: bool = False) -> str:
    """Make the CA and the collector's server certificate in `directory`; the CA's fingerprint.

    Refuses when a CA is there already, unless `force`: replacing it invalidates every host's
    certificate, so every host must enroll again."""
    directory = os.fspath(directory)
    existing = [n for n in (CA_KEY, CA_CERT) if os.path.exists(os.path.join(directory, n))]
    if existing and not force:
        raise CAError(f"a CA already exists in {directory} ({', '.join(existing)}): every "
                      "enrolled host trusts it. Keep it (nothing to do), or replace it with "
                      "`sshtrail collector init --force` (every host must then enroll again)")
    san = _san(list(names))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    # makedirs' mode is cut by the umask, and an existing directory keeps its own: this one
    # holds the CA key.
    os.chmod(directory, 0o700)
    now = _now_dt(None)
    ca_key, ca_cert = _make_ca(now)
    server_key = signing.generate_key()
    server_cert = _leaf(ca_key, ca_cert, server_key.public_key(), _name(names[0]),
                        now - BACKDATE, now + datetime.timedelta(days=SERVER_DAYS),
                        ExtendedKeyUsageOID.SERVER_AUTH, san)
    # The CA files last: a crash before them leaves no CA, so running init again just works.
    signing.save_key(server_key, os.path.join(directory, SERVER_KEY))
    signing.write_atomic(os.path.join(directory, SERVER_CERT), _cert_bytes(server_cert), 0o644)
    signing.save_key(ca_key, os.path.join(directory, CA_KEY))
    signing.write_atomic(os.path.join(directory, CA_CERT), _cert_bytes(ca_cert), 0o644)
    return signing.fingerprint(ca_cert)


# -- using the CA ----------------------------------------------------------------------------
class CA:
    """A CA made by `init`, loaded from its directory."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        missing = [n for n in (CA_KEY, CA_CERT)
                   if not os.path.exists(os.path.join(self.directory, n))]
        if missing:
            raise CAError(f"no CA in {self.directory} ({', '.join(missing)} missing): run "
                          "`sshtrail collector init` first")
        try:
            self.key = signing.load_key(os.path.join(self.directory, CA_KEY))
            self.cert = signing.load_cert_file(os.path.join(self.directory, CA_CERT))
        except signing.SigningError as e:
            raise CAError(f"cannot load the CA in {self.directory}: {e}") from None
        if signing.public_key_der(self.key) != signing.public_key_der(self.cert):
            raise CAError(f"{CA_KEY} and {CA_CERT} in {self.directory} do not belong together: "
                          "restore them from a backup, or `sshtrail collector init --force`")
        self.fingerprint = signing.fingerprint(self.cert)
        self.cert_pem = signing.cert_pem(self.cert)
        self.server_key_path = os.path.join(self.directory, SERVER_KEY)
        self.server_cert_path = os.path.join(self.directory, SERVER_CERT)
        self.cert_path = os.path.join(self.directory, CA_CERT)

    def issue_cert(self, public_key, server_id: str, *, not_before: datetime.datetime,
                   not_after: datetime.datetime) -> x509.Certificate:
        """A client certificate for `server_id` and `public_key`. No proof of possession is
        checked here: callers facing the network use `sign_csr`."""
        check_server_id(server_id)
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            # Upload signatures are ECDSA (sshtrail.signing.verify accepts nothing else).
            raise CAError("the host key is not an ECDSA key: sshtrail hosts use ECDSA P-256 "
                          "(`sshtrail enroll` makes one)")
        return _leaf(self.key, self.cert, public_key,
                     x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_id)]),
                     not_before, not_after, ExtendedKeyUsageOID.CLIENT_AUTH)

    def sign_csr(self, csr_pem, server_id: str, days: int, *, now: float | None = None) -> str:
        """A PEM client certificate for the key in `csr_pem`, valid for `days`.

        The CSR must be signed by the key it carries (the host holds that key) and name
        `server_id` as its CN; only its public key is used, nothing else it asks for."""
        check_server_id(server_id)
        csr = parse_csr(csr_pem)
        cn = csr_server_id(csr)
        if cn != server_id:
            raise CAError(f"the request is for {cn!r}, not {server_id!r}")
        if not isinstance(days, int) or isinstance(days, bool) or not 1 <= days <= CA_DAYS:
            raise CAError(f"certificate lifetime {days!r} days: give 1 to {CA_DAYS}")
        start = _now_dt(now)
        # Never past the CA's own end: TLS would refuse such a certificate then anyway.
        ca_end = datetime.datetime.fromtimestamp(signing.cert_not_after(self.cert),
                                                 tz=datetime.timezone.utc)
        end = min(start + datetime.timedelta(days=days), ca_end)
        cert = self.issue_cert(csr.public_key(), server_id,
                               not_before=start - BACKDATE, not_after=end)
        return signing.cert_pem(cert)


def parse_csr(csr_pem) -> x509.CertificateSigningRequest:
    """A CSR whose own signature verifies (proof the sender holds its key), or CAError."""
    data = csr_pem.encode("ascii", "replace") if isinstance(csr_pem, str) else csr_pem
    if not isinstance(data, bytes) or len(data) > MAX_CSR_BYTES:
        raise CAError("the certificate request is not PEM text of a sensible size")
    try:
        csr = x509.load_pem_x509_csr(data)
    except (ValueError, TypeError):
        raise CAError("the certificate request is not a PEM CSR "
                      "(-----BEGIN CERTIFICATE REQUEST-----)") from None
    try:
        valid = csr.is_signature_valid
    except Exception:  # an unsupported key or algorithm: not a request we can check
        valid = False
    if not valid:
        raise CAError("the certificate request is not signed by the key it carries")
    if not isinstance(csr.public_key(), ec.EllipticCurvePublicKey):
        raise CAError("the certificate request is not for an ECDSA key: sshtrail hosts use "
                      "ECDSA P-256 (`sshtrail enroll` makes one)")
    return csr


def csr_server_id(csr: x509.CertificateSigningRequest) -> str:
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1:
        raise CAError("the certificate request must have exactly one CN: the host's server_id")
    return check_server_id(cns[0].value)


# -- enrollment ------------------------------------------------------------------------------
def issue_token(store, ca: CA, ttl: float, server_id: str | None = None, *,
                now: float | None = None) -> str:
    """A single-use enrollment token, valid `ttl` seconds, optionally only for `server_id`.

    The result is shown to the operator once; the store keeps sha256 of its secret only."""
    if server_id is not None:
        check_server_id(server_id)
    if not ttl > 0:
        raise CAError(f"token lifetime {ttl!r} seconds: give a positive number")
    now = time.time() if now is None else now
    secret = "st" + secrets.token_urlsafe(24)  # never starts with "-", which a CLI would take for an option
    store.add_enroll_token(_hash_secret(secret), now + ttl, server_id)
    return f"{secret}.{ca.fingerprint}"


def enroll(store, ca: CA, token, csr_pem, *, days: int,
           now: float | None = None) -> tuple[str, str]:
    """Exchange a token and a CSR for a client certificate: (cert PEM, server_id).

    What depends on the request alone (token and CSR well-formed, CSR signed by its key) is
    checked before the token is used, so a garbled request does not burn it; from there on the
    token is spent whatever happens, and it is spent atomically, so of two racing requests one
    at most succeeds."""
    now = time.time() if now is None else now
    try:
        secret, fp = signing.split_token(token)
    except signing.SigningError as e:
        raise EnrollError(str(e), 400) from None
    if fp is not None and fp != ca.fingerprint:
        raise EnrollError("this token was issued by another collector's CA: issue one here with "
                          "`sshtrail collector enroll-token`", 403)
    try:
        csr = parse_csr(csr_pem)
        requested = csr_server_id(csr)
    except CAError as e:
        raise EnrollError(str(e), 400) from None
    ok, bound = store.use_enroll_token(_hash_secret(secret), now)
    if not ok:
        raise EnrollError(TOKEN_USED_MESSAGE, 403)
    if bound is not None and bound != requested:
        raise EnrollError(f"this token is for server_id {bound!r}, the request is for "
                          f"{requested!r}: issue a token for {requested!r}", 403)
    server_id = requested
    known = store.host(server_id)
    if known is not None and not known.revoked:
        raise EnrollError(f"{server_id!r} is already enrolled; revoke it first with "
                          f"`sshtrail collector revoke {server_id}`", 409)
    try:
        cert_pem = ca.sign_csr(csr_pem, server_id, days, now=now)
    except CAError as e:
        raise EnrollError(str(e), 400) from None
    cert = signing.load_cert(cert_pem)
    store.put_host(server_id, signing.cert_serial_hex(cert), cert_pem,
                   signing.cert_not_after(cert), now)
    return cert_pem, server_id


# -- auditors --------------------------------------------------------------------------------
def issue_reader_token(store, name: str, *, now: float | None = None) -> str:
    """A bearer token for auditor `name` to read with; shown once, stored as sha256 only."""
    if not isinstance(name, str) or not name.strip() or len(name) > 128 or not name.isprintable():
        raise CAError(f"reader name {name!r}: give 1-128 printable characters")
    secret = "st" + secrets.token_urlsafe(32)
    store.add_reader(_hash_secret(secret), name, time.time() if now is None else now)
    return secret


def check_reader(store, token) -> str | None:
    """The reader `token` belongs to, or None (for anything that is not a token we issued)."""
    if not isinstance(token, str) or not 16 <= len(token) <= 256:
        return None
    return store.reader(_hash_secret(token))


# -- the ingest path -------------------------------------------------------------------------
def peer_allowed(store, cert, *, now: float | None = None) -> tuple[bool, str | None, str]:
    """May the peer presenting `cert` (Certificate, PEM or DER) upload? (ok, server_id, reason).

    TLS already checked that our CA issued it and that it is in its validity period; this
    checks it is still its host's *current* certificate: a revoked host, or a certificate
    superseded by a later enrollment, is refused though TLS accepted it."""
    if cert is None or cert == "" or cert == b"":
        return False, None, ("no client certificate: hosts upload with the certificate from "
                             "`sshtrail enroll`")
    try:
        cert = signing.load_cert(cert)
        server_id = signing.cert_server_id(cert)
    except signing.SigningError as e:
        return False, None, f"client certificate unusable: {e}"
    if not signing.is_server_id(server_id):
        return False, None, "client certificate names no valid server_id"
    host = store.host(server_id)
    if host is None:
        return False, server_id, f"{server_id!r} is not enrolled: enroll it with `sshtrail enroll`"
    if host.revoked:
        return False, server_id, f"{server_id!r} is revoked: enroll it again to upload"
    serial = signing.cert_serial_hex(cert)
    if serial != host.cert_serial:
        return False, server_id, (f"certificate {serial} of {server_id!r} was superseded by a "
                                  f"later enrollment ({host.cert_serial})")
    # The serial is public (every batch proof names it): also compare the whole certificate,
    # so nothing but the very certificate issued passes even if TLS were misconfigured.
    try:
        same = signing.fingerprint(signing.load_cert(host.cert_pem)) == signing.fingerprint(cert)
    except signing.SigningError:
        same = False
    if not same:
        return False, server_id, f"certificate {serial} of {server_id!r} is not the one issued"
    if signing.cert_not_after(cert) < (time.time() if now is None else now):
        return False, server_id, f"certificate of {server_id!r} has expired: enroll it again"
    return True, server_id, "ok"
