"""The collector's HTTP API (Starlette, served by collector.serve).

Starlette rather than FastAPI: the API is a dozen routes over bytes we parse and check
ourselves (the batch format has its own module), so a model layer would only add a second
schema to keep in step; the OpenAPI document is written out in collector.openapi instead.

Three kinds of caller, three credentials, never mixed:
- hosts write (events, recordings) with their client certificate: the peer certificate the TLS
  handshake verified, an enrolled and unrevoked host's current one, and a signature by the same
  key over each body;
- auditors read with a reader token (`Authorization: Bearer ...`), which cannot write;
- a new host enrolls with a single-use token, over TLS it checks against the CA fingerprint in
  that token.
"""
from __future__ import annotations

import io
import json
import logging
import time

import anyio
import anyio.to_thread

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sshtrail import asciicast, batch, events, signing, wire

from . import ca as ca_mod
from . import balance, ingest, openapi
from .blobs import BlobError, decompress
from .store import BadQuery, EventQuery, SearchQuery, StoreConflict
from .tls import peer_cert_pem

log = logging.getLogger("sshtrail.collector")
MAX_QUERY_LIMIT = 1000


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _body(request: Request, limit: int) -> bytes:
    """The request body, or Refused(413) as soon as it passes `limit` (nothing is kept)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ingest.Refused(413, f"body of {declared} bytes is over the limit of {limit}; send "
                                  "smaller batches")
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ingest.Refused(413, f"body is over the limit of {limit} bytes; send smaller "
                                      "batches")
        parts.append(chunk)
    return b"".join(parts)


def _time_param(request: Request, name: str) -> float | None:
    text = request.query_params.get(name)
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return events.parse_time(text)
    except events.EventError:
        raise ingest.Refused(400, f"{name}={text!r}: use epoch seconds or an RFC 3339 UTC time "
                                  "like 2026-01-02T03:04:05Z") from None


def _int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    text = request.query_params.get(name)
    if text is None:
        return default
    if not text.isdigit() or not lo <= int(text) <= hi:
        raise ingest.Refused(400, f"{name}={text!r}: expected a whole number from {lo} to {hi}")
    return int(text)


class Collector:
    """The routes, bound to one store, blob store and CA."""

    def __init__(self, store, blobs, ca, *, max_batch_bytes: int = batch.MAX_BYTES,
                 cert_days: int = 365):
        self.store, self.blobs, self.ca = store, blobs, ca
        self.max_batch_bytes, self.cert_days = max_batch_bytes, cert_days
        self._writer: anyio.CapacityLimiter | None = None

    async def _write(self, fn, *args):
        """Run a host's write (parse, check, store) in this process's one writing thread. Two
        would share the GIL to no gain, and worse: SQLite gives the GIL up at every row it
        writes, and gets it back only when the other thread's switch interval (5 ms) ends, so
        a store ingest beside one busy Python thread took 180 times as long (26 -> 4,660 us an
        event, a microbenchmark). The workers (collector.workers) run writes side by side."""
        if self._writer is None:
            self._writer = anyio.CapacityLimiter(1)
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._writer)

    @staticmethod
    def _written(body: dict) -> JSONResponse:
        """The answer to a host's write; from a worker with more than its share of connections,
        with a request to reconnect (see collector.balance)."""
        shed = balance.slot is not None and balance.slot.over_share()
        return JSONResponse(body, headers={"connection": "close"} if shed else None)

    # -- who is calling ------------------------------------------------------------------------
    def _host(self, request: Request):
        """(server_id, cert) of the host behind this request's client certificate."""
        pem = peer_cert_pem(request.scope)
        if pem is None:
            raise ingest.Refused(401, "a client certificate is required to upload: enroll this "
                                      "host with `sshtrail enroll`")
        cert = signing.load_cert(pem)
        ok, server_id, reason = ca_mod.peer_allowed(self.store, cert)
        if not ok:
            raise ingest.Refused(403, reason)
        return server_id, cert

    def _reader(self, request: Request) -> str:
        auth = request.headers.get("authorization", "")
        if not auth.lower().startswith("bearer "):
            raise ingest.Refused(401, "reading needs a reader token (Authorization: Bearer ...); "
                                      "make one with `sshtrail collector reader-token NAME`")
        name = ca_mod.check_reader(self.store, auth[7:].strip())
        if name is None:
            raise ingest.Refused(401, "the reader token is not valid")
        return name

    # -- hosts writing -------------------------------------------------------------------------
    async def post_events(self, request: Request):
        server_id, cert = self._host(request)
        body = await _body(request, self.max_batch_bytes)
        sig = request.headers.get(batch.SIGNATURE_HEADER)
        try:
            result = await self._write(ingest.ingest_events, self.store, server_id, cert,
                                       body, sig)
        except StoreConflict as e:
            raise ingest.Refused(409, str(e)) from None
        return self._written({"stored": result.stored, "duplicates": result.duplicates})

    async def put_recording(self, request: Request):
        server_id, cert = self._host(request)
        body = await _body(request, 1 << 20)
        await self._write(ingest.put_recording, self.store, server_id, cert,
                          request.path_params["sid"], body,
                          request.headers.get(batch.SIGNATURE_HEADER))
        return self._written({"ok": True})

    async def put_chunk(self, request: Request):
        server_id, cert = self._host(request)
        body = await _body(request, batch.MAX_CHUNK_BYTES)
        new = await self._write(ingest.put_chunk, self.store, self.blobs, server_id, cert,
                                request.path_params["sid"], request.path_params["seq"],
                                body, request.headers.get(batch.SIGNATURE_HEADER))
        return self._written({"stored": bool(new)})

    # -- enrollment ------------------------------------------------------------------------------
    async def get_ca(self, request: Request):
        return Response(self.ca.cert_pem, media_type="application/x-pem-file")

    async def post_enroll(self, request: Request):
        body = await _body(request, 64 << 10)
        try:
            req = json.loads(body)
            token, csr = req["token"], req["csr"]
            if not isinstance(token, str) or not isinstance(csr, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise ingest.Refused(400, 'expected JSON {"token": ..., "csr": PEM}') from None
        try:
            cert_pem, server_id = await run_in_threadpool(
                ca_mod.enroll, self.store, self.ca, token, csr, days=self.cert_days)
        except ca_mod.EnrollError as e:
            raise ingest.Refused(e.status, str(e)) from None
        except ca_mod.CAError as e:
            raise ingest.Refused(400, str(e)) from None
        log.info("enrolled host %s", server_id)
        return JSONResponse({"certificate": cert_pem, "ca": self.ca.cert_pem,
                             "server_id": server_id})

    # -- auditors reading ------------------------------------------------------------------------
    async def get_events(self, request: Request):
        self._reader(request)
        p = request.query_params
        q = EventQuery(since=_time_param(request, "since"), until=_time_param(request, "until"),
                       types=p.getlist("type"), login=p.get("user"), server_id=p.get("host"),
                       sid=p.get("sid"), text=p.get("q"),
                       limit=_int_param(request, "limit", 100, 1, MAX_QUERY_LIMIT),
                       after=p.get("after"))
        page = await run_in_threadpool(self.store.query, q)
        return JSONResponse({"events": page.events, "next": page.next})

    async def get_search(self, request: Request):
        self._reader(request)
        p = request.query_params
        text = p.get("q") or ""
        kinds = tuple(p.getlist("kind")) or ("output", "command")
        bad = [k for k in kinds if k not in ("output", "command")]
        if bad:
            raise ingest.Refused(400, f"kind={bad[0]!r}: expected output or command")
        q = SearchQuery(text=text, login=p.get("user"), server_id=p.get("host"),
                        since=_time_param(request, "since"), until=_time_param(request, "until"),
                        kinds=kinds, limit=_int_param(request, "limit", 50, 1, MAX_QUERY_LIMIT),
                        before=p.get("before"))
        try:
            page = await run_in_threadpool(self.store.search, q)
        except BadQuery as e:
            raise ingest.Refused(400, str(e)) from None
        return JSONResponse({"hits": [
            {"kind": h.kind, "server_id": h.server_id, "sid": h.sid, "login": h.login,
             "server_hostname": h.hostname,
             "time": events.format_time(h.time) if h.time is not None else None,
             "offset": h.offset, "line": h.line, **({"uid": h.uid} if h.uid else {})}
            for h in page.hits], "next": page.next})

    async def get_sessions(self, request: Request):
        self._reader(request)
        p = request.query_params
        rows = await run_in_threadpool(
            self.store.sessions, since=_time_param(request, "since"), login=p.get("user"),
            server_id=p.get("host"), limit=_int_param(request, "limit", 100, 1, MAX_QUERY_LIMIT))
        return JSONResponse({"sessions": rows})

    async def get_recording(self, request: Request):
        self._reader(request)
        sid = ingest.check_sid(request.path_params["sid"])
        data = await run_in_threadpool(self.recording_cast, request.query_params.get("host"), sid)
        if data is None:
            return _error(404, f"no recording of session {sid}")
        return Response(data, media_type="application/x-asciicast")

    def recording_cast(self, server_id: str | None, sid: str) -> bytes | None:
        rec = self.store.recording(server_id, sid)
        if rec is None:
            return None

        def frames():
            for seq in rec["chunks"]:
                key = ingest.chunk_key(rec["server_id"], sid, seq)
                try:
                    blob = decompress(self.blobs.get(key))
                except BlobError as e:
                    # Indexed only after its bytes were stored: gone or damaged since.
                    raise ingest.Refused(500, f"recording {sid}: chunk {seq} is missing or "
                                              f"damaged in the blob store ({e})") from None
                yield from wire.unpack_frames(blob)
        out = io.BytesIO()
        asciicast.write_session(out, {**rec["meta"], "sid": sid}, frames())
        return out.getvalue()

    async def get_hosts(self, request: Request):
        self._reader(request)
        hosts = await run_in_threadpool(self.store.hosts)
        return JSONResponse({"hosts": [
            {"server_id": h.server_id, "cert_serial": h.cert_serial, "not_after": h.not_after,
             "enrolled": h.enrolled, "revoked": h.revoked, "last_seq": h.last_seq}
            for h in hosts]})

    async def get_openapi(self, request: Request):
        return JSONResponse(openapi.DOCUMENT)

    async def healthz(self, request: Request):
        return JSONResponse({"ok": True, "time": time.time()})


def build_app(store, blobs, ca, **kw) -> Starlette:
    c = Collector(store, blobs, ca, **kw)

    def guarded(handler):
        async def route(request: Request):
            try:
                return await handler(request)
            except ingest.Refused as e:
                if e.status in (401, 403):
                    log.warning("%s %s refused (%d): %s", request.method, request.url.path,
                                e.status, e)
                return _error(e.status, str(e))
        return route

    routes = [
        Route("/v1/events", guarded(c.post_events), methods=["POST"]),
        Route("/v1/events", guarded(c.get_events), methods=["GET"]),
        Route("/v1/recordings/{sid}", guarded(c.put_recording), methods=["PUT"]),
        Route("/v1/recordings/{sid}/chunks/{seq:int}", guarded(c.put_chunk), methods=["PUT"]),
        Route("/v1/search", guarded(c.get_search), methods=["GET"]),
        Route("/v1/sessions", guarded(c.get_sessions), methods=["GET"]),
        Route("/v1/sessions/{sid}/recording", guarded(c.get_recording), methods=["GET"]),
        Route("/v1/hosts", guarded(c.get_hosts), methods=["GET"]),
        Route("/v1/ca", guarded(c.get_ca), methods=["GET"]),
        Route("/v1/enroll", guarded(c.post_enroll), methods=["POST"]),
        Route("/v1/openapi.json", c.get_openapi, methods=["GET"]),
        Route("/healthz", c.healthz, methods=["GET"]),
    ]
    app = Starlette(routes=routes)
    app.state.collector = c
    return app
