"""Mutual TLS for the collector: which certificate the peer presented, as the app sees it.

uvicorn verifies client certificates (against our CA, including expiry) during the handshake,
but does not tell the application which certificate it was. This HTTP protocol subclass adds it
to each request's scope in the ASGI TLS extension's shape (`scope["extensions"]["tls"]
["client_cert_chain"]`, PEM strings), so the app can tell hosts apart and refuse revoked ones.

The handshake asks for a certificate but does not require one (CERT_OPTIONAL): enrollment and
auditors' reads come without one, and ingest refuses requests that lack it. A certificate that
is presented must verify, or the handshake fails and the request never reaches the app.
"""
from __future__ import annotations

import ssl

from uvicorn.protocols.http.h11_impl import H11Protocol

from . import balance


class ClientCertProtocol(H11Protocol):
    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if balance.slot is not None:
            balance.slot.opened()
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        tls = {"client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
               "tls_version": ssl_object.version() if ssl_object is not None else None}
        inner = self.app

        async def app_with_peer(scope, receive, send):
            if scope["type"] == "http":
                scope = dict(scope)
                scope["extensions"] = {**(scope.get("extensions") or {}), "tls": tls}
            await inner(scope, receive, send)

        self.app = app_with_peer

    def connection_lost(self, exc) -> None:
        super().connection_lost(exc)
        if balance.slot is not None:
            balance.slot.closed()


def peer_cert_pem(scope) -> str | None:
    chain = ((scope.get("extensions") or {}).get("tls") or {}).get("client_cert_chain") or []
    return chain[0] if chain else None
