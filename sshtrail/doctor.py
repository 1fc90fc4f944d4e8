"""`sshtrail doctor`: check a host end to end and say, per line, OK or what is wrong and how to
fix it. Read-only: it looks, it never repairs. Part of the command layer (it may import the
ebpf component, to try loading the tracer the way the agent would).
"""
from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path


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
    checks = [_pam(pam_service), *_sshd(sshd_config, sshd_binary), _spool(cfg), _agent(cfg)]
    if bpf:
        checks.append(_bpf(cfg))
    return checks


def _pam(service: str) -> Check:
    path = Path("/etc/pam.d") / service
    try:
        text = path.read_text()
    except OSError as e:
        return Check("PAM hook", False, f"cannot read {path}: {e.strerror}",
                     "give the right --pam-service, or run `sshtrail install`")
    missing = [t for t in ("auth", "account", "session") if not _hook_line(text, t)]
    if missing:
        return Check("PAM hook", False, f"{path} lacks sshtrail's {', '.join(missing)} hook",
                     "run `sshtrail install` (it puts back exactly what is missing)")
    return Check("PAM hook", True, f"{path} has the auth, account and session hooks")


def _hook_line(text: str, pam_type: str) -> bool:
    """Whether sshtrail's marked block for this stack holds its pam_exec line."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(f"# >>> sshtrail {pam_type} hook"):
            for inner in lines[i + 1:]:
                if inner.startswith("# <<< sshtrail"):
                    break
                words = inner.split()
                if words[:1] == [pam_type] and "pam_exec.so" in words:
                    return True
    return False


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
    out.append(Check("session wrapper", "session_wrapper/shell.py" in fc,
                     f"ForceCommand in effect: {fc}",
                     "run `sshtrail install` (without --no-wrapper) and reload sshd"))
    level = eff.get("loglevel", "").upper()
    out.append(Check("sshd log level", level in ("VERBOSE", "DEBUG", "DEBUG1", "DEBUG2", "DEBUG3"),
                     f"LogLevel {level}: refused keys are logged from VERBOSE up",
                     "run `sshtrail install` (it raises LogLevel to VERBOSE)"))
    out.append(Check("UsePAM", eff.get("usepam") == "yes", f"UsePAM {eff.get('usepam')}",
                     "set `UsePAM yes` in sshd_config: the login trail comes through PAM"))
    return out


def _spool(cfg) -> Check:
    from .spool import Spool, SpoolError
    try:
        spool = Spool.from_config(cfg)
    except SpoolError as e:
        return Check("spool", False, str(e), f"make {os.path.dirname(cfg['spool.path'])} a "
                     "writable directory for root, or set spool.path")
    try:
        backlog = spool.count(sent=False)
    finally:
        spool.close()
    return Check("spool", True, f"{cfg['spool.path']} writable; {backlog} event(s) not yet delivered")


def _agent(cfg) -> Check:
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
