"""A host's identity: its private key, its certificate, and the signatures it puts on uploads.

Each host makes its own ECDSA P-256 key (fast to sign, accepted by every TLS stack); the key
never leaves the host. The collector's CA certifies it (collector.ca), the uploader signs every
batch body with it (sshtrail.batch.SIGNATURE_HEADER) and the collector checks that signature
against the certificate the host presented over mutual TLS.

Must never: print, log or put into an error message any private key material or token secret;
leave a private key readable by anyone but its owner, even for an instant; raise on malformed
input in `verify` (its inputs come from the network).

Core module: imports only sshtrail core modules, never a component. Heavier than most (it loads
OpenSSL through `cryptography`), so the PAM hook's path must not import it.
"""
from __future__ import annotations

import base64
import binascii
import datetime
import os
import re

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from . import files
from .errors import SshtrailError

# A server_id becomes a directory name on the collector and a label in every event: one
# rule, shared by the host (enroll) and the collector (ca), so neither can make the other's
# paths escape.
SERVER_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}\Z")
# An enrollment token is SECRET.FINGERPRINT: the secret is single-use proof that an operator
# allowed this host in; the fingerprint (sha256 of the CA certificate's DER) lets the new host
# trust the collector's CA on first contact, as kubeadm's discovery-token-ca-cert-hash does.
_TOKEN_SECRET_RE = re.compile(r"[A-Za-z0-9_-]{16,128}\Z")
_FINGERPRINT_RE = re.compile(r"[0-9a-f]{64}\Z")
# A DER ECDSA signature over P-256 is at most 72 bytes; anything far longer is not one, and
# need not be decoded at all.
_MAX_SIGNATURE_B64 = 256


class SigningError(SshtrailError):
    """A key or certificate cannot be read or used; the message says which file and what to do,
    never what is in it."""


# -- keys ------------------------------------------------------------------------------------
def generate_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


# Kept under this name for its callers: keys and certificates are written with it.
write_atomic = files.write_atomic


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def save_key(key: ec.EllipticCurvePrivateKey, path: str | os.PathLike) -> None:
    """Store a private key at `path`, unencrypted PEM, mode 0600 from its creation on."""
    write_atomic(path, key_pem(key), 0o600)


