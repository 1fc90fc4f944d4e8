"""PAM calls left as files for the agent (pam_module.queue, detach.sh --queue): the record
format's vectors, what the real detach.sh writes, and real logins through a lab sshd whose
agent is stopped, killed, or cannot write."""
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pam_module import hook, queue
from sshtrail import config, procfs
from sshtrail.errors import SshtrailError
from trail import locked_spool

BOOT = "7fb7ac07-6497-4a5d-9245-a94333ae6bf4"
RECORD = (b"sshtrail-pam-call 1\0caller=19334\0caller_start=6819428\0uptime=68194.63\0"
          b"boot=" + BOOT.encode() + b"\0PAM_TYPE=open_session\0PAM_USER=alice\0"
          b"PAM_SERVICE=sshd\0PAM_TTY=ssh\0PAM_RHOST=\0"
          b"SSH_CONNECTION=127.0.0.1 46258 127.0.0.1 22\0"
          b"SSH_AUTH_INFO_0=publickey ssh-ed25519 AAAA\n\0end\0")
DETACH = os.path.join(os.path.dirname(hook.__file__), "detach.sh")


# -- the format -----------------------------------------------------------------------------

def test_a_record_parses_to_its_fields():
    fields = queue.parse(RECORD)
    assert fields["caller"] == "19334" and fields["uptime"] == "68194.63"
    assert fields["SSH_AUTH_INFO_0"] == "publickey ssh-ed25519 AAAA\n"
    assert fields["PAM_RHOST"] == ""


def test_every_part_of_a_record_is_not_whole_yet():
    # detach.sh's printf may reach the file in several writes: no prefix is an error.
    for n in range(len(RECORD)):
        assert queue.parse(RECORD[:n]) is None, n


@pytest.mark.parametrize("data, reason", [
    (b"#!/bin/sh\0end\0", "does not start with"),
    (RECORD.replace(b"PAM_TTY=", b"LD_PRELOAD="), "known NAME"),
    (RECORD.replace(b"PAM_TTY=ssh", b"PAM_USER=bob"), "there twice"),
    (RECORD.replace(b"PAM_TTY=ssh\0", b""), "PAM_TTY are missing"),
    (RECORD.replace(b"PAM_TTY=ssh\0", b"PAM_TTY\0"), "NAME=VALUE"),
    (RECORD[:-5] + b"x" * queue.MAX_RECORD + b"\0end\0", "more than"),
])
def test_what_is_no_record_is_refused_with_the_reason(data, reason):
    with pytest.raises(queue.RecordError, match=reason):
        queue.parse(data)


def test_a_call_of_this_boot_is_stamped_when_pam_made_it():
    m = queue.message(queue.parse(RECORD), "68194.63.4711", 5000.0, boot=BOOT,
                      boottime=68200.63, wall=1_700_000_000.0)
    assert m["now"] == pytest.approx(1_700_000_000.0 - 6.0)
    assert m["ppid"] == 19334 and m["ppid_start"] == 6819428 and m["boot"] == BOOT
    assert "PAM_RHOST" not in m["env"]  # empty: unset
    call = hook.PamCall.from_message(m)
    assert call.type == "open_session" and call.addr == "127.0.0.1:46258"
    # The same file read again (an agent killed after writing it) gives the same event uids.
    again = queue.message(queue.parse(RECORD), "68194.63.4711", 0.0, boot=BOOT, boottime=1.0,
                          wall=1.0)
    assert again["seed"] == m["seed"]
    other = queue.message(queue.parse(RECORD), "68194.63.4712", 0.0, boot=BOOT, boottime=1.0,
                          wall=1.0)
    assert other["seed"] != m["seed"]


def test_a_call_of_another_boot_is_stamped_when_its_file_was_written():
    m = queue.message(queue.parse(RECORD), "68194.63.4711", 1_690_000_000.5, boot="other",
                      boottime=10.0, wall=1_700_000_000.0)
    assert m["now"] == 1_690_000_000.5 and m["boot"] == BOOT


def test_a_bad_caller_is_refused():
    with pytest.raises(queue.RecordError, match="not a pid"):
        queue.message(queue.parse(RECORD.replace(b"caller=19334", b"caller=1 2")), "1.2.3",
                      0.0, boot=BOOT, boottime=0.0, wall=0.0)


# -- detach.sh, the writer --------------------------------------------------------------------

def _detach(queue_dir, marker, env):
    """detach.sh as pam_exec runs it; its "hook" only leaves `marker` behind."""
    fake_hook = marker.with_suffix(".sh")
    fake_hook.write_text(f"#!/bin/sh\n/usr/bin/touch {marker}\n")
    fake_hook.chmod(0o755)
    base = {"PAM_TYPE": "open_session", "PAM_USER": "alice", "PAM_SERVICE": "sshd",
            "SSH_CONNECTION": "127.0.0.1 50500 127.0.0.1 22"}
    return subprocess.run(["/bin/sh", DETACH, "--queue", str(queue_dir), str(fake_hook)],
                          env=dict(base, **env), capture_output=True, timeout=10)


