"""Host events end to end: the agent's BPF tracer following recorded sessions on a real sshd."""
import socket
import subprocess
import time

import pytest

pytestmark = pytest.mark.integration

try:
    import bcc  # noqa: F401  (only: is it there)
    HAVE_BCC = True
except ImportError:
    HAVE_BCC = False
needs_bcc = pytest.mark.skipif(not HAVE_BCC, reason="BCC (Debian's python3-bpfcc) is not installed")


@pytest.fixture
def trail(trail_factory):
    t = trail_factory(settings="[ebpf]\nenabled = true\n")
    (start,) = t.events(type="agent.start")
    assert "host events on" in start["message"]
    return t


@pytest.fixture
def listener():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    yield s.getsockname()[1]
    s.close()


def events_of(trail, sid, kind, n=1, timeout=20):
    def have(evs):
        return len([e for e in evs if e.get("sid") == sid]) >= n
    evs = trail.wait_for(have, type=kind, what=f"{n} {kind}", timeout=timeout)
    return [e for e in evs if e.get("sid") == sid]


def session_sid(trail, login):
    (ev,) = trail.wait_for(lambda e: len(e) >= 1, type="session.start", user=login)
    return ev["sid"]


@needs_bcc
def test_commands_files_and_connects_of_a_session(trail, listener):
    user = trail.lab.add_user("bpf")
    hundred = " ".join(f"arg{i}" for i in range(100))
    script = ("ls /etc >/dev/null; cat /etc/hostname >/dev/null; "
              f"python3 -c \"import socket; socket.create_connection(('127.0.0.1', {listener})).close()\"; "
              f"/bin/echo {hundred} >/dev/null")
    r = trail.lab.ssh(user, script)
    assert r.returncode == 0, r.stderr
    sid = session_sid(trail, user.login)
    cmds = events_of(trail, sid, "session.command", n=4)
    argvs = [c["argv"] for c in cmds]
    assert ["ls", "/etc"] in argvs and ["cat", "/etc/hostname"] in argvs
    assert ["/bin/echo"] + [f"arg{i}" for i in range(100)] in argvs
    disk = events_of(trail, sid, "session.disk")
    assert any(d["path"] == "/etc/hostname" and d["return_code"] >= 0 for d in disk)
    assert any(d["path"] == "/etc" for d in disk)  # ls opens the directory
    (net,) = [n for n in events_of(trail, sid, "session.network")
              if n["dst_port"] == listener]
    assert net["dst_addr"] == "127.0.0.1" and net["version"] == 4 and net["return_code"] == 0
    # Nothing of this session is attributed elsewhere, and the table shows it readably.
    table = trail.cli("events", "--user", user.login).stdout
    assert "run ls /etc" in table and f"connect 127.0.0.1:{listener}" in table


@needs_bcc
def test_background_jobs_that_outlive_the_session_stay_attributed(trail):
    user = trail.lab.add_user("bg")
    r = trail.lab.ssh(user, "nohup sh -c 'sleep 1; cat /etc/passwd' >/dev/null 2>&1 & "
                            "setsid sh -c '(sleep 1; cat /etc/group) &' >/dev/null 2>&1; exit 0")
    assert r.returncode == 0
    sid = session_sid(trail, user.login)
    # Both jobs open their file a second after the session has ended.
    trail.wait_for(lambda evs: {"/etc/passwd", "/etc/group"} <= {d["path"] for d in evs
                                                                 if d.get("sid") == sid},
                   type="session.disk", what="the background jobs' opens", timeout=20)


@needs_bcc
def test_processes_outside_sessions_and_other_sessions_are_not_mixed(trail, tmp_path):
    a, b = trail.lab.add_user("sa"), trail.lab.add_user("sb")
    marker = tmp_path / "outside-marker"
    marker.write_text("x")
    subprocess.run(["cat", str(marker)], check=True, capture_output=True)  # not in a session
    ra = trail.lab.ssh(a, "cat /etc/hostname >/dev/null; sleep 0.5")
    rb = trail.lab.ssh(b, "cat /etc/os-release >/dev/null")
    assert ra.returncode == rb.returncode == 0
    sa, sb = session_sid(trail, a.login), session_sid(trail, b.login)
    events_of(trail, sa, "session.disk")
    events_of(trail, sb, "session.disk")
    time.sleep(1)
    disk = trail.events(type="session.disk")
    assert not [d for d in disk if d["path"] == str(marker)]
    assert all(d["login"] == a.login for d in disk if d["sid"] == sa)
    assert all(d["login"] == b.login for d in disk if d["sid"] == sb)
    assert not [d for d in disk if d["sid"] == sa and d["path"] == "/etc/os-release"]
    assert not [d for d in disk if d["sid"] == sb and d["path"] == "/etc/hostname"]


