"""`sshtrail agent`: the root daemon on each host.

It hosts the sshd-log watcher (refusals into `user.login` failures, and the reaping of PAM
attempts nothing else explained), the session socket where wrappers deliver recordings
(sshtrail.session_server), the eBPF tracer that follows each recorded session's processes
(sshtrail.host_events), the look for processes in SSH sessions that no wrapper started
(sshtrail.unrecorded) and for sessions whose PAM close never came (pam_module.sessions), and
the uploader that ships the spool to the collector
(sshtrail.uploader). Logs go to stderr (journald picks them up); it stops
cleanly on SIGTERM/SIGINT after writing what it has read.

The log position is saved in the spool in the same transaction as the events it produced, so a
restart neither re-reads nor skips a line. What a crash can lose: refusals the tracker still
held in memory (a `Failed password` waits up to 2 s for the line that tells an expired account
from a wrong password; a connection's own record waits for its end).
"""
from __future__ import annotations

import logging
import os
import resource
import signal
import threading
import time

from pam_module import attempts, sshd_log
from pam_module.queue import PamQueue
from pam_module.sessions import UnclosedSessions
from sshtrail import config, events, host_events, session_server
from sshtrail.spool import Spool
from sshtrail.unrecorded import UnrecordedWatch

log = logging.getLogger("sshtrail.agent")
_POSITION_KEY = "sshd_log.position"
REAP_EVERY = 5.0
# The look at the host's processes: for what runs unrecorded in SSH sessions, for sessions whose
# PAM close never came, and (once, first) for recordings whose wrapper died while no agent ran.
LOOK_FIRST = 3.0  # seconds after the start
LOOK_EVERY = 5.0  # a look reads /proc/*/stat: about 20 µs per process on the host
# A refusal of one attempt resolves one pending PAM attempt; these end the whole connection.
_PER_ATTEMPT = {"bad_password", "bad_key", "bad_credentials"}


class LogWatcher:
    """Follows sshd's log into the spool. `step()` does one pass, so tests can drive it."""

    def __init__(self, spool: Spool, path: str, *, attempt_grace: float):
        self.spool = spool
        self.grace = attempt_grace
        saved = spool.get_state(_POSITION_KEY)
        if saved and saved.get("path") != path:
            saved = None  # a different log file: its offsets mean nothing here
        position = (saved["inode"], saved["offset"]) if saved else None
        self.follower = sshd_log.LogFollower(path, position)
        self.tracker = sshd_log.ConnectionTracker()
        self.path = path
        self._last_reap = 0.0

    def step(self, now: float | None = None, *, final: bool = False) -> int:
        """Read what the log has now; write its refusals; reap stale attempts. Returns the
        number of events written. `final` also writes what the tracker still holds."""
        now = time.time() if now is None else now
        lines = self.follower.read_available()
        refusals = []
        for line in lines:
            refusals += self.tracker.feed(line, now)
        refusals += self.tracker.flush() if final else self.tracker.expire(now)
        written = 0
        if lines or refusals:
            evs, resolutions = [], []
            for r in refusals:
                ev = events.new("user.login", at=r["time"], login=r["login"], success=False,
                                method=r["method"], error=r["error"], message=r["message"],
                                source="sshd_log")
                if r.get("addr"):
                    ev["addr.remote"] = (f"[{r['addr']}]" if ":" in r["addr"] else r["addr"]) + (
                        f":{r['port']}" if r.get("port") else "")
                if r.get("key"):
                    ev["key"] = r["key"]
                if r.get("attempts"):
                    ev["attempts"] = r["attempts"]
                evs.append(ev)
                if r.get("port"):
                    resolutions.append((attempts.conn_key(r["addr"], r["port"]),
                                        r["error"] not in _PER_ATTEMPT))
            inode, offset = self.follower.position()
            position = {"path": self.path, "inode": inode, "offset": offset}

            def bookkeeping(db):
                for conn, everything in resolutions:
                    attempts.consume(db, conn, everything=everything)
                    if everything:
                        attempts.conclude(db, conn, at=now)
                db.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)",
                           (_POSITION_KEY, events.to_json(position)))
            if evs:
                self.spool.append(*evs, extra_sql=bookkeeping)
            else:
                with self.spool.transaction() as db:
                    bookkeeping(db)
            written += len(evs)
        if now - self._last_reap >= min(REAP_EVERY, self.grace) and not lines:
            # Only once caught up with the log, so sshd's own account of an attempt wins.
            self._last_reap = now
            written += len(attempts.reap(self.spool, grace=self.grace, now=now,
                                         skip=self.tracker.open_connections()))
        return written


def _strict_policy(cfg):
    """strict_for(login, gid) by the config as it is now, as each wrapper reads it when its
    session starts: what the agent refuses or ends must be what the wrapper would refuse. Read
    only for a wrapper its login shell started, or for what escaped the recording."""
    def strict_for(login: str, gid: int) -> bool:
        current = cfg
        if cfg.source:
            try:
                current = config.load_cached(cfg.source)  # as the wrapper reads it
            except config.ConfigError as e:
                log.error("%s; deciding by the config the agent started with", e)
        return current.strict_for(login, gid)
    return strict_for


def _report_refusals(sessions, spool) -> None:
    try:
        for ev in sessions.take_refusals():
            spool.append(ev)
    except Exception as e:  # noqa: BLE001 - a bad pass must not end the agent
        log.error("reporting refused connections failed: %s", e)


