"""Session recording end to end: the ForceCommand wrapper in a real sshd, the real OpenSSH client
(under a pseudo-terminal for interactive sessions), the agent, and the exports."""
import hashlib
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

import ptyprocess
import pytest

from sshtrail import asciicast, config, procfs
from sshtrail.spool import Spool
from terminal import PROMPT, Terminal, shell_user
from ttyrun import run_on_a_tty

pytestmark = pytest.mark.integration


@pytest.fixture
def trail(trail_factory):
    return trail_factory()


def recording_of(trail, user, timeout=15.0):
    evs = trail.wait_for(lambda e: any(x["event"] == "session.recording" for x in e),
                         user=user.login, timeout=timeout, what="session.recording")
    (rec,) = [e for e in evs if e["event"] == "session.recording"]
    out = trail.dir / f"{rec['sid']}.cast"
    trail.cli("export", rec["sid"], "--output", str(out))
    with open(out, "rb") as f:
        header, frames = asciicast.read(f)
        frames = list(frames)
    return rec, header, frames, out


def test_interactive_session_recorded_resized_and_exit_status(trail):
    user = shell_user(trail.lab)
    term = Terminal(trail.lab, user, cols=80, rows=24)
    term.expect(re.escape(PROMPT))
    term.send("echo first-$((20+1))\r")
    term.expect(rb"first-21")
    term.p.setwinsize(30, 100)
    time.sleep(0.3)
    term.send("stty size; echo second-$((40+2))\r")
    term.expect(rb"second-42")
    assert b"30 100" in term.seen  # the program in our pty saw the new size
    term.send("exit 3\r")
    assert term.wait() == 3

    rec, header, frames, path = recording_of(trail, user)
    assert header["width"] == 80 and header["height"] == 24
    times = [t for t, _, _ in frames]
    assert times == sorted(times)
    out = "".join(d for _, c, d in frames if c == "o")
    assert out.index("first-21") < out.index("30 100") < out.index("second-42")
    assert ("r", "100x30") in [(c, d) for _, c, d in frames]
    assert [c for _, c, _ in frames].count("i") == 0  # input is not recorded by default
    assert rec["exit_status"] == 3
    # The recording belongs to the same session as the login.
    starts = trail.events(type="session.start", user=user.login)
    assert [s["sid"] for s in starts] == [rec["sid"]]
    # Debian's asciinema, an independent reader, plays it back to the same output.
    r = run_on_a_tty(["asciinema", "cat", str(path)], cwd=trail.dir)
    assert r.returncode == 0 and b"second-42" in r.stdout


def test_a_paste_into_a_program_that_reads_no_input_leaves_its_output_flowing(trail):
    # sshd alone keeps relaying such a program's output whatever waits in its input (a paste
    # into `yes`, a build): a relay that waited for the program to take the input stopped
    # reading its output, and both waited for ever.
    user = trail.lab.add_user("paste")
    program = ("python3 -c \"import time\nfor i in range(2000): print('line', i, flush=True); "
               "time.sleep(0.001)\nprint('DONE')\"")
    term = Terminal(trail.lab, user, program)
    term.expect(rb"line 10\r")

    def paste():
        try:
            for i in range(4000):  # 228 KB: more than the ptys and the relay hold
                term.send(f"pasted line {i:05d} {'.' * 40}\n")
        except OSError:
            pass  # the session ended first
    threading.Thread(target=paste, daemon=True).start()
    term.expect(rb"DONE", timeout=30)
    assert term.wait() == 0


def test_a_short_sessions_login_and_recording_share_the_sid(trail):
    # The PAM hook runs after the login (pam_module/detach.sh defers it), by when a session
    # this short has ended and its sshd, which the sid is derived from, is gone.
    user = trail.lab.add_user("short")
    assert trail.lab.ssh(user, "true").returncode == 0
    (ev,) = trail.wait_for(lambda e: len(e) >= 1, type="exec", user=user.login, what="exec")
    (end,) = trail.wait_for(lambda e: len(e) >= 1, type="session.end", user=user.login,
                            what="session.end")
    (start,) = trail.events(type="session.start", user=user.login)
    assert start["sid"] == ev["sid"] == end["sid"]


def test_output_bytes_kept_exactly(trail):
    user = shell_user(trail.lab)
    blob = bytes(range(256)) * 4
    (user.home / "blob").write_bytes(blob)
    term = Terminal(trail.lab, user, command="cat ~/blob; exit 0")
    assert term.wait() == 0
    sid = recording_of(trail, user)[0]["sid"]
    spool = open_spool(trail)
    raw = b"".join(d for _, k, d in spool.frames(sid) if k == b"o")
    spool.close()
    # The pty turns \n into \r\n (onlcr): that is what the terminal showed; nothing else changed.
    assert raw == blob.replace(b"\n", b"\r\n")


def test_exec_exit_status_stdin_eof_and_stderr(trail):
    lab = trail.lab
    user = lab.add_user("ex")
    assert lab.ssh(user, "exit 7").returncode == 7
    r = lab.ssh(user, "cat; echo done; echo err >&2", input=b"from-stdin")
    assert r.returncode == 0 and r.stdout == b"from-stdindone\n" and r.stderr == b"err\n"
    evs = trail.wait_for(lambda e: len(e) >= 2, type="exec", user=user.login, what="2 exec events")
    assert [(e["command"], e["exit_status"]) for e in evs] == [
        ("exit 7", 7), ("cat; echo done; echo err >&2", 0)]
    assert evs[1]["bytes_in"] == len(b"from-stdin") and evs[1]["bytes_out"] == len(b"from-stdindone\n") + 4


