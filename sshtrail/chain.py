"""The per-host hash chain every spooled event is part of.

The spool gives each event, as it stores it, the next `seq` and `prev_hash` (the hash of the
previous event's stored body), then hashes the body it stored. An event deleted, changed or
moved after that breaks the chain or leaves a gap in seq, which the collector's `verify`
reports. Kept apart from sshtrail.batch, which needs json: this is on the PAM hook's path.
"""
from .sha import sha256

GENESIS = "0" * 64


def link_hash(body: str | bytes) -> str:
    """The chain hash of one event: sha256 of its body's exact bytes."""
    return sha256(body.encode() if isinstance(body, str) else body).hexdigest()
