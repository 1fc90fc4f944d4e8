"""`sshtrail play`: a recorded session on this terminal, from the spool, a collector or a file.

Thin: finds the recording (and the session's events, for the status line and `--commands`),
puts the terminal in raw mode, runs `player.Player`, and always gives the terminal back (raw
mode off, the recording's modes undone, the alternate screen left, the cursor shown) on q, the
end, Ctrl-C, SIGTERM, SIGHUP and errors. Signals arrive as bytes on a pipe
(signal.set_wakeup_fd), not as handlers racing the loop.
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import signal
import termios
import tty

from sshtrail import cli_remote
from sshtrail.errors import SshtrailError
from sshtrail.wakeup import SignalPipe

EXAMPLES = """keys:
  space        pause / resume          .          one frame forward (paused)
  left/right   10 s back / forward     + / -      speed x2 / x0.5 (0.25x to 16x)
  down/up      60 s back / forward     PgUp/PgDn  60 s back / forward
  q, Ctrl-C    quit

examples:
  sshtrail play 01J9Z3...                      from this host's spool
  sshtrail play 01J9Z3... --collector https://c:8443 --token-file t --commands
  sshtrail play s.cast --speed 2 --idle-limit 2 --at 1:30
  sshtrail play s.cast --at 2026-01-02T03:04:05Z
"""


def add_parsers(sub, add, common) -> None:
    sp = add("play", cmd_play, "replay a recorded session in this terminal")
    sp.epilog, sp.formatter_class = EXAMPLES, argparse.RawDescriptionHelpFormatter
    sp.add_argument("session", metavar="SID|FILE",
                    help="a session id (spool, or --collector), or an asciicast file "
                         "(a path with a /, or a name ending in .cast)")
    sp.add_argument("--speed", type=float, default=1.0, help="0.25 to 16 (default 1)")
    sp.add_argument("--idle-limit", type=float, metavar="SECONDS",
                    help="play idle gaps longer than this as this long")
    sp.add_argument("--at", metavar="TIME",
                    help="start here: 90, 1:30, 1h2m, or an RFC 3339 time within the session")
    sp.add_argument("--commands", action="store_true",
                    help="show the session's commands (session.command events) as they run")
    sp.add_argument("--no-status", action="store_true", help="no status line")
    sp.add_argument("--ignore-size", action="store_true",
                    help="play a recording larger than this terminal anyway (it is cut)")
    sp.add_argument("--paused", action="store_true",
                    help="start paused (with --at: look at that moment, then space to play)")
    sp.add_argument("--stay", action="store_true",
                    help="at the end, pause instead of quitting")
    sp.add_argument("--host", help="the host, where two share a session id (with --collector)")
    cli_remote.add_collector_options(sp)


def fetch(args, cfg):
    """The recording, from a file, the collector or the spool, as player.Recording."""
    from sshtrail import player
    target = args.session
    # A file only when it says so: a name alone is a session id, or a file dropped in the
    # auditor's working directory under a session's id would be played in its place.
    if "/" in target or target.endswith(".cast"):
        try:
            with open(target, "rb") as f:
                return player.load(f)
        except OSError as e:
            raise SshtrailError(f"cannot read {target}: {e.strerror}") from None
    if args.collector:
        reader = cli_remote.reader(args, cfg)
        data = reader.recording(target, args.host)
        evs = reader.events(sid=target, **({"host": args.host} if args.host else {}))
        return player.load(data, session_events=evs)
    from sshtrail.cli import _open_spool, export_asciicast
    spool = _open_spool(cfg)
    try:
        rec = spool.recording(target)
        if rec is None and os.path.isfile(target):
            raise SshtrailError(f"no recording {target!r} in the spool; to play the file of "
                                f"that name, say ./{target}")
        buf = io.BytesIO()
        export_asciicast(spool, target, buf)
        evs = spool.query(sid=target)
    finally:
        spool.close()
    return player.load(buf.getvalue(), user=rec.get("login"),
                       host=cfg.server_hostname or cfg.server_id,
                       start=rec.get("started"), session_events=evs)


def cmd_play(args, cfg) -> int:
    from sshtrail import player
    if not 0.25 <= args.speed <= 16:
        raise SshtrailError(f"--speed {args.speed:g}: use 0.25 to 16")
    if args.idle_limit is not None and not args.idle_limit > 0:  # NaN too
        # 0 or less would play the whole recording at once, or (negative) never reach its end.
        raise SshtrailError(f"--idle-limit {args.idle_limit:g}: use a number of seconds above "
                            "0, e.g. --idle-limit 2")
    if not (os.isatty(0) and os.isatty(1)):
        raise SshtrailError("play needs a terminal on stdin and stdout; to save a session, "
                            "use `sshtrail export SID --format asciicast|text`")
    rec = fetch(args, cfg)
    size = shutil.get_terminal_size((0, 0))
    cols, rows = size.columns or rec.width, size.lines or rec.height
    if (rec.width > cols or rec.height > rows) and not args.ignore_size:
        raise SshtrailError(
            f"the recording is {rec.width}x{rec.height} but this terminal is {cols}x{rows}: "
            "enlarge the terminal (or make the font smaller), or pass --ignore-size to play it "
            "cut at the terminal's edge")
    p = player.Player(rec, os.fdopen(os.dup(1), "wb", buffering=0), speed=args.speed,
                      idle_limit=args.idle_limit, status=not args.no_status,
                      commands=args.commands, term_size=(cols, rows), stay=args.stay,
                      paused=args.paused)
    at = 0.0
    if args.at:
        at = p.timeline.to_play(player.parse_offset(args.at, rec.start))
    return play_on_terminal(p, at)


def play_on_terminal(p, at: float = 0.0) -> int:
    """Run `p` on the terminal at fds 0/1; the terminal is given back whatever happens."""
    fd = 0
    saved = termios.tcgetattr(fd)
    signals = SignalPipe((signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGWINCH))

    def on_wake(data: bytes) -> None:
        for signum in data:
            if signum == signal.SIGWINCH:
                size = shutil.get_terminal_size((p.term_cols, p.term_rows))
                p.term_cols, p.term_rows = size.columns, size.lines
                if p.rec.width > p.term_cols or p.rec.height > p.term_rows:
                    p.message = f"terminal {p.term_cols}x{p.term_rows} < recording " \
                                f"{p.rec.width}x{p.rec.height}: cut"
                else:
                    p.message = ""
                p.seek(p.position)  # the terminal may have reflowed: redraw from the model
            else:
                p.done = True

    try:
        tty.setraw(fd, termios.TCSANOW)
        p.start(at)
        p.run(fd, signals.fd, on_wake)
    finally:
        try:
            p.out.write(p.restore_sequence().encode())
        except OSError:
            pass  # the terminal is gone (SIGHUP): nothing to restore
        try:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        except termios.error:
            pass
        signals.close()
    return 0