@pytest.mark.parametrize("tty", [False, True])
def test_the_program_starts_as_sshd_would_start_it(trail_factory, tty):
    # The wrapper is Python, which ignores SIGPIPE and SIGXFSZ and, in the C locale, sets
    # LC_CTYPE=C.UTF-8 in its environment (PEP 538). Both reached every program of the session:
    # `yes | head -1` printed "Broken pipe", and a shell loop writing into `head` never ended.
    trail = trail_factory(extra_sshd_config="AcceptEnv LC_CTYPE\n")
    user = trail.lab.add_user("sig")
    probe = ("grep -E '^Sig(Ign|Blk)' /proc/self/status; echo \"ctype=${LC_CTYPE-unset}\"; "
             "timeout 10 sh -c 'while :; do echo loop; done | head -1'; yes | head -1")
    r = trail.lab.ssh(user, probe, tty=tty)
    out = (r.stdout + r.stderr).replace(b"\r\n", b"\n").decode()
    blocked, ignored, rest = out.split("\n", 2)
    # What the lab's sshd itself was started with is inherited past it (a test runner may
    # ignore a signal or two): only the wrapper's own are the wrapper's to undo.
    ours = 1 << (signal.SIGPIPE - 1) | 1 << (signal.SIGXFSZ - 1)
    assert blocked.startswith("SigBlk:") and ignored.startswith("SigIgn:"), out
    assert not (int(blocked.split()[1], 16) | int(ignored.split()[1], 16)) & ours, out
    assert rest == "ctype=unset\nloop\ny\n", out
    r = trail.lab.ssh(user, "echo \"ctype=${LC_CTYPE-unset}\"", tty=tty,
                      extra_opts=["-o", "SetEnv=LC_CTYPE=POSIX"])
    assert r.stdout.strip() == b"ctype=POSIX"


@pytest.mark.parametrize("tty", [False, True])
def test_a_program_killed_by_sigkill_ends_the_session_as_it_would_without_the_wrapper(trail, tty):
    # The wrapper leaves as its program did, by the same signal; SIGKILL cannot be reset to its
    # default, and trying to printed a traceback and exited 1 instead of sshd's exit-signal.
    user = trail.lab.add_user("kill")
    r = trail.lab.ssh(user, "echo x; kill -9 $$", tty=tty)
    assert r.returncode == 255 and b"Traceback" not in r.stdout + r.stderr, r.stderr
    (ev,) = trail.wait_for(lambda e: len(e) >= 1, type="exec" if not tty else "session.recording",
                           user=user.login)
    assert ev["exit_status"] == -signal.SIGKILL


def test_the_programs_terminal_has_the_clients_modes_and_is_ssh_tty(trail):
    # sshd sets the client's terminal modes on its pty; the wrapper's own pty had the kernel's
    # defaults: a client whose backspace sends ^H got ^H echoed at every cooked-mode prompt.
    user = shell_user(trail.lab, "modes")
    argv, env = trail.lab.ssh_argv(user, 'stty -a; [ "$SSH_TTY" = "$(tty)" ] && echo same-tty',
                                   tty=True)
    client = ptyprocess.PtyProcess.spawn(
        ["sh", "-c", 'stty erase ^H intr ^G; exec "$@"', "sh", *argv], env=env)
    out = b""
    while True:
        try:
            out += client.read(65536)
        except EOFError:
            break
    assert b"intr = ^G;" in out and b"erase = ^H;" in out, out
    assert b"same-tty" in out  # SSH_TTY names it, as sshd's names its pty


def test_a_command_and_terminal_that_are_not_utf8_work_as_without_the_wrapper(trail, tmp_path):
    # A file named in Latin-1 on the server: `scp -O lab:café.txt` has sshd hand the wrapper
    # `scp -f caf\xe9.txt`, bytes that are not UTF-8 (str here: surrogateescape). They must reach
    # the program exactly; the events show each such byte as U+FFFD, as host events do.
    lab = trail.lab
    user = shell_user(lab, "nu")
    name = "caf\udce9.txt"
    (user.home / name).write_bytes(b"latin-1 named\n")
    r = lab.ssh(user, "printf '%s' caf\udce9")
    assert (r.returncode, r.stdout, r.stderr) == (0, b"caf\xe9", b"")
    cfg = ssh_config(lab, user, tmp_path)
    r = subprocess.run(["scp", "-O", "-F", str(cfg), f"lab:{name}", str(tmp_path / name)],
                       capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / name).read_bytes() == b"latin-1 named\n"
    evs = trail.wait_for(lambda e: len(e) >= 2, type="exec", user=user.login, what="2 exec events")
    assert [(e["command"], e["exit_status"]) for e in evs] == [
        ("printf '%s' caf\ufffd", 0), ("scp -f caf\ufffd.txt", 0)]

    # Interactive, with a terminal name that is not UTF-8 either (the client sends its TERM).
    term = Terminal(lab, user, command="printf '[%s|%s]' caf\udce9 \"$TERM\"; exit 0",
                    term="vt100\udce9")
    assert term.wait() == 0
    assert b"[caf\xe9|vt100\xe9]" in term.seen
    rec, header, frames, _ = recording_of(trail, user)
    (row,) = [r for r in recordings_of(trail, user) if r["mode"] == "interactive"]
    assert (row["command"], row["term"]) == ("printf '[%s|%s]' caf\ufffd \"$TERM\"; exit 0",
                                             "vt100\ufffd")
    assert header["env"]["TERM"] == "vt100\ufffd"
    assert "[caf\ufffd|vt100\ufffd]" in "".join(d for _, k, d in frames if k == "o")


def test_a_command_longer_than_a_hello_holds_is_recorded_cut_and_says_so(trail):
    # sshd takes a command of up to 128 KiB, and the agent reads at most 64 KiB from a peer
    # before its hello: a command padded past that had the agent refuse the hello, and the
    # session ran unrecorded.
    lab = trail.lab
    user = shell_user(lab, "long")
    pad = " #" + "x" * 100_000
    command = "echo ok" + pad
    r = lab.ssh(user, command)
    assert (r.returncode, r.stdout) == (0, b"ok\n")
    (ev,) = trail.wait_for(lambda e: len(e) >= 1, type="exec", user=user.login, what="exec event")
    assert ev["command"] == command[:4096] and ev["command_bytes"] == len(command)
    table = trail.cli("events", "--user", user.login, "--type", "exec").stdout
    assert f"(cut: {len(command)} bytes in all) exit 0" in table

    command = "echo phase-$((6*7)); exit 0" + pad
    term = Terminal(lab, user, command=command)
    assert term.wait() == 0
    rec, _, frames, _ = recording_of(trail, user)
    assert "phase-42" in "".join(d for _, k, d in frames if k == "o")
    assert rec["command_bytes"] == len(command)
    assert trail.events(type="agent.peer_refused") == []


