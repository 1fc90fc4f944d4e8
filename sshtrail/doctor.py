"""`sshtrail doctor`: check a host end to end and say, per line, OK or what is wrong and how to
fix it. Read-only: it looks, it never repairs. Part of the command layer (it may import the
ebpf component, to try loading the tracer the way the agent would).

The checks, in order: the PAM hooks (and that the programs they run exist), sshd's effective
config (`sshd -T`: ForceCommand into the wrapper and the environment sshd sets for it,
LogLevel, UsePAM), login shells that would run the user's files before the wrapper, sshd's log
for the agent, the spool (writable, and what waits in it), the agent's socket, BPF, and the
link to the collector: enrollment files, the host certificate's validity and expiry, and the
collector reached over mutual TLS with that certificate (GET /healthz). Network checks are
bounded by a few seconds each.
"""
from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from . import unsafe_env

# A host certificate closer than this to its end is reported, so it is renewed in time.
CERT_RENEW_BEFORE = 14 * 86400
# Undelivered events older than this, on an enrolled host, mean uploads are not getting through.
BACKLOG_STALE = 600.0
HEALTH_TIMEOUT = 5.0


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""

    def __str__(self) -> str:
        line = f"{'OK  ' if self.ok else 'FAIL'}  {self.name}: {self.detail}"
        return line + (f"\n      fix: {self.fix}" if not self.ok and self.fix else "")


def run_checks(cfg, *, pam_service: str, sshd_config: str, sshd_binary: str,
               bpf: bool = True) -> list[Check]:
    checks = [_pam(pam_service, cfg), *_sshd(sshd_config, sshd_binary)]
    if any(c.name == "session wrapper" and c.ok for c in checks):
        checks.append(_login_shells())
    checks.append(_sshd_log(cfg))
    spool_check, backlog = _spool(cfg)
    checks += [spool_check, _agent(cfg)]
    if bpf:
        checks.append(_bpf(cfg))
    checks += _collector(cfg, backlog)
    return checks


def _pam(service: str, cfg) -> Check:
    path = Path("/etc/pam.d") / service
    try:
        text = path.read_text()
    except OSError as e:
        return Check("PAM hook", False, f"cannot read {path}: {e.strerror}",
                     "give the right --pam-service, or run `sshtrail install`")
    lines = {t: _hook_line(text, t) for t in ("auth", "account", "session")}
    missing = [t for t, words in lines.items() if not words]
    if missing:
        return Check("PAM hook", False, f"{path} lacks sshtrail's {', '.join(missing)} hook",
                     "run `sshtrail install` (it puts back exactly what is missing)")
    gone = sorted({p for words in lines.values() for p in _programs(words)
                   if not os.path.exists(p)})
    if gone:
        return Check("PAM hook", False, f"{path} has the hooks, but they run {', '.join(gone)}, "
                     "which does not exist (sshtrail moved or was removed since install)",
                     "run `sshtrail install` again from the sshtrail you use now")
    from pam_module.queue import queue_dir
    queues = {words[i + 1] for words in lines.values() for i, w in enumerate(words[:-1])
              if w == "--queue"}
    fail_open = any("detach.sh" in w for words in lines.values() for w in words)
    if fail_open and queues != {queue_dir(cfg["spool.path"])}:
        return Check("PAM hook", False, f"{path}'s hooks leave PAM calls "
                     + (f"in {', '.join(sorted(queues))}" if queues else "to no agent")
                     + f", not in {queue_dir(cfg['spool.path'])} where the agent takes them: "
                     "every PAM call starts a Python hook (~25 ms of CPU; nothing is lost)",
                     "run `sshtrail install` again (spool.path changed, or an older sshtrail "
                     "installed the hooks)")
    return Check("PAM hook", True, f"{path} has the auth, account and session hooks")


