"""SSH public key fingerprints in sshd's own notation (`SHA256:` + unpadded base64), so a key
in a PAM event can be matched by eye against sshd's "Accepted publickey ... SHA256:..." line.
binascii rather than base64: base64 imports re, a few ms of every PAM call."""
import binascii

from sshtrail.sha import sha256


def fingerprint(blob_b64: str) -> str:
    try:
        blob = binascii.a2b_base64(blob_b64.encode("ascii"), strict_mode=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return "unparseable key"
    digest = binascii.b2a_base64(sha256(blob).digest(), newline=False).decode()
    return "SHA256:" + digest.rstrip("=")