def _raise_open_files_limit() -> None:
    """Up to the hard limit: each session holds a descriptor of ours, and systemd starts
    services with a soft limit of 1024 (for select(); nothing here uses it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as e:
            log.warning("could not raise the open-files limit from %d to %d: %s", soft, hard, e)


def run(cfg, stop: threading.Event | None = None) -> int:
    """Run until SIGTERM/SIGINT (or `stop` is set). Returns the exit status."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    _raise_open_files_limit()
    spool = Spool.from_config(cfg)
    swept = spool.sweep_chunk_files()  # before any session can send a chunk
    if swept:
        log.info("removed %d recording chunk file(s) left by an agent killed mid-write", swept)
    # The follower fixes its starting point before agent.start says we are up.
    watcher = LogWatcher(spool, cfg["sshd_log.path"], attempt_grace=cfg["pam.attempt_grace"])
    message = f"watching {cfg['sshd_log.path']}"
    if not os.path.exists(cfg["sshd_log.path"]):
        # Not fatal (it may appear), but until it does, refusals outside PAM go unrecorded.
        message = (f"sshd log {cfg['sshd_log.path']} does not exist (yet): refused keys and "
                   "users never reach PAM and are not recorded until it does; set sshd_log.path")
        log.warning(message)
    hosts = host_events.HostEvents(cfg)
    strict_for = _strict_policy(cfg)
    sessions = session_server.serve(cfg, on_session=hosts.track, strict_for=strict_for,
                                    on_login=hosts.session_opened)
    # PAM calls detach.sh leaves as files (pam_module.queue): its own thread, as a call may
    # wait for another (close_session for its open).
    pam_calls = PamQueue(cfg, on_login=hosts.session_opened)
    pam_stop = threading.Event()
    pam_thread = threading.Thread(target=pam_calls.run, args=(pam_stop,), name="pam-queue",
                                  daemon=True)
    pam_thread.start()
    pam_calls.announce()
    # agent.start says we are up with all we have: BCC takes seconds to compile the probes.
    # (Sessions starting meanwhile are recorded, and followed once the tracer is loaded.)
    hosts.ready.wait(60)
    message += "; host events " + ("on" if hosts.loaded else f"off ({hosts.reason})")
    spool.append(events.new("agent.start", message=message))
    log.info("agent started; spool %s; sshd log %s; sessions on %s", cfg["spool.path"],
             cfg["sshd_log.path"], cfg["agent.socket"])
    # The uploader (sshtrail.uploader): its own thread and spool connection.
    # Started even before enrollment: it idles until `sshtrail enroll` has run.
    upload_stop, upload_thread = threading.Event(), None
    try:
        from sshtrail import uploader
    except ImportError as e:
        # A host without the uploader's libraries still records everything into the spool.
        log.error("uploads are off: %s; events stay in the spool until it is installed", e)
    else:
        upload_thread = uploader.start(cfg, upload_stop)
    unrecorded = UnrecordedWatch(cfg["recording.unrecorded_grace"], strict_for)
    # Longer than a close hook can take (it starts 0.3 s after the call, ends within pam.timeout).
    unclosed = UnclosedSessions(cfg["pam.timeout"] + 5.0)
    # The first look waits for wrappers that lost the agent to come back (they retry every
    # second): until they do, they are not known as wrappers.
    next_look = time.monotonic() + LOOK_FIRST
    # Then too, once: recordings left open by wrappers that died while no agent ran.
    orphans_closed = False
    try:
        while not stop.is_set():
            try:
                if watcher.step() == 0:
                    stop.wait(cfg["sshd_log.poll_interval"])
            except Exception as e:  # noqa: BLE001 - a bad pass must not end the agent
                log.error("log watcher pass failed: %s; retrying", e)
                stop.wait(1.0)
            if time.monotonic() >= next_look:
                if not orphans_closed:
                    orphans_closed = True
                    try:
                        session_server.close_orphans(spool)
                    except Exception as e:  # noqa: BLE001 - as above
                        log.error("ending recordings whose wrapper died meanwhile failed: %s", e)
                next_look = time.monotonic() + LOOK_EVERY
                try:
                    for ev in unrecorded.scan(spool):
                        log.warning("%s", ev["reason"])
                        spool.append(ev)
                except Exception as e:  # noqa: BLE001 - as above
                    log.error("looking for unrecorded processes failed: %s", e)
                _report_refusals(sessions, spool)
                try:
                    for ev in unclosed.reap(spool):
                        log.warning("session %s of %s: %s", ev["sid"], ev["login"], ev["message"])
                except Exception as e:  # noqa: BLE001 - as above
                    log.error("looking for sessions whose close never came failed: %s", e)
        watcher.step(final=True)  # what was already in the log, and what the tracker held
    finally:
        # uploader: finish the request in flight (a killed one is re-sent after its lease)
        upload_stop.set()
        if upload_thread is not None:
            upload_thread.join(cfg["upload.timeout"] + 5)
        # detach.sh starts hooks again; then what it left meanwhile is written.
        pam_calls.withdraw()
        pam_stop.set()
        pam_thread.join()
        try:
            pam_calls.step(defer=0)
        except Exception as e:  # noqa: BLE001 - the calls stay queued for the next agent
            log.error("writing queued PAM calls failed: %s; the next agent writes them", e)
        pam_calls.close()
        sessions.stop()
        _report_refusals(sessions, spool)
        hosts.stop()
        spool.append(events.new("agent.stop"))
        spool.close()
        log.info("agent stopped")
    return 0
