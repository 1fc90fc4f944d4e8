"""sshtrail(1), made from the CLI's own argparse definitions, so the page and `--help` never
disagree. `python packaging/manpage.py VERSION > sshtrail.1`."""
from __future__ import annotations

import argparse
import datetime
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sshtrail import cli, config  # noqa: E402

FILES = [
    (config.DEFAULT_PATH, "the configuration (TOML); every key, its default and what it does: "
                          "sshtrail config --defaults"),
    ("/etc/sshtrail/auto-install", "if present when the package is first installed, the package "
                                   "runs sshtrail install (with the words in it as arguments)"),
    ("/var/spool/sshtrail/spool.db", "the local spool (spool.path)"),
    ("/var/spool/sshtrail/spool.db.chunks/", "the spool's recording chunks, one file each"),
    ("/var/lib/sshtrail/install/install.json", "what sshtrail install changed"),
    ("/var/lib/sshtrail/identity/", "this host's key and certificate (sshtrail enroll)"),
    ("/var/lib/sshtrail/collector/", "the collector's CA, server certificate and store"),
    ("/usr/lib/sshtrail/", "sshtrail's code and bundled libraries"),
]


def esc(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    # A line starting with . or ' would be read as a request.
    return "\n".join(("\\&" + ln if ln[:1] in (".", "'") else ln) for ln in text.split("\n"))


def options(parser: argparse.ArgumentParser) -> list[str]:
    out = []
    for a in parser._actions:
        if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if a.option_strings:
            flags = ", ".join(f"\\fB{esc(o)}\\fR" for o in a.option_strings)
            if a.nargs != 0:
                flags += f" \\fI{esc(a.metavar or a.dest.upper())}\\fR"
        else:
            flags = f"\\fI{esc(a.metavar or a.dest)}\\fR"
        out += [".TP", flags, esc(a.help or "")]
    return out


def render(version: str) -> str:
    parser = cli.build_parser()
    stamp = os.environ.get("SOURCE_DATE_EPOCH")  # reproducible builds: the commit's date
    date = (datetime.datetime.fromtimestamp(int(stamp), datetime.timezone.utc).date()
            if stamp else datetime.date.today()).isoformat()
    out = [f'.TH SSHTRAIL 1 "{date}" "sshtrail {esc(version)}" "User Commands"',
           ".SH NAME", "sshtrail \\- audit trail for OpenSSH servers",
           ".SH SYNOPSIS", "\\fBsshtrail\\fR [\\fB\\-\\-config\\fR \\fIPATH\\fR] "
           "\\fICOMMAND\\fR [\\fIoptions\\fR]",
           ".SH DESCRIPTION",
           esc("sshtrail records who logged in to this host over SSH and who was refused, "
               "records interactive sessions, the commands, file opens and connections each "
               "session caused, and ships it all to a central collector. It hooks into sshd "
               "through PAM and ForceCommand; installing the package changes nothing about "
               "logins until `sshtrail install` is run, and `sshtrail uninstall` (or removing "
               "the package) puts the PAM file and sshd_config back byte for byte."),
           ".SH OPTIONS"] + options(parser)
    out.append(".SH COMMANDS")
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in sub._choices_actions}
    for name, sp in sub.choices.items():
        out += [".SS " + esc(f"sshtrail {name}"), esc(helps.get(name) or sp.description or "")]
        opts = [o for o in options(sp)]
        # --config is on every command; it is described once, above.
        i = 0
        while i < len(opts):
            if opts[i] == ".TP" and "config" in opts[i + 1] and opts[i + 1].count("\\fB") == 1 \
                    and "\\-\\-config\\fR" in opts[i + 1]:
                del opts[i:i + 3]
                continue
            i += 1
        out += [".RS"] + opts + [".RE"] if opts else []
        nested = [a for a in sp._actions if isinstance(a, argparse._SubParsersAction)]
        for n in nested:
            nhelps = {c.dest: c.help for c in n._choices_actions}
            for nname, nsp in n.choices.items():
                out += [".TP", esc(f"sshtrail {name} {nname}"), esc(nhelps.get(nname) or "")]
    out += [".SH EXAMPLES", ".nf"] + [esc(ln) for ln in cli.EXAMPLES.splitlines()[1:]] + [".fi"]
    out += [".SH FILES"]
    for path, what in FILES:
        out += [".TP", f"\\fI{esc(path)}\\fR", esc(what)]
    out += [".SH SEE ALSO", "\\fBsshd\\fR(8), \\fBsshd_config\\fR(5), \\fBpam_exec\\fR(8)"]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render(sys.argv[1] if len(sys.argv) > 1 else "0"))
