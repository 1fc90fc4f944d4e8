"""The agent's uploader: ships the spool to the collector over mutual TLS, and says how far
behind it is (`status`, for `sshtrail status`).

Each pass (`Uploader.step`) sends a bounded amount of each kind of data, so a long recording
cannot starve events nor the other way round: recordings' metadata first (the collector learns
of a recording before its chunks, and while it is still running), then recording chunks, then
one batch of events (sshtrail.batch), each request signed with the host's key.

Must never: mark anything delivered without the collector's 200; let one bad batch block the
events after it (a 400/409 sets it aside in the spool, and says so with an upload.rejected
event); dead-letter anything because the collector refused *us* (401/403: that is the
identity's fault, not the batch's); log key material or event bodies. It may be SIGKILLed at
any moment: what was delivered is only what the spool says (claim/ack), what was in flight is
sent again by the next uploader (it releases every claim it finds at start: one uploader per
spool), and the collector removes duplicates by uid. Nothing this
object holds in memory is needed for correctness.
"""
from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from urllib.parse import quote

import requests

from . import batch as upload_format
from . import enroll, events, signing
from .spool import Batch, Spool

log = logging.getLogger("sshtrail.uploader")

STATUS_KEY = "upload.status"
BACKOFF_MIN = 0.25
NOT_ENROLLED_INTERVAL = 5.0
# Per pass: recordings whose metadata changed, and chunks (also capped by upload.batch_bytes).
RECORDINGS_PER_STEP = 16
CHUNKS_PER_STEP = 16
# The server's own words go into logs and status, cut to this: it is not trusted to be short.
_ERROR_TEXT_MAX = 300
# Statuses that mean "this request is wrong, sending it again will not help".
_REFUSED = (400, 409)
_IDENTITY_REFUSED = (401, 403)


class _Retry(Exception):
    """The collector could not be reached or could not take the request now: back off and send
    the same again. The message is for the log and `status`."""


class _IdentityRefused(_Retry):
    """The collector refused this host's certificate or signature (401/403)."""


def identity_paths(cfg) -> tuple[str, str, str]:
    """(key, certificate, CA certificate) of this host, as `sshtrail enroll` writes them."""
    d = cfg["upload.identity_dir"]
    return (os.path.join(d, enroll.HOST_KEY), os.path.join(d, enroll.HOST_CERT),
            os.path.join(d, enroll.CA_CERT))