def test_install_compiles_what_the_wrapper_loads(trail_factory):
    # As a fresh clone has it: no bytecode. The wrapper runs as the user, who cannot write it
    # beside root's code, so without `sshtrail install` compiling it every session would.
    from session_wrapper import bytecode, shell
    for name in bytecode.PACKAGES:
        shutil.rmtree(os.path.join(bytecode.ROOT, name, "__pycache__"), ignore_errors=True)
    trail = trail_factory()
    user = trail.lab.add_user("pyc")
    argv = shell.command(sys.executable, str(trail.config))
    argv.insert(1, "-v")  # python says where each module's code object came from
    for interactive in (True, False):
        run = ["runuser", "-u", user.login, "--", "env", "SSH_ORIGINAL_COMMAND=exit 0", *argv]
        if interactive:
            r = run_on_a_tty(run, cwd=user.home)
        else:
            r = subprocess.run(run, cwd=user.home, capture_output=True, timeout=60,
                               stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr[-2000:]
        loaded = re.findall(rb"^# code object from '?(.+?)'?$", r.stderr, re.M)
        ours = [p.decode() for p in loaded if p.startswith(bytecode.ROOT.encode())]
        assert any("pty_relay" in p for p in ours) == interactive
        assert ours and [p for p in ours if not p.endswith(".pyc")] == []


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("big") / "random.bin"
    path.write_bytes(os.urandom(20 << 20))
    return path


def ssh_config(lab, user, tmp_path):
    """An ssh_config for scp, sftp and rsync, with the same options the lab's ssh uses."""
    argv, _ = lab.ssh_argv(user, None)
    opts = [argv[i + 1] for i, a in enumerate(argv) if a == "-o"]
    cfg = tmp_path / "ssh_config"
    cfg.write_text("Host lab\n  HostName 127.0.0.1\n" + f"  Port {lab.port}\n  User {user.login}\n"
                   + f"  IdentityFile {user.key}\n" + "".join(f"  {o.replace('=', ' ', 1)}\n" for o in opts))
    return cfg


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("tool", ["scp -O", "scp", "sftp", "rsync"])
def test_file_transfers_byte_identical(trail, big_file, tmp_path, tool):
    lab = trail.lab
    user = lab.add_user("xfer")
    cfg = ssh_config(lab, user, tmp_path)
    back = tmp_path / "back.bin"
    remote = f"{user.home}/copy.bin"
    if tool.startswith("scp"):
        opts = tool.split()[1:]
        up = ["scp", *opts, "-F", str(cfg), str(big_file), f"lab:{remote}"]
        down = ["scp", *opts, "-F", str(cfg), f"lab:{remote}", str(back)]
        cmds = [up, down]
    elif tool == "sftp":
        batch = tmp_path / "batch"
        batch.write_text(f"put {big_file} {remote}\nget {remote} {back}\n")
        cmds = [["sftp", "-F", str(cfg), "-b", str(batch), "lab"]]
    else:
        e = f"ssh -F {cfg}"
        cmds = [["rsync", "-e", e, str(big_file), f"lab:{remote}"],
                ["rsync", "-e", e, f"lab:{remote}", str(back)]]
    for cmd in cmds:
        r = subprocess.run(cmd, capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr
    assert sha(back) == sha(big_file)
    assert sha(user.home / "copy.bin") == sha(big_file)
    evs = trail.wait_for(lambda e: len(e) >= len(cmds), type="exec", user=user.login,
                         what="exec events")
    assert len(evs) == len(cmds) and all(e["exit_status"] == 0 for e in evs)
    if tool == "sftp":
        assert evs[0]["command"] == "/usr/lib/openssh/sftp-server"
    assert max(e["bytes_in"] + e["bytes_out"] for e in evs) >= 20 << 20


def test_git_push_and_clone_over_ssh(trail, tmp_path):
    # git runs git-receive-pack / git-upload-pack through sshd: binary pack data both ways on
    # pipes, which the wrapper must pass through untouched.
    lab = trail.lab
    user = lab.add_user("git")
    cfg = ssh_config(lab, user, tmp_path)
    env = dict(os.environ, GIT_SSH_COMMAND=f"ssh -F {cfg}", GIT_CONFIG_NOSYSTEM="1",
               HOME=str(tmp_path), GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.com")

    def git(*args, cwd=tmp_path):
        r = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, timeout=60,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr
        return r.stdout.decode().strip()

    assert lab.ssh(user, "git init -q --bare -b main repo.git").returncode == 0
    work = tmp_path / "work"
    git("init", "-q", "-b", "main", str(work))
    (work / "blob.bin").write_bytes(os.urandom(1 << 20))  # incompressible: a real pack
    git("add", "blob.bin", cwd=work)
    git("commit", "-q", "-m", "first", cwd=work)
    git("push", "-q", "lab:repo.git", "main", cwd=work)
    git("clone", "-q", "lab:repo.git", str(tmp_path / "clone"))
    assert git("rev-parse", "HEAD", cwd=tmp_path / "clone") == git("rev-parse", "HEAD", cwd=work)
    assert (tmp_path / "clone" / "blob.bin").read_bytes() == (work / "blob.bin").read_bytes()
    evs = trail.wait_for(lambda e: len(e) >= 3, type="exec", user=user.login, what="exec events")
    assert [e["command"].split()[0] for e in evs] == ["git", "git-receive-pack", "git-upload-pack"]
    assert all(e["exit_status"] == 0 for e in evs)
    assert evs[1]["bytes_in"] > 1 << 20 and evs[2]["bytes_out"] > 1 << 20


def test_wrapper_cannot_be_traced_and_killing_it_ends_the_session(trail):
    user = shell_user(trail.lab)
    # $PPID of a command the shell execs in place is the wrapper.
    probe = ("python3 -c \"import ctypes, os; l = ctypes.CDLL(None, use_errno=True); "
             "r = l.ptrace(16, os.getppid(), 0, 0); print('ptrace', r, ctypes.get_errno())\"")
    r = trail.lab.ssh(user, probe)
    assert r.stdout.strip() == b"ptrace -1 1"  # EPERM
    r = trail.lab.ssh(user, "cat /proc/$PPID/environ")
    assert r.returncode != 0 and b"Permission denied" in r.stderr

    term = Terminal(trail.lab, user)
    term.expect(re.escape(PROMPT))
    term.send("echo before-kill; kill -9 $PPID\r")
    term.wait()
    evs = trail.wait_for(lambda e: any(x["event"] == "session.recording" for x in e),
                         user=user.login, what="session.recording")
    (rec,) = [e for e in evs if e["event"] == "session.recording" and "end_reason" in e]
    assert "went away" in rec["end_reason"]


@pytest.mark.parametrize("whom", ["wrapper", "group"])
def test_a_signal_to_a_commands_wrapper_leaves_the_command_its_end(trail, whom):
    # The wrapper died of the first SIGTERM (or SIGINT, with a traceback to the client), before
    # its command's output and exit: the session read as crashed. sshd's signal request and a
    # shutdown signal the whole group, the command too, which then decides.
    user = trail.lab.add_user("sigx")
    argv, env = trail.lab.ssh_argv(user, "trap 'echo got-term; exit 5' TERM; echo up; "
                                         "for i in 1 2 3 4 5 6 7 8 9 10; do sleep 0.2; done; "
                                         "echo done-$((6*7))")
    client = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert client.stdout.readline() == b"up\n"
    (wrapper,) = wrappers_of(user)
    if whom == "wrapper":
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            os.kill(wrapper, sig)
    else:
        os.killpg(os.getpgid(wrapper), signal.SIGTERM)
    out, err = client.communicate(timeout=30)
    (ev,) = trail.wait_for(lambda e: len(e) >= 1, type="exec", user=user.login)
    assert ev["end_reason"] == ("the session wrapper was sent SIGTERM while the command ran, "
                                "and went on until the command ended")
    if whom == "wrapper":  # the command was not signalled: it finished
        assert (client.returncode, out, err) == (0, b"done-42\n", b"")
        assert ev["exit_status"] == 0 and ev["bytes_out"] == len(b"up\ndone-42\n")
    else:  # the command's own trap said so, and its status is its own (bash says its `sleep`
        # was terminated, as it would without the wrapper)
        assert (client.returncode, out) == (5, b"got-term\n") and b"Traceback" not in err
        assert ev["exit_status"] == 5


def test_a_signal_to_an_interactive_wrapper_other_than_a_hangup_leaves_it_relaying(trail):
    user = shell_user(trail.lab, "sigi")
    term = Terminal(trail.lab, user)
    term.expect(b"READY")
    (wrapper,) = wrappers_of(user)
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM):
        os.kill(wrapper, sig)
    term.send("echo alive-$((6*7)); exit 4\r")
    term.expect(b"alive-42")
    assert term.wait() == 4 and b"Traceback" not in term.seen
    rec = recording_of(trail, user)[0]
    assert rec["exit_status"] == 4 and "end_reason" not in rec


def test_a_command_whose_wrapper_is_killed_has_its_exec_event(trail):
    # Only an end from the wrapper wrote a command's `exec` event: killed, the command was in no
    # event at all (its recording's row alone had it).
    user = trail.lab.add_user("kexec")
    r = trail.lab.ssh(user, "kill -9 $PPID; echo gone-$((6*7))")
    assert r.returncode == 255
    (ev,) = trail.wait_for(lambda e: len(e) >= 1, type="exec", user=user.login)
    assert ev["command"] == "kill -9 $PPID; echo gone-$((6*7))" and ev["exit_status"] is None
    assert "went away without reporting an end" in ev["end_reason"]
    assert trail.events(type="session.recording", user=user.login) == []  # it recorded nothing
    table = trail.cli("events", "--user", user.login, "--type", "exec").stdout
    assert "exit status unknown; the session wrapper went away" in table


@pytest.mark.parametrize("ignores_hangup", [False, True])
def test_a_client_that_goes_away_leaves_a_whole_recording_that_says_so(trail, ignores_hangup):
    # sshd's pty hangs up when the client is gone, and SIGHUP used to kill the wrapper on the
    # spot: its last batch (the last ~50 ms of output) and its end were lost, and the session
    # read as crashed.
    user = shell_user(trail.lab, "hup")
    term = Terminal(trail.lab, user)
    term.expect(b"READY")
    if ignores_hangup:  # as nohup does: left running, as sshd leaves it
        term.send("trap '' HUP; echo trapped-$((2*3))\r")
        term.expect(b"trapped-6")
    term.send("echo phase-$((6*7))\r")
    term.expect(b"phase-42")
    term.p.kill(signal.SIGKILL)  # the client dies: sshd drops the connection and the pty
    rec, _, frames, _ = recording_of(trail, user)
    assert "phase-42" in "".join(d for _, k, d in frames if k == "o")
    assert rec["end_reason"].startswith("the terminal hung up (the client disconnected")
    if ignores_hangup:
        assert rec["end_reason"].endswith("ignored SIGHUP and was left running")
        assert rec["exit_status"] is None
    else:
        assert rec["end_reason"].endswith("was sent SIGHUP and ended")
        assert rec["exit_status"] == -signal.SIGHUP


def test_a_signal_after_the_program_exited_leaves_its_own_end(trail):
    # The program exits with 3, leaving a process that writes to its pty, and the client reads
    # nothing: the relay is still passing that output on when the wrapper is sent SIGTERM. The
    # end is the program's own, and says what came after; no SIGHUP was sent to it.
    user = shell_user(trail.lab, "termx")
    term = Terminal(trail.lab, user, command="trap '' HUP; yes tick & sleep 0.3; exit 3")
    term.expect(b"tick")  # the relay runs; the client reads no more after this
    (wrapper,) = wrappers_of(user)
    deadline = time.monotonic() + 15
    while _children(wrapper):
        assert time.monotonic() < deadline, "the program did not exit"
        time.sleep(0.05)
    os.kill(wrapper, signal.SIGTERM)
    assert term.wait() == 3
    rec, _, frames, _ = recording_of(trail, user)
    assert "tick" in "".join(d for _, k, d in frames if k == "o")
    assert rec["exit_status"] == 3
    assert rec["end_reason"] == (
        "the program had exited; then the session wrapper was sent SIGTERM, while processes it "
        "left running still wrote to its terminal")


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def wrappers_of(user) -> list[int]:
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                wrapper = b"session_wrapper/shell.py" in f.read()
            if wrapper and procfs.real_uid(int(name)) == user.uid:
                found.append(int(name))
        except OSError:
            pass
    return found


def test_a_program_in_the_session_cannot_reach_the_terminal_around_the_recording(trail):
    # sshd's pty, the wrapper's fds 0-2, belongs to the user. A program inside the session that
    # opened it wrote to the client and read from it past the recording (with the wrapper
    # SIGSTOPped, a whole shell: `bash -i <>/dev/pts/N`). The wrapper holds it exclusive.
    user = shell_user(trail.lab)
    term = Terminal(trail.lab, user)
    term.expect(re.escape(PROMPT))
    (wrapper,) = wrappers_of(user)
    outer = os.readlink(f"/proc/{wrapper}/fd/0")
    assert outer.startswith("/dev/pts/") and os.stat(outer).st_uid == user.uid
    term.send("echo own-$(tty)\r")
    own = re.search(rb"own-(/dev/pts/\d+)", term.expect(rb"own-/dev/pts/\d+\r"))[1]
    assert own != outer.encode()  # the program's terminal is the wrapper's pty, not sshd's
    term.send(f"echo BY$((0))PASS > {outer}; echo opened-$?\r")
    term.expect(rb"opened-\d")
    assert b"opened-1" in term.seen and b"Device or resource busy" in term.seen
    assert b"BY0PASS" not in term.seen
    # Its own terminal it opens as ever (/dev/tty: ssh and sudo asking for a password).
    term.send("echo OWN-$((1+1)) > /dev/tty; exit\r")
    assert term.wait() == 0
    assert b"OWN-2" in term.seen


@pytest.mark.parametrize("mode", ["best_effort", "strict"])
def test_a_process_holding_the_terminal_from_before_the_wrapper_is_reported(trail, mode):
    # One left running by an earlier login can watch /dev/pts and open the new session's pty
    # before the wrapper holds it exclusive; it keeps that descriptor. Here root opens it (as
    # root may) and hands it to such a process of the user's.
    trail.write_config(f'[recording]\nmode = "{mode}"\n')
    user = shell_user(trail.lab)
    term = Terminal(trail.lab, user)
    term.expect(re.escape(PROMPT))
    (wrapper,) = wrappers_of(user)
    fd = os.open(os.readlink(f"/proc/{wrapper}/fd/0"), os.O_RDWR | os.O_NOCTTY)
    try:
        lurker = subprocess.Popen(["/bin/bash", "-c", f"echo BY0PASS >&{fd}; exec sleep 60"],
                                  user=user.uid, group=user.gid, pass_fds=(fd,))
    finally:
        os.close(fd)
    try:
        term.expect(rb"BY0PASS")  # on the client, and in no recording
        evs = trail.wait_for(lambda e: any(x.get("pid") == lurker.pid for x in e),
                             type="session.recording_failed", user=user.login, timeout=20,
                             what="the report of the process holding the terminal")
        (ev,) = [e for e in evs if e.get("pid") == lurker.pid]
        assert "holds this session's terminal outside the session wrapper" in ev["reason"]
        assert ev["command"].startswith("sleep 60")
        (start,) = trail.events(type="session.start", user=user.login)
        assert ev["sid"] == start["sid"]
        if mode == "strict":
            assert ev["ended"] is True and lurker.wait(10) == -signal.SIGKILL
        else:
            assert "ended" not in ev and lurker.poll() is None
    finally:
        lurker.kill()
        lurker.wait()
    term.send("exit\r")
    term.wait()


def test_agent_down_best_effort_lets_in_and_says_so(trail, syslog_sink):
    user = trail.lab.add_user("be")
    trail.stop_agent()
    r = trail.lab.ssh(user, "echo in")
    assert r.returncode == 0 and r.stdout == b"in\n"
    syslog_sink.wait_for("NOT RECORDED")


def test_agent_down_strict_refuses(trail, syslog_sink):
    trail.write_config("[recording]\nmode = \"strict\"\n")
    user = trail.lab.add_user("st")
    trail.stop_agent()
    r = trail.lab.ssh(user, "echo in")
    assert r.returncode == 1 and r.stdout == b""
    assert b"must be recorded" in r.stderr
    syslog_sink.wait_for("refused session")


def shell_that_said(trail, command: str, expect: bytes):
    """(user, terminal): a new user's shell that ran `command` and showed `expect`, which is
    with the agent by now."""
    user = shell_user(trail.lab)
    term = Terminal(trail.lab, user)
    term.expect(re.escape(PROMPT))
    term.send(command + "\r")
    term.expect(expect)
    time.sleep(0.5)  # a batch is due every 50 ms
    return user, term


def test_agent_restart_mid_session_loses_nothing(trail):
    user, term = shell_that_said(trail, "echo phase-$((1*11))", rb"phase-11")
    trail.stop_agent()
    term.send("echo phase-$((2*11))\r")  # recorded while the agent is away
    term.expect(rb"phase-22")
    trail.start_agent()
    time.sleep(1.5)  # the wrapper retries every second
    term.send("echo phase-$((3*11)); exit\r")
    assert term.wait() == 0
    _, _, frames, _ = recording_of(trail, user)
    out = "".join(d for _, c, d in frames if c == "o")
    assert out.index("phase-11") < out.index("phase-22") < out.index("phase-33")


def test_a_wrapper_that_ends_while_the_agent_is_away_has_its_recording_ended(trail):
    # Its end never reaches an agent, and no connection is left to be lost: the next agent
    # finds the recording open and its wrapper gone, and ends it, saying so.
    user, term = shell_that_said(trail, "sleep 1; echo last-$((6*7))", rb"last-42")
    (rec,) = recordings_of(trail, user)
    trail.stop_agent()
    os.kill(rec["wrapper_pid"], signal.SIGKILL)
    term.wait()
    trail.start_agent()
    (ev,) = trail.wait_for(lambda e: any("end_reason" in x for x in e), type="session.recording",
                           user=user.login, what="the recording ended")
    assert "ended while the agent was not running" in ev["end_reason"]
    (row,) = recordings_of(trail, user)
    # Its last output came a second in, and the end is taken from it.
    assert row["ended"] is not None and 1.0 <= row["ended"] - row["started"] < 30
    spool = open_spool(trail)
    try:
        assert b"last-42" in b"".join(d for _, k, d in spool.frames(rec["sid"]))
    finally:
        spool.close()


def recordings_of(trail, user) -> list[dict]:
    spool = open_spool(trail)
    try:
        return [r for r in spool.recordings() if r["login"] == user.login]
    finally:
        spool.close()


def open_spool(trail) -> Spool:
    return Spool.from_config(config.load(trail.config))


def test_twenty_concurrent_sessions_recorded_completely(trail):
    user = trail.lab.add_user("many")
    results = {}

    def one(i):
        argv, env = trail.lab.ssh_argv(user, f"seq {i} 3000; exit 0", tty=True)
        results[i] = subprocess.run(argv, env=env, capture_output=True, timeout=120,
                                    stdin=subprocess.DEVNULL)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.returncode == 0 for r in results.values())
    evs = trail.wait_for(lambda e: len(e) >= 20, type="session.recording", user=user.login,
                         what="20 recordings", timeout=30)
    spool = open_spool(trail)
    try:
        for ev in evs:
            rec = spool.recording(ev["sid"])
            out = b"".join(d for _, k, d in spool.frames(ev["sid"]) if k == b"o")
            first = int(rec["command"].split()[1])
            assert out == "".join(f"{n}\r\n" for n in range(first, 3001)).encode()
    finally:
        spool.close()


def test_agent_lost_mid_session_strict_ends_it(trail):
    trail.write_config('[recording]\nmode = "strict"\n')
    user = shell_user(trail.lab)
    term = Terminal(trail.lab, user)
    term.expect(re.escape(PROMPT))
    trail.stop_agent()
    term.send("echo still-here\r")
    term.wait(timeout=20)
    assert b"may not work unrecorded: ending the session" in term.seen


def test_a_process_inside_the_session_cannot_pose_as_a_wrapper(trail):
    user = trail.lab.add_user("fake")
    (user.home / "fake.py").write_text(
        "import socket, json, struct\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        f"s.connect('{trail.dir / 'agent.sock'}')\n"
        "h = json.dumps({'type': 'hello', 'mode': 'interactive', 'command': 'x'}).encode()\n"
        "s.sendall(struct.pack('>I', len(h) + 1) + h + b'\\n')\n"
        "print(s.recv(4096)[4:].decode())\n")
    r = trail.lab.ssh(user, "python3 ~/fake.py")
    assert b'"type":"refused"' in r.stdout and b"not started by sshd" in r.stdout, r.stdout
    # Nor under copies of a shell named sshd, posing as sshd's two processes above a wrapper
    # (`; true`: each shell waits for its command rather than become it). A process was sshd by
    # its program's file name: this one was welcomed, and its frames stored as a recording.
    r = trail.lab.ssh(user, "mkdir -p ~/b && cp /bin/sh ~/b/sshd && "
                            "~/b/sshd -c '~/b/sshd -c \"python3 ~/fake.py; true\"; true'")
    assert b'"type":"refused"' in r.stdout and b"not started by sshd" in r.stdout, r.stdout


def procfs_open_files(pid: int) -> int:
    """The process's soft limit of open files."""
    with open(f"/proc/{pid}/limits") as f:
        (line,) = [line for line in f if line.startswith("Max open files")]
    return int(line.split()[3])


def test_a_user_flooding_the_agents_socket_leaves_no_session_unrecorded(trail):
    # Anyone may connect to the agent's socket. Connections that never say hello must not tie
    # up its threads and descriptors: with systemd's 1024 descriptors, 1,100 of them left every
    # session of every user unrecorded, and the agent unable to write PAM calls.
    from sshtrail.session_server import HELLO_TIMEOUT, PENDING_PER_UID
    from test_session_server import SILENT
    trail.stop_agent()
    trail.start_agent(open_files=1024)  # as systemd starts it; it takes its hard limit
    assert procfs_open_files(trail.agent.pid) == resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    user = trail.lab.add_user("flood")
    n = PENDING_PER_UID + 8
    flood = subprocess.Popen(["/usr/bin/python3", "-I", "-c", SILENT, str(trail.dir / "agent.sock"),
                              str(n)], user=user.uid, group=user.gid, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert flood.stdout.readline().split() == ["held", str(PENDING_PER_UID), "refused", "8"]
        # Past the user's share, their wrapper still comes in: its parent is sshd.
        r = trail.lab.ssh(user, "echo recorded-anyway")
        assert (r.returncode, r.stdout) == (0, b"recorded-anyway\n")
        evs = trail.wait_for(lambda e: e, type="exec", user=user.login, what="the exec event")
        assert [e["command"] for e in evs] == ["echo recorded-anyway"]
        t = time.monotonic()
        flood.stdin.write("go on\n")
        flood.stdin.flush()
        assert flood.stdout.readline().split() == ["closed", str(PENDING_PER_UID)]
        assert time.monotonic() - t < HELLO_TIMEOUT + 5
    finally:
        flood.kill()
        flood.wait()
    refused = trail.wait_for(lambda e: sum(x["count"] for x in e) == n, type="agent.peer_refused",
                             user=user.login, timeout=20, what=f"{n} refused connections")
    assert "had not said hello yet" in refused[0]["reason"]
    assert all(e["user_id"] == user.uid for e in refused)


def test_user_environment_and_rc_cannot_run_code_around_the_wrapper(trail):
    # pam_env's user_readenv (on in Debian's sshd PAM service) lets a user put LD_PRELOAD into
    # the environment sshd starts the ForceCommand in; ~/.ssh/rc runs before the command.
    lab = trail.lab
    user = shell_user(lab)
    marker = user.home / "escaped"
    src = user.home / "evil.c"
    src.write_text('#include <stdlib.h>\n__attribute__((constructor)) static void f(void) '
                   f'{{ system("touch {marker}"); }}\n')
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(user.home / "evil.so"), str(src)], check=True)
    (user.home / ".pam_environment").write_text(f"LD_PRELOAD DEFAULT={user.home}/evil.so\n")
    (user.home / ".ssh" / "rc").write_text(f"touch {marker}-rc\n")
    r = lab.ssh(user, "echo in; env | grep -c '^LD_PRELOAD=' || true")
    assert r.stdout == b"in\n0\n"  # and no LD_PRELOAD at all in the user's program
    assert not marker.exists() and not (user.home / "escaped-rc").exists()
    (ev,) = trail.wait_for(lambda e: len(e) >= 1, type="exec", user=user.login, what="exec")
    assert ev["command"].startswith("echo in")


