"""Reading from a collector as an auditor: events, sessions, recordings (HTTPS + reader token).

Used by `sshtrail events|sessions|export|search --collector URL`. The collector's certificate is
checked against its CA: `--ca FILE`, else the CA this host enrolled with, else the collector's
own (when run on the collector). Never prints the token.
"""
from __future__ import annotations

import os

from .errors import SshtrailError


class CollectorError(SshtrailError):
    pass


class Reader:
    def __init__(self, url: str, token: str | None, ca_file: str, timeout: float = 30.0):
        import requests
        if not token:
            raise CollectorError("reading from a collector needs a reader token: --token-file "
                                 "FILE or $SSHTRAIL_READER_TOKEN (made with `sshtrail collector "
                                 "reader-token NAME` on the collector)")
        if not os.path.exists(ca_file):
            raise CollectorError(f"CA certificate {ca_file} not found: pass the collector's "
                                 "ca.crt with --ca")
        self.url, self.timeout = url.rstrip("/"), timeout
        self._http = requests.Session()
        self.ca_file = ca_file
        self._http.headers["Authorization"] = f"Bearer {token}"

    def _get(self, path: str, params=None, *, raw: bool = False):
        import requests
        try:
            # verify per request: requests lets $REQUESTS_CA_BUNDLE override a session's.
            r = self._http.get(self.url + path, params=params, timeout=self.timeout,
                               verify=self.ca_file)
        except requests.RequestException as e:
            raise CollectorError(f"{self.url}: cannot reach the collector: {e}") from None
        if r.status_code != 200:
            try:
                why = r.json()["error"]
            except (ValueError, KeyError, TypeError):
                why = r.text[:200]
            raise CollectorError(f"{self.url}{path}: {r.status_code}: {why}")
        return r.content if raw else r.json()

    def events(self, *, limit: int | None = None, **filters) -> list[dict]:
        """Every matching event, oldest first (following the pages), up to `limit`."""
        params = {k: v for k, v in filters.items() if v is not None}
        out, after = [], None
        while True:
            page_size = 1000 if limit is None else min(1000, limit - len(out))
            page = self._get("/v1/events", {**params, "limit": page_size,
                                            **({"after": after} if after else {})})
            out += page["events"]
            after = page["next"]
            if not after or (limit is not None and len(out) >= limit):
                return out

    def sessions(self, **filters) -> list[dict]:
        return self._get("/v1/sessions", {k: v for k, v in filters.items() if v is not None})[
            "sessions"]

    def recording(self, sid: str, host: str | None = None) -> bytes:
        return self._get(f"/v1/sessions/{sid}/recording", {"host": host} if host else None,
                         raw=True)

    def search(self, text: str, *, limit: int = 50, **filters) -> list[dict]:
        """Hits of a full-text search, newest first (following the pages), up to `limit`."""
        params = {k: v for k, v in filters.items() if v is not None}
        out, before = [], None
        while True:
            page = self._get("/v1/search", {**params, "q": text,
                                            "limit": min(1000, limit - len(out)),
                                            **({"before": before} if before else {})})
            out += page["hits"]
            before = page["next"]
            if not before or len(out) >= limit:
                return out
