"""The session tracer: what the processes of each SSH session exec, open and connect to.

Loads ebpf/probes.c through BCC onto sched and syscall tracepoints (the only probes this fleet's
kernels offer: no kprobes, no fentry), and reports every event of every process that descends
from a process registered with `track()` -- double forks, setsid and daemons included, since a
child inherits its session key at fork, in the kernel. Processes outside any session are
filtered in the kernel, by the first map lookup of each probe.

    def on_events(batch):               # a list of plain dicts, see decode.py
        for ev in batch: ...
    with Tracer(on_events) as t:
        t.track(wrapper_pid, key=7)     # the session wrapper and all it will start
        while running:
            t.poll(100)                 # calls on_events with what arrived
            for key, n in t.lost().items(): ...   # events the kernel could not deliver

Events (dicts), each with "key", "pid", "ppid", "comm", "time" (epoch seconds) and "ret":
  exec     uid, path, argv, argv_truncated  (ret < 0: a failed exec, argv is [])
  open     path, path_truncated, flags             (ret: fd or -errno)
  connect  family (4|6), dst_addr, dst_port        (ret: 0 or -errno, -115 for non-blocking)
  listen   family (4|6), addr, port                (the socket's bound address; port 0: the
                                                     kernel chose it; part of kind "connect")
Extra keys appear only when true: path_unreadable, argv_unreadable. Paths are as the process
passed them (a relative open path stays relative: resolving it would mean walking kernel
structs). ppid is the process that forked this one, which stays its ppid when it is reparented.

What it must never do: drop an event silently. Whatever the kernel could not deliver is counted
per session and returned by lost(); the agent turns it into `ebpf.lost` events. Open paths under
the ignore prefixes are left out on purpose, and only read-only opens (see IGNORE_PREFIXES).

Runs as root inside the agent. One thread only: BCC's objects are not thread-safe.
"""
from __future__ import annotations

import contextlib
import ctypes as ct
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

from .decode import Decoder

PROBES_C = Path(__file__).resolve().with_name("probes.c")

KINDS = ("exec", "open", "connect")

# Read-only opens of these are left out: every dynamically linked exec reads the loader cache,
# every locale-aware program reads locale files, and programs read their own /proc entries. They
# say nothing about what a user did. Deliberately nothing that could hold what a session reads
# or changes (never /etc in general, /home, /root...), and opens for writing are always reported.
IGNORE_PREFIXES = (
    "/etc/ld.so.cache",
    "/proc/self/",
    "/proc/thread-self/",
    "/usr/lib/locale/",
    "/usr/share/locale/",
    "/usr/lib/x86_64-linux-gnu/gconv/",
    "/sys/devices/system/cpu/",
)

O_ACCMODE, O_RDONLY, O_CREAT, O_TRUNC = 0o3, 0o0, 0o100, 0o1000

# Lost events that could not be counted under their session (its counter could not be created)
# are counted under this key in the kernel; lost() reports them under None.
KEY_UNATTRIBUTED = 0xFFFFFFFF
# The processes under an sshd listener that no session claimed (track_sshd); see probes.c.
KEY_SSHD = 0xFFFFFFFE

INIT_PID_NS = 0xEFFFFFFC  # proc_ns inode number of the initial PID namespace (PROC_PID_INIT_INO)
TRACEFS = Path("/sys/kernel/tracing")
DEBUGFS_TRACING = Path("/sys/kernel/debug/tracing")

# Where BCC takes its verification limits from: max_args makes the exec program's loop, which the
# verifier walks once per iteration; 256 stays well under its 1M instruction limit.
MAX_ARGS_LIMIT = 256
ARGS_BUF_LIMIT = 16384  # the exec event must fit one per-CPU map value (at most 32 KB)


class TracerUnavailable(Exception):
    """The tracer cannot run on this host; `reason` says why and what would fix it."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _ensure_tracefs() -> None:
    """BCC attaches tracepoints by name and reads their record layout from tracefs, which a host
    without systemd (or a container) may not have mounted. Mount it where the kernel expects."""
    for base in (DEBUGFS_TRACING, TRACEFS):
        if (base / "events").is_dir():
            return
    libc = ct.CDLL(None, use_errno=True)
    if libc.mount(b"tracefs", str(TRACEFS).encode(), b"tracefs", 0, None) != 0:
        err = ct.get_errno()
        raise TracerUnavailable(
            f"tracefs is not mounted and mounting it on {TRACEFS} failed: {os.strerror(err)} "
            f"(mount -t tracefs tracefs {TRACEFS})")


def _check_host() -> None:
    if os.geteuid() != 0:
        raise TracerUnavailable("the eBPF tracer needs root (loading BPF programs and attaching "
                                "tracepoints need CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN)")
    ns = os.stat("/proc/self/ns/pid").st_ino
    if ns != INIT_PID_NS:
        # BPF sees pids of the initial namespace; ours would not match them.
        raise TracerUnavailable("the agent runs in a PID namespace of its own; the eBPF tracer "
                                "must run in the host's (pids seen by BPF would not match)")
    build = Path("/lib/modules") / os.uname().release / "build"
    if not build.exists():
        raise TracerUnavailable(
            f"no kernel headers at {build}: BCC compiles its programs against them. Link it to "
            f"Debian's headers (ln -s /usr/src/linux-headers-*-amd64 {build}; `make setup` does)")


@contextlib.contextmanager
def _capture_stderr():
    """BCC writes compiler errors and the verifier's log to fd 2, not to its exceptions; keep
    them to put into TracerUnavailable's reason."""
    out = {"text": ""}
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            out["text"] = f.read().decode(errors="replace")


