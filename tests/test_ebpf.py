"""The eBPF session tracer (ebpf/tracer.py) against the real kernel: real BPF programs on real
tracepoints, real processes. Needs root and Debian's python3-bpfcc; skipped, with the reason,
only when BCC cannot be imported.

Each test starts shells of its own (Shell below), tracks them under a key of its own, and makes
them run commands; the tracer is loaded once for the module. Every process a test starts is
gone when the test ends, including daemons that left their parent (killed by the pids the tracer
still follows for the test's key).
"""
from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

try:
    import bcc  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the host
    pytest.skip(f"BCC's Python bindings are missing ({e}): install Debian's python3-bpfcc and use "
                f"a virtualenv made with --system-site-packages", allow_module_level=True)

if os.geteuid() != 0:  # pragma: no cover - CI runs as root
    pytest.skip("the eBPF tracer needs root (CI runs as root)", allow_module_level=True)

from ebpf import tracer as tracer_mod  # noqa: E402
from ebpf.tracer import Tracer, TracerUnavailable  # noqa: E402

PYTHON = "/usr/bin/python3"
ENV = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C"}
MAX_ARG_LEN = 256
MAX_PATH = 512
_keys = itertools.count(100)


class Collector:
    """The module's tracer and everything it reported."""

    def __init__(self):
        self.events: list[dict] = []
        self.tracer = Tracer(self.events.extend, max_arg_len=MAX_ARG_LEN, max_path=MAX_PATH)

    def wait_for(self, pred, timeout: float = 10.0, count: int = 1) -> list[dict]:
        """Poll until `count` events match pred; return all that match (fails on timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            self.tracer.poll(50)
            found = [e for e in self.events if pred(e)]
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                pytest.fail(f"no event matched within {timeout}s")

    def settle(self, seconds: float = 0.3) -> None:
        """Take in whatever is still on its way."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.tracer.poll(50)

    def of(self, key: int) -> list[dict]:
        return [e for e in self.events if e["key"] == key]


@pytest.fixture(scope="module")
def trace():
    c = Collector()
    yield c
    c.tracer.close()


