"""SSH public key fingerprints in sshd's own notation (`SHA256:` + unpadded base64), so a key
in a PAM event can be matched by eye against sshd's "Accepted publickey ... SHA256:..." line."""
import base64
import binascii

from sshtrail.sha import sha256


def fingerprint(blob_b64: str) -> str:
    try:
        blob = base64.b64decode(blob_b64, validate=True)
    except (binascii.Error, ValueError):
        return "unparseable key"
    return "SHA256:" + base64.b64encode(sha256(blob).digest()).decode().rstrip("=")