def _hook_line(text: str, pam_type: str) -> list[str]:
    """The words of the pam_exec line in sshtrail's marked block for this stack, or []."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(f"# >>> sshtrail {pam_type} hook"):
            for inner in lines[i + 1:]:
                if inner.startswith("# <<< sshtrail"):
                    break
                words = inner.split()
                if words[:1] == [pam_type] and "pam_exec.so" in words:
                    return words
    return []


def _programs(words: list[str]) -> list[str]:
    """The absolute paths a hook or ForceCommand line runs: the interpreter and our files."""
    return [w for w in words if w.startswith("/") and (w.endswith((".py", ".sh"))
                                                       or "python" in os.path.basename(w))]


def _sshd(config: str, binary: str) -> list[Check]:
    try:
        proc = subprocess.run([binary, "-T", "-f", config], capture_output=True, text=True,
                              timeout=30)
    except OSError as e:
        return [Check("sshd config", False, f"cannot run {binary}: {e.strerror}",
                      "install openssh-server, or give --sshd-binary")]
    if proc.returncode != 0:
        return [Check("sshd config", False, f"`{binary} -T -f {config}` failed: "
                      f"{proc.stderr.strip()[:300]}", "fix sshd_config until `sshd -t` passes")]
    eff = {}
    for line in proc.stdout.splitlines():
        key, _, value = line.partition(" ")
        eff.setdefault(key.lower(), value)
    out = []
    fc = eff.get("forcecommand", "none")
    gone = [p for p in _programs(fc.split()) if not os.path.exists(p)]
    if "session_wrapper/shell.py" in fc and gone:
        # Every session would fail at once: the most urgent line doctor can print.
        out.append(Check("session wrapper", False, f"ForceCommand in effect: {fc}, but "
                         f"{', '.join(gone)} does not exist: every session fails",
                         "run `sshtrail install` again (or `sshtrail uninstall`) and reload sshd"))
    else:
        out.append(Check("session wrapper", "session_wrapper/shell.py" in fc,
                         f"ForceCommand in effect: {fc}",
                         "run `sshtrail install` (without --no-wrapper) and reload sshd"))
    if "session_wrapper/shell.py" in fc:
        out.append(_wrapper_environment(proc.stdout))
    level = eff.get("loglevel", "").upper()
    out.append(Check("sshd log level", level in ("VERBOSE", "DEBUG", "DEBUG1", "DEBUG2", "DEBUG3"),
                     f"LogLevel {level}: refused keys are logged from VERBOSE up",
                     "run `sshtrail install` (it raises LogLevel to VERBOSE)"))
    out.append(Check("UsePAM", eff.get("usepam") == "yes", f"UsePAM {eff.get('usepam')}",
                     "set `UsePAM yes` in sshd_config: the login trail comes through PAM"))
    return out


def _wrapper_environment(effective: str) -> Check:
    # `sshd -T` prints one line per SetEnv variable.
    have = {line.split(" ", 1)[1] for line in effective.splitlines()
            if line.lower().startswith("setenv ")}
    missing = [v for v in unsafe_env.sshd_setenv().split() if v not in have]
    if missing:
        return Check("wrapper environment", False,
                     f"sshd does not set {' '.join(missing)}: the user's environment or shell "
                     "startup files could run their code before or inside the session wrapper",
                     "run `sshtrail install` again and reload sshd (the packages do it on "
                     "upgrade; an install from a checkout needs it by hand)")
    return Check("wrapper environment", True, "sshd sets what keeps the user's code out of the "
                 f"wrapper's start ({len(have)} variables)")


# sshd runs the ForceCommand through the login shell (`shell -c wrapper`). These run no file of
# the user's for that (bash and zsh once sshd sets unsafe_env.SHELL_SETTINGS), or never start a
# session at all; these others run one before the wrapper, outside the recording, whatever the
# environment says. Any shell in neither list is named too: sshtrail cannot vouch for it.
SAFE_SHELLS = {"bash", "rbash", "sh", "dash", "zsh", "ksh", "ksh93", "mksh", "nologin", "false",
               "true", "sync", "halt", "shutdown", "git-shell"}
USER_FILES_FIRST = {"csh": "~/.cshrc", "tcsh": "~/.tcshrc", "fish": "~/.config/fish/config.fish",
                    "tmux": "~/.tmux.conf"}


def _login_shells() -> Check:
    import pwd
    found = []
    for p in pwd.getpwall():
        shell = os.path.basename(p.pw_shell)
        if shell in USER_FILES_FIRST:
            found.append(f"{p.pw_name} ({shell} reads {USER_FILES_FIRST[shell]})")
        elif shell and shell not in SAFE_SHELLS:
            found.append(f"{p.pw_name} ({p.pw_shell}: not a shell sshtrail knows)")
    if not found:
        return Check("login shells", True, "no account's login shell runs startup files of the "
                     "user's before the session wrapper")
    more = f" and {len(found) - 10} more" if len(found) > 10 else ""
    return Check("login shells", False,
                 f"{len(found)} account(s) have a login shell that may run the user's own "
                 f"startup file before the session wrapper, where it can keep the session from "
                 f"being recorded (the agent reports what runs outside the wrapper, and refuses "
                 f"strict accounts with such a shell): {', '.join(sorted(found)[:10])}{more}",
                 "give them bash, zsh or sh as login shell (chsh -s /bin/bash USER)")


def _sshd_log(cfg) -> Check:
    path = cfg["sshd_log.path"]
    if os.access(path, os.R_OK):
        return Check("sshd log", True, f"{path} readable (refusals PAM never sees come from it)")
    why = "does not exist" if not os.path.exists(path) else "is not readable"
    return Check("sshd log", False, f"{path} {why}: refused keys and unknown users are not "
                 "recorded", "install rsyslog (Debian 12 logs to the journal only: it writes "
                 "/var/log/auth.log), or point sshd_log.path at the file sshd logs to")


def _spool(cfg) -> tuple[Check, dict | None]:
    from .spool import Spool, SpoolError
    path = cfg["spool.path"]
    if not os.path.exists(path):
        # Not created here: doctor only looks. The agent, install or the first login make it.
        parent = os.path.dirname(path) or "."
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if os.access(parent, os.W_OK | os.X_OK):
            return Check("spool", True, f"{path} not created yet ({parent} is writable; the "
                         "agent or the first login creates it); backlog 0"), None
        return Check("spool", False, f"{path} does not exist and {parent} is not writable",
                     f"make {os.path.dirname(path)} a writable directory for root, or set "
                     "spool.path"), None
    try:
        spool = Spool.from_config(cfg)
    except SpoolError as e:
        return Check("spool", False, str(e), f"make {os.path.dirname(cfg['spool.path'])} a "
                     "writable directory for root, or set spool.path"), None
    try:
        backlog = spool.backlog()
    finally:
        spool.close()
    detail = f"{cfg['spool.path']} writable; backlog {backlog['events']} event(s)"
    if backlog["events"] and backlog["oldest"]:
        detail += f" (oldest {backlog['oldest'][:19]}Z)"
    detail += f", {backlog['chunks']} recording chunk(s) ({backlog['chunk_bytes']} bytes)"
    if backlog["rejected"]:
        # Dead-lettered by the collector: kept, never re-sent. Worth knowing, not a fault here.
        detail += f"; {backlog['rejected']} rejected by the collector (see `sshtrail status`)"
    return Check("spool", True, detail), backlog


def _agent(cfg) -> Check:
    from pam_module.queue import STALE, call_age, call_names, queue_dir
    path = cfg["agent.socket"]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(path)
    except OSError as e:
        return Check("agent", False, f"not reachable at {path}: {e.strerror or e}",
                     "start it: `sshtrail agent` (systemd: sshtrail-agent.service)")
    finally:
        s.close()
    # Calls left for an agent that stopped taking them (hung, or killed and not back).
    try:
        waiting = [n for n in call_names(queue_dir(cfg["spool.path"])) if call_age(n) > STALE]
    except OSError:
        waiting = []
    if waiting:
        return Check("agent", False, f"listening at {path}, but {len(waiting)} PAM call(s) have "
                     f"waited in {queue_dir(cfg['spool.path'])} for over {STALE:.0f}s",
                     "see the agent's log (journalctl -u sshtrail-agent); restart it: the calls "
                     "stay there until an agent writes them")
    return Check("agent", True, f"listening at {path}")


def _bpf(cfg) -> Check:
    if not cfg["ebpf.enabled"]:
        return Check("eBPF host events", True, "off by config (ebpf.enabled = false)")
    from ebpf.tracer import Tracer, TracerUnavailable  # imports BCC only when loading
    try:
        Tracer(lambda batch: None, kinds=tuple(cfg["ebpf.kinds"])).close()
    except TracerUnavailable as e:
        fix = ("apt install python3-bpfcc (and run sshtrail with Debian's python3)"
               if "python3-bpfcc" in str(e) else "as the reason says")
        return Check("eBPF host events", False, str(e), fix)
    return Check("eBPF host events", True, "the tracer's probes load and attach")


def _collector(cfg, backlog: dict | None) -> list[Check]:
    """Enrollment, the host certificate, the collector over mutual TLS, and whether the backlog
    is moving. Not enrolled is a failure: events then never leave this host."""
    try:
        from . import enroll, signing
    except ImportError as e:
        # A doctor that dies of a missing library would hide every other line.
        return [Check("enrollment", False, f"cannot check: {e}",
                      "install sshtrail's dependencies (python3-cryptography, python3-requests)")]
    url = enroll.collector_url(cfg)
    ident = cfg["upload.identity_dir"]
    files = {n: os.path.join(ident, n) for n in (enroll.HOST_KEY, enroll.HOST_CERT, enroll.CA_CERT)}
    missing = [n for n, p in files.items() if not os.path.exists(p)]
    if not url or missing:
        what = "no collector URL (upload.url, or `sshtrail enroll`)" if not url else \
            f"{ident} lacks {', '.join(missing)}"
        return [Check("enrollment", False, f"not enrolled: {what}; events stay in the spool",
                      "on the collector `sshtrail collector enroll-token`, then here "
                      "`sshtrail enroll --collector URL --token TOKEN`")]
    out = []
    try:
        cert = signing.load_cert_file(files[enroll.HOST_CERT])
        ca = signing.load_cert_file(files[enroll.CA_CERT])
        server_id = signing.cert_server_id(cert)
    except signing.SigningError as e:
        return [Check("enrollment", False, str(e), "enroll this host again (`sshtrail enroll`)")]
    now = time.time()
    not_before, not_after = signing.cert_not_before(cert), signing.cert_not_after(cert)
    expiry = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(not_after))
    renew = "enroll again with a new token (`sshtrail enroll`) to get a new certificate"
    if not signing.cert_issued_by(cert, ca):
        out.append(Check("certificate", False, f"{files[enroll.HOST_CERT]} was not issued by "
                         f"the CA in {files[enroll.CA_CERT]}", renew))
    elif now < not_before:
        out.append(Check("certificate", False, "host certificate not valid before "
                         + time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(not_before))
                         + " (is this host's clock right?)", "fix the clock, or " + renew))
    elif now >= not_after:
        out.append(Check("certificate", False, f"host certificate expired {expiry}", renew))
    elif not_after - now < CERT_RENEW_BEFORE:
        out.append(Check("certificate", False, f"host certificate expires {expiry}, in "
                         f"{(not_after - now) / 86400:.1f} days", renew))
    else:
        out.append(Check("certificate", True, f"host {server_id}, valid until {expiry} "
                         f"({int((not_after - now) // 86400)} days)"))
    out.append(_health(url, files))
    oldest = _epoch(backlog["oldest"]) if backlog and backlog["events"] else None
    if oldest is not None and now - oldest > BACKLOG_STALE:
        out.append(Check("upload", False, f"{backlog['events']} event(s) wait, the oldest for "
                         f"{(now - oldest) / 60:.0f} min: uploads are not getting through",
                         "check the agent is running and the lines above; "
                         "`sshtrail status` shows the uploader's last error"))
    return out


def _epoch(rfc3339: str | None) -> float | None:
    from . import events
    try:
        return events.parse_time(rfc3339) if rfc3339 else None
    except events.EventError:
        return None


def _health(url: str, files: dict) -> Check:
    from . import enroll
    import requests
    try:
        r = requests.get(url + "/healthz", timeout=HEALTH_TIMEOUT, verify=files[enroll.CA_CERT],
                         cert=(files[enroll.HOST_CERT], files[enroll.HOST_KEY]))
    except requests.exceptions.SSLError as e:
        return Check("collector", False, f"{url}: TLS failed: {_short(e)}",
                     "the collector's certificate must chain to the CA this host enrolled with, "
                     "and accept this host's certificate: enroll again if the collector's CA changed")
    except requests.RequestException as e:
        return Check("collector", False, f"{url} not reachable: {_short(e)}",
                     "check the collector runs (sshtrail-collector.service), the URL, and the "
                     "network path to it")
    if r.status_code != 200:
        return Check("collector", False, f"{url}/healthz answered HTTP {r.status_code}",
                     "see the collector's log")
    return Check("collector", True, f"{url} reachable over mutual TLS with this host's certificate")


def _short(e: Exception) -> str:
    text = str(e)
    # requests nests the reason deep in a repr; the last part says what happened.
    for marker in ("Caused by ", "due to "):
        if marker in text:
            text = text.split(marker)[-1]
    return text.strip("()'\" ")[:200]
