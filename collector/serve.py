"""`sshtrail collector serve`: the collector on HTTPS, and the opening of its store.

The store is SQLite in collector.dir unless collector.database names a PostgreSQL URL. TLS
uses the server certificate `sshtrail collector init` made; client certificates are asked for
and verified against the collector's CA (see collector.tls for why they are optional at the
handshake and required by ingest).
"""
from __future__ import annotations

import logging
import os
import ssl

from sshtrail.errors import SshtrailError

from .blobs import DirBlobStore
from .ca import CA

log = logging.getLogger("sshtrail.collector")


def open_store(cfg):
    url = cfg["collector.database"]
    if url.startswith(("postgresql://", "postgres://")):
        from .store_postgres import PostgresStore
        return PostgresStore(url)
    if url:
        from .store import StoreError
        raise StoreError(f"collector.database = {url!r}: expected empty (SQLite in "
                         "collector.dir) or a postgresql:// URL")
    from .store_sqlite import SqliteStore
    os.makedirs(cfg["collector.dir"], mode=0o700, exist_ok=True)
    return SqliteStore(os.path.join(cfg["collector.dir"], "collector.db"))


def open_blobs(cfg) -> DirBlobStore:
    return DirBlobStore(cfg["collector.blob_dir"] or os.path.join(cfg["collector.dir"],
                                                                   "recordings"))


class ServeError(SshtrailError):
    pass


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ServeError(f"collector.listen = {text!r}: expected HOST:PORT, like 0.0.0.0:8443")
    return host.strip("[]") or "0.0.0.0", int(port)


def serve(cfg, *, listen: str | None = None) -> int:
    import uvicorn

    from .app import build_app
    from .tls import ClientCertProtocol

    host, port = parse_listen(listen or cfg["collector.listen"])
    ca = CA(cfg["collector.dir"])
    store = open_store(cfg)
    app = build_app(store, open_blobs(cfg), ca, max_batch_bytes=cfg["collector.max_batch_bytes"],
                    cert_days=cfg["collector.cert_days"])
    config = uvicorn.Config(
        app, host=host, port=port, http=ClientCertProtocol, lifespan="off", access_log=False,
        ssl_certfile=ca.server_cert_path, ssl_keyfile=ca.server_key_path,
        ssl_ca_certs=ca.cert_path, ssl_cert_reqs=ssl.CERT_OPTIONAL, log_level="warning",
        timeout_keep_alive=30,
        # An idle keep-alive TLS connection (every uploader holds one) would otherwise hold
        # a SIGTERM for as long as the peer keeps it open.
        timeout_graceful_shutdown=3)
    log.info("collector listening on https://%s:%d (store: %s)", host, port,
             "postgresql" if cfg["collector.database"] else "sqlite")
    try:
        uvicorn.Server(config).run()
    finally:
        store.close()
        log.info("collector stopped")
    return 0
