"""The agent's side of host events: the eBPF tracer (ebpf/) turned into spooled events.

The session server tells us each recorded session's wrapper pid and sid; the tracer follows
that process and everything that descends from it (fork events in the kernel, so double forks,
setsid and daemons stay attributed) and reports execs, opens and connects. It also follows
every sshd listener, for what a connection does outside its recordings: port forwarding, and
what a login shell runs before the wrapper (sshtrail.connection_events sorts those into their
sessions). What the tracer lost is counted per session and written as `ebpf.lost`. When BPF
cannot run (no BCC, no headers, no permission), the agent goes on without it and says why,
once, in `agent.ebpf_unavailable`.

A session must be followed before its wrapper starts the user's program, or a short command
would run unseen: the session server calls track() before it welcomes the wrapper. BCC's
objects are not thread-safe, so a lock serialises track() with the polling thread, which holds
it while it handles what a poll brought, never while it waits for events (when it did, hellos
waited through its waits, and host events added 41-69 ms to every session's setup). Part of the
agent (an entry point): it may import the ebpf component.
"""
from __future__ import annotations

import logging
import queue
import threading
import time

from ebpf.tracer import KEY_SSHD  # not BCC: that is imported only when the tracer loads

from . import events
from .connection_events import ConnectionEvents
from .spool import Spool

log = logging.getLogger("sshtrail.agent.ebpf")
# A 16 MiB ring buffer rides out a storm while the spool catches up; events per spool write.
RINGBUF_PAGES = 4096
BATCH = 4096
LISTENERS_EVERY = 5.0  # seconds between looks for sshd listeners (a restarted sshd is new)
# Seconds between looks for sessions none of whose processes is followed any more: one found so
# twice in a row is forgotten (its events have been read by then), so that an agent that runs
# for years does not keep every session it ever saw.
SWEEP_EVERY = 60.0
# Milliseconds a quiet loop waits for events: they end the wait as they come, so this paces only
# an idle agent's housekeeping (events waiting for their session, CHECK_EVERY 0.25 s). At 20 ms
# the idle agent took 12 ms of CPU a second, on every host, and from every login's setup.
WAIT_MS = 100