def load_key(path: str | os.PathLike) -> ec.EllipticCurvePrivateKey:
    """The EC private key stored at `path`, or SigningError saying why not.

    Refuses a key file others may read or write, as ssh does: such a key may already be
    someone else's, and a certificate for it proves nothing."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise SigningError(f"no private key at {path}: enroll this host first "
                           "(`sshtrail enroll`)") from None
    except OSError as e:
        raise SigningError(f"cannot read the private key {path}: {e.strerror}: "
                           "run as root (or as the key's owner)") from None
    if st.st_mode & 0o077:
        raise SigningError(f"private key {path} is accessible by others "
                           f"(mode {st.st_mode & 0o777:04o}): it must be 0600; "
                           f"`chmod 600 {path}`, and consider the key exposed")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # The library's message is dropped on purpose: it may quote what it could not parse.
        raise SigningError(f"{path} is not an unencrypted PEM private key: move it away and "
                           "enroll again to make a new one") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SigningError(f"{path} is not an ECDSA key (sshtrail signs with ECDSA P-256): move "
                           "it away and enroll again to make a new one")
    return key


def public_key_der(key_or_cert) -> bytes:
    """The SubjectPublicKeyInfo DER of a private key, public key or certificate: what two
    of them compare by when the question is "is this the same key"."""
    if isinstance(key_or_cert, x509.Certificate):
        key_or_cert = key_or_cert.public_key()
    elif hasattr(key_or_cert, "public_key"):
        key_or_cert = key_or_cert.public_key()
    return key_or_cert.public_bytes(serialization.Encoding.DER,
                                    serialization.PublicFormat.SubjectPublicKeyInfo)


# -- certificate requests --------------------------------------------------------------------
def make_csr(key: ec.EllipticCurvePrivateKey, server_id: str) -> str:
    """A PEM certificate signing request for `key`, with CN = server_id."""
    if not SERVER_ID_RE.match(server_id or ""):
        raise SigningError(f"server_id {server_id!r} is not valid: 1-128 characters of "
                           "A-Z a-z 0-9 . _ -")
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_id)]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


# -- signatures ------------------------------------------------------------------------------
def sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> str:
    """Base64 of the DER ECDSA-SHA256 signature over `data`."""
    return base64.b64encode(key.sign(data, ec.ECDSA(hashes.SHA256()))).decode("ascii")


def verify(cert_or_public_key, data: bytes, signature_b64) -> bool:
    """True only if `signature_b64` is a valid ECDSA-SHA256 signature over `data` by the key of
    `cert_or_public_key`. False, never an exception, on anything malformed: every argument but
    the key may come from an attacker."""
    try:
        key = (cert_or_public_key.public_key()
               if isinstance(cert_or_public_key, x509.Certificate) else cert_or_public_key)
        if not isinstance(key, ec.EllipticCurvePublicKey):
            return False
        if isinstance(signature_b64, bytes):
            signature_b64 = signature_b64.decode("ascii")
        if not isinstance(signature_b64, str) or not 0 < len(signature_b64) <= _MAX_SIGNATURE_B64:
            return False
        if not isinstance(data, (bytes, bytearray, memoryview)):
            return False
        signature = base64.b64decode(signature_b64, validate=True)
        key.verify(signature, bytes(data), ec.ECDSA(hashes.SHA256()))
        return True
    except (InvalidSignature, binascii.Error, ValueError, TypeError, UnicodeError):
        return False


# -- certificates ----------------------------------------------------------------------------
def load_cert(pem) -> x509.Certificate:
    """A certificate from PEM (str or bytes) or DER bytes; SigningError if it is not one."""
    if isinstance(pem, x509.Certificate):
        return pem
    data = pem.encode("ascii", "replace") if isinstance(pem, str) else bytes(pem)
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise SigningError("not an X.509 certificate (PEM or DER)") from None


def load_cert_file(path: str | os.PathLike) -> x509.Certificate:
    """A certificate from a file, with the file named in any error."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise SigningError(f"no certificate at {path}: enroll this host first "
                           "(`sshtrail enroll`)") from None
    except OSError as e:
        raise SigningError(f"cannot read the certificate {path}: {e.strerror}") from None
    try:
        return load_cert(data)
    except SigningError:
        raise SigningError(f"{path} is not an X.509 certificate: enroll again") from None


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def cert_server_id(cert: x509.Certificate) -> str:
    """The certificate's subject CN: the host's server_id. SigningError unless exactly one."""
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1 or not isinstance(cns[0].value, str):
        raise SigningError("certificate has no single subject CN (the host's server_id)")
    return cns[0].value


def cert_serial_hex(cert: x509.Certificate) -> str:
    """The serial number as lowercase hex without leading zeros: how the store keeps it."""
    return format(cert.serial_number, "x")


def _utc(dt: datetime.datetime) -> datetime.datetime:
    # cryptography 38 returns naive datetimes that mean UTC.
    return dt if dt.tzinfo else dt.replace(tzinfo=datetime.timezone.utc)


def cert_not_after(cert: x509.Certificate) -> float:
    """The end of the certificate's validity, in epoch seconds."""
    return _utc(getattr(cert, "not_valid_after_utc", None) or cert.not_valid_after).timestamp()


def cert_not_before(cert: x509.Certificate) -> float:
    return _utc(getattr(cert, "not_valid_before_utc", None) or cert.not_valid_before).timestamp()


def fingerprint(cert: x509.Certificate) -> str:
    """sha256 hex of the certificate's DER: the CA fingerprint that enrollment tokens carry."""
    return cert.fingerprint(hashes.SHA256()).hex()


def cert_issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True if `issuer`'s key signed `cert` and `cert` names it as its issuer. Checks the one
    link, not validity times or extensions (TLS does that)."""
    if cert.issuer != issuer.subject:
        return False
    key = issuer.public_key()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes,
                       ec.ECDSA(cert.signature_hash_algorithm))
            return True
        return False
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False


# -- enrollment tokens -----------------------------------------------------------------------
def split_token(token) -> tuple[str, str | None]:
    """(secret, CA fingerprint or None) of an enrollment token `SECRET.FINGERPRINT` (or a bare
    SECRET). SigningError if it is neither; the message never quotes the token."""
    if not isinstance(token, str):
        raise SigningError("enrollment token is not text")
    token = token.strip()
    secret, dot, fp = token.partition(".")
    if not _TOKEN_SECRET_RE.match(secret) or (dot and not _FINGERPRINT_RE.match(fp)):
        raise SigningError("enrollment token is malformed: expected SECRET.FINGERPRINT as "
                           "printed by `sshtrail collector enroll-token`")
    return secret, (fp or None)


def is_server_id(value) -> bool:
    return isinstance(value, str) and SERVER_ID_RE.match(value) is not None
