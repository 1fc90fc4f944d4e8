"""The `sshtrail` command: one thin subcommand per library function.

Each subcommand parses its arguments, calls into the library, and turns a library error into a
message and a non-zero exit: never a traceback for bad input.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from pathlib import Path

from sshtrail import config, events
from sshtrail.errors import SshtrailError

EXAMPLES = """examples:
  sshtrail install                          hook sshd (PAM service 'sshd', /etc/ssh/sshd_config)
  sshtrail install --pam-service sshd-lab --sshd-config /srv/lab/sshd_config --config /srv/lab/sshtrail.toml
  sshtrail events --since 10m               what happened in the last ten minutes
  sshtrail events --type user.login --user alice --json
  sshtrail agent                            run the host daemon in the foreground
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


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _safe(text) -> str:
    # Logins and messages come from the network: never let them drive the reader's terminal.
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))


def _detail(ev: dict) -> str:
    kind = ev["event"]
    if kind == "user.login":
        if ev["success"]:
            return f"granted {ev.get('method') or '?'}" + (f" {ev['key']}" if ev.get("key") else "")
        return f"REFUSED {ev.get('error')}" + (f" ({ev['method']})" if ev.get("method") else "")
    if kind == "session.end" and "duration" in ev:
        return f"after {ev['duration']:.1f}s"
    if kind == "spool.dropped":
        return f"{ev['count']} dropped: {ev['reason']}"
    return ev.get("message", "")


def format_table(evs: list[dict]) -> str:
    rows = [("TIME", "EVENT", "LOGIN", "FROM", "DETAIL", "SID")]
    for ev in evs:
        rows.append((ev["time"][:23].replace("T", " "), ev["event"], ev.get("login", ""),
                     ev.get("addr.remote", ""), _detail(ev), ev.get("sid", "")[:13]))
    rows = [tuple(_safe(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


# -- subcommands ----------------------------------------------------------------------------

def cmd_events(args, cfg) -> int:
    from sshtrail.spool import Spool
    if not os.path.exists(cfg["spool.path"]):
        raise CliError(f"no spool at {cfg['spool.path']}: nothing recorded yet, or --config "
                       "points at another host's settings")
    spool = Spool.from_config(cfg)
    try:
        evs = spool.query(kind=args.type, login=args.user,
                          since=parse_since(args.since) if args.since else None, limit=args.limit)
    finally:
        spool.close()
    if args.json:
        for ev in evs:
            print(events.to_json(ev))
    else:
        print(format_table(evs))
    return 0


def cmd_install(args, cfg) -> int:
    from pam_module import hook
    from sshtrail import install
    from sshtrail.spool import Spool
    Spool.from_config(cfg).close()  # the hook's first login should not have to create it
    report = install.install(
        pam_file=Path("/etc/pam.d") / args.pam_service, sshd_config=Path(args.sshd_config),
        hook_argv=hook.command(sys.executable, args.config, fail_closed=cfg["pam.fail_closed"]),
        fail_closed=cfg["pam.fail_closed"], state_dir=Path(cfg["install.state_dir"]),
        sshd_binary=args.sshd_binary, log=_note)
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
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH",
                        help=f"config file (default: $SSHTRAIL_CONFIG, else {config.DEFAULT_PATH})")
    p = argparse.ArgumentParser(prog="sshtrail", description="Audit trail for OpenSSH servers.",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                                parents=[common])
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name, func, help_):
        sp = sub.add_parser(name, help=help_, description=help_, parents=[common])
        sp.set_defaults(func=func)
        return sp

    for name, func, help_ in (("install", cmd_install, "hook sshtrail into sshd's PAM service and config"),
                              ("uninstall", cmd_uninstall, "remove exactly what install added")):
        sp = add(name, func, help_)
        sp.add_argument("--pam-service", default="sshd", help="PAM service name (default: sshd)")
        sp.add_argument("--sshd-config", default="/etc/ssh/sshd_config", metavar="PATH")
        sp.add_argument("--sshd-binary", default="/usr/sbin/sshd", metavar="PATH",
                        help="the sshd used to check the config (sshd -t)")
    sp = add("events", cmd_events, "print spooled events (a table, or JSON lines)")
    sp.add_argument("--type", help="only this event type, e.g. user.login")
    sp.add_argument("--user", help="only this login")
    sp.add_argument("--since", help="only newer than this: 10m, 2h, 3d or an RFC 3339 time")
    sp.add_argument("--limit", type=int, help="at most this many")
    sp.add_argument("--json", action="store_true", help="one JSON object a line")
    add("agent", cmd_agent, "run the host daemon (sshd-log watcher) in the foreground")
    sp = add("config", cmd_config, "check the config file, or print every key with its default")
    sp.add_argument("--defaults", action="store_true", help="print the documented default file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = config.load(args.config)
        return args.func(args, cfg)
    except (CliError, config.ConfigError) as e:
        print(f"sshtrail: {e}", file=sys.stderr)
        return 2
    except SshtrailError as e:
        print(f"sshtrail: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