class HostEvents:
    def __init__(self, cfg, *, sweep_every: float = SWEEP_EVERY):
        self.cfg = cfg
        self.sweep_every = sweep_every
        self.reason: str | None = None
        self.ready = threading.Event()  # set once the tracer is loaded, or known unavailable
        self.loaded = False
        self._requests: queue.Queue = queue.Queue()  # sessions that came before the tracer
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._tracer = None
        self._keys: dict[str, int] = {}
        self._sids: dict[int, tuple[str, str]] = {}  # tracer key -> (sid, login)
        self._next_key = 1
        self._gone: set[int] = set()  # keys with no process at the last sweep
        # Longer than a PAM hook can take to write the session an event waits for.
        self._connections = ConnectionEvents(cfg.server_id, cfg["pam.timeout"] + 5.0)
        self._thread = threading.Thread(target=self._run, name="ebpf", daemon=True)
        self._thread.start()

    def track(self, pid: int, sid: str, login: str) -> None:
        """Follow `pid` and its descendants as session `sid` (any thread). Returns once the
        kernel follows it, if the tracer is loaded; before that, it is followed on load."""
        with self._lock:
            self._connections.wrapper(pid)
            if self._tracer is None:
                if not self.ready.is_set():
                    self._requests.put((pid, sid, login))
                return
            self._track(pid, sid, login)

    def session_opened(self, monitor: int, start: int, sid: str, login: str) -> None:
        """A PAM session opened by the sshd process `monitor` (any thread)."""
        with self._lock:
            self._connections.opened(monitor, start, sid, login)

    def sessions_known(self) -> int:
        """Sessions whose sid the tracer's events are matched against now."""
        with self._lock:
            return len(self._sids)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    # -- the tracer's thread -------------------------------------------------------------------

    def _run(self) -> None:
        # NORMAL: host events come in storms (bench/ebpf: 250,000 opens in a quarter second),
        # and an fsync per batch made the spool the bottleneck; a batch still survives the
        # agent being killed, only not a power cut before the next checkpoint.
        spool = Spool.from_config(self.cfg, synchronous="NORMAL")
        try:
            tracer = self._load(spool)
            self.loaded = tracer is not None
            self.ready.set()
            if tracer is None:
                return
            with tracer:
                with self._lock:
                    self._tracer = tracer
                    while not self._requests.empty():
                        self._track(*self._requests.get_nowait())
                next_listeners, next_sweep = 0.0, time.monotonic() + self.sweep_every
                while not self._stop.is_set():
                    now, listeners = time.monotonic(), []
                    if now >= next_listeners:
                        # Read from /proc outside the lock: a wrapper's hello waits for it.
                        next_listeners = now + LISTENERS_EVERY
                        listeners = self._connections.new_listeners()
                    # The wait is most of a quiet host's loop, and a wrapper's hello waits for
                    # the lock (track): it waits outside it.
                    tracer.wait(WAIT_MS)
                    with self._lock:
                        for pid in listeners:
                            self._follow(tracer, pid)
                        tracer.flush()
                        lost = tracer.lost()
                        placed = self._connections.ready(spool.db, time.monotonic())
                        forgotten = {}
                        if now >= next_sweep:
                            next_sweep = now + self.sweep_every
                            forgotten = self._sweep(tracer, lost)
                    self._write_placed(spool, placed)
                    self._report_lost(spool, lost, forgotten)
                with self._lock:
                    tracer.drain()
                    placed = self._connections.ready(spool.db, time.monotonic(), final=True)
                    self._write_placed(spool, placed)
                    self._report_lost(spool, tracer.lost())
                    self._tracer = None
        except Exception as e:  # noqa: BLE001 - the agent goes on without host events
            log.error("host events stopped: %s", e)
            spool.append(events.new("agent.ebpf_unavailable", reason=f"the tracer failed: {e}"))
        finally:
            self.ready.set()
            spool.close()

    def _load(self, spool):
        cfg = self.cfg
        if not cfg["ebpf.enabled"]:
            self.reason = "ebpf.enabled is false in the config"
        else:
            from ebpf.tracer import Tracer, TracerUnavailable  # imports BCC only when loading
            try:
                return Tracer(lambda batch: self._write(spool, batch),
                              kinds=tuple(cfg["ebpf.kinds"]), max_args=cfg["ebpf.max_args"],
                              ignore_prefixes=tuple(cfg["ebpf.ignore_prefixes"]),
                              ringbuf_pages=RINGBUF_PAGES, batch_size=BATCH)
            except TracerUnavailable as e:  # no BCC, no headers, no permission...
                self.reason = str(e)
        log.warning("host events are off: %s", self.reason)
        spool.append(events.new("agent.ebpf_unavailable", reason=self.reason))
        return None

    def _track(self, pid: int, sid: str, login: str) -> None:
        # Called with the lock held.
        key = self._keys.get(sid)
        if key is None:
            key = self._keys[sid] = self._next_key
            self._next_key += 1
        self._sids[key] = (sid, login)
        try:
            self._tracer.track(pid, key)
        except ProcessLookupError:
            log.info("session %s: wrapper %d already gone, nothing to follow", sid, pid)

    def _sweep(self, tracer, lost: dict) -> dict[int, tuple[str, str]]:
        """Forget the sessions that had no process followed at this sweep and the one before;
        what their counters still held joins `lost`. Returns {key: (sid, login)} of those."""
        # Called with the lock held.
        alive = set(tracer.tracked().values())
        gone = {key for key in self._sids if key not in alive}
        forgotten = {}
        for key in gone & self._gone:
            n = tracer.forget(key)
            if n:
                lost[key] = lost.get(key, 0) + n
            forgotten[key] = self._sids.pop(key)
            self._keys.pop(forgotten[key][0], None)
        self._gone = gone - forgotten.keys()
        return forgotten

    def _follow(self, tracer, listener: int) -> None:
        # Called with the lock held.
        try:
            tracer.track_sshd(listener)
            log.info("following the connections of sshd %d", listener)
        except ProcessLookupError:
            pass

    def _report_lost(self, spool, lost: dict, forgotten: dict | None = None) -> None:
        evs = []
        for key, count in lost.items():
            sid, login = self._sids.get(key) or (forgotten or {}).get(key, ("", ""))
            fields = {"sid": sid, "login": login} if sid else {}
            whose = ("of the session" if sid else "of SSH connections outside their recordings"
                     if key == KEY_SSHD else "(session unknown)")
            evs.append(events.new("ebpf.lost", count=count, **fields,
                                  message=f"the tracer's buffer was full: this many host events "
                                          f"{whose} were not captured"))
        unplaced, self._connections.unplaced = self._connections.unplaced, 0
        if unplaced:
            evs.append(events.new("ebpf.lost", count=unplaced, message=(
                "host events of SSH connections outside their recordings whose session could "
                "not be found: their processes had ended before the agent looked")))
        cut_short, self._connections.cut_short = self._connections.cut_short, 0
        if cut_short:
            evs.append(events.new("ebpf.lost", count=cut_short, message=(
                "host events of SSH connections outside their recordings, still waiting for "
                "their connection to become a session when the agent stopped")))
        if evs:
            spool.append(*evs)

    def _write(self, spool, batch: list[dict]) -> None:
        evs, outside = [], []
        for e in batch:
            if e["key"] == KEY_SSHD:
                outside.append(e)
                continue
            sid, login = self._sids.get(e["key"], (None, None))
            if sid is not None:
                evs += _event(e, sid, login)
        if outside:  # (called from poll(), in this thread, with the lock held)
            self._connections.add(outside, time.monotonic(), spool.db)
        self._append(spool, evs)

    def _write_placed(self, spool, placed) -> None:
        evs = []
        for e, sid, login, forwarded in placed:
            evs += _event(e, sid, login, outside=True, forwarded=forwarded)
        self._append(spool, evs)

    def _append(self, spool, evs: list[dict]) -> None:
        if not evs:
            return
        try:
            spool.append(*evs)
        except Exception as e:  # noqa: BLE001 - counted, never silent, and the tracer goes on
            log.error("could not write %d host events: %s", len(evs), e)
            try:
                spool.append(events.new("ebpf.lost", count=len(evs),
                                        message=f"captured but not written: {e}"[:500]))
            except Exception:  # noqa: BLE001 - the spool itself is failing: the log says it
                pass


