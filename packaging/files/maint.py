"""What the package's maintainer scripts (deb postinst/prerm, rpm %post/%preun) ask of sshtrail.

Installed as /usr/lib/sshtrail/maint.py and run as `PYTHON -I maint.py ACTION`:

  unhook        before the package goes away: take sshtrail's blocks out of every PAM file and
                sshd_config it is in (`sshtrail uninstall`, byte for byte), then reload sshd so
                no new session is sent to a ForceCommand whose program is about to disappear.
                Fails (and so stops the removal) if a ForceCommand into sshtrail would remain.
  auto-install  on a first install only, and only if the operator asked for it beforehand with
                /etc/sshtrail/auto-install (its words, if any, are passed to `sshtrail install`,
                e.g. `--no-wrapper`): hook sshd, then reload it.
  rehook        on an upgrade: bring the blocks of the recorded install up to what this version
                writes (`sshtrail install` again, with the arguments its install record
                holds), and reload sshd if sshd_config changed: a fix in the blocks (say, in
                what sshd sets for the wrapper) reaches the host with the package. Files whose
                block was taken out by hand are left alone; a failure is said, never fatal.
  compile       byte-compile the private library tree (the package ships no .pyc).
  clean         remove what `compile` and Python made (__pycache__), before the files go.

Must never: touch a PAM or sshd file that holds no sshtrail block, restart sshd (a reload keeps
every running session; even a restart would, but there is no need), or fail an upgrade.
"""
from __future__ import annotations

import glob
import json
import os
import shlex
import shutil
import subprocess
import sys

LIBDIR = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(LIBDIR, "lib")]

AUTO_INSTALL = "/etc/sshtrail/auto-install"
PAM_DIR = "/etc/pam.d"
SSHD_CONFIG = "/etc/ssh/sshd_config"
SSHD = "/usr/sbin/sshd"
MARK = "# >>> sshtrail "


def say(message: str) -> None:
    print(f"sshtrail: {message}", file=sys.stderr)


def _has_block(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return MARK.encode() in f.read()
    except OSError:
        return False


def _config():
    from sshtrail import config
    try:
        return config.load(None, use_env=False)
    except config.ConfigError as e:
        say(f"{e}; using the defaults to find what sshtrail install changed")
        return config.Config({k.name: k.default for k in config.DEFAULTS}, None)


def hooked_pairs(state_dir: str) -> list[tuple[str, str, str]]:
    """(PAM file, sshd_config, sshd binary) sets that may hold sshtrail blocks: what the install
    record names, the default pair, and any PAM file with a block (paired with the default
    sshd_config: a PAM block alone is harmless, its lines are `optional`)."""
    pairs = []
    try:
        with open(os.path.join(state_dir, "install.json")) as f:
            state = json.load(f)
        files = state.get("files", {})
        pairs.append((files["pam"]["path"], files["sshd_config"]["path"],
                      state.get("sshd_binary") or SSHD))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    pairs.append((os.path.join(PAM_DIR, "sshd"), SSHD_CONFIG, SSHD))
    for pam in sorted(glob.glob(os.path.join(PAM_DIR, "*"))):
        if _has_block(pam):
            pairs.append((pam, SSHD_CONFIG, SSHD))
    seen, out = set(), []
    for p in pairs:
        if p[:2] not in seen:
            seen.add(p[:2])
            out.append(p)
    return out


def unhook() -> int:
    from sshtrail import install
    cfg = _config()
    changed_sshd = False
    for pam, sshd_config, sshd in hooked_pairs(cfg["install.state_dir"]):
        if not (_has_block(pam) or _has_block(sshd_config)):
            continue
        if not os.path.exists(pam):
            # uninstall() takes both files; this pair's PAM half is gone, so give it one with
            # nothing to remove.
            pam = os.devnull
        say(f"removing sshtrail's hooks from {pam} and {sshd_config}")
        try:
            report = install.uninstall(pam_file=pam, sshd_config=sshd_config,
                                       state_dir=cfg["install.state_dir"], sshd_binary=sshd,
                                       log=say)
        except install.InstallError as e:
            say(f"cannot remove the hooks: {e}\nRun `sshtrail uninstall` by hand (see its "
                f"--pam-service/--sshd-config), then remove the package again.")
            return 1
        print(report, file=sys.stderr)
        changed_sshd |= any(f.status == "changed" and str(f.path) == sshd_config
                            for f in report.files)
    leftover = [p for p in [SSHD_CONFIG, *glob.glob("/etc/ssh/sshd_config.d/*")]
                if _forces_into_sshtrail(p)]
    if leftover:
        say(f"{', '.join(leftover)} still send sessions to sshtrail's wrapper (a ForceCommand "
            f"outside sshtrail's marked block?): removing the package would break every login. "
            f"Take that line out, reload sshd, then remove the package again.")
        return 1
    if changed_sshd:
        reload_sshd()
    return 0


def _forces_into_sshtrail(path: str) -> bool:
    try:
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    for line in lines:
        words = line.split("#", 1)[0].split()
        if words and words[0].lower() == "forcecommand" and LIBDIR in line:
            return True
    return False


def reload_sshd() -> None:
    """Make a running sshd read its config again (SIGHUP: sessions in progress go on)."""
    if os.path.isdir("/run/systemd/system") and shutil.which("systemctl"):
        for unit in ("ssh.service", "sshd.service"):
            if subprocess.run(["systemctl", "is-active", "--quiet", unit]).returncode == 0:
                subprocess.run(["systemctl", "reload", unit])
                say(f"reloaded {unit}")
        return
    if os.path.exists("/etc/init.d/ssh") and shutil.which("invoke-rc.d"):
        # Debian without systemd as PID 1; invoke-rc.d honours policy-rc.d.
        if subprocess.run(["invoke-rc.d", "ssh", "reload"]).returncode == 0:
            say("reloaded ssh (invoke-rc.d)")
        return
    try:
        with open("/run/sshd.pid") as f:
            pid = int(f.read().split()[0])
        if os.path.basename(os.readlink(f"/proc/{pid}/exe")).startswith("sshd"):
            os.kill(pid, 1)
            say(f"reloaded sshd (pid {pid})")
    except (OSError, ValueError, IndexError):
        say("no running sshd found to reload; a new sshd reads the new config")


def auto_install() -> int:
    if not os.path.exists(AUTO_INSTALL):
        say("installed; sshd and PAM are unchanged until you run `sshtrail install` "
            "(`sshtrail doctor` checks everything)")
        return 0
    with open(AUTO_INSTALL) as f:
        words = shlex.split(f.read(), comments=True)
    sshtrail = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(LIBDIR))), "bin",
                            "sshtrail")
    say(f"{AUTO_INSTALL} exists: running `sshtrail install {' '.join(words)}`")
    proc = subprocess.run([sshtrail, "install", *words])
    if proc.returncode != 0:
        # Not fatal for the package: install rolled back, login behaviour is what it was.
        say("sshtrail install failed (nothing was changed); fix what it says and run it again")
        return 0
    reload_sshd()
    return 0


