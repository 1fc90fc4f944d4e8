"""The `sshtrail` subcommands about central collection: the collector service and its CA
(`collector init|serve|enroll-token|reader-token|revoke`), a host joining it (`enroll`), the
uploader's backlog (`status`), the integrity check (`verify`), and reading from a collector
(`--collector URL` of events, sessions, export, and `search`). Thin: each parses, calls one
library function, prints.
"""
from __future__ import annotations

import json
import os
import sys

from sshtrail import events
from sshtrail.errors import SshtrailError

EXAMPLES = """examples:
  sshtrail collector init                       the collector's CA and server certificate
  sshtrail collector serve                      HTTPS on collector.listen
  sshtrail collector enroll-token               a single-use token for one new host
  sshtrail enroll --collector https://c:8443 --token T   (on the host)
  sshtrail collector reader-token alice > t     an auditor's read token
  sshtrail events --collector https://c:8443 --token-file t --user bob --since 1h
  sshtrail verify                               gaps, edits, bad signatures (exit 1 if any)
"""

SEARCH_EXAMPLES = """The text is literal and case-insensitive, 3 characters at least; it is looked
for in every line that appeared on a recorded screen (typed commands too: shells echo them)
and in every command a session ran. Newest first.

examples:
  sshtrail search 'rm -rf /tmp/x' --collector https://c:8443 --token-file t
  sshtrail search marker-42 --user bob --host web-1 --since 2d --collector https://c:8443
  sshtrail search 'DROP TABLE' --kind command --json --collector https://c:8443
then: sshtrail play SID --at OFFSET   opens the recording where the text was on screen
"""


# -- the collector ------------------------------------------------------------------------------

def cmd_collector_init(args, cfg) -> int:
    from collector import ca
    names = args.name or cfg["collector.names"]
    fingerprint = ca.init(cfg["collector.dir"], names, force=args.force)
    print(f"collector CA and server certificate in {cfg['collector.dir']} for {', '.join(names)}")
    print(f"CA fingerprint (sha256): {fingerprint}")
    return 0


def cmd_collector_serve(args, cfg) -> int:
    from collector import serve
    return serve.serve(cfg, listen=args.listen)


def cmd_collector_enroll_token(args, cfg) -> int:
    from collector import ca, serve
    store = serve.open_store(cfg)
    try:
        token = ca.issue_token(store, ca.CA(cfg["collector.dir"]),
                               args.ttl if args.ttl is not None else cfg["collector.token_ttl"],
                               server_id=args.server_id)
    finally:
        store.close()
    print(token)
    return 0


def cmd_collector_reader_token(args, cfg) -> int:
    from collector import ca, serve
    store = serve.open_store(cfg)
    try:
        print(ca.issue_reader_token(store, args.name))
    finally:
        store.close()
    return 0


def cmd_collector_revoke(args, cfg) -> int:
    from collector import serve
    store = serve.open_store(cfg)
    try:
        if not store.revoke(args.server_id):
            raise SshtrailError(f"no enrolled host {args.server_id!r}; `sshtrail collector hosts` "
                                "lists them")
    finally:
        store.close()
    print(f"revoked {args.server_id}: its uploads are refused until it enrolls again")
    return 0


def cmd_collector_hosts(args, cfg) -> int:
    from collector import serve
    store = serve.open_store(cfg)
    try:
        for h in store.hosts():
            print(f"{h.server_id}  seq {h.last_seq}  cert {h.cert_serial[:16]}  until "
                  f"{events.format_time(h.not_after)[:10]}" + ("  REVOKED" if h.revoked else ""))
    finally:
        store.close()
    return 0


def cmd_verify(args, cfg) -> int:
    from collector import serve, verify
    store = serve.open_store(cfg)
    try:
        reports = verify.verify(store, args.host)
    finally:
        store.close()
    if args.host and not reports:
        raise SshtrailError(f"no enrolled host {args.host!r} in this collector's store")
    if not reports:
        print("no enrolled hosts in this collector's store: nothing to verify")
    bad = 0
    for r in reports:
        state = "OK" if not r.problems else f"{len(r.problems)} PROBLEM(S)"
        print(f"{r.server_id}: {r.events} events, seq 1-{r.last_seq}, {r.batches} signed "
              f"batches: {state}")
        for p in r.problems:
            print(f"  {p.kind}: {p.detail}")
        bad += bool(r.problems)
    return 1 if bad else 0


# -- a host ------------------------------------------------------------------------------------

def _read_token(path: str | None, env: str) -> str | None:
    if path:
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError as e:
            raise SshtrailError(f"cannot read the token file {path}: {e.strerror}") from None
    return os.environ.get(env) or None


def cmd_enroll(args, cfg) -> int:
    from sshtrail import enroll
    token = args.token or _read_token(args.token_file, "SSHTRAIL_ENROLL_TOKEN")
    if not token:
        raise SshtrailError("enroll needs a token: --token-file FILE or $SSHTRAIL_ENROLL_TOKEN "
                            "(from `sshtrail collector enroll-token` on the collector)")
    info = enroll.enroll(args.collector, token, cfg.server_id, cfg["upload.identity_dir"])
    print(f"enrolled {info['server_id']} with {args.collector}; certificate valid until "
          f"{events.format_time(info['not_after'])[:19]}Z; identity in "
          f"{cfg['upload.identity_dir']}")
    return 0


def cmd_status(args, cfg) -> int:
    from sshtrail import uploader
    st = uploader.status(cfg)
    if args.json:
        print(json.dumps(st, sort_keys=True))
        return 0
    for key in sorted(st):
        print(f"{key}: {st[key]}")
    return 0