@needs_bcc
def test_port_forwarding_and_what_a_login_shell_runs_first_belong_to_their_session(trail):
    # ProxyJump (`ssh -W`, like -L and -D) opens no session channel: no wrapper starts, and the
    # connect is the connection's own sshd's; for `ssh -R` it listens. tcsh runs ~/.tcshrc for `tcsh -c wrapper` before
    # the wrapper starts. Both happen in the connection outside its recording, and are
    # followed from sshd's fork. What the recorder itself does before its hello is not shown.
    lab = trail.lab
    jump, rc = lab.add_user("jump"), lab.add_user("rc", shell="/usr/bin/tcsh")
    (rc.home / ".tcshrc").write_text("/bin/cat /etc/hostname > /dev/null\n")
    target = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    target.bind(("127.0.0.1", 0))
    target.listen(1)
    port = target.getsockname()[1]
    argv, env = lab.ssh_argv(jump, None, extra_opts=["-W", f"127.0.0.1:{port}"])
    tunnel = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        target.settimeout(20)
        conn, _ = target.accept()
        conn.sendall(b"through\n")
        assert tunnel.stdout.read(8) == b"through\n"
        conn.close()
    finally:
        tunnel.stdin.close()
        tunnel.wait(20)
        target.close()
    # ssh -R: the connection's sshd listens on the host.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        rport = probe.getsockname()[1]
    argv, env = lab.ssh_argv(jump, None, extra_opts=["-N", "-R", f"127.0.0.1:{rport}:127.0.0.1:9"])
    reverse = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        (listen,) = trail.wait_for(lambda e: len(e) >= 1, type="session.listen",
                                   user=jump.login, what="the port ssh -R listens on")
    finally:
        reverse.terminate()
        reverse.wait(20)
    assert lab.ssh(jump, "true").returncode == 0  # a recorded session of the same user
    assert lab.ssh(rc, "true").returncode == 0
    starts = trail.wait_for(lambda e: len(e) >= 3, type="session.start", user=jump.login)
    (forward,) = events_of(trail, starts[0]["sid"], "session.network")
    assert (forward["dst_addr"], forward["dst_port"]) == ("127.0.0.1", port)
    assert forward["forwarded"] is True and forward["program"].startswith("sshd")
    # It returned "in progress"; the handshake's end came after, as its own event.
    (made,) = events_of(trail, starts[0]["sid"], "session.network_outcome")
    assert (made["dst_addr"], made["dst_port"], made["established"]) == ("127.0.0.1", port, True)
    assert made["forwarded"] is True and made["pid"] == forward["pid"]
    assert listen["sid"] == starts[1]["sid"] and listen["forwarded"] is True
    assert (listen["addr"], listen["port"], listen["return_code"]) == ("127.0.0.1", rport, 0)
    rc_sid = session_sid(trail, rc.login)
    ran = trail.wait_for(lambda evs: ["/bin/cat", "/etc/hostname"] in [
        c["argv"] for c in evs if c.get("sid") == rc_sid and c.get("outside")],
        type="session.command", what="the cat that ~/.tcshrc ran", timeout=20)
    assert [c for c in ran if c.get("sid") == rc_sid and c.get("outside")][0]["argv"][0] == "tcsh"
    # By now every earlier event has been placed or left out: of jump's, only the forward is
    # outside a recording (not its wrapper's exec and imports before the hello).
    outside = [e for e in trail.events(user=jump.login) if e.get("outside")]
    assert sorted(outside, key=lambda e: e["time"]) == [forward, made, listen]
    table = trail.cli("events", "--user", jump.login, "--type", "session.network").stdout
    # sshd connects without blocking: the call returns before the connection is made.
    assert f"connect 127.0.0.1:{port} (in progress; forwarded by sshd for the client)" in table
    table = trail.cli("events", "--user", jump.login, "--type", "session.network_outcome").stdout
    assert f"connect 127.0.0.1:{port} established (forwarded by sshd for the client)" in table
    table = trail.cli("events", "--user", jump.login, "--type", "session.listen").stdout
    assert f"listen 127.0.0.1:{rport} (forwarded by sshd for the client)" in table