def test_a_permissive_sshd_config_lets_no_environment_reach_the_wrapper(trail_factory):
    # An operator's sshd may take any variable from the client (AcceptEnv *) and read
    # ~/.ssh/environment (PermitUserEnvironment yes): sshtrail's SetEnv still wins over both.
    trail = trail_factory(extra_sshd_config="AcceptEnv *\nPermitUserEnvironment yes\n")
    lab = trail.lab
    user = shell_user(lab)
    marker = user.home / "escaped"
    (user.home / "evil.c").write_text('#include <stdlib.h>\n__attribute__((constructor)) static '
                                      f'void f(void) {{ system("touch {marker}"); }}\n')
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(user.home / "evil.so"),
                    str(user.home / "evil.c")], check=True)
    preload = f"LD_PRELOAD={user.home}/evil.so"
    check = "echo in; env | grep -c '^LD_PRELOAD=' || true"
    r = lab.ssh(user, check, extra_opts=["-o", f"SetEnv={preload}"])  # sent by the client
    assert r.stdout == b"in\n0\n" and not marker.exists(), r.stderr
    (user.home / ".ssh" / "environment").write_text(preload + "\n")
    r = lab.ssh(user, check)
    assert r.stdout == b"in\n0\n" and not marker.exists(), r.stderr
    assert len(trail.wait_for(lambda e: len(e) >= 2, type="exec", user=user.login)) == 2


