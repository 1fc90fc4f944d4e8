"""The `sshtrail` command: one thin subcommand per library function.

Each subcommand parses its arguments, calls into the library, and turns a library error into a
message and a non-zero exit: never a traceback for bad input.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import select
import signal
import sys
import tempfile
import time
from pathlib import Path

from sshtrail import cli_play, cli_remote, config, events, termfilter
from sshtrail.errors import SshtrailError

EXAMPLES = """examples (see also `sshtrail collector --help`):
  sshtrail install                          hook sshd (PAM service 'sshd', /etc/ssh/sshd_config)
  sshtrail install --pam-service sshd-lab --sshd-config /srv/lab/sshd_config --config /srv/lab/sshtrail.toml
  sshtrail events --since 10m               what happened in the last ten minutes
  sshtrail events --type user.login --user alice --json
  sshtrail sessions                         recorded sessions
  sshtrail export SID -o s.cast             a recording as asciicast v2 (asciinema play s.cast)
  sshtrail agent                            run the host daemon in the foreground
  sshtrail doctor                           is everything in place? (exit 1 if not)
  sshtrail config --defaults                every config key, its default and what it does
"""


class CliError(SshtrailError):
    pass


def parse_since(text: str, now: float | None = None) -> float:
    """'90s', '10m', '2h', '3d', or an RFC 3339 UTC time, as epoch seconds."""
    now = time.time() if now is None else now
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if m:
        return now - float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    try:
        return events.parse_time(text)
    except events.EventError:
        raise CliError(f"--since {text!r}: use a duration like 90s, 10m, 2h, 3d, or a UTC time "
                       "like 2026-01-02T03:04:05Z") from None


def _safe(text) -> str:
    # Logins, commands and messages come from the network and the session: never let them
    # drive the reader's terminal, nor change how the row reads.
    return termfilter.field(text)


def _host_event_notes(ev: dict) -> str:
    """How a host event ended, and where it happened when not inside the recording."""
    notes = []
    rc = ev.get("return_code", 0)
    if rc == -errno.EINPROGRESS and ev["event"] == "session.network":
        notes.append("in progress")  # non-blocking: a session.network_outcome says the rest
    elif rc < 0:
        notes.append(f"failed: {errno.errorcode.get(-rc, rc)}")
    if ev.get("forwarded"):
        notes.append("forwarded by sshd for the client")
    elif ev.get("outside"):
        notes.append("in the connection, outside the recording")
    return f" ({'; '.join(notes)})" if notes else ""


def _detail(ev: dict) -> str:
    kind = ev["event"]
    if kind == "user.login":
        if ev["success"]:
            return f"granted {ev.get('method') or '?'}" + (f" {ev['key']}" if ev.get("key") else "")
        return f"REFUSED {ev.get('error')}" + (f" ({ev['method']})" if ev.get("method") else "")
    if kind == "session.end" and "duration" in ev:
        return f"after {ev['duration']:.1f}s"
    if kind == "session.end" and "duration_at_most" in ev:
        return f"after at most {ev['duration_at_most']:.1f}s (its close never came)"
    if kind == "session.end" and ev.get("message"):
        return ev["message"]
    if kind == "session.command":
        return "run " + " ".join(ev["argv"])[:100] + _host_event_notes(ev)
    if kind == "session.disk":
        return f"open {ev['path']}" + _host_event_notes(ev)
    if kind == "session.network":
        return f"connect {events.endpoint(ev)}" + _host_event_notes(ev)
    if kind == "session.network_outcome":
        return (f"connect {events.endpoint(ev)} "
                f"{'established' if ev['established'] else 'NOT established'}"
                + _host_event_notes(ev))
    if kind == "session.listen":
        where = events.endpoint(ev) if ev["port"] else events.endpoint(ev)[:-1] + "(any port)"
        return f"listen {where}" + _host_event_notes(ev)
    if kind == "exec":
        cut = f" (cut: {ev['command_bytes']} bytes in all)" if ev.get("command_bytes") else ""
        status = ev.get("exit_status")
        how = f"exit {status}" if status is not None else "exit status unknown"
        command = f"`{ev['command']}`" if ev["command"] else NO_COMMAND
        return (f"{command}{cut} {how}"
                + (f"; {ev['end_reason']}" if ev.get("end_reason") else ""))
    if kind == "session.recording":
        return f"recorded {ev.get('size', 0)}B" + (f"; {ev['end_reason']}" if ev.get("end_reason") else "")
    if kind == "agent.ebpf_unavailable":
        return ev["reason"]
    if kind == "session.recording_failed":
        return ev["reason"]
    if kind == "spool.dropped":
        return f"{ev['count']} dropped: {ev['reason']}"
    return ev.get("message", "")


# An exec session without a command: `ssh -T host`, the login shell on pipes, reading commands
# from the client's stdin (they are not recorded unless recording.exec_output is on; host
# events show what they ran).
NO_COMMAND = "(no command: the login shell, reading commands from stdin)"


def format_table(evs: list[dict]) -> str:
    rows = [("TIME", "EVENT", "LOGIN", "FROM", "DETAIL", "SID")]
    for ev in evs:
        rows.append((ev["time"][:23].replace("T", " "), ev["event"], ev.get("login", ""),
                     ev.get("addr.remote", ""), _detail(ev), ev.get("sid", "")[:13]))
    return _columns(rows)


def _columns(rows: list[tuple]) -> str:
    rows = [tuple(_safe(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


# -- subcommands ----------------------------------------------------------------------------

def cmd_events(args, cfg) -> int:
    since = parse_since(args.since) if args.since else None
    if args.collector:
        evs = cli_remote.reader(args, cfg).events(
            type=args.type, user=args.user, host=args.host, sid=args.sid, q=args.text,
            since=events.format_time(since) if since is not None else None, limit=args.limit)
    else:
        if args.host or args.sid or args.text:
            raise CliError("--host, --sid and --text search a collector: add --collector URL")
        spool = _open_spool(cfg)
        try:
            evs = spool.query(kind=args.type, login=args.user, since=since, limit=args.limit)
        finally:
            spool.close()
    if args.json:
        for ev in evs:
            print(events.to_json(ev))
    else:
        print(format_table(evs))
    return 0


def cmd_install(args, cfg) -> int:
    from pam_module import hook, queue
    from session_wrapper import shell
    from sshtrail import install
    from sshtrail.spool import Spool
    Spool.from_config(cfg).close()  # the hook's first login should not have to create it
    report = install.install(
        pam_file=Path("/etc/pam.d") / args.pam_service, sshd_config=Path(args.sshd_config),
        hook_argv=hook.command(sys.executable, args.config, fail_closed=cfg["pam.fail_closed"],
                               queue=queue.queue_dir(cfg["spool.path"])),
        fail_closed=cfg["pam.fail_closed"], state_dir=Path(cfg["install.state_dir"]),
        sshd_binary=args.sshd_binary, log=_note,
        force_command=None if args.no_wrapper else shell.command(sys.executable, args.config))
    if not args.no_wrapper:
        from session_wrapper import bytecode
        if not bytecode.compile_ahead():
            _note(f"could not write the wrapper's compiled code in {bytecode.ROOT} (read-only?): "
                  "each session will compile it as it starts, ~20 ms more per login")
    print(report)
    return 0


def cmd_uninstall(args, cfg) -> int:
    from sshtrail import install
    report = install.uninstall(pam_file=Path("/etc/pam.d") / args.pam_service,
                               sshd_config=Path(args.sshd_config),
                               state_dir=Path(cfg["install.state_dir"]), sshd_binary=args.sshd_binary,
                               log=_note)
    print(report)
    return 0


def _note(message: str) -> None:
    print(f"sshtrail: {message}", file=sys.stderr)


def cmd_sessions(args, cfg) -> int:
    if args.collector:
        rows = [{**r["meta"], "server_id": r["server_id"]}
                for r in cli_remote.reader(args, cfg).sessions()]
        rows = [r for r in rows if "started" in r and "login" in r]
    else:
        spool = _open_spool(cfg)
        try:
            rows = spool.recordings()
        finally:
            spool.close()
    if args.json:
        for r in rows:
            print(events.to_json(_session_summary(r)))
        return 0
    table = [("SID", "USER", "MODE", "START", "DURATION", "OUTPUT", "COMMAND / END")]
    partial = False
    for r in rows:
        s = _session_summary(r)
        mark = "*" if s.get("missing") else ""
        partial = partial or bool(mark)
        table.append((s["sid"], s["login"], s["mode"], s["start"][:19].replace("T", " "),
                      f"{s['duration']:.1f}s" if s["duration"] is not None else "running",
                      f"{s['bytes_out']}B{mark}",
                      s["command"] or (NO_COMMAND if s["mode"] == "exec" else "")
                      or s["end_reason"] or ""))
    print(_columns(table))
    if partial:
        print("* not whole in this spool (pruned after delivery, or dropped): "
              "`sshtrail export SID` says what is missing")
    return 0


def _session_summary(r: dict) -> dict:
    g = r.get
    missing = _missing(r, r["held"]) if "held" in r else None  # the spool's rows only
    return {"sid": r["sid"], "login": r["login"], "mode": g("mode"), "command": g("command"),
            "start": events.format_time(r["started"]),
            "duration": round(r["ended"] - r["started"], 3) if g("ended") else None,
            "bytes_out": g("bytes_out", 0), "stored_bytes": g("stored_bytes", 0),
            "exit_status": g("exit_status"), "end_reason": g("end_reason"),
            "size": f"{g('cols')}x{g('rows')}",
            **({"missing": missing} if missing else {}),
            **({"server_id": r["server_id"]} if "server_id" in r else {})}


def _open_spool(cfg):
    from sshtrail.spool import Spool
    if not os.path.exists(cfg["spool.path"]):
        raise CliError(f"no spool at {cfg['spool.path']}: nothing recorded yet, or --config "
                       "points at another host's settings")
    return Spool.from_config(cfg)


def export_asciicast(spool, sid: str, out) -> None:
    """Write a recording from the spool as asciicast v2 to a binary file object; say on stderr
    what of it the spool lacks."""
    from sshtrail import asciicast
    rec = spool.recording(sid)
    if rec is None:
        raise CliError(f"no recording {sid!r} in the spool; `sshtrail sessions` lists them")
    missing = _missing(rec, spool.chunks_held(sid))
    if missing:
        _note(f"recording {sid} is not whole in this spool: {missing}")
    asciicast.write_session(out, rec, spool.frames(sid))


def _missing(rec: dict, held: int) -> str | None:
    """What a recording in the spool lacks, said for an auditor, or None. A chunk delivered to
    the collector is pruned when the spool needs room: an export from here would start (or
    stop) mid-session without a word."""
    said = []
    pruned = (rec.get("chunks") or 0) - held
    if pruned:
        said.append(f"{pruned} of its {rec['chunks']} chunks of output were delivered to the "
                    "collector and pruned here (`--collector URL` has them)")
    if rec.get("dropped_bytes"):
        said.append(f"{rec['dropped_bytes']} bytes of its output were never recorded (the "
                    "spool was full; its session.recording_failed events say so)")
    return "; ".join(said) or None


def cmd_export(args, cfg) -> int:
    if args.output not in (None, "-") and os.path.isdir(args.output):
        raise CliError(f"--output {args.output} is a directory: name a file in it, e.g. "
                       f"{os.path.join(args.output, args.sid + '.cast')}")
    if args.collector:
        reader = cli_remote.reader(args, cfg)
        if args.format == "json":
            evs = reader.events(sid=args.sid, **({"host": args.host} if args.host else {}))
            if not evs:
                raise CliError(f"no session {args.sid!r} on the collector (no events of it); "
                               "`sshtrail sessions --collector URL` lists them")
            write = lambda f: _write_json_lines(evs, f)  # noqa: E731
        else:
            data = reader.recording(args.sid, args.host)
            write = lambda f: f.write(data)  # noqa: E731
        spool = None
    else:
        spool = _open_spool(cfg)
        if args.format == "json":
            evs = spool.query(sid=args.sid)
            if not evs and spool.recording(args.sid) is None:
                spool.close()
                raise CliError(f"no session {args.sid!r} in the spool; `sshtrail sessions` "
                               "lists them")
            write = lambda f: _write_json_lines(evs, f)  # noqa: E731
        else:
            write = lambda f: export_asciicast(spool, args.sid, f)  # noqa: E731
    if args.format == "text":
        from sshtrail import textexport
        cast_of = write

        def write(f):
            import io
            buf = io.BytesIO()
            cast_of(buf)
            textexport.write_text(buf.getvalue(), f)
    try:
        if args.output in (None, "-"):
            write(sys.stdout.buffer)
        else:
            _write_file(args.output, write)
    finally:
        if spool is not None:
            spool.close()
    return 0


def _write_file(path: str, write) -> None:
    """Call write(f) on a new file beside `path`, then rename it to `path`: a failed export
    leaves no half file. The new file gets a name no one can guess and is made with O_EXCL
    (mkstemp): the CLI often runs as root, and a fixed name in a shared directory (/tmp) would
    let any user plant a symlink there and have root write through it."""
    folder = os.path.dirname(path) or "."
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.",
                                   suffix=".part")
    except OSError as e:
        raise CliError(f"cannot write {path}: {folder}: {e.strerror}; check the --output "
                       "path, or leave it out to write to stdout") from None
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp made it 0600; the export gets the mode a plain open() would have given.
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(f.fileno(), 0o666 & ~umask)
            write(f)
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise CliError(f"cannot write {path}: {e.strerror}") from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def _write_json_lines(evs, f) -> None:
    for ev in evs:
        f.write((events.to_json(ev) + "\n").encode())


def cmd_doctor(args, cfg) -> int:
    from sshtrail import doctor
    checks = doctor.run_checks(cfg, pam_service=args.pam_service, sshd_config=args.sshd_config,
                               sshd_binary=args.sshd_binary, bpf=not args.no_bpf)
    for c in checks:
        print(c)
    failed = [c for c in checks if not c.ok]
    print(f"{len(checks) - len(failed)} OK, {len(failed)} to fix")
    return 1 if failed else 0


def cmd_agent(args, cfg) -> int:
    from sshtrail import agent
    return agent.run(cfg)


def cmd_config(args, cfg) -> int:
    if args.defaults:
        sys.stdout.write(config.render_defaults())
    else:
        where = cfg.source or f"{config.DEFAULT_PATH} (absent: all defaults)"
        print(f"config OK: {where}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    config_help = f"config file (default: $SSHTRAIL_CONFIG, else {config.DEFAULT_PATH})"
    p = argparse.ArgumentParser(prog="sshtrail", description="Audit trail for OpenSSH servers.",
                                epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="PATH", help=config_help)
    # --config may come before the command or after it. SUPPRESS: a command's parser without one
    # leaves what `sshtrail --config X COMMAND` set (its default None would overwrite it).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help=config_help)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name, func, help_):
        sp = sub.add_parser(name, help=help_, description=help_, parents=[common])
        sp.set_defaults(func=func)
        return sp

    for name, func, help_ in (("install", cmd_install, "hook sshtrail into sshd's PAM service and config"),
                              ("uninstall", cmd_uninstall, "remove exactly what install added"),
                              ("doctor", cmd_doctor, "check this host end to end: OK, or what to fix")):
        sp = add(name, func, help_)
        sp.add_argument("--pam-service", default="sshd", help="PAM service name (default: sshd)")
        sp.add_argument("--sshd-config", default="/etc/ssh/sshd_config", metavar="PATH")
        sp.add_argument("--sshd-binary", default="/usr/sbin/sshd", metavar="PATH",
                        help="the sshd used to check the config (sshd -t)")
        if name == "install":
            sp.add_argument("--no-wrapper", action="store_true",
                            help="the login trail only: no ForceCommand, no session recording")
        if name == "doctor":
            sp.add_argument("--no-bpf", action="store_true",
                            help="skip loading the eBPF probes (takes a few seconds)")
    sp = add("events", cmd_events, "print spooled events (a table, or JSON lines)")
    sp.add_argument("--type", help="only this event type, e.g. user.login")
    sp.add_argument("--user", help="only this login")
    sp.add_argument("--since", help="only newer than this: 10m, 2h, 3d or an RFC 3339 time")
    sp.add_argument("--limit", type=int, help="at most this many")
    sp.add_argument("--json", action="store_true", help="one JSON object a line")
    sp.add_argument("--host", help="only this host (server_id or hostname; with --collector)")
    sp.add_argument("--sid", help="only this session (with --collector)")
    sp.add_argument("--text", metavar="TEXT",
                    help="text in a command line, an opened path or an address:port "
                         "connected to or listened on (with --collector)")
    cli_remote.add_collector_options(sp)
    sp = add("sessions", cmd_sessions, "list recorded sessions (a table, or JSON lines)")
    sp.add_argument("--json", action="store_true", help="one JSON object a line")
    cli_remote.add_collector_options(sp)
    sp = add("export", cmd_export, "write a session's recording in a standard format")
    sp.add_argument("sid", help="the session id (see `sshtrail sessions`)")
    sp.add_argument("--format", choices=["asciicast", "text", "json"], default="asciicast",
                    help="asciicast v2: plays in any asciinema player (default); text: what "
                         "the screen showed, as plain text; json: the session's events, one "
                         "JSON object a line")
    sp.add_argument("--output", "-o", metavar="FILE", help="write here instead of stdout")
    sp.add_argument("--host", help="the host, where two share a session id (with --collector)")
    cli_remote.add_collector_options(sp)
    add("agent", cmd_agent, "run the host daemon (log watcher, session recorder) in the foreground")
    cli_remote.add_parsers(sub, add, common)
    cli_play.add_parsers(sub, add, common)
    sp = add("config", cmd_config, "check the config file, or print every key with its default")
    sp.add_argument("--defaults", action="store_true", help="print the documented default file")
    return p


def _stdout_gone() -> bool:
    """Whether stdout is a pipe or socket with no one left to read it (poll says POLLERR)."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poll.poll(0))
    except (OSError, ValueError):
        return False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = config.load(args.config)
        rc = args.func(args, cfg)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at the interpreter's exit
        return rc
    except BrokenPipeError:
        if not _stdout_gone():
            raise  # some other pipe or socket: a bug, keep its traceback
        # The reader of stdout went away (`sshtrail export SID | head`): stop quietly, with the
        # status of a tool killed by SIGPIPE. Python would flush stdout again at its exit and
        # print that it failed: point it at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except (CliError, config.ConfigError) as e:
        print(f"sshtrail: {e}", file=sys.stderr)
        return 2
    except SshtrailError as e:
        print(f"sshtrail: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
