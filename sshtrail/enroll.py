"""Enrolling this host with a collector: `sshtrail enroll URL TOKEN`.

The host makes its key here (or reuses the one it has), fetches the collector's CA without
trusting the network, and believes it only if its sha256 fingerprint is the one inside the token
the operator copied from the collector. Only then does it send the token and a CSR, over TLS
checked against that CA, and keep the certificate it gets back.

Must never: send the private key anywhere, print the token (in errors too), leave a key readable
by others, or write anything to identity_dir before the collector's CA has been checked. Files
are replaced whole (write then rename); a failed enrollment changes nothing that was there.

Core module: imports sshtrail core modules and requests, never a component.
"""
from __future__ import annotations

import os
import tempfile
import warnings

import requests

from . import signing
from .errors import SshtrailError

# The files of identity_dir (upload.identity_dir), shared by the uploader and the tests.
HOST_KEY = "host.key"
# The collector this host enrolled with: the uploader's URL unless upload.url says otherwise.
URL_FILE = "collector.url"
HOST_CERT = "host.crt"
CA_CERT = "ca.crt"
CA_PATH = "/v1/ca"
ENROLL_PATH = "/v1/enroll"


class EnrollError(SshtrailError):
    """Enrollment failed; the message says why and what to do, never the token."""


def _redact(text: str, *secrets: str) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, "<token>")
    return text


def _server_error(resp: requests.Response) -> str:
    try:
        err = resp.json().get("error")
    except (ValueError, AttributeError):
        err = None
    return str(err) if err else (resp.text.strip()[:200] or resp.reason or "no reason given")


def _prepare_dir(identity_dir: str) -> None:
    try:
        os.makedirs(identity_dir, mode=0o700, exist_ok=True)
        # makedirs' mode is cut by the umask, and an existing directory keeps its own.
        os.chmod(identity_dir, 0o700)
    except OSError as e:
        raise EnrollError(f"cannot make {identity_dir} (mode 0700): {e.strerror}: run as "
                          "root") from None


def _host_key(identity_dir: str):
    """(key, is_new): the key already in identity_dir, else a new one not yet saved."""
    path = os.path.join(identity_dir, HOST_KEY)
    if os.path.exists(path):
        return signing.load_key(path), False
    return signing.generate_key(), True


def fetch_ca(url: str, expected_fingerprint: str, *, timeout: float = 30.0):
    """The collector's CA certificate, fetched without TLS verification (we have nothing to
    verify with yet) and so believed only if its fingerprint is the token's."""
    with warnings.catch_warnings():
        # The warning is about exactly what we do on purpose here; the fingerprint check below
        # is what makes it safe.
        warnings.simplefilter("ignore")
        try:
            resp = requests.get(url + CA_PATH, verify=False, timeout=timeout)
        except requests.RequestException as e:
            raise EnrollError(f"cannot reach the collector at {url}: {type(e).__name__}: "
                              "check the URL and that `sshtrail collector serve` runs "
                              "there") from None
    if resp.status_code != 200:
        raise EnrollError(f"collector at {url} answered HTTP {resp.status_code} for its CA: "
                          f"{_server_error(resp)}")
    try:
        ca = signing.load_cert(resp.content)
    except signing.SigningError:
        raise EnrollError(f"{url}{CA_PATH} did not return a certificate: is {url} an sshtrail "
                          "collector?") from None
    got = signing.fingerprint(ca)
    if got != expected_fingerprint:
        raise EnrollError(f"the collector at {url} presented CA fingerprint {got}, but the token "
                          f"was made for CA {expected_fingerprint}: this is not the collector "
                          "that issued the token (or someone is in between); nothing was "
                          "written. Check the URL, or issue a token on that collector")
    return ca