# -- reading from a collector ------------------------------------------------------------------

def reader(args, cfg):
    from sshtrail.collector_client import Reader
    ca_file = args.ca or next(
        (p for p in (os.path.join(cfg["upload.identity_dir"], "ca.crt"),
                     os.path.join(cfg["collector.dir"], "ca.crt")) if os.path.exists(p)),
        os.path.join(cfg["upload.identity_dir"], "ca.crt"))
    return Reader(args.collector, _read_token(args.token_file, "SSHTRAIL_READER_TOKEN"), ca_file)


def cmd_search(args, cfg) -> int:
    from sshtrail.cli import _safe, parse_since
    if not args.collector:
        raise SshtrailError("search runs at the collector: add --collector URL (and a reader "
                            "token: --token-file FILE or $SSHTRAIL_READER_TOKEN)")
    since = parse_since(args.since) if args.since else None
    hits = reader(args, cfg).search(
        args.text, user=args.user, host=args.host, kind=args.kind, limit=args.limit,
        since=events.format_time(since) if since is not None else None)
    if args.json:
        for h in hits:
            print(json.dumps(h, sort_keys=True))
        return 0
    if not hits:
        print(f"no match for {_safe(args.text)!r}", file=sys.stderr)
        return 1
    for h in hits:
        when = (h["time"] or "?")[:23].replace("T", " ")
        who = f"{_safe(h['login'] or '?')}@{_safe(h['server_hostname'] or h['server_id'])}"
        offset = f"+{h['offset']:.3f}s" if h["offset"] is not None else "-"
        print(f"{when}  {who}  {_safe(h['sid'] or '-')}  {offset}  {h['kind']}: "
              f"{_safe(h['line'])}")
        if h["offset"] is not None and h["sid"]:
            print(f"    sshtrail play {_safe(h['sid'])} --at {h['offset']:g}")
    return 0


def add_collector_options(sp) -> None:
    sp.add_argument("--collector", metavar="URL", help="ask this collector instead of the spool")
    sp.add_argument("--token-file", metavar="FILE",
                    help="reader token for --collector (default: $SSHTRAIL_READER_TOKEN)")
    sp.add_argument("--ca", metavar="FILE", help="the collector's CA certificate "
                                                 "(default: this host's enrolled CA)")


def add_parsers(sub, add, common) -> None:
    import argparse
    sp = add("collector", None, "the central collector service and its CA")
    sp.epilog, sp.formatter_class = EXAMPLES, argparse.RawDescriptionHelpFormatter
    csub = sp.add_subparsers(dest="collector_command", metavar="ACTION", required=True)

    # --config may come before or after the action; SUPPRESS keeps an absent one from
    # overwriting what `collector --config X` set.
    nested = argparse.ArgumentParser(add_help=False)
    nested.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                        help="config file (default: $SSHTRAIL_CONFIG, else /etc/sshtrail/sshtrail.toml)")

    def cadd(name, func, help_):
        c = csub.add_parser(name, help=help_, description=help_, parents=[nested])
        c.set_defaults(func=func)
        return c

    c = cadd("init", cmd_collector_init, "create the collector's CA and server certificate")
    c.add_argument("--name", action="append",
                   help="a host name or address clients use (repeat; default collector.names)")
    c.add_argument("--force", action="store_true", help="replace an existing CA (every host "
                                                        "must enroll again)")
    c = cadd("serve", cmd_collector_serve, "run the collector (HTTPS) in the foreground")
    c.add_argument("--listen", metavar="HOST:PORT", help="default: collector.listen")
    c = cadd("enroll-token", cmd_collector_enroll_token, "print a single-use enrollment token")
    c.add_argument("--ttl", type=float, metavar="SECONDS", help="default: collector.token_ttl")
    c.add_argument("--server-id", help="only this host may use it")
    c = cadd("reader-token", cmd_collector_reader_token, "print a new auditor (read) token")
    c.add_argument("name", help="who it is for, e.g. alice")
    c = cadd("revoke", cmd_collector_revoke, "refuse a host's uploads until it enrolls again")
    c.add_argument("server_id")
    cadd("hosts", cmd_collector_hosts, "list enrolled hosts")

    sp = add("enroll", cmd_enroll, "get this host a certificate from the collector")
    sp.add_argument("--collector", required=True, metavar="URL", help="e.g. https://c.example:8443")
    sp.add_argument("--token", help="the enrollment token (single use, short-lived)")
    sp.add_argument("--token-file", metavar="FILE",
                    help="read the token from FILE (default: $SSHTRAIL_ENROLL_TOKEN)")
    sp = add("status", cmd_status, "the uploader's backlog, lag and last error")
    sp.add_argument("--json", action="store_true")
    sp = add("search", cmd_search, "find text seen on recorded screens, or run as a command")
    sp.epilog, sp.formatter_class = SEARCH_EXAMPLES, argparse.RawDescriptionHelpFormatter
    sp.add_argument("text", metavar="QUERY", help="literal text, 3 characters at least")
    sp.add_argument("--user", help="only this login")
    sp.add_argument("--host", help="only this host (server_id or hostname)")
    sp.add_argument("--since", help="only newer than this: 10m, 2h, 3d or an RFC 3339 time")
    sp.add_argument("--kind", choices=["output", "command"],
                    help="only screen output, or only commands (default both)")
    sp.add_argument("--limit", type=int, default=50, help="at most this many hits (50)")
    sp.add_argument("--json", action="store_true", help="one JSON object a hit")
    add_collector_options(sp)
    sp = add("verify", cmd_verify, "check the collector's store: gaps, edits, bad signatures")
    sp.add_argument("--host", metavar="SERVER_ID", help="only this host")