@pytest.mark.parametrize("shell,startup_file,execution_string", [
    ("/bin/bash", ".bashrc", "BASH_EXECUTION_STRING"),
    ("/usr/bin/zsh", ".zshenv", "ZSH_EXECUTION_STRING"),
])
def test_shell_startup_files_cannot_run_before_the_wrapper(trail, shell, startup_file,
                                                           execution_string):
    # sshd runs the ForceCommand as `shell -c wrapper`. Debian's bash reads ~/.bashrc for that
    # (SSH_SOURCE_BASHRC), zsh reads ~/.zshenv for every shell: an `exec` there, when the
    # command is the wrapper, would be a session never recorded. ~/.pam_environment tries to
    # undo sshd's settings that prevent it.
    lab = trail.lab
    user = lab.add_user("rc", shell=shell)
    (user.home / startup_file).write_text(
        f'case "${execution_string}" in *session_wrapper*) '
        'echo ESCAPED; exec /bin/sh -c "echo unrecorded";; esac\n')
    (user.home / ".pam_environment").write_text(f"SHLVL DEFAULT=0\nZDOTDIR DEFAULT={user.home}\n")
    r = lab.ssh(user, "echo in; echo ${SHLVL-unset} ${ZDOTDIR-unset}")
    assert r.returncode == 0, r.stderr
    # The startup file ran, but inside the wrapper (for `shell -c command`, as without
    # sshtrail); the environment the user's program sees has none of sshd's settings.
    assert r.stdout == b"in\n1 unset\n", r.stdout
    (ev,) = trail.wait_for(lambda e: len(e) >= 1, type="exec", user=user.login, what="exec")
    assert ev["command"].startswith("echo in")
    r = lab.ssh(user, "echo tty-in", tty=True)
    assert b"tty-in" in r.stdout and b"ESCAPED" not in r.stdout, r.stdout
    recording_of(trail, user)