def _post_csr(url: str, token: str, csr: str, ca_pem: str, identity_dir: str,
              timeout: float) -> str:
    """The certificate PEM the collector issues for `csr`, over TLS checked against `ca_pem`."""
    # requests wants the CA as a file; a private temporary one, so nothing is left in
    # identity_dir if this fails.
    fd, ca_tmp = tempfile.mkstemp(prefix=".ca-", suffix=".crt", dir=identity_dir)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(ca_pem)
        try:
            resp = requests.post(url + ENROLL_PATH, json={"token": token, "csr": csr},
                                 verify=ca_tmp, timeout=timeout)
        except requests.exceptions.SSLError as e:
            raise EnrollError(f"TLS to {url} failed although its CA matched the token "
                              f"({_redact(str(e), token)[:300]}): the collector's server "
                              "certificate must name the host in the URL (collector.names on "
                              "the collector, then `sshtrail collector init --force`)") from None
        except requests.RequestException as e:
            raise EnrollError(f"cannot reach the collector at {url}: "
                              f"{type(e).__name__}") from None
    finally:
        os.unlink(ca_tmp)
    if resp.status_code != 200:
        raise EnrollError(f"the collector refused enrollment (HTTP {resp.status_code}): "
                          f"{_redact(_server_error(resp), token, token.partition('.')[0])}")
    try:
        return resp.json()["certificate"]
    except (ValueError, KeyError, TypeError):
        raise EnrollError("the collector's answer held no certificate: is it the same "
                          "sshtrail version?") from None


def _check_issued(cert, key, ca, server_id: str) -> None:
    if signing.public_key_der(cert) != signing.public_key_der(key):
        raise EnrollError("the collector returned a certificate for another key: nothing was "
                          "written; enroll again")
    try:
        cn = signing.cert_server_id(cert)
    except signing.SigningError:
        cn = None
    if cn != server_id:
        raise EnrollError(f"the collector returned a certificate for {cn!r}, not {server_id!r}: "
                          "nothing was written; enroll again")
    if not signing.cert_issued_by(cert, ca):
        raise EnrollError("the returned certificate is not signed by the collector's CA: "
                          "nothing was written; enroll again")


def enroll(url: str, token: str, server_id: str, identity_dir: str, *,
           timeout: float = 30.0) -> dict:
    """Enroll this host as `server_id`; returns {"server_id", "not_after", "fingerprint" (of
    the host certificate), "ca_fingerprint"}. identity_dir ends up holding HOST_KEY, HOST_CERT
    and CA_CERT."""
    url = url.rstrip("/")
    if not url.startswith("https://"):
        raise EnrollError(f"collector URL {url!r} must start with https:// (the token travels "
                          "in the request)")
    try:
        _secret, expected = signing.split_token(token)
    except signing.SigningError as e:
        raise EnrollError(str(e)) from None
    if expected is None:
        raise EnrollError("the token has no CA fingerprint (SECRET.FINGERPRINT): copy the whole "
                          "token `sshtrail collector enroll-token` printed")
    if not signing.is_server_id(server_id):
        raise EnrollError(f"server_id {server_id!r} is not valid: 1-128 characters of "
                          "A-Z a-z 0-9 . _ - (set server_id in sshtrail.toml)")
    identity_dir = os.fspath(identity_dir)
    ca = fetch_ca(url, expected, timeout=timeout)
    _prepare_dir(identity_dir)
    key, new_key = _host_key(identity_dir)
    ca_pem = signing.cert_pem(ca)
    # The whole token is sent: the collector checks its fingerprint part too, and says so
    # plainly when a token of another collector was used.
    cert_pem = _post_csr(url, token.strip(), signing.make_csr(key, server_id), ca_pem,
                         identity_dir, timeout)
    try:
        cert = signing.load_cert(cert_pem)
    except signing.SigningError:
        raise EnrollError("the collector's answer is not a certificate: nothing was "
                          "written") from None
    _check_issued(cert, key, ca, server_id)
    # The key first: a certificate must never sit beside a key it does not belong to.
    if new_key:
        signing.save_key(key, os.path.join(identity_dir, HOST_KEY))
    signing.write_atomic(os.path.join(identity_dir, HOST_CERT), cert_pem.encode(), 0o600)
    signing.write_atomic(os.path.join(identity_dir, CA_CERT), ca_pem.encode(), 0o644)
    signing.write_atomic(os.path.join(identity_dir, URL_FILE), url.rstrip("/").encode(), 0o644)
    return {"server_id": server_id, "not_after": signing.cert_not_after(cert),
            "fingerprint": signing.fingerprint(cert), "ca_fingerprint": expected}


def collector_url(cfg) -> str:
    """Where the uploader sends: upload.url, else the collector `sshtrail enroll` used, else
    "" (not enrolled: events stay in the spool)."""
    if cfg["upload.url"]:
        return cfg["upload.url"].rstrip("/")
    try:
        with open(os.path.join(cfg["upload.identity_dir"], URL_FILE)) as f:
            return f.read().strip().rstrip("/")
    except OSError:
        return ""
