"""PAM calls the agent takes from files: their format, and the agent's drain of them.

In fail-open mode, while the agent runs, detach.sh writes each PAM call as a file in
`<spool.path>.pam-calls/` with shell builtins alone, and returns: no Python starts for it (a
start cost ~25 ms of CPU per call, three or four a login, on the cores the login and then the
session run on). The agent takes the files in the order of the calls, writes each as the hook
would (pam_module.hook.record, under the same event uids), and removes it. A file stays until
it is written, so a call made while the agent stops, hangs or is killed is written by the next
one, stamped with when PAM made it. Without a live agent (DIR/agent: its pid and start time),
detach.sh starts the hook instead, as before.

A record, version 1: NUL-terminated fields, "sshtrail-pam-call 1", then NAME=VALUE for each of
FIELDS in any order, then "end". The values come from the PAM environment and /proc, so none
holds a NUL; an empty value is an unset variable. A file without its "end" is still being
written; one that stays so past STALE lost its writer (disk full mid-write) and is dropped, said
in a `spool.dropped` event, as is a record that is not one of ours.
"""
from __future__ import annotations

import logging
import math
import os
import stat
import threading
import time

from pam_module import hook
from sshtrail.errors import SshtrailError
from sshtrail.sha import sha256

log = logging.getLogger("sshtrail.pam_queue")

MAGIC = b"sshtrail-pam-call 1"
FIELDS = ("caller", "caller_start", "uptime", "boot") + hook._ENV
MAX_RECORD = 16384  # the environment's values are at most hook._MAX_FIELD each, but one key
POLL = 0.1  # seconds between looks at the queue
# A call is taken this long after it was made, once the login it records is under way: taken at
# once, its write (an fsync, and the spool's lock) came just as the session's wrapper said hello
# to the agent, and setup took +77 ms over plain sshd instead of +31 (bench/pty).
DEFER = 0.3
STALE = 30.0
MARKER = "agent"


class RecordError(ValueError):
    pass


def queue_dir(spool_path: str) -> str:
    return spool_path + ".pam-calls"


def parse(data: bytes) -> dict[str, str] | None:
    """A record's fields, or None if it is not whole yet. RecordError if it is not a record."""
    if len(data) > MAX_RECORD:
        raise RecordError(f"{len(data)} bytes, more than a PAM call's {MAX_RECORD}")
    parts = data.split(b"\0")
    if parts[0] != MAGIC:
        if MAGIC.startswith(parts[0]) and len(parts) == 1:
            return None  # the first field is still being written
        raise RecordError(f"it does not start with {MAGIC.decode()!r}")
    if len(parts) < 3 or parts[-2:] != [b"end", b""]:
        return None
    fields: dict[str, str] = {}
    for part in parts[1:-2]:
        name, sep, value = part.partition(b"=")
        key = name.decode("ascii", "replace")
        if not sep or key not in FIELDS:
            raise RecordError(f"field {part[:40]!r} is not NAME=VALUE of a known NAME")
        if key in fields:
            raise RecordError(f"field {key} is there twice")
        fields[key] = os.fsdecode(value)  # as os.environ decodes the hook's environment
    missing = [k for k in FIELDS if k not in fields]
    if missing:
        raise RecordError(f"fields {', '.join(missing)} are missing")
    return fields


def message(fields: dict[str, str], name: str, written: float, *, boot: str, boottime: float,
            wall: float) -> dict:
    """The call as the agent's session server takes it from a hook (PamCall.from_message).
    `written`: the file's mtime; `boot`, `boottime`, `wall`: this boot's id and its clocks now.
    The call's time is its uptime mapped to the wall clock, or, for a call from another boot
    (the agent was down across a reboot), when its file was written."""
    if not fields["caller"].isdigit():
        raise RecordError(f"caller {fields['caller']!r} is not a pid")
    start = fields["caller_start"]
    if start and not start.isdigit():
        raise RecordError(f"caller_start {start!r} is not a start time in clock ticks")
    now = written
    if fields["boot"] == boot:
        try:
            ago = boottime - float(fields["uptime"])
        except ValueError:
            raise RecordError(f"uptime {fields['uptime']!r} is not a number of seconds") from None
        if ago >= 0:
            now = wall - ago
    env = {k: fields[k] for k in hook._ENV if fields[k]}
    # The uids of the call's events come from the seed: the same whenever the file is read.
    seed = sha256(f"{fields['boot']} {name}".encode()).hexdigest()[:20]
    return {"type": "pam", "env": env, "ppid": int(fields["caller"]), "now": float(now),
            "ppid_start": int(start) if start else None, "boot": fields["boot"], "seed": seed}


def call_names(queue: str) -> list[str]:
    """The calls waiting in the folder `queue`, in the order PAM made them (the agent's marker
    and files being renamed into place left out)."""
    names = [n for n in os.listdir(queue) if n != MARKER and n[0] != "."]
    made = {n: _made(n) for n in names}
    # Names that are not ours last: they are dropped, after the calls.
    return sorted(names, key=lambda n: (made[n] is None, made[n] or 0.0, n))