def _records(queue_dir):
    return {n: (queue_dir / n).read_bytes() for n in os.listdir(queue_dir) if n != "agent"}


def test_detach_leaves_the_call_for_a_live_agent_and_starts_nothing(tmp_path):
    q = tmp_path / "q"
    q.mkdir(mode=0o700)
    (q / "agent").write_text(f"{os.getpid()} {procfs.start_time(os.getpid())}\n")
    hostile = "st-x\n%s\\0 $(touch /tmp/pwned) 'a=b'"
    r = _detach(q, tmp_path / "ran", {"PAM_RHOST": hostile, "SSH_AUTH_INFO_0": "publickey k\n"})
    assert r.returncode == 0 and r.stderr == b""
    (name, data), = _records(q).items()
    fields = queue.parse(data)
    assert fields["PAM_RHOST"] == hostile and fields["SSH_AUTH_INFO_0"] == "publickey k\n"
    assert fields["caller"] == str(os.getpid())  # pam_exec's place: the caller is our process
    assert fields["caller_start"] == str(procfs.start_time(os.getpid()))
    assert fields["boot"] == procfs.boot_id() and fields["PAM_TTY"] == ""
    assert name.startswith(fields["uptime"] + ".")
    time.sleep(0.6)  # the hook would have run by now (0.3 s later)
    assert not (tmp_path / "ran").exists() and not os.path.exists("/tmp/pwned")


@pytest.mark.parametrize("agent", ["gone", "pid reused", "no queue"])
def test_without_a_live_agent_detach_starts_the_hook(tmp_path, agent):
    q = tmp_path / "q"
    if agent != "no queue":
        q.mkdir(mode=0o700)
        dead = subprocess.Popen(["/bin/true"])
        dead.wait()
        pid, start = ((dead.pid, 1) if agent == "gone"
                      else (os.getpid(), procfs.start_time(os.getpid()) + 1))
        (q / "agent").write_text(f"{pid} {start}\n")
    r = _detach(q, tmp_path / "ran", {})
    assert r.returncode == 0
    deadline = time.monotonic() + 10
    while not (tmp_path / "ran").exists():
        assert time.monotonic() < deadline, "the hook was not started"
        time.sleep(0.05)
    assert agent == "no queue" or _records(q) == {}


# -- the agent's drain ------------------------------------------------------------------------

def test_what_is_not_a_whole_call_is_dropped_and_said(tmp_path):
    cfg_path = tmp_path / "sshtrail.toml"
    cfg_path.write_text(f'[spool]\npath = "{tmp_path}/spool.db"\n')
    drain = queue.PamQueue(config.load(cfg_path))
    q = tmp_path / "spool.db.pam-calls"
    assert oct(q.stat().st_mode & 0o777) == "0o700"
    now = math.floor(time.clock_gettime(time.CLOCK_BOOTTIME) * 100) / 100  # as detach.sh: cut
    young, old = f"{now:.2f}.2", f"{now - queue.STALE - 1:.2f}.3"
    (q / "10.00.1").write_bytes(b"#!/bin/sh\n")
    (q / young).write_bytes(RECORD[:40])  # its writer is still at it
    (q / old).write_bytes(RECORD[:50])  # ...and this one's stopped long ago
    try:
        assert drain.step(defer=0) == 0
        dropped = [r[0] for r in drain.spool.db.execute(
            "SELECT json_extract(body, '$.reason') FROM events "
            "WHERE json_extract(body, '$.event') = 'spool.dropped'")]
    finally:
        drain.close()
    assert sorted(os.listdir(q)) == [young]
    assert len(dropped) == 2
    assert any("10.00.1" in d and "does not start with" in d for d in dropped)
    assert any(old in d and "cut short" in d for d in dropped)


def test_a_queue_folder_someone_else_could_write_is_refused(tmp_path):
    cfg_path = tmp_path / "sshtrail.toml"
    cfg_path.write_text(f'[spool]\npath = "{tmp_path}/spool.db"\n')
    (tmp_path / "spool.db.pam-calls").mkdir()
    os.chown(tmp_path / "spool.db.pam-calls", 65534, 65534)  # nobody's: could forge logins
    with pytest.raises(SshtrailError, match="must be a directory of root's"):
        queue.PamQueue(config.load(cfg_path))