@needs_bcc
def test_a_session_is_followed_again_by_an_agent_restarted_under_it(trail):
    # The new agent's tracer knows nothing of the session until its wrapper comes back, which
    # it does within a second though it has nothing to deliver (this session prints nothing).
    user = trail.lab.add_user("again")
    argv, env = trail.lab.ssh_argv(user, "sleep 8; cat /etc/hostname >/dev/null")
    session = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        sid = session_sid(trail, user.login)
        trail.wait_for(lambda e: len(e) >= 1, type="session.command", user=user.login,
                       what="the session's first command")
        trail.stop_agent()
        trail.start_agent()  # returns once its tracer is loaded
        assert session.wait(30) == 0
    finally:
        session.kill()
    evs = trail.wait_for(lambda evs: any(e["argv"] == ["cat", "/etc/hostname"] for e in evs),
                         type="session.command", user=user.login, what="the later command")
    (cat,) = [e for e in evs if e["argv"] == ["cat", "/etc/hostname"]]
    assert cat["sid"] == sid and "outside" not in cat  # in its recording, as before the restart


@needs_bcc
def test_sessions_whose_processes_are_all_gone_are_forgotten(tmp_path):
    # An agent runs for years: it must not keep every session it ever followed. A session with
    # a process still running (a daemon it left) is kept, and its events still come.
    import json
    from sshtrail import config, host_events
    from sshtrail.spool import Spool
    cfg = config.parse(f'[spool]\npath = {json.dumps(str(tmp_path / "spool.db"))}\n'
                       '[ebpf]\nenabled = true\n')
    hosts = host_events.HostEvents(cfg, sweep_every=0.3)
    daemon = subprocess.Popen(["sh", "-c", "read x; cat /etc/hostname >/dev/null"],
                              stdin=subprocess.PIPE)
    try:
        assert hosts.ready.wait(120) and hosts.loaded, hosts.reason
        for i in range(3):
            short = subprocess.Popen(["sleep", "0.2"])
            hosts.track(short.pid, f"short-{i}", "u")
            short.wait()
        hosts.track(daemon.pid, "lives-on", "u")
        deadline = time.monotonic() + 10
        while hosts.sessions_known() > 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert hosts.sessions_known() == 1
        daemon.communicate(b"go\n", timeout=10)
        spool = Spool(str(tmp_path / "spool.db"))
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                rows = spool.db.execute("SELECT sid FROM events WHERE event = 'session.command'"
                                        ).fetchall()
                if ("lives-on",) in rows:
                    break
                time.sleep(0.1)
            assert ("lives-on",) in rows
        finally:
            spool.close()
    finally:
        daemon.kill()
        hosts.stop()


@needs_bcc
def test_the_tracer_waits_for_events_without_the_lock_a_hello_takes(tmp_path):
    # track() runs inside a wrapper's hello, which the session waits for: while the tracer's
    # thread held the lock through its 20 ms waits, eBPF added 41-69 ms to every session's
    # setup (bench/pty, "with host events on").
    import json
    from sshtrail import config, host_events
    cfg = config.parse(f'[spool]\npath = {json.dumps(str(tmp_path / "spool.db"))}\n'
                       '[ebpf]\nenabled = true\n')
    hosts = host_events.HostEvents(cfg)
    try:
        assert hosts.ready.wait(120) and hosts.loaded, hosts.reason
        tracer, held = hosts._tracer, []
        real_wait = tracer.wait

        def wait(timeout_ms):
            held.append(hosts._lock.locked())
            real_wait(timeout_ms)
        tracer.wait = wait
        deadline = time.monotonic() + 10
        while len(held) < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(held) >= 5 and not any(held)
        # And a session tracked meanwhile is followed.
        p = subprocess.Popen(["sh", "-c", "read x; true"], stdin=subprocess.PIPE)
        hosts.track(p.pid, "meanwhile", "u")
        assert p.pid in tracer.tracked()
        p.communicate(b"\n", timeout=10)
    finally:
        hosts.stop()


@pytest.fixture
def trail_without_bcc(lab_factory):
    from trail import Trail
    t = Trail(lab_factory(), settings="[ebpf]\nenabled = true\n")
    t.install()
    t.start_agent(without_bcc=True)
    yield t
    t.close()


def test_without_bcc_the_agent_records_logins_and_sessions_and_says_why(trail_without_bcc):
    t = trail_without_bcc
    (off,) = t.wait_for(lambda e: len(e) >= 1, type="agent.ebpf_unavailable", what="why BPF is off")
    assert "python3-bpfcc" in off["reason"]
    user = t.lab.add_user("nobpf")
    r = t.lab.ssh(user, "echo still-recorded")
    assert r.returncode == 0 and r.stdout == b"still-recorded\n"
    evs = t.wait_for(lambda e: {"user.login", "session.start", "exec"} <= {x["event"] for x in e},
                     user=user.login, what="login, session and exec")
    assert not [e for e in evs if e["event"].startswith("session.") and e["event"] not in
                ("session.start", "session.end")]