def _made(name: str) -> float | None:
    """The uptime a call was made at: its name is "UPTIME.PID" (detach.sh); None if not."""
    try:
        return float(name.rpartition(".")[0])
    except ValueError:
        return None


def call_age(name: str, boottime: float | None = None) -> float:
    """Seconds since the call was made, by the boot clock (the wall clock may be set back
    meanwhile); infinite for a name that is no uptime, or one of a boot before (ahead of us)."""
    made = _made(name)
    if boottime is None:
        boottime = time.clock_gettime(time.CLOCK_BOOTTIME)
    return math.inf if made is None or made > boottime else boottime - made


class PamQueue:
    """The agent's drain. `step()` takes what is there, so tests can drive it."""

    def __init__(self, cfg, *, on_login=None):
        """`on_login(pid, start, sid, login)` for each open_session written (host events)."""
        from sshtrail import procfs
        self.cfg, self.on_login = cfg, on_login
        self.spool = None  # opened by the thread that writes: an sqlite connection is its own
        self.dir = queue_dir(cfg["spool.path"])
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        st = os.lstat(self.dir)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
            raise SshtrailError(f"{self.dir} must be a directory of root's (it holds PAM calls the "
                          "agent records as they are): remove it, and the agent makes it")
        os.chmod(self.dir, 0o700)  # root's alone: only root's calls can be in it
        self._boot = procfs.boot_id()
        self._me = f"{os.getpid()} {procfs.start_time(os.getpid())}\n"

    def refresh_config_cache(self) -> None:
        """The wrapper reads the config through a cache only root writes (config.load_cached),
        which the Python hook of each PAM call used to keep fresh: without it, every session
        start paid for the TOML parser (~20 ms here, bench/pty's setup)."""
        if self.cfg.source:
            from sshtrail import config
            try:
                config.load_cached(self.cfg.source)
            except config.ConfigError as e:
                log.error("%s; sessions read the config without the cache", e)

    def announce(self) -> None:
        """From now on detach.sh leaves its calls here."""
        self.refresh_config_cache()
        tmp = os.path.join(self.dir, f".{MARKER}.{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(self._me)
        os.replace(tmp, os.path.join(self.dir, MARKER))

    def withdraw(self) -> None:
        """From now on detach.sh starts the hook: this agent is going."""
        path = os.path.join(self.dir, MARKER)
        try:
            with open(path) as f:
                if f.read() != self._me:
                    return  # another agent's by now
            os.unlink(path)
        except FileNotFoundError:
            pass

    def step(self, *, defer: float = DEFER) -> int:
        """Write the whole calls waiting, oldest first, that were made `defer` seconds ago or
        more; returns how many were written."""
        if self.spool is None:
            from sshtrail.spool import Spool
            self.spool = Spool.from_config(self.cfg)  # synchronous FULL, as the hook writes
        names = call_names(self.dir)
        if names:
            self.refresh_config_cache()  # logins are under way: the next one reads it
        written = 0
        for name in names:
            boottime = time.clock_gettime(time.CLOCK_BOOTTIME)
            if call_age(name, boottime) < defer:
                break  # too young: so are the calls after it
            written += self._take(name, boottime)
        return written

    def run(self, stop: threading.Event) -> None:
        """Take calls until `stop`; then step() again from the thread that stopped us."""
        try:
            while not stop.wait(POLL):
                try:
                    self.step()
                except Exception as e:  # noqa: BLE001 - the calls stay queued for the next look
                    log.error("writing queued PAM calls failed: %s; retrying", e)
                    stop.wait(1.0)
        finally:
            self.close()

    def close(self) -> None:
        if self.spool is not None:
            self.spool.close()
            self.spool = None

    def _take(self, name: str, boottime: float) -> int:
        path = os.path.join(self.dir, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return 0
        except OSError as e:
            return self._drop(name, f"cannot be opened ({e.strerror}): not a file detach.sh wrote")
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != 0:
                return self._drop(name, "not a regular file of root's")
            data = os.read(fd, MAX_RECORD + 1)
        finally:
            os.close(fd)
        try:
            fields = parse(data)
            if fields is None:
                if call_age(name, boottime) > STALE:
                    return self._drop(name, f"cut short ({len(data)} bytes): its writer ended "
                                            "before it was whole")
                return 0
            call = hook.PamCall.from_message(message(
                fields, name, st.st_mtime_ns / 1e9, boot=self._boot, boottime=boottime,
                wall=time.time()))
        except (RecordError, hook.HookError) as e:
            return self._drop(name, str(e))
        hook.record(self.cfg, call, spool=self.spool, on_login=self.on_login)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass  # another agent on this spool took it too: its events are kept once
        return 1

    def _drop(self, name: str, reason: str) -> int:
        from sshtrail import events
        reason = f"queued PAM call {name} not recorded: {reason}"
        log.error("%s", reason)
        self.spool.append(events.new("spool.dropped", count=1, reason=reason))
        try:
            os.unlink(os.path.join(self.dir, name))
        except FileNotFoundError:
            pass
        return 0