class Uploader:
    """Ships the spool of `cfg` to `cfg["upload.url"]`. `run(stop)` in a thread of its own, or
    `step()` one pass at a time (tests). The spool connection is opened by the first pass, in
    the thread that runs it (sqlite connections belong to one thread).

    `wait` is what `run` sleeps before the next pass: 0 after progress, upload.idle_interval
    when nothing waits, a backoff delay after a failure."""

    def __init__(self, cfg, *, lease: float | None = None, rng: random.Random | None = None):
        self.cfg = cfg
        self.url = enroll.collector_url(cfg)
        self.timeout = cfg["upload.timeout"]
        # Longer than one upload may take, so a live uploader's claim never lapses under it.
        self.lease = lease if lease is not None else 2 * self.timeout + 10
        self.max_events = max(1, min(cfg["upload.batch_events"], upload_format.MAX_EVENTS))
        self.max_bytes = max(1, min(cfg["upload.batch_bytes"], upload_format.MAX_BYTES))
        self.limit = self.max_events  # halved on 413, doubled back after each success
        self.backoff_max = max(cfg["upload.backoff_max"], BACKOFF_MIN)
        self.idle_interval = cfg["upload.idle_interval"]
        self.rng = rng or random.Random()
        self.failures = 0
        self.wait = 0.0
        self.backoff_ceiling = 0.0
        self._delivered = 0  # what this pass had a 200 for
        self._spool: Spool | None = None
        self._http = None
        self._key = None
        self._identity_stamp = None
        # Recording uploads the collector refused as malformed (400/409/413): the spool has no
        # dead-letter state for them, so this run skips them (logged); the next run tries again.
        self._stuck_recordings: set[tuple[str, int]] = set()
        self._stuck_chunks: set[tuple[str, int]] = set()

    # -- the loop ---------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        log.info("uploading to %s", self.url or "(not enrolled yet: events stay in the spool)")
        try:
            while not stop.is_set():
                try:
                    self.step()
                except Exception as e:  # noqa: BLE001 - a bad pass (spool busy...) must not end it
                    log.error("upload pass failed: %s; retrying", e)
                    self._note_failure(f"upload pass failed: {e}")
                stop.wait(self.wait)
        finally:
            self.close()
            log.info("uploader stopped")

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None
        if self._spool is not None:
            self._spool.close()
            self._spool = None

    @property
    def spool(self) -> Spool:
        if self._spool is None:
            self._spool = Spool.from_config(self.cfg)
            # One uploader per spool (the agent's): claims left at start are a killed one's,
            # and are taken again now instead of after their lease.
            self._spool.release_all()
            self.failures = int(self._status().get("failures") or 0)
        return self._spool

    def step(self) -> bool:
        """One pass: recordings' metadata, their chunks, one batch of events. True if the
        collector took (or definitively refused) something; sets `wait`."""
        spool = self.spool
        self._delivered = answered = 0
        self.url = enroll.collector_url(self.cfg)
        if not self.url:
            self.wait = NOT_ENROLLED_INTERVAL  # enrolling later needs no restart
            return False
        try:
            self._load_identity()
            answered += self._ship_recordings(spool)
            answered += self._ship_chunks(spool)
            answered += self._ship_events(spool)
        except _Retry as e:
            if self._delivered:
                self._note_success()
            self._note_failure(str(e))
            return bool(answered)
        if self._delivered:
            self._note_success()
        elif answered and self.failures:
            self.failures = 0  # refused, but the collector is reachable and answering
            self._set_status(failures=0)
        self.wait = 0.0 if answered else self.idle_interval
        return bool(answered)

    # -- events ----------------------------------------------------------------------------

    def _ship_events(self, spool: Spool) -> int:
        b = spool.claim(self.limit, self.lease, self.max_bytes)
        if b is None:
            return 0
        try:
            status, why = self._send("POST", "/v1/events", upload_format.encode(b.bodies),
                                     upload_format.MEDIA_TYPE)
        except BaseException:
            spool.release(b.id)
            raise
        n = len(b.bodies)
        if status == 200:
            spool.ack(b.id)
            self._delivered += n
            log.debug("delivered events seq %d-%d (%d)", b.first_seq, b.last_seq, n)
            self.limit = min(self.max_events, self.limit * 2)
            return n
        if status == 413 and n > 1:
            spool.release(b.id)
            self.limit = max(1, n // 2)
            log.warning("collector refused %d events as too large (413); sending at most %d "
                        "per batch", n, self.limit)
            return 1  # an answer all the same: the next pass tries again at once, smaller
        if status in _REFUSED or status == 413:
            if status == 413:
                why = (f"a single event of {len(b.bodies[0])} bytes is too large for the "
                       "collector (413)")
            self._reject(spool, b, f"HTTP {status}: {why}")
            return n
        spool.release(b.id)
        raise _Retry(f"POST /v1/events: HTTP {status}: {why}")

    def _reject(self, spool: Spool, b: Batch, reason: str) -> None:
        spool.reject(b, reason)
        self._error(f"collector refused events seq {b.first_seq}-{b.last_seq} "
                    f"({len(b.bodies)}): {reason}; set aside in the spool, an upload.rejected "
                    "event reports it")

    # -- recordings ------------------------------------------------------------------------

    def _ship_recordings(self, spool: Spool) -> int:
        done = 0
        for row in spool.unsynced_recordings(RECORDINGS_PER_STEP + len(self._stuck_recordings)):
            sid, version = row["sid"], row["version"]
            if (sid, version) in self._stuck_recordings:
                continue
            meta = {k: v for k, v in row.items() if k not in ("version", "synced")}
            body = json.dumps(meta, separators=(",", ":"), sort_keys=True).encode()
            path = f"/v1/recordings/{quote(sid, safe='')}"
            status, why = self._send("PUT", path, body, "application/json")
            if status == 200:
                spool.mark_recording_synced(sid, version)
                self._delivered += 1
                done += 1
            elif status in _REFUSED or status == 413:
                done += 1
                self._stuck_recordings.add((sid, version))
                self._refused_recording(f"recording {sid} (version {version})", status, why)
            else:
                raise _Retry(f"PUT {path}: HTTP {status}: {why}")
        return done

    def _ship_chunks(self, spool: Spool) -> int:
        done, sent_bytes, announced = 0, 0, {}
        for sid, seq, data in spool.unsent_chunks(CHUNKS_PER_STEP + len(self._stuck_chunks)):
            if (sid, seq) in self._stuck_chunks:
                continue
            if sid not in announced:
                # A chunk goes only after its recording: the collector must know what it is for.
                row = spool.recording(sid)
                announced[sid] = bool(row and row["synced"] > 0)
            if not announced[sid]:
                continue
            if data is None:
                self._stuck_chunks.add((sid, seq))
                self._error(f"recording {sid} chunk {seq}: its file in the spool "
                            f"({spool.chunk_dir}) is gone, so it cannot be sent; skipped")
                continue
            path = f"/v1/recordings/{quote(sid, safe='')}/chunks/{seq}"
            status, why = self._send("PUT", path, bytes(data), "application/octet-stream")
            if status == 200:
                spool.mark_chunk_sent(sid, seq)
                self._delivered += 1
                done += 1
                sent_bytes += len(data)
                if sent_bytes >= self.max_bytes or done >= CHUNKS_PER_STEP:
                    break
            elif status in _REFUSED or status == 413:
                done += 1
                self._stuck_chunks.add((sid, seq))
                self._refused_recording(f"recording {sid} chunk {seq} ({len(data)} bytes)",
                                        status, why)
            else:
                raise _Retry(f"PUT {path}: HTTP {status}: {why}")
        return done

    def _refused_recording(self, what: str, status: int, why: str) -> None:
        self._error(f"collector refused {what}: HTTP {status}: {why}; kept in the spool, "
                    "skipped until the agent restarts")

    def _error(self, text: str) -> None:
        """Logged, and shown by `sshtrail status` as the last error."""
        log.error("%s", text)
        self._set_status(last_error=text, last_error_time=time.time())

    # -- HTTP ------------------------------------------------------------------------------

    def _load_identity(self) -> None:
        """Load the key and a session for the current identity; again whenever `sshtrail
        enroll` has replaced the files (os.stat of three files per pass)."""
        paths = identity_paths(self.cfg)
        try:
            stamp = tuple((st.st_ino, st.st_size, st.st_mtime_ns)
                          for st in (os.stat(p) for p in paths))
        except FileNotFoundError as e:
            self._drop_session()
            raise _Retry(f"no identity: {e.filename} is missing; enroll this host "
                         "(`sshtrail enroll`)") from None
        except OSError as e:
            self._drop_session()
            raise _Retry(f"cannot read the identity in {self.cfg['upload.identity_dir']}: "
                         f"{e.strerror}") from None
        if stamp == self._identity_stamp and self._http is not None:
            return
        try:
            key = signing.load_key(paths[0])
        except signing.SigningError as e:
            self._drop_session()
            raise _Retry(str(e)) from None
        self._drop_session()
        http = requests.Session()
        http.cert = (paths[1], paths[0])
        http.verify = paths[2]
        self._http, self._key, self._identity_stamp = http, key, stamp
        log.info("identity loaded from %s", self.cfg["upload.identity_dir"])

    def _drop_session(self) -> None:
        if self._http is not None:
            self._http.close()
        self._http = self._key = self._identity_stamp = None

    def _send(self, method: str, path: str, body: bytes, content_type: str) -> tuple[int, str]:
        """(HTTP status, the server's error text) of one signed request. Raises _Retry when
        there is no answer, _IdentityRefused on 401/403."""
        import requests
        headers = {"Content-Type": content_type,
                   upload_format.SIGNATURE_HEADER: signing.sign(self._key, body)}
        try:
            # verify and cert per request, not only on the session: requests lets
            # $REQUESTS_CA_BUNDLE override a session's verify, and we pin the collector's CA.
            r = self._http.request(method, self.url + path, data=body, headers=headers,
                                   timeout=self.timeout, verify=self._http.verify,
                                   cert=self._http.cert)
        except requests.RequestException as e:
            raise _Retry(f"{method} {path}: {type(e).__name__}: {e}") from None
        why = ""
        if r.status_code != 200:
            try:
                why = str(r.json()["error"])
            except (ValueError, KeyError, TypeError):
                why = r.text
            why = why[:_ERROR_TEXT_MAX]
        if r.status_code in _IDENTITY_REFUSED:
            text = (f"collector refused this host's identity ({method} {path}: HTTP "
                    f"{r.status_code}: {why}); nothing is set aside, retrying with backoff. "
                    f"Check the host's enrollment (`sshtrail status`, `sshtrail enroll`)")
            log.error("%s", text)
            raise _IdentityRefused(text)
        return r.status_code, why

    # -- status ----------------------------------------------------------------------------

    def _note_success(self) -> None:
        self.failures = 0
        self.backoff_ceiling = 0.0
        self._set_status(last_success=time.time(), failures=0)

    def _note_failure(self, text: str) -> None:
        self.failures += 1
        # Exponential backoff with full jitter: uniform in [0, ceiling], the ceiling doubling
        # from BACKOFF_MIN to upload.backoff_max, so a fleet of hosts does not retry in step.
        self.backoff_ceiling = min(self.backoff_max,
                                   BACKOFF_MIN * 2 ** min(self.failures - 1, 32))
        self.wait = self.rng.uniform(0, self.backoff_ceiling)
        if not isinstance(text, str):
            text = str(text)
        log.warning("upload failed (%d in a row): %s; retrying in %.2f s",
                    self.failures, text, self.wait)
        try:
            self._set_status(last_error=text, last_error_time=time.time(),
                             failures=self.failures)
        except Exception as e:  # noqa: BLE001 - the status must not hide the failure itself
            log.error("cannot record the upload status in the spool: %s", e)

    def _status(self) -> dict:
        return self._spool.get_state(STATUS_KEY, {}) or {}

    def _set_status(self, **changes) -> None:
        st = self._status()
        st.update(changes)
        self._spool.set_state(STATUS_KEY, st)


def start(cfg, stop: threading.Event) -> threading.Thread:
    """Run an Uploader for `cfg` in a daemon thread until `stop` is set."""
    uploader = Uploader(cfg)
    thread = threading.Thread(target=uploader.run, args=(stop,), name="uploader", daemon=True)
    thread.start()
    return thread


def status(cfg, now: float | None = None) -> dict:
    """How far behind the collector this host is, for `sshtrail status`: what waits in the
    spool (events, the oldest one's time, rejected events, chunks and their bytes), `lag` in
    seconds (now minus the oldest waiting event's time; 0 when nothing waits), the last
    success and the last error (epoch seconds, and the error's text), consecutive failures,
    whether an identity is enrolled, and the upload URL."""
    now = time.time() if now is None else now
    spool = Spool.from_config(cfg)
    try:
        backlog = spool.backlog()
        st = spool.get_state(STATUS_KEY, {}) or {}
    finally:
        spool.close()
    oldest = backlog["oldest"]
    return {
        "url": enroll.collector_url(cfg),
        "identity": all(os.path.exists(p) for p in identity_paths(cfg)),
        "identity_dir": cfg["upload.identity_dir"],
        **backlog,
        "lag": round(max(0.0, now - events.parse_time(oldest)), 3) if oldest else 0.0,
        "last_success": st.get("last_success"),
        "last_error": st.get("last_error"),
        "last_error_time": st.get("last_error_time"),
        "failures": st.get("failures", 0),
    }