def test_a_call_is_taken_once_its_login_is_under_way(tmp_path):
    cfg_path = tmp_path / "sshtrail.toml"
    cfg_path.write_text(f'[spool]\npath = "{tmp_path}/spool.db"\n')
    drain = queue.PamQueue(config.load(cfg_path))
    q = tmp_path / "spool.db.pam-calls"
    # The first step creates the spool (synchronous FULL: fsyncs): done before the call's
    # clock is read, so that a loaded machine's fsyncs cannot age the call past DEFER.
    assert drain.step() == 0
    # Made just now, by the boot clock, cut to hundredths as /proc/uptime is (detach.sh):
    # rounded up, the name could lie ahead of step()'s clock, which takes it for a call of a
    # boot before, and writes it at once. (CI failed so, once: the spool's creation had hidden
    # it, being slower than the 5 ms a rounded-up name can be ahead.)
    now = math.floor(time.clock_gettime(time.CLOCK_BOOTTIME) * 100) / 100
    call = q / f"{now:.2f}.4711"
    call.write_bytes(RECORD)
    try:
        assert drain.step() == 0 and call.exists()
        call = call.rename(q / f"{now - queue.DEFER:.2f}.4711")
        assert drain.step() == 1 and not call.exists()
        kinds = [r[0] for r in drain.spool.db.execute("SELECT event FROM events ORDER BY seq")]
    finally:
        drain.close()
    assert kinds == ["user.login", "session.start"]


# -- real logins ------------------------------------------------------------------------------

@pytest.fixture
def hook_trail(lab_factory):
    """make(settings) -> Trail: a lab with sshtrail's PAM hooks (no wrapper) and its agent."""
    from trail import Trail
    made = []

    def make(settings=""):
        t = Trail(lab_factory(), settings=settings)
        made.append(t)
        t.install(wrapper=False)
        t.start_agent()
        return t
    yield make
    for t in made:
        t.close()


def test_a_login_while_the_agent_is_stopped_waits_for_the_next_agent(hook_trail):
    """SIGSTOP: the agent is there (detach.sh queues) but takes nothing; then it is killed, as
    by the OOM killer, with the calls still queued: the next agent writes them, stamped when
    PAM made them, and no process of ours ran for them meanwhile."""
    trail = hook_trail()
    user = trail.lab.add_user("quinn")
    os.kill(trail.agent.pid, signal.SIGSTOP)
    try:
        t0 = time.time()
        r = trail.lab.ssh(user, "echo in")
        t1 = time.time()
        assert r.returncode == 0 and r.stdout == b"in\n"
        deadline = time.monotonic() + 10
        while len(calls := [queue.parse(d) for d in _records(
                Path(f"{trail.spool_path}.pam-calls")).values()]) < 3:  # close: after the client
            assert time.monotonic() < deadline, calls
            time.sleep(0.05)
        assert trail._processes_of_this_trail() == []  # no hook started, none sleeping
        assert sorted(c["PAM_TYPE"] for c in calls) == ["account", "close_session",
                                                        "open_session"]
    finally:
        os.kill(trail.agent.pid, signal.SIGKILL)
        trail.agent.wait()
    time.sleep(1.0)
    trail.start_agent()
    evs = trail.wait_for(lambda e: {"user.login", "session.start", "session.end"}
                         <= {x["event"] for x in e}, what="the queued calls", user=user.login)
    start = next(e for e in evs if e["event"] == "session.start")
    assert t0 - 0.1 <= _epoch(start["time"]) <= t1 + 0.1  # not when the new agent wrote it
    assert next(e for e in evs if e["event"] == "session.end")["sid"] == start["sid"]
    trail.wait_for_detached()
    assert trail.queued_pam_calls() == []


def test_the_agent_keeps_the_wrappers_config_cache_fresh(hook_trail):
    """Sessions read the config through a cache only root writes: with no Python hook run for
    a login any more, the agent must write it, or each session start parses the TOML again."""
    import marshal
    trail = hook_trail()
    trail.write_config("[pam]\ntimeout = 4.5\n")  # a new file: the cache is stale now
    trail.lab.ssh(trail.lab.add_user("sam"), "true")
    trail.wait_for_detached()
    st = os.stat(trail.config)
    with open(config.cache_file(str(trail.config)), "rb") as f:
        stamp, values = marshal.load(f)
    assert tuple(stamp) == (st.st_ino, st.st_size, st.st_mtime_ns)
    assert values["pam.timeout"] == 4.5


def test_a_locked_spool_holds_neither_the_login_nor_loses_its_calls(hook_trail):
    trail = hook_trail("[spool]\nbusy_timeout = 30.0\n")
    user = trail.lab.add_user("rita")
    with locked_spool(trail.spool_path):
        t0 = time.monotonic()
        assert trail.lab.ssh(user, "true").returncode == 0
        assert time.monotonic() - t0 < 10
        time.sleep(0.5)
        assert len(trail.queued_pam_calls()) >= 2  # waiting, not dropped
    trail.wait_for(lambda e: {"user.login", "session.start", "session.end"}
                   <= {x["event"] for x in e}, what="the calls", user=user.login)


def _epoch(iso: str) -> float:
    from datetime import datetime
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