def rehook() -> int:
    from sshtrail import install
    state_dir = _config()["install.state_dir"]
    try:
        with open(os.path.join(state_dir, "install.json")) as f:
            state = json.load(f)
        if not state.get("installed"):
            return 0
        pam = state["files"]["pam"]["path"]
        sshd_config = state["files"]["sshd_config"]["path"]
        args = dict(hook_argv=[str(a) for a in state["hook_argv"]],
                    fail_closed=bool(state["fail_closed"]),
                    force_command=[str(a) for a in state.get("force_command") or []] or None,
                    sshd_binary=state.get("sshd_binary") or SSHD)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return 0  # never installed, or no record of how: nothing to bring up to date
    if not _has_block(pam) or (state.get("sshd_lines") and not _has_block(sshd_config)):
        say(f"sshtrail's hooks are not all in {pam} and {sshd_config}: left as they are")
        return 0
    try:
        report = install.install(pam_file=pam, sshd_config=sshd_config, state_dir=state_dir,
                                 log=say, **args)
    except install.InstallError as e:
        say(f"cannot bring sshtrail's hooks up to date: {e}\nRun `sshtrail install` again by "
            f"hand (`sshtrail doctor` says what is missing).")
        return 0
    if any(f.status == "changed" for f in report.files):
        print(report, file=sys.stderr)
    if any(f.status == "changed" and str(f.path) == sshd_config for f in report.files):
        reload_sshd()
    return 0


def compile_tree() -> int:
    import compileall
    for sub in ("lib", "collector-lib"):
        path = os.path.join(LIBDIR, sub)
        if os.path.isdir(path):
            compileall.compile_dir(path, quiet=1, workers=1)
    return 0


def clean(sub: str | None = None) -> int:
    for part in ([sub] if sub else ["lib", "collector-lib"]):
        for root, dirs, _ in os.walk(os.path.join(LIBDIR, part), topdown=False):
            for d in dirs:
                if d == "__pycache__":
                    shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    return 0


def main(argv: list[str]) -> int:
    actions = {"unhook": unhook, "auto-install": auto_install, "rehook": rehook,
               "compile": compile_tree,
               "reload-sshd": lambda: reload_sshd() or 0,
               "clean": lambda: clean(argv[2] if len(argv) > 2 else None)}
    if len(argv) < 2 or argv[1] not in actions:
        say(f"usage: maint.py {'|'.join(actions)}")
        return 2
    return actions[argv[1]]()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
