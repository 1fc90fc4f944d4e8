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


def listen_socket(host: str, port: int):
    """The listening socket the workers share, Nagle off on every connection it accepts: with
    it on, each response's body waited ~40 ms for the client's delayed ACK of its headers
    (bench/collector: a query took 44 ms, an upload as long). asyncio turns it off itself only
    on sockets made with IPPROTO_TCP, and Linux hands the option on to accepted ones too."""
    import socket
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror}; is another collector "
                         "running there? (collector.listen, --listen)") from None
    sock.listen(1024)
    return sock


def serve(cfg, *, listen: str | None = None) -> int:
    """Serve until SIGTERM/SIGINT. collector.workers processes share one listening socket (the
    kernel hands each connection to one of them, and collector.balance evens out the hosts'
    keep-alive connections): parsing and checking a batch is Python work that one process does
    on one core, while the stores take writers from several processes."""
    host, port = parse_listen(listen or cfg["collector.listen"])
    CA(cfg["collector.dir"])  # no CA: say so now, before anything listens
    # Opened once here, so the schema exists before the workers open it side by side (and a
    # store that cannot be opened is said here, once).
    open_store(cfg).close()
    sock = listen_socket(host, port)
    log.info("collector listening on https://%s:%d (store: %s, %d worker(s))", host, port,
             "postgresql" if cfg["collector.database"] else "sqlite", cfg["collector.workers"])
    workers = max(1, cfg["collector.workers"])
    if workers == 1:
        try:
            return _worker(cfg, sock)
        finally:
            sock.close()
            log.info("collector stopped")
    return _supervise(cfg, sock, workers)


def _supervise(cfg, sock, workers: int) -> int:
    """Fork the workers, pass SIGTERM/SIGINT on to them, and wait for them all. One dying on
    its own takes the others down, so that the service manager restarts the whole."""
    import signal
    from . import balance
    loads = balance.Loads(workers)
    children = set()
    for index in range(workers):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                balance.slot = loads.slot(index)
                code = _worker(cfg, sock)
            except BaseException as e:  # noqa: BLE001 - said here: nobody else sees a child's
                log.error("collector worker %d failed: %s: %s", os.getpid(), type(e).__name__, e)
            finally:
                os._exit(code)
        children.add(pid)
    sock.close()
    stopping = False

    def forward(signum, _frame):
        nonlocal stopping
        stopping = True
        for pid in children:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    while children:
        pid, code = os.wait()
        children.discard(pid)
        if not stopping and children:
            log.error("collector worker %d ended (wait status %d): stopping the others", pid, code)
            status = 1
            forward(signal.SIGTERM, None)
    log.info("collector stopped")
    return status


def _worker(cfg, sock) -> int:
    import uvicorn

    from .app import build_app
    from .tls import ClientCertProtocol

    ca = CA(cfg["collector.dir"])
    store = open_store(cfg)
    app = build_app(store, open_blobs(cfg), ca, max_batch_bytes=cfg["collector.max_batch_bytes"],
                    cert_days=cfg["collector.cert_days"])
    config = uvicorn.Config(
        app, http=ClientCertProtocol, lifespan="off", access_log=False,
        ssl_certfile=ca.server_cert_path, ssl_keyfile=ca.server_key_path,
        ssl_ca_certs=ca.cert_path, ssl_cert_reqs=ssl.CERT_OPTIONAL, log_level="warning",
        timeout_keep_alive=30,
        # An idle keep-alive TLS connection (every uploader holds one) would otherwise hold
        # a SIGTERM for as long as the peer keeps it open.
        timeout_graceful_shutdown=3)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        store.close()
    return 0