def _event(e: dict, sid: str, login: str, **extra) -> list[dict]:
    """The spool event of a tracer event (none for an unknown kind). `outside`: it happened in
    the session's connection outside its recording; `forwarded`: a connect or listen the
    connection's sshd made for the client (port forwarding)."""
    common = {"sid": sid, "login": login, "pid": e["pid"], "program": e.get("comm", ""),
              "return_code": e["ret"]}
    for flag in ("argv_truncated", "path_truncated", "path_unreadable", "argv_unreadable"):
        if e.get(flag):
            common[flag] = True
    common.update((k, True) for k, v in extra.items() if v)
    if e["kind"] == "exec":
        # process_uid: `uid` is every event's own id (DESIGN.md, common fields).
        return [events.new("session.command", at=e.get("time"), path=e["path"], argv=e["argv"],
                           ppid=e.get("ppid", 0), process_uid=e.get("uid", 0), **common)]
    if e["kind"] == "open":
        return [events.new("session.disk", at=e.get("time"), path=e["path"], flags=e["flags"],
                           **common)]
    if e["kind"] == "connect":
        return [events.new("session.network", at=e.get("time"), dst_addr=e["dst_addr"],
                           dst_port=e["dst_port"], version=e["family"], **common)]
    if e["kind"] == "listen":
        return [events.new("session.listen", at=e.get("time"), addr=e["addr"], port=e["port"],
                           version=e["family"], **common)]
    if e["kind"] == "connected":  # no return code: the kernel's error is not in the tracepoint
        del common["return_code"]
        return [events.new("session.network_outcome", at=e.get("time"), dst_addr=e["dst_addr"],
                           dst_port=e["dst_port"], version=e["family"],
                           established=e["established"], **common)]
    return []