class Shell:
    """A /bin/sh reading commands from a pipe, tracked under `key` unless key is None."""

    def __init__(self, trace: Collector | None, key: int | None):
        self.trace, self.key = trace, key
        self.proc = subprocess.Popen(["/bin/sh"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=ENV, cwd="/",
                                     start_new_session=True)
        self.pid = self.proc.pid
        self._n = 0
        if key is not None:
            trace.tracer.track(self.pid, key)

    def run(self, cmd: str) -> str:
        """Run cmd, wait for it to finish, return its output."""
        self._n += 1
        marker = f"__done_{self._n}__"
        self.proc.stdin.write(f"{cmd}\necho {marker}\n".encode())
        self.proc.stdin.flush()
        out = []
        for line in self.proc.stdout:
            line = line.decode(errors="replace")
            if line.rstrip("\n").endswith(marker):  # output without a final newline precedes it
                out.append(line.rstrip("\n")[:-len(marker)])
                return "".join(out)
            out.append(line)
        raise AssertionError(f"shell {self.pid} ended while running {cmd!r}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc.stdout.close()
        # Daemons that left the shell's process group are still followed by the tracer.
        if self.key is not None:
            for pid, key in self.trace.tracer.tracked().items():
                if key == self.key:
                    with _ignore_gone():
                        os.kill(pid, signal.SIGKILL)


class _ignore_gone:
    def __enter__(self):
        return self

    def __exit__(self, typ, *_):
        return typ is ProcessLookupError


@pytest.fixture
def shells(trace):
    made: list[Shell] = []

    def make(tracked: bool = True) -> Shell:
        s = Shell(trace, next(_keys) if tracked else None)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def wait_file(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


# -- exec ------------------------------------------------------------------------------------


def test_exec_reports_path_argv_parent_uid_and_time(trace, shells):
    sh = shells()
    t0 = time.time()
    assert "hostname" in sh.run("ls /etc")
    ev = trace.wait_for(lambda e: e["key"] == sh.key and e["kind"] == "exec"
                        and e["argv"] == ["ls", "/etc"])[0]
    assert ev["path"] == "/usr/bin/ls"
    assert ev["ppid"] == sh.pid
    assert ev["pid"] != sh.pid
    assert ev["uid"] == 0
    assert ev["comm"] == "ls"
    assert ev["ret"] == 0 and not ev["argv_truncated"]
    assert t0 - 1 < ev["time"] < time.time() + 1


def test_failed_exec_is_reported_with_its_error(trace, shells):
    sh = shells()
    sh.run("/nonexistent/sshtrail-no-such-program arg")
    ev = trace.wait_for(lambda e: e["key"] == sh.key and e["kind"] == "exec"
                        and e["path"] == "/nonexistent/sshtrail-no-such-program")[0]
    assert ev["ret"] == -2  # ENOENT
    assert ev["argv"] == []


def test_hundred_arguments_arrive_intact_and_in_order(trace, shells):
    sh = shells()
    args = [f"arg{i:03d}-{'x' * (i % 7)}" for i in range(100)]
    sh.run("/bin/echo " + " ".join(args) + " >/dev/null")
    ev = trace.wait_for(lambda e: e["key"] == sh.key and e["kind"] == "exec"
                        and e["path"] == "/bin/echo")[0]
    assert ev["argv"] == ["/bin/echo", *args]
    assert not ev["argv_truncated"]


def test_long_argument_is_cut_and_marked(trace, shells):
    sh = shells()
    long_arg = "L" * 1000
    sh.run(f"/bin/echo short {long_arg} after >/dev/null")
    ev = trace.wait_for(lambda e: e["key"] == sh.key and e["kind"] == "exec"
                        and e["path"] == "/bin/echo")[0]
    assert ev["argv_truncated"]
    assert ev["argv"][:2] == ["/bin/echo", "short"]
    assert ev["argv"][2] == "L" * (MAX_ARG_LEN - 1)
    assert ev["argv"][3] == "after"  # a cut argument does not swallow the next ones


def test_argument_exactly_at_the_limit_is_not_marked(trace, shells):
    sh = shells()
    exact = "E" * (MAX_ARG_LEN - 1)  # with its NUL it fills the slot exactly
    sh.run(f"/bin/echo {exact} >/dev/null")
    ev = trace.wait_for(lambda e: e["key"] == sh.key and e["kind"] == "exec"
                        and e["path"] == "/bin/echo")[0]
    assert ev["argv"] == ["/bin/echo", exact]
    assert not ev["argv_truncated"]


# -- open ------------------------------------------------------------------------------------


def test_open_reports_path_flags_and_result(trace, shells):
    sh = shells()
    sh.run("cat /etc/hostname; cat /nonexistent-sshtrail-file; echo hi > /tmp/sshtrail-ebpf-w")
    try:
        ok = trace.wait_for(lambda e: e["key"] == sh.key and e["kind"] == "open"
                            and e["path"] == "/etc/hostname")[0]
        assert ok["ret"] >= 0 and ok["comm"] == "cat" and ok["flags"] & 0o3 == os.O_RDONLY
        missing = trace.wait_for(lambda e: e["key"] == sh.key and e["kind"] == "open"
                                 and e["path"] == "/nonexistent-sshtrail-file")[0]
        assert missing["ret"] == -2
        write = trace.wait_for(lambda e: e["key"] == sh.key and e["kind"] == "open"
                               and e["path"] == "/tmp/sshtrail-ebpf-w")[0]
        assert write["flags"] & os.O_WRONLY and write["flags"] & os.O_CREAT
        assert write["pid"] == sh.pid  # the redirection is the shell's own open
    finally:
        Path("/tmp/sshtrail-ebpf-w").unlink(missing_ok=True)


def test_loader_cache_is_ignored_but_etc_is_not(trace, shells):
    sh = shells()
    sh.run("cat /etc/hostname")
    trace.wait_for(lambda e: e["key"] == sh.key and e["path"] == "/etc/hostname")
    trace.settle()
    paths = [e["path"] for e in trace.of(sh.key) if e["kind"] == "open"]
    assert "/etc/ld.so.cache" not in paths  # cat is dynamically linked: it did read the cache
    assert trace.tracer.ignored > 0
    # ...but an open for writing under an ignored prefix is always reported.
    assert not trace.tracer._ignored({"path": "/etc/ld.so.cache", "flags": os.O_WRONLY})


def test_long_path_is_cut_and_marked(trace, shells):
    sh = shells()
    long_path = "/tmp/" + "/".join(["d" * 60] * 12)  # ~730 bytes, no such file
    sh.run(f"cat {long_path}")
    ev = trace.wait_for(lambda e: e["key"] == sh.key and e["kind"] == "open"
                        and e["comm"] == "cat" and e["path"].startswith("/tmp/ddd"))[0]
    assert ev["path_truncated"]
    assert ev["path"] == long_path[:MAX_PATH - 1]
    assert ev["ret"] < 0


def test_path_exactly_at_the_limit_is_not_marked(trace, shells):
    sh = shells()
    path = ("/tmp/" + "/".join(["e" * 200] * 5))[:MAX_PATH - 1]  # components < NAME_MAX
    sh.run(f"cat {path}")
    ev = trace.wait_for(lambda e: e["key"] == sh.key and e["kind"] == "open"
                        and e["comm"] == "cat" and e["path"].startswith("/tmp/eee"))[0]
    assert ev["path"] == path
    assert not ev["path_truncated"]


# -- connect ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family,host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_connect_reports_destination_and_result(trace, shells, family, host):
    with socket.socket(family, socket.SOCK_STREAM) as srv:
        srv.bind((host, 0))
        srv.listen()
        port = srv.getsockname()[1]
        sh = shells()
        code = (f"import socket; s = socket.socket({int(family)}, socket.SOCK_STREAM); "
                f"s.connect(({host!r}, {port})); s.close()")
        sh.run(f"{PYTHON} -c \"{code}\"")
        ev = trace.wait_for(lambda e: e["key"] == sh.key and e["kind"] == "connect")[0]
    assert ev == {**ev, "family": 4 if family == socket.AF_INET else 6, "dst_addr": host,
                  "dst_port": port, "ret": 0, "comm": "python3"}


def test_refused_connect_reports_the_error(trace, shells):
    with socket.socket() as s:  # a port nobody listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        sh = shells()
        sh.run(f"{PYTHON} -c \"import socket; socket.socket().connect_ex(('127.0.0.1', {port}))\"")
        ev = trace.wait_for(lambda e: e["key"] == sh.key and e["kind"] == "connect")[0]
    assert ev["dst_port"] == port and ev["ret"] == -111  # ECONNREFUSED


def test_a_connect_left_in_progress_says_how_it_ended(trace, shells):
    """As sshd's forwarded connects (ssh -W, -L, -D): non-blocking, the syscall says only
    EINPROGRESS. One to a listening port is established, one to a closed port is not; a
    blocking connect says it in its own return code and gets no second event."""
    with socket.socket() as srv, socket.socket() as closed:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        closed.bind(("127.0.0.1", 0))  # bound, never listening: refused
        open_port, closed_port = srv.getsockname()[1], closed.getsockname()[1]
        sh = shells()
        code = ("import socket, select; "
                "c = [socket.socket() for _ in range(2)]; [s.setblocking(False) for s in c]; "
                f"[s.connect_ex(('127.0.0.1', p)) for s, p in zip(c, ({open_port}, {closed_port}))]; "
                "select.select([], c, [], 5); "
                f"socket.create_connection(('127.0.0.1', {open_port})).close()")
        sh.run(f"{PYTHON} -c \"{code}\"")
        mine = lambda e: e["key"] == sh.key  # noqa: E731
        outcomes = trace.wait_for(lambda e: mine(e) and e["kind"] == "connected", count=2)
        trace.settle()
    connects = [e for e in trace.events if mine(e) and e["kind"] == "connect"]
    assert sorted(e["ret"] for e in connects) == [-115, -115, 0]  # EINPROGRESS twice
    assert {(e["dst_port"], e["established"]) for e in outcomes} == {(open_port, True),
                                                                    (closed_port, False)}
    assert all(e["comm"] == "python3" and e["pid"] == connects[0]["pid"] for e in outcomes)
    assert len([e for e in trace.events if mine(e) and e["kind"] == "connected"]) == 2


@pytest.mark.parametrize("family,host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_listen_reports_the_address_it_was_bound_to(trace, shells, family, host):
    with socket.socket(family, socket.SOCK_STREAM) as probe:  # a port that is free now
        probe.bind((host, 0))
        port = probe.getsockname()[1]
    sh = shells()
    # A bound socket that never listens (a client choosing its port) is not reported; the
    # listening one is, with its address, after it.
    code = (f"import socket; c = socket.socket({int(family)}); c.bind(({host!r}, 0)); "
            f"s = socket.socket({int(family)}); s.bind(({host!r}, {port})); s.listen()")
    sh.run(f"{PYTHON} -c \"{code}\"")
    ev = trace.wait_for(lambda e: e["key"] == sh.key and e["kind"] == "listen")[0]
    assert ev == {**ev, "family": 4 if family == socket.AF_INET else 6, "addr": host,
                  "port": port, "ret": 0, "comm": "python3"}
    time.sleep(0.3)
    assert len([e for e in trace.events if e["key"] == sh.key and e["kind"] == "listen"]) == 1


def test_listen_on_port_0_reports_the_port_the_kernel_chose(trace, shells, tmp_path):
    sh = shells()  # as `ssh -R 0:host:port` makes sshd do
    chosen = tmp_path / "port"
    code = (f"import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); "
            f"open('{chosen}', 'w').write(str(s.getsockname()[1]))")
    sh.run(f"{PYTHON} -c \"{code}\"")
    ev = trace.wait_for(lambda e: e["key"] == sh.key and e["kind"] == "listen")[0]
    assert ev["port"] == int(chosen.read_text()) != 0


# -- attribution -----------------------------------------------------------------------------


def test_background_job_outliving_its_parent_stays_in_the_session(trace, shells, tmp_path):
    sh = shells()
    done = tmp_path / "nohup-done"
    # The inner sh exits at once; the job is reparented and reads a file a second later.
    sh.run(f"sh -c 'nohup sh -c \"sleep 1; cat /etc/passwd >/dev/null; touch {done}\" "
           f">/dev/null 2>&1 &'")
    wait_file(done)
    ev = trace.wait_for(lambda e: e["kind"] == "open" and e["path"] == "/etc/passwd"
                        and e["comm"] == "cat" and e["key"] == sh.key)[0]
    assert ev["key"] == sh.key


def test_double_fork_with_setsid_stays_in_the_session(trace, shells, tmp_path):
    sh = shells()
    done = tmp_path / "daemon-done"
    code = ("import os, time\n"
            "if os.fork(): os._exit(0)\n"
            "os.setsid()\n"
            "if os.fork(): os._exit(0)\n"
            "time.sleep(0.5)\n"
            f"os.execv('/bin/sh', ['sh', '-c', 'cat /etc/group >/dev/null; touch {done}'])\n")
    script = tmp_path / "daemonize.py"
    script.write_text(code)
    sh.run(f"{PYTHON} {script}")
    wait_file(done)
    cat = trace.wait_for(lambda e: e["kind"] == "exec" and e["argv"] == ["cat", "/etc/group"])
    assert [e["key"] for e in cat] == [sh.key]
    sh_exec = trace.wait_for(lambda e: e["kind"] == "exec" and e["key"] == sh.key
                             and e["path"] == "/bin/sh")[0]
    assert sh_exec["ppid"] != sh.pid  # forked by the daemonizing python, since gone


def test_threads_are_attributed_to_their_process(trace, shells, tmp_path):
    sh = shells()
    target = tmp_path / "from-a-thread"
    target.write_text("t")
    code = (f"import threading; "
            f"t = threading.Thread(target=lambda: open({str(target)!r}).close()); "
            f"t.start(); t.join()")
    sh.run(f"{PYTHON} -c \"{code}\"")
    ev = trace.wait_for(lambda e: e["key"] == sh.key and e.get("path") == str(target))[0]
    py = trace.wait_for(lambda e: e["key"] == sh.key and e["kind"] == "exec"
                        and e["path"] == PYTHON)[0]
    assert ev["pid"] == py["pid"]  # the process, not the thread


def test_processes_outside_sessions_produce_nothing(trace, shells, tmp_path):
    marker = tmp_path / f"untracked-{uuid.uuid4().hex}"
    marker.write_text("x")
    outsider = shells(tracked=False)
    insider = shells()
    marker.read_text()  # this test process: not tracked either
    outsider.run(f"cat {marker}; ls {tmp_path}")
    insider.run("cat /etc/hostname")
    # The tracer is working (the insider's event arrives) ...
    trace.wait_for(lambda e: e["key"] == insider.key and e["path"] == "/etc/hostname")
    trace.settle()
    # ... and nothing came from the outsider or from this process.
    assert not [e for e in trace.events if str(marker) in e.get("path", "")
                or str(marker) in " ".join(e.get("argv") or [])]
    assert not [e for e in trace.events if e["pid"] in (outsider.pid, os.getpid())]
    assert outsider.pid not in trace.tracer.tracked()


def test_two_sessions_never_get_each_others_events(trace, shells, tmp_path):
    a, b = shells(), shells()
    fa, fb = tmp_path / "only-a", tmp_path / "only-b"
    fa.write_text("a")
    fb.write_text("b")
    for _ in range(3):
        a.run(f"cat {fa}; sh -c 'cat {fa}'")
        b.run(f"cat {fb}; sh -c 'cat {fb}'")
    trace.wait_for(lambda e: e["key"] == a.key and e.get("path") == str(fa))
    trace.wait_for(lambda e: e["key"] == b.key and e.get("path") == str(fb))
    trace.settle()
    def text(key):
        return " ".join(f"{e.get('path')} {' '.join(e.get('argv') or [])}" for e in trace.of(key))
    a_text, b_text = text(a.key), text(b.key)
    assert str(fa) in a_text and str(fb) not in a_text
    assert str(fb) in b_text and str(fa) not in b_text
    assert len([e for e in trace.of(a.key) if e.get("path") == str(fa)]) == 6


def test_exited_processes_leave_no_map_entries(trace, shells):
    sh = shells()
    sh.run("for i in 1 2 3 4 5; do sh -c 'true' & done; wait")
    tracked = trace.tracer.tracked()
    assert [pid for pid, key in tracked.items() if key == sh.key] == [sh.pid]
    sh.close()
    assert sh.key not in trace.tracer.tracked().values()


def test_untrack_stops_reporting(trace, shells):
    sh = shells()
    sh.run("cat /etc/hostname")
    trace.wait_for(lambda e: e["key"] == sh.key and e.get("path") == "/etc/hostname")
    assert trace.tracer.untrack(sh.key) == 1
    sh.run("cat /etc/os-release")
    trace.settle()
    assert not [e for e in trace.of(sh.key) if e.get("path") == "/etc/os-release"]


def test_track_takes_in_the_descendants_a_process_already_has(trace, tmp_path):
    # A child forked by a second thread (listed under that thread in /proc), and its own child:
    # both born before track(), both followed after it.
    for name in ("child", "grandchild"):
        (tmp_path / name).write_text("x")
    code = ("import os, sys, threading\n"
            "def spawn():\n"
            "    if os.fork() == 0:\n"
            "        if os.fork() == 0:\n"
            "            os.read(0, 1); os.close(os.open(sys.argv[1] + '/grandchild', 0)); os._exit(0)\n"
            "        print('ready', flush=True)  # the grandchild is born\n"
            "        os.read(0, 1); os.close(os.open(sys.argv[1] + '/child', 0)); os.wait(); os._exit(0)\n"
            "    os.wait()\n"
            "t = threading.Thread(target=spawn); t.start(); t.join()\n")
    p = subprocess.Popen([PYTHON, "-c", code, str(tmp_path)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, env=ENV)
    try:
        assert p.stdout.readline() == b"ready\n"
        key = next(_keys)
        trace.tracer.track(p.pid, key)
        assert len([pid for pid, k in trace.tracer.tracked().items() if k == key]) == 3
        p.stdin.write(b"xx")
        p.stdin.close()
        assert p.wait(10) == 0
        for name in ("child", "grandchild"):
            trace.wait_for(lambda e: e["key"] == key and e.get("path") == str(tmp_path / name))
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_track_of_a_gone_process_raises(trace):
    p = subprocess.Popen(["true"])
    p.wait()
    with pytest.raises(ProcessLookupError):
        trace.tracer.track(p.pid, next(_keys))
    assert p.pid not in trace.tracer.tracked()


def test_nothing_lost_in_normal_operation(trace):
    # Runs after the tests above, in file order: none of them overflowed the 2 MB ring.
    trace.settle()
    assert trace.tracer.lost() == {}


# -- losses and failures ---------------------------------------------------------------------


def test_connects_in_progress_past_the_map_are_counted_never_silent():
    # A session could open connects nobody answers, to push a real one's outcome out of the
    # map: each connect left in progress gets its outcome, or is counted lost.
    received: list[dict] = []
    n = 12
    code = ("import os, socket, sys\n"
            "os.read(0, 1)\n"
            f"c = [socket.socket() for _ in range({n})]\n"
            "[s.setblocking(False) for s in c]\n"
            f"[s.connect_ex(('127.0.0.1', int(sys.argv[1]))) for s in c]\n"
            "print('connecting', flush=True)\n"
            "os.read(0, 1)\n"
            "[s.close() for s in c]\n")
    with Tracer(received.extend, kinds=("connect",), max_connecting=4) as t, \
            socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(0)  # never accepted: once its queue is full, SYNs are dropped, unanswered
        p = subprocess.Popen([PYTHON, "-c", code, str(srv.getsockname()[1])],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        key = next(_keys)
        try:
            t.track(p.pid, key)
            p.stdin.write(b"x")
            p.stdin.flush()
            assert p.stdout.readline() == b"connecting\n"
            p.stdin.write(b"x")  # closes them: the ones still in the map say "not established"
            p.stdin.close()
            assert p.wait(10) == 0
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            t.poll(50)
        lost = t.lost().get(key, 0)
    mine = [e for e in received if e["key"] == key]
    in_progress = [e for e in mine if e["kind"] == "connect" and e["ret"] == -115]
    outcomes = [e for e in mine if e["kind"] == "connected"]
    # A few are taken into the listener's queue (established, room made); the rest wait.
    assert len(in_progress) == n and lost >= 1, (lost, outcomes)
    assert len(outcomes) + lost >= n, (lost, outcomes)


def storm(t: Tracer, target: Path, key: int, received: list[dict], opens: int = 5000,
          execs: int = 200) -> tuple[int, dict]:
    """A process of session `key` opens `target` and execs /bin/true as fast as it can while
    nobody polls; returns (events of it delivered, t.lost())."""
    code = (f"import os\n"
            f"for _ in range({opens}): os.close(os.open({str(target)!r}, os.O_RDONLY))\n"
            f"for _ in range({execs}):\n"
            f"    if os.fork() == 0: os.execv('/bin/true', ['true'])\n"
            f"    os.wait()\n")
    r, w = os.pipe()
    p = subprocess.Popen([PYTHON, "-c", f"import os; os.read(0, 1)\n{code}"], stdin=r)
    os.close(r)
    try:
        t.track(p.pid, key)
        os.write(w, b"x")  # go; nobody polls while the storm runs
        assert p.wait(60) == 0
    finally:
        os.close(w)
        if p.poll() is None:
            p.kill()
            p.wait()
    while t.drain():
        pass
    got = [e for e in received if e.get("path") == str(target)
           or e["kind"] == "exec" and e["path"] == "/bin/true" and e["key"] == key]
    del received[:]
    return len(got), t.lost()


def test_ring_overflow_is_counted_never_silent(tmp_path):
    received: list[dict] = []
    with Tracer(received.extend, ringbuf_pages=8, kinds=("exec", "open")) as t:
        target = tmp_path / "storm"
        target.write_text("x")
        key = next(_keys)
        got, lost = storm(t, target, key, received)
    assert lost.get(key, 0) > 0, "a storm through an 8-page ring lost nothing?"
    # Every event is either delivered or counted (more counted: the loader's opens too).
    assert got + lost[key] >= 5000 + 200
    assert got < 5200


def test_a_loss_no_counter_slot_could_take_is_still_counted(tmp_path):
    # One slot in `lost`: the first session's storm takes it, so the second's losses find no
    # slot, neither their own nor the unattributed one. They are reported as unattributed.
    received: list[dict] = []
    with Tracer(received.extend, ringbuf_pages=8, kinds=("exec", "open"), max_lost_keys=1) as t:
        first, second = next(_keys), next(_keys)
        (tmp_path / "a").write_text("x")
        (tmp_path / "b").write_text("x")
        _, lost = storm(t, tmp_path / "a", first, received)
        assert lost.get(first, 0) > 0 and None not in lost, lost
        got, lost = storm(t, tmp_path / "b", second, received)
        assert t.lost() == {}  # reported once
    assert second not in lost, lost
    assert lost.get(None, 0) > 0, lost
    assert got + lost[None] >= 5000 + 200


def test_compile_failure_raises_unavailable_with_the_compiler_message(tmp_path, monkeypatch):
    broken = tmp_path / "probes.c"
    broken.write_text("int this is not C;\n")
    monkeypatch.setattr(tracer_mod, "PROBES_C", broken)
    with pytest.raises(TracerUnavailable) as info:
        Tracer(lambda batch: None)
    assert "compile" in info.value.reason
    assert "error" in info.value.reason  # clang's message is in the reason, not lost on stderr


def test_bad_settings_are_refused_before_loading():
    with pytest.raises(ValueError):
        Tracer(lambda batch: None, kinds=("exec", "mmap"))
    with pytest.raises(ValueError):
        Tracer(lambda batch: None, ringbuf_pages=12)