def _tail(text: str, lines: int = 12) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the comm field (which may hold spaces and parentheses)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return raw[raw.rindex(")") + 2:].split()


def _ppid_and_start(pid: int) -> tuple[int, int] | None:
    f = _stat_fields(pid)
    return None if f is None else (int(f[1]), int(f[19]))


def _children_of(pid: int) -> list[int]:
    """pid's children, as its threads' /proc children files list them: a session's wrapper has
    none when its hello tracks it, and reading all of /proc to learn that cost every session's
    start ~3 ms (~80 processes here; more on a busy host)."""
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out  # gone
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                out.extend(int(c) for c in f.read().split())
        except OSError:
            pass  # the thread ended
    return out


def _children_from_scan() -> Callable[[int], list[int]]:
    """Where the kernel has no children files (CONFIG_PROC_CHILDREN): every process's parent,
    read once, from /proc/PID/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            st = _ppid_and_start(int(entry.name))
            if st is not None:
                children.setdefault(st[0], []).append(int(entry.name))
    return lambda pid: children.get(pid, [])


_HAS_CHILDREN_FILES = os.path.exists(f"/proc/self/task/{os.getpid()}/children")


class Tracer:
    """Loads the probes; see the module docstring. Raises TracerUnavailable when it cannot.

    max_args, max_arg_len: argv entries read per exec, and bytes per entry (longer ones are cut,
        and the event says argv_truncated).
    max_argv_bytes: bytes for all argv entries of one exec together (rounded up with max_path to
        a power of two, at most 16 KB).
    max_path: bytes of an exec filename or open path (longer: path_truncated).
    ringbuf_pages: size of the ring buffer in pages (a power of two); events that do not fit
        before the next poll() are counted by lost().
    max_procs: processes and threads of all sessions alive at once.
    max_connecting: TCP connects of all sessions waiting for their handshake at once (past it,
        a connect's outcome is counted by lost()).
    max_lost_keys: sessions with a lost counter at once (past it, losses are unattributed).
    """

    def __init__(self, on_events: Callable[[list[dict]], None], *,
                 max_args: int = 128, max_arg_len: int = 512, max_argv_bytes: int = 8192,
                 max_path: int = 1024, kinds: Iterable[str] = KINDS,
                 ignore_prefixes: Iterable[str] = IGNORE_PREFIXES,
                 ringbuf_pages: int = 512, max_procs: int = 65536, max_connecting: int = 10240,
                 max_lost_keys: int = 16384, batch_size: int = 512):
        kinds = tuple(kinds)
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown event kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
        if not 1 <= max_args <= MAX_ARGS_LIMIT:
            raise ValueError(f"max_args must be 1..{MAX_ARGS_LIMIT}, not {max_args}")
        if not 16 <= max_path <= 4096:
            raise ValueError(f"max_path must be 16..4096, not {max_path}")
        args_buf = _next_pow2(max_path + max_argv_bytes)
        if args_buf > ARGS_BUF_LIMIT or not 16 <= max_arg_len <= max_argv_bytes:
            raise ValueError(f"max_path + max_argv_bytes must stay within {ARGS_BUF_LIMIT} "
                             f"and max_arg_len within 16..max_argv_bytes")
        if ringbuf_pages < 1 or ringbuf_pages != _next_pow2(ringbuf_pages):
            raise ValueError(f"ringbuf_pages must be a power of two, not {ringbuf_pages}")

        self.on_events = on_events
        self.kinds = kinds
        self.ignore_prefixes = tuple(ignore_prefixes)
        self.batch_size = batch_size
        self.ignored = 0          # opens left out by ignore_prefixes, for the curious
        self._batch: list[dict] = []
        self._callback_error: BaseException | None = None
        self._lost_seen: dict[int, int] = {}
        self._lost_pending: dict[int, int] = {}
        # Of lost_total (probes.c): what it said at the last look, and how much of it the
        # per-session counters have accounted for since the load.
        self._lost_total_seen = 0
        self._lost_taken = 0

        _check_host()
        try:
            import bcc  # noqa: F401  (python3-bpfcc, Debian's; the PyPI "bcc" is another project)
        except ImportError as e:
            raise TracerUnavailable(f"BCC's Python bindings are missing ({e}); install Debian's "
                                    f"python3-bpfcc and run with a Python that sees them")
        _ensure_tracefs()

        cflags = [
            f"-DMAX_ARGS={max_args}", f"-DMAX_ARG_LEN={max_arg_len}", f"-DARGS_BUF={args_buf}",
            f"-DMAX_PATH={max_path}", f"-DRINGBUF_PAGES={ringbuf_pages}",
            f"-DMAX_PROCS={max_procs}", f"-DMAX_CONNECTING={max_connecting}",
            f"-DMAX_KEYS={max_lost_keys}",
            "-Wno-macro-redefined",
        ] + [f"-DWANT_{k.upper()}" for k in kinds]
        with _capture_stderr() as log:
            try:
                self._bpf = bcc.BPF(src_file=str(PROBES_C).encode(), cflags=cflags)
            except Exception as e:
                failure = e
            else:
                failure = None
        if failure is not None:
            detail = _tail(log["text"])
            if isinstance(failure, PermissionError) or "Operation not permitted" in str(failure):
                raise TracerUnavailable(f"permission denied loading BPF programs: {failure}")
            raise TracerUnavailable(f"the BPF programs failed to compile or load: {failure}"
                                    + (f"\n{detail}" if detail else ""))
        if log["text"].strip():
            sys.stderr.write(log["text"])  # compiler warnings: not ours to hide

        # bpf_ktime_get_ns() is CLOCK_MONOTONIC; the offset turns it into epoch seconds.
        self._decoder = Decoder(time_offset=time.time() - time.clock_gettime(time.CLOCK_MONOTONIC))
        self._procs = self._bpf[b"procs"]
        self._lost = self._bpf[b"lost"]
        self._lost_total = self._bpf[b"lost_total"]
        self._bpf[b"events"].open_ring_buffer(self._on_record)

    # -- sessions ----------------------------------------------------------------------------

    def track(self, pid: int, key: int, *, claim: bool = True) -> None:
        """Follow pid and everything it will start under `key` (0 <= key < KEY_UNATTRIBUTED).

        Descendants pid already has are tracked too. `claim`: take processes another key
        follows (a session wrapper starts under its sshd's KEY_SSHD); else leave them as they
        are. Raises ProcessLookupError when pid is gone.
        """
        if not 0 <= key < KEY_UNATTRIBUTED:
            raise ValueError(f"key must be 0..{KEY_UNATTRIBUTED - 1}, not {key}")
        before = _ppid_and_start(pid)
        if before is None:
            raise ProcessLookupError(f"no process {pid}")
        if not claim and self._procs.get(self._procs.Key(pid)) is not None:
            return
        self._put(pid, key, before[0])
        # Had pid exited before the entry was in, its exit would have found nothing to clean up
        # and a later process reusing the pid would inherit the session: check it is still there.
        if _ppid_and_start(pid) is None or _ppid_and_start(pid)[1] != before[1]:
            self._procs.pop(self._procs.Key(pid), None)
            raise ProcessLookupError(f"process {pid} exited while being tracked")
        # Children pid forked before now were not seen forking; from now on the kernel sees them.
        children = _children_of if _HAS_CHILDREN_FILES else _children_from_scan()
        todo = [(child, pid) for child in children(pid)]
        while todo:
            child, parent = todo.pop()
            if not claim and self._procs.get(self._procs.Key(child)) is not None:
                continue  # followed already, with all it started
            self._put(child, key, parent)
            todo.extend((grandchild, child) for grandchild in children(child))

    def track_sshd(self, listener: int) -> None:
        """Follow an sshd listener's connections (KEY_SSHD): the processes of each, and what
        runs in it outside the sessions track() follows, which keep their keys. Of processes
        running as root there, only connects are reported (probes.c)."""
        self.track(listener, KEY_SSHD, claim=False)

    def _put(self, pid: int, key: int, ppid: int) -> None:
        self._procs[self._procs.Key(pid)] = self._procs.Leaf(key, ppid)

    def untrack(self, key: int) -> int:
        """Stop following the processes of session `key`; returns how many there were. Its lost
        count not yet returned by lost() is kept for the next call."""
        gone = [k for k, v in self._procs.items() if v.key == key]
        for k in gone:
            self._procs.pop(k, None)
        leaf = self._lost.get(self._lost.Key(key))
        if leaf is not None:
            delta = leaf.value - self._lost_seen.pop(key, 0)
            if delta:
                self._lost_pending[key] = self._lost_pending.get(key, 0) + delta
                self._lost_taken += delta
            self._lost.pop(self._lost.Key(key), None)
        return len(gone)

    def forget(self, key: int) -> int:
        """Drop the lost counter of a session none of whose processes is followed any more;
        returns what it counted that lost() has not returned yet."""
        leaf = self._lost.get(self._lost.Key(key))
        n = self._lost_pending.pop(key, 0)
        if leaf is not None:
            delta = leaf.value - self._lost_seen.get(key, 0)
            n += delta
            self._lost_taken += delta
            self._lost.pop(self._lost.Key(key), None)
        self._lost_seen.pop(key, None)
        return n

    def tracked(self) -> dict[int, int]:
        """{pid: key} of the processes (and threads) followed now."""
        return {k.value: v.key for k, v in self._procs.items()}

    # -- events ------------------------------------------------------------------------------

    def _on_record(self, ctx, data, size) -> int:
        # Called by BCC from inside ring_buffer_poll; an exception here would be printed and
        # swallowed by ctypes, so it is kept and raised by poll().
        try:
            ev = self._decoder.decode(ct.string_at(data, size))
            if ev is None:
                pending = self._lost_pending
                pending[KEY_UNATTRIBUTED] = pending.get(KEY_UNATTRIBUTED, 0) + 1
            elif ev["kind"] == "open" and self._ignored(ev):
                self.ignored += 1
            else:
                self._batch.append(ev)
        except BaseException as e:  # noqa: BLE001  (re-raised by poll)
            self._callback_error = self._callback_error or e
        return 0

    def _ignored(self, ev: dict) -> bool:
        flags = ev["flags"]
        if flags & O_ACCMODE != O_RDONLY or flags & (O_CREAT | O_TRUNC):
            return False
        return ev["path"].startswith(self.ignore_prefixes)

    def poll(self, timeout_ms: int = 100) -> int:
        """Wait up to timeout_ms for events, hand what arrived to on_events in batches of at most
        batch_size, and return how many were handed over."""
        self.wait(timeout_ms)
        return self.flush()

    def wait(self, timeout_ms: int) -> None:
        """poll()'s first half: wait up to timeout_ms for events and take them in (decoded, not
        handed over). It touches the ring buffer and what flush() hands over, nothing that
        track() does: another thread may track() meanwhile. Events that did not wake us
        (probes.c: WAKE_BYTES) are taken when the timeout ends."""
        self._bpf.ring_buffer_poll(timeout_ms)
        self._bpf.ring_buffer_consume()

    def flush(self) -> int:
        """poll()'s second half: hand what wait() took in to on_events; returns how many."""
        return self._flush()

    def drain(self) -> int:
        """Hand over whatever is in the ring buffer now, without waiting."""
        self._bpf.ring_buffer_consume()
        return self._flush()

    def _flush(self) -> int:
        batch, self._batch = self._batch, []
        if self._callback_error is not None:
            err, self._callback_error = self._callback_error, None
            raise err
        for i in range(0, len(batch), self.batch_size):
            self.on_events(batch[i:i + self.batch_size])
        return len(batch)

    def lost(self) -> dict[int | None, int]:
        """{key: events lost since the last call}, only keys with losses; key None for losses
        that could not be attributed to a session."""
        out: dict[int | None, int] = {}
        # The total first: a loss it counts is in its session's counter already (probes.c
        # counts there first), so what the counters lack of it is what none could take.
        total = self._lost_total[self._lost_total.Key(0)].value
        if total != self._lost_total_seen:  # else nothing new: no walk over every session's
            self._lost_total_seen = total
            for k, v in self._lost.items():
                key = k.value
                delta = v.value - self._lost_seen.get(key, 0)
                self._lost_seen[key] = v.value
                if delta:
                    out[key] = delta
                    self._lost_taken += delta
            if total > self._lost_taken:
                out[KEY_UNATTRIBUTED] = out.get(KEY_UNATTRIBUTED, 0) + total - self._lost_taken
                self._lost_taken = total
        for key, n in self._lost_pending.items():
            out[key] = out.get(key, 0) + n
        self._lost_pending.clear()
        if KEY_UNATTRIBUTED in out:
            out[None] = out.pop(KEY_UNATTRIBUTED)
        return out

    # -- lifetime ----------------------------------------------------------------------------

    def close(self) -> None:
        """Detach and unload the programs (maps and ring buffer go with them)."""
        bpf, self._bpf = getattr(self, "_bpf", None), None
        if bpf is not None:
            bpf.cleanup()

    def __enter__(self) -> "Tracer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
