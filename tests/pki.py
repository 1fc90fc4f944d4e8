"""Certificates tests need but the CA would never issue on request: expired, not yet valid.

Everything here uses the real CA code (collector.ca.CA.issue_cert), so a test certificate has
exactly the extensions a real one has; only its validity period is chosen by the test.
"""
from __future__ import annotations

import datetime

from sshtrail import signing


def _dt(when) -> datetime.datetime:
    if isinstance(when, datetime.datetime):
        return when if when.tzinfo else when.replace(tzinfo=datetime.timezone.utc)
    return datetime.datetime.fromtimestamp(float(when), tz=datetime.timezone.utc)


def issue_for_test(ca, key, server_id: str, *, not_before, not_after) -> str:
    """A client certificate PEM from `ca` (collector.ca.CA) for `key` (private or public) as
    `server_id`, valid from `not_before` to `not_after` (epoch seconds or datetimes), e.g. an
    expired one: `not_before=time.time() - 7200, not_after=time.time() - 3600`.

    Not recorded in any store: call store.put_host(...) with it where a test needs that."""
    public = key.public_key() if hasattr(key, "public_key") else key
    cert = ca.issue_cert(public, server_id, not_before=_dt(not_before), not_after=_dt(not_after))
    return signing.cert_pem(cert)