def test_a_process_the_login_shell_ran_outside_the_wrapper_is_reported(trail_factory):
    # csh, fish or a shell sshtrail does not know may run the user's files for `shell -c
    # wrapper` and never start the wrapper: here, a login shell that ignores its command and
    # runs a program of its own. A recorded session and `ssh -N`, at the same time, are not
    # reported; nor is the tcsh that started the recorded one's wrapper (tcsh forks for -c),
    # whose session is recorded.
    t = trail_factory(settings="[recording]\nunrecorded_grace = 1.0\n")
    lab = t.lab
    user, other = lab.add_user("esc"), lab.add_user("ok", shell="/usr/bin/tcsh")
    shell = user.home / "shell"
    shell.write_text("#!/bin/sh\nexec sleep 8\n")
    shell.chmod(0o755)
    subprocess.run(["usermod", "--shell", str(shell), user.login], check=True)
    argv, env = lab.ssh_argv(other, None, extra_opts=["-N"])
    forwarding = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
    recorded = subprocess.Popen(lab.ssh_argv(other, "sleep 7")[0], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    escaping = subprocess.Popen(lab.ssh_argv(user, "echo anything")[0], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # A recording an agent left open (it died) names a wrapper pid that the escaped
        # process may have now: it must not pass for that wrapper.
        pid = wait_for_process(user, "sleep")
        spool = open_spool(t)
        try:
            spool.start_recording(sid="left-open", login=user.login, mode="exec", command="x",
                                  term="", cols=80, rows=24, started=time.time() - 3600,
                                  wrapper_pid=pid, wrapper_start=procfs.start_time(pid) - 100)
        finally:
            spool.close()
        assert escaping.wait(30) == 0
    finally:
        forwarding.terminate()
        for p in (recorded, forwarding, escaping):
            p.wait(30)
    (ev,) = t.wait_for(lambda e: len(e) >= 1, type="session.recording_failed",
                       user=user.login, what="the unrecorded process reported")
    assert ev["command"] == "sleep 8" and "outside the session wrapper" in ev["reason"]
    (start,) = t.events(type="session.start", user=user.login)
    assert ev["sid"] == start["sid"]
    assert t.events(type="session.recording_failed", user=other.login) == []
    assert len(t.events(type="session.start", user=other.login)) == 2
    (recorded,) = t.wait_for(lambda e: len(e) >= 1, type="exec", user=other.login,
                             what="the tcsh user's command recorded")
    assert recorded["command"] == "sleep 7" and recorded["exit_status"] == 0
    assert "ended" not in ev  # best_effort: reported, left running


def wait_for_process(user, name: str, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = subprocess.run(["pgrep", "-u", user.login, "-x", name], capture_output=True)
        if r.stdout.split():
            return int(r.stdout.split()[0])
        time.sleep(0.05)
    raise AssertionError(f"no {name} process of {user.login} after {timeout:.0f}s")


@pytest.mark.parametrize("tty", [False, True], ids=["command", "tty"])
def test_what_escapes_a_strict_accounts_recording_is_ended_with_a_message(trail_factory, tty):
    # tcsh reads ~/.tcshrc for `tcsh -c wrapper` whatever sshd's environment says; here it
    # never lets the wrapper start. The account must be recorded: the agent ends the program,
    # and with it the session, and says why on the session's stderr. A recorded session of
    # another user, open meanwhile, goes on untouched.
    t = trail_factory(settings='[recording]\nunrecorded_grace = 1.0\nmode = "strict"\n')
    lab = t.lab
    user, other = lab.add_user("esc", shell="/usr/bin/tcsh"), lab.add_user("ok")
    (user.home / ".tcshrc").write_text("exec sleep 120\n")
    argv, env = lab.ssh_argv(other, "sleep 9; echo still-here")
    recorded = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    started = time.monotonic()
    r = lab.ssh(user, "echo anything", tty=tty, timeout=60)
    took = time.monotonic() - started
    out, _ = recorded.communicate(timeout=30)
    assert recorded.returncode == 0 and out == b"still-here\n"
    assert took < 30, f"the escaped program ran {took:.0f}s"  # it would sleep 120 s
    assert r.returncode != 0
    shown = r.stdout if tty else r.stderr  # a terminal has one stream
    assert b"outside the session recorder, and this account may not work unrecorded" in shown, shown
    (ev,) = t.wait_for(lambda e: len(e) >= 1, type="session.recording_failed",
                       user=user.login, what="the escape reported")
    assert ev["command"] == "sleep 120" and ev["ended"] is True and "it was ended" in ev["reason"]
    assert not procfs.alive(ev["pid"])
    assert t.events(type="session.recording_failed", user=other.login) == []


def test_a_strict_account_whose_shell_reads_its_files_first_is_refused(trail_factory):
    # What tcsh starts after ~/.tcshrc may pose as the wrapper: for an account that must be
    # recorded, the agent does not take a wrapper a tcsh started, and says why. The same
    # account in best_effort is recorded (test above).
    t = trail_factory(settings='[recording]\nmode = "strict"\n')
    user = t.lab.add_user("csh", shell="/usr/bin/tcsh")
    r = t.lab.ssh(user, "echo ran")
    assert r.returncode == 1 and b"ran" not in r.stdout
    assert (b"this session must be recorded, and the recorder refused it: the login shell "
            b"/usr/bin/tcsh runs the user's own startup files before the session recorder"
            in r.stderr), r.stderr
    assert t.events(type="exec", user=user.login) == []


def test_a_full_spool_drops_output_not_events_and_says_so(trail_factory):
    # A user printing without end must not push undelivered events out of the spool.
    t = trail_factory(settings="[spool]\nmax_bytes = 2000000\n")
    user = t.lab.add_user("flood")
    r = t.lab.ssh(user, "head -c 6000000 /dev/zero | base64", tty=True)
    assert r.returncode == 0 and len(r.stdout) > 7_000_000  # the terminal got all of it
    (failed,) = t.wait_for(lambda e: len(e) >= 1, type="session.recording_failed",
                           user=user.login, what="recording_failed")
    assert "the spool was full" in failed["reason"] and failed["dropped_bytes"] > 4_000_000
    # Every event of the session is still there (the end from PAM's close, written after it).
    t.wait_for(lambda e: {"user.login", "session.start", "session.recording", "session.end"}
               <= {x["event"] for x in e}, user=user.login, what="every event of the session")
