"""One SSH session through the wrapper, from sshd's ForceCommand (session_wrapper/shell.py) to
the program's exit. Every session of every user runs this.

It runs as the logged-in user, who may want to escape it, so: it is started as `python3 -I -S`
(the ForceCommand line `sshtrail install` writes), so nothing from the user's environment
(PYTHONPATH via ~/.pam_environment) or from site-packages runs in it; it makes itself
non-dumpable first (no ptrace, no /proc/PID/mem from the session); it trusts nothing it reads
from the session; and the agent identifies it from the kernel, not from what it says.

Interactive sessions (sshd gave us a pty) run the login shell, or the requested command, in a
pty of ours (pty_relay); non-interactive ones (`ssh host cmd`, scp, sftp, rsync, git) run on
pipes passed through byte for byte (passthrough), and become `exec` events.
"""
from __future__ import annotations

import os
import sys

from session_wrapper import program

PR_SET_DUMPABLE = 4
SFTP_SERVER = "/usr/lib/openssh/sftp-server"


def make_undumpable() -> None:
    """Same-uid processes may ptrace us and read our memory unless we are not dumpable.
    prctl is called through _ctypes, the C half of ctypes: importing ctypes itself cost every
    session's start ~4.5 ms here (bench/pty's setup time)."""
    import _ctypes

    class CInt(_ctypes._SimpleCData):
        _type_ = "i"

    class Function(_ctypes.CFuncPtr):
        _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
        _restype_ = CInt

    prctl = Function(_ctypes.dlsym(_ctypes.dlopen(None), "prctl"))
    if prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(_ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


def command_line(shell: str, original: str | None) -> tuple[str, list[str]]:
    """What sshd itself would run: the login shell (argv[0] '-bash'), or `shell -c command`."""
    if original is None:
        return shell, ["-" + os.path.basename(shell)]
    if original.strip() == "internal-sftp":
        # sshd's built-in sftp cannot run outside sshd: the standalone server speaks the same.
        return SFTP_SERVER, [SFTP_SERVER]
    return shell, [os.path.basename(shell), "-c", original]


def _report(message: str) -> None:
    import syslog
    syslog.openlog("sshtrail-shell", syslog.LOG_PID, syslog.LOG_AUTHPRIV)
    syslog.syslog(syslog.LOG_WARNING, message)


def _exit_like(status: int | None) -> None:
    """Leave as the program did: its exit code, or the signal that killed it (sshd reports
    exit-signal to the client, as without us). None: it was left running after a hangup."""
    if status is None:
        status = (128 + 1) << 8  # as a shell reports a hangup: 129
    if os.WIFSIGNALED(status):
        import signal
        sig = os.WTERMSIG(status)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):  # neither can be handled, nor reset
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    # os._exit: the session is over and reported; the interpreter's teardown would only make
    # sshd (and the user) wait ~2 ms longer for the exit status.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(os.waitstatus_to_exitcode(status))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    program.undo_locale_coercion(os.environ)
    make_undumpable()
    interactive = os.isatty(0)
    if interactive:
        # Next: a program of the user's that opens sshd's pty before this keeps it, unrecorded
        # (the agent's look reports it: sshtrail.unrecorded).
        from session_wrapper.pty_relay import hold_exclusive
        hold_exclusive(0)
    import pwd

    from session_wrapper import agent_client
    from sshtrail import config, unsafe_env
    config_path = argv[argv.index("--config") + 1] if "--config" in argv else None
    try:
        cfg = config.load_cached(config_path)
    except config.ConfigError as e:
        # Without config we cannot know the policy: refuse rather than run unrecorded.
        print(f"sshtrail: session refused, the recorder's config is broken: {e}", file=sys.stderr)
        sys.exit(1)
    unsafe_env.remove_ours(os.environ)
    pw = pwd.getpwuid(os.getuid())
    shell = pw.pw_shell or "/bin/sh"
    original = os.environ.pop("SSH_ORIGINAL_COMMAND", None)
    path, args = command_line(shell, original)
    strict = cfg.strict_for(pw.pw_name, os.getgid())

    if interactive:
        from session_wrapper.pty_relay import get_winsize
        cols, rows = get_winsize(0)
    else:
        cols, rows = 0, 0  # termios and tty, imported with pty_relay: ~1 ms not needed here
    hello = agent_client.default_hello("interactive" if interactive else "exec",
                                       original if original is not None else "", cols, rows)
    client = agent_client.AgentClient(
        cfg["agent.socket"], hello, batch_s=cfg["recording.batch_ms"] / 1000,
        batch_bytes=cfg["recording.batch_bytes"], buffer_bytes=cfg["recording.buffer_bytes"])
    if not client.connect():
        why = client.refused or client.error
        if strict:
            if client.refused:
                print(f"sshtrail: this session must be recorded, and the recorder refused it: "
                      f"{why}.", file=sys.stderr)
            else:
                print(f"sshtrail: this session must be recorded, and the recorder is not "
                      f"available ({why}). Try again later, or ask your administrator.",
                      file=sys.stderr)
            _report(f"refused session of {pw.pw_name}: recorder unavailable ({why})")
            sys.exit(1)
        if client.refused:
            # The agent reports the session itself: its look finds this process unrecorded.
            _report(f"session of {pw.pw_name} NOT RECORDED: the recorder refused it ({why})")
        else:
            _report(f"session of {pw.pw_name} NOT RECORDED so far: recorder unavailable "
                    f"({why}); retrying during the session")
            client.hello = dict(hello, late=why)

    if interactive:
        from session_wrapper.pty_relay import relay
        status, ended_by = relay(path, args, dict(os.environ), client,
                                 record_input=cfg["recording.input"], strict=strict)
        end = {"exit_status": os.waitstatus_to_exitcode(status) if status is not None else None}
        if ended_by:
            end["reason"] = ended_by
    else:
        from session_wrapper.passthrough import run
        status, bytes_in, bytes_out, came = run(path, args, dict(os.environ),
                                                client, record=cfg["recording.exec_output"])
        end = {"exit_status": os.waitstatus_to_exitcode(status), "bytes_in": bytes_in,
               "bytes_out": bytes_out}
        if came:
            end["reason"] = (f"the session wrapper was sent {came} while the command ran, and "
                             "went on until the command ended")
    if not client.finish(end, timeout=3.0):
        _report(f"session {client.sid or '(no sid)'} of {pw.pw_name}: the recorder did not "
                f"confirm the end of the session; {client.dropped_bytes} bytes were dropped")
    _exit_like(status)
