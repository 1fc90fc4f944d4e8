"""Put sshtrail's hooks into a PAM service file and sshd_config, and take them out again.

`sshtrail install` and `sshtrail uninstall` are thin layers over `install()` and `uninstall()`.
Everything sshtrail adds to an operator's file is a marked block:

    # >>> sshtrail auth hook (managed by `sshtrail install`; `sshtrail uninstall` removes it)
    auth optional pam_exec.so quiet /usr/lib/sshtrail/venv/bin/python3 -I -m pam_module.hook ...
    # <<< sshtrail

The marked blocks are the truth about what is installed: install replaces them in place,
uninstall removes exactly them, and the state record under `state_dir` (hashes of the files,
for a later `doctor`) is only a help, never needed.

What this module must never do:
- change, reorder or delete an operator's line: it only inserts and removes whole marked blocks,
  so after uninstall the files are byte for byte what they were (plus any edits the operator made
  in between);
- leave a half-written file (every write is temp file + fsync + rename), or an sshd_config that
  fails `sshd -t` (it checks before and after, and puts both files back if the check fails);
- flip `UsePAM`: that changes how every user authenticates, so it is the operator's call;
- touch anything but the two files it was given and `state_dir`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Mapping

from . import unsafe_env
from .errors import SshtrailError

__all__ = ["install", "uninstall", "wanted_sshd_lines", "InstallError", "Report", "FileResult"]

BEGIN_PREFIX = "# >>> sshtrail "
END_MARKER = "# <<< sshtrail"
_MANAGED = "(managed by `sshtrail install`; `sshtrail uninstall` removes it)"

PAM_TYPES = ("auth", "account", "session")
_KIND_NAMES = {"auth": "auth hook", "account": "account hook", "session": "session hook",
               "sshd": "sshd settings"}
STATE_FILE = "install.json"
_LOCK_FILE = "install.lock"

# sshd -T prints QUIET as SILENT and DEBUG1 as DEBUG; both spellings are listed.
_LOG_LEVELS = {
    "QUIET": 0, "SILENT": 0, "FATAL": 1, "ERROR": 2, "INFO": 3, "VERBOSE": 4,
    "DEBUG": 5, "DEBUG1": 5, "DEBUG2": 6, "DEBUG3": 7,
}
# Refused public keys ("Failed publickey for ...") are logged only from VERBOSE up; the
# sshd-log watcher needs them because public-key refusals never reach PAM.
_NEEDED_LOG_LEVEL = "VERBOSE"

# Used only if `sshd -T` refuses to print without connection parameters (older OpenSSH with
# Match blocks). The values then shown are those root from localhost would get.
_MATCH_SPEC = "user=root,host=localhost,addr=127.0.0.1"
_SSHD_TIMEOUT = 30


class InstallError(SshtrailError):
    """Install or uninstall refused or failed; the message says what was wrong and what to do.

    When it is raised, the PAM file and sshd_config hold the bytes they had before the call.
    """


@dataclasses.dataclass(frozen=True)
class FileResult:
    path: Path
    status: str  # "changed" or "unchanged"
    reason: str


@dataclasses.dataclass
class Report:
    action: str  # "install" or "uninstall"
    files: list[FileResult]
    notes: list[str] = dataclasses.field(default_factory=list)  # warnings the operator should read
    state_file: Path | None = None

    @property
    def changed(self) -> bool:
        return any(f.status == "changed" for f in self.files)

    def __str__(self) -> str:
        lines = [f"{f.status:<9} {f.path}: {f.reason}" for f in self.files]
        lines += [f"warning: {n}" for n in self.notes]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Public API


def install(*, pam_file: Path, sshd_config: Path, hook_argv: list[str], fail_closed: bool,
            state_dir: Path, sshd_binary: str = "/usr/sbin/sshd",
            log: Callable[[str], object] = print,
            force_command: list[str] | None = None) -> Report:
    """Insert (or update in place) sshtrail's PAM hooks and sshd_config settings.

    Running it again with the same arguments writes nothing. `log` gets progress lines and
    warnings; the returned Report says per file what changed and why.
    """
    pam_file, sshd_config, state_dir = Path(pam_file), Path(sshd_config), Path(state_dir)
    sshd = _find_sshd(sshd_binary)
    pam_args = _pam_exec_args(hook_argv)
    notes: list[str] = []
    control = "required" if fail_closed else "optional"
    if not os.access(hook_argv[0], os.X_OK):
        if fail_closed:
            raise InstallError(
                f"the hook program {hook_argv[0]} is missing or not executable, and fail_closed "
                f"makes the PAM hooks 'required': every SSH login would fail. Install sshtrail's "
                f"hook there first, or install without fail-closed.")
        notes.append(f"the hook program {hook_argv[0]} is missing or not executable: logins still "
                     f"work (the hooks are 'optional'), but nothing is audited until it exists")

    with _locked(state_dir):
        pam = _read_file(pam_file, what="PAM service file")
        cfg = _read_file(sshd_config, what="sshd_config")
        previous = _state_files(_read_state(state_dir))

        log(f"checking {sshd_config} with {sshd} -t")
        error = _sshd_test(sshd, sshd_config)
        if error:
            raise InstallError(
                f"{sshd_config} already fails `{sshd} -t -f {sshd_config}`, so nothing was "
                f"changed: {error}\nFix that first, then run sshtrail install again.")

        # Judge the operator's config without our block: our own LogLevel would otherwise hide
        # what they set, and we could never take the block out when they raise it themselves.
        operator_cfg, _ = _apply_blocks(cfg.text, sshd_config, {}, _at_top)
        effective = _effective_settings(sshd, sshd_config, operator_cfg, cfg.text)
        _require_use_pam(effective, sshd_config)
        wanted = wanted_sshd_lines(effective, force_command)
        notes_from_match = _match_log_level_notes(operator_cfg, sshd_config)
        notes += notes_from_match

        new_pam, pam_actions = _apply_blocks(
            pam.text, pam_file,
            {t: _pam_block(t, control, pam_args) for t in PAM_TYPES}, _pam_insert_index)
        new_cfg, cfg_actions = _apply_blocks(
            cfg.text, sshd_config,
            {"sshd": _sshd_block([line for line, _ in wanted])} if wanted else {}, _at_top)

        _commit([(pam, new_pam), (cfg, new_cfg)], sshd, sshd_config, state_dir, log,
                validate=True, action="install")

        if new_cfg != cfg.text and wanted and not notes_from_match:
            notes += _still_low_notes(sshd, sshd_config)

        results = [
            FileResult(pam_file, _status(pam, new_pam), _pam_reason(pam_actions, control)),
            FileResult(sshd_config, _status(cfg, new_cfg),
                       _sshd_reason(cfg_actions, wanted, effective)),
        ]
        state = {
            "installed": True,
            "hook_argv": list(hook_argv),
            "force_command": list(force_command or []),
            "fail_closed": bool(fail_closed),
            "sshd_binary": sshd,
            "sshd_lines": [line for line, _ in wanted],
            "files": {
                "pam": _hashes(pam, new_pam, previous.get("pam")),
                "sshd_config": _hashes(cfg, new_cfg, previous.get("sshd_config")),
            },
        }
        state_file = _write_state(state_dir, state, notes)

    for n in notes:
        log(f"warning: {n}")
    return Report("install", results, notes, state_file)


def uninstall(*, pam_file: Path, sshd_config: Path, state_dir: Path,
              sshd_binary: str = "/usr/sbin/sshd",
              log: Callable[[str], object] = print) -> Report:
    """Remove every sshtrail block from the PAM file and sshd_config; nothing else.

    Not installed is not an error: nothing is written and the Report says so.
    """
    pam_file, sshd_config, state_dir = Path(pam_file), Path(sshd_config), Path(state_dir)
    sshd = _find_sshd(sshd_binary)
    notes: list[str] = []

    with _locked(state_dir):
        pam = _read_file(pam_file, what="PAM service file")
        cfg = _read_file(sshd_config, what="sshd_config")
        new_pam, pam_actions = _apply_blocks(pam.text, pam_file, {}, _pam_insert_index)
        new_cfg, cfg_actions = _apply_blocks(cfg.text, sshd_config, {}, _at_top)
        previous = _read_state(state_dir)

        if new_pam == pam.text and new_cfg == cfg.text:
            if previous.get("installed"):
                notes.append("the state record said sshtrail was installed, but neither file "
                             "holds an sshtrail block (removed by hand?)")
        else:
            # Removing our lines cannot break a config that passed before; if it did not pass
            # before, removing them is still right, and the check afterwards proves nothing.
            error_before = _sshd_test(sshd, sshd_config)
            if error_before:
                notes.append(f"{sshd_config} already failed `sshd -t` before sshtrail's block "
                             f"was removed (removing it neither causes nor fixes that); fix it "
                             f"before sshd restarts: {error_before}")
            _commit([(pam, new_pam), (cfg, new_cfg)], sshd, sshd_config, state_dir, log,
                    validate=not error_before, action="uninstall")

        results = []
        for f, new, actions, key in ((pam, new_pam, pam_actions, "pam"),
                                     (cfg, new_cfg, cfg_actions, "sshd_config")):
            if new == f.text:
                reason = "no sshtrail block: not installed here"
            else:
                kinds = [_KIND_NAMES.get(k, k) for k in actions]
                reason = (f"removed sshtrail block{'s' if len(kinds) > 1 else ''}: "
                          + ", ".join(kinds))
                before = _state_files(previous).get(key, {}).get("sha256_without_sshtrail")
                if before and before == _sha256(new):
                    reason += " (back to the exact bytes it had before install)"
                elif before:
                    reason += " (edits made since install are kept)"
            results.append(FileResult(f.path, _status(f, new), reason))

        state_file = None
        if previous or new_pam != pam.text or new_cfg != cfg.text:
            state_file = _write_state(state_dir, {
                "installed": False,
                "files": {
                    "pam": _hashes(pam, new_pam, _state_files(previous).get("pam")),
                    "sshd_config": _hashes(cfg, new_cfg,
                                           _state_files(previous).get("sshd_config")),
                },
            }, notes)

    for n in notes:
        log(f"warning: {n}")
    return Report("uninstall", results, notes, state_file)


def wanted_sshd_lines(effective: Mapping[str, str],
                      force_command: list[str] | None = None) -> list[tuple[str, str]]:
    """The sshd_config lines sshtrail needs, given sshd's effective settings (`sshd -T`).

    Returns (line, why) pairs, in the order they go at the top of sshd_config; an empty list
    means sshd is fine as it is. This is the one place to add a directive (ForceCommand next).
    """
    lines: list[tuple[str, str]] = []
    level = effective.get("loglevel", "").upper()
    if level not in _LOG_LEVELS:
        raise InstallError(f"`sshd -T` reported LogLevel {level or '(none)'!r}, which sshtrail "
                           f"does not know; report this with your OpenSSH version")
    if _LOG_LEVELS[level] < _LOG_LEVELS[_NEEDED_LOG_LEVEL]:
        lines.append((f"LogLevel {_NEEDED_LOG_LEVEL}",
                      f"effective LogLevel was {level}; sshd logs refused public keys only at "
                      f"{_NEEDED_LOG_LEVEL}"))
    if force_command:
        theirs = effective.get("forcecommand", "none")
        if theirs not in ("", "none"):
            # Ours would win (sshd keeps the first value) and silently disable theirs.
            raise InstallError(f"sshd_config already has ForceCommand {theirs}: sshtrail's session "
                               f"wrapper would replace it. Remove it, or run it from the "
                               f"wrapper's side, then install again.")
        for arg in force_command:
            if not arg or any(c.isspace() or c in "\"'\\#" for c in arg):
                raise InstallError(f"ForceCommand argument {arg!r} is empty or holds white space, "
                                   f"quotes or '#': install sshtrail under a plain path")
        lines.append(("ForceCommand " + " ".join(force_command),
                      "every session goes through sshtrail's session wrapper (recording)"))
        if effective.get("permituserrc", "yes") != "no":
            lines.append(("PermitUserRC no", "~/.ssh/rc would run the user's code outside the "
                                              "recorded session, before the wrapper"))
        if effective.get("setenv", "none") not in ("", "none"):
            # Ours would come first and sshd keeps the first SetEnv: theirs would be lost.
            raise InstallError("sshd_config has SetEnv of its own; sshtrail needs its own SetEnv "
                               "(blanking LD_PRELOAD and friends for the session wrapper). Move "
                               "those variables elsewhere, then install again.")
        lines.append(("SetEnv " + unsafe_env.sshd_setenv(),
                      "blank what would run the user's code inside the session wrapper "
                      "(LD_PRELOAD and friends from ~/.pam_environment), and keep the "
                      "user's shell from running their startup files before it"))
    return lines


# ---------------------------------------------------------------------------------------------
# Marked blocks: finding, replacing, inserting, removing


@dataclasses.dataclass(frozen=True)
class _Block:
    kind: str
    start: int  # index of the begin marker line
    end: int    # index of the end marker line


def _find_blocks(lines: list[str], path: Path) -> list[_Block]:
    blocks, open_at, kind = [], None, ""
    for i, line in enumerate(lines):
        s = line.strip()
        if s.startswith(BEGIN_PREFIX.strip() + " "):
            if open_at is not None:
                raise _damaged(path, open_at, f"a second begin marker at line {i + 1}")
            words = s[len(BEGIN_PREFIX):].split()
            open_at, kind = i, (words[0] if words else "")
        elif s == END_MARKER:
            if open_at is None:
                raise _damaged(path, i, "an end marker without a begin marker")
            blocks.append(_Block(kind, open_at, i))
            open_at = None
    if open_at is not None:
        raise _damaged(path, open_at, "a begin marker without an end marker")
    return blocks


def _damaged(path: Path, index: int, what: str) -> InstallError:
    return InstallError(
        f"{path} line {index + 1}: {what}. sshtrail only touches whole marked blocks "
        f"('{BEGIN_PREFIX.strip()} ...' to '{END_MARKER}') and will not guess where this one "
        f"ends: fix or delete the sshtrail lines by hand, then run sshtrail again.")


def _apply_blocks(text: str, path: Path, wanted: Mapping[str, list[str]],
                  insert_index: Callable[[list[str], str], int | None]
                  ) -> tuple[str, dict[str, str]]:
    """Make `text` hold exactly the blocks in `wanted` (kind -> full block lines, no newlines).

    An existing block of a wanted kind is replaced where it stands (the operator may have moved
    it on purpose); a missing one goes where `insert_index` says (None: at the end); blocks of
    other kinds, and duplicates, are removed. Returns the new text and kind -> what happened.

    Reversibility trap: appending to a file without a final newline needs a newline first. We
    add it in front of the block and leave the block's last line unterminated, so the file keeps
    "no final newline"; removing a block that ends the file without a newline takes the newline
    before it too. Both directions then restore the exact bytes.
    """
    lines = text.splitlines(keepends=True)
    actions: dict[str, str] = {}
    out: list[str] = []
    pos = 0
    for block in _find_blocks(lines, path):
        out += lines[pos:block.start]
        old = lines[block.start:block.end + 1]
        unterminated = not old[-1].endswith("\n")
        if block.kind in wanted and block.kind not in actions:
            new = [line + "\n" for line in wanted[block.kind]]
            if unterminated:
                new[-1] = new[-1][:-1]
            actions[block.kind] = "kept" if new == old else "replaced"
            out += new
        else:
            actions.setdefault(block.kind, "removed")
            if unterminated and out:
                out[-1] = out[-1][:-1] if out[-1].endswith("\n") else out[-1]
        pos = block.end + 1
    out += lines[pos:]

    for kind, block_lines in wanted.items():
        if kind in actions:
            continue
        new = [line + "\n" for line in block_lines]
        at = insert_index(out, kind)
        if at is not None:
            out[at:at] = new
            actions[kind] = "inserted"
        else:
            if out and not out[-1].endswith("\n"):
                out[-1] += "\n"
                new[-1] = new[-1][:-1]
            out += new
            actions[kind] = "appended"
    return "".join(out), actions


def _inside_blocks(lines: list[str]) -> set[int]:
    inside = set()
    for b in _find_blocks(lines, Path("<text>")):
        inside.update(range(b.start, b.end + 1))
    return inside


# ---------------------------------------------------------------------------------------------
# PAM


def _pam_exec_args(hook_argv: list[str]) -> list[str]:
    """Check that hook_argv survives PAM's config parser unchanged, and return it."""
    if not hook_argv or not all(isinstance(a, str) for a in hook_argv):
        raise InstallError("hook_argv must be a non-empty list of strings (the hook program "
                           "and its arguments)")
    for arg in hook_argv:
        # PAM splits module arguments on whitespace, cuts the line at '#' wherever it stands,
        # reads '[...]' as one quoted argument, and joins lines ending in '\'. pam_exec has no
        # quoting of its own, so such an argument cannot be passed intact: refuse it.
        bad = sorted({c for c in arg
                      if c.isspace() or c in "#[]\\" or ord(c) < 32 or ord(c) == 127})
        if not arg or bad:
            raise InstallError(
                f"hook argument {arg!r} {'is empty' if not arg else f'contains {bad!r}'}: PAM "
                f"splits module arguments on whitespace and treats '#', '[', ']' and '\\' "
                f"specially, so pam_exec could not pass it intact. Install sshtrail under a "
                f"path without such characters.")
    if not hook_argv[0].startswith("/"):
        raise InstallError(f"the hook program {hook_argv[0]!r} must be an absolute path: "
                           f"pam_exec runs it without searching PATH")
    return list(hook_argv)


def _pam_block(pam_type: str, control: str, args: list[str]) -> list[str]:
    return [
        f"{BEGIN_PREFIX}{pam_type} hook {_MANAGED}",
        " ".join([pam_type, control, "pam_exec.so", "quiet", *args]),
        END_MARKER,
    ]


def _pam_line_type(line: str) -> str | None:
    """The stack a PAM line belongs to, as far as placing our hook goes."""
    words = line.split("#", 1)[0].split()
    if not words:
        return None
    first = words[0].lower()  # libpam compares the type case-insensitively
    if first.startswith("-"):
        first = first[1:]
    if first in PAM_TYPES:
        return first
    # Only the common-<type> includes have a known type; any other @include may hold anything.
    if words[0] == "@include" and len(words) > 1:
        name = words[1].rsplit("/", 1)[-1]
        if name.startswith("common-") and name[len("common-"):] in PAM_TYPES:
            return name[len("common-"):]
    return None


def _pam_insert_index(lines: list[str], pam_type: str) -> int | None:
    """Index of the first line of `pam_type`'s stack, or None if the file has none.

    Inserting before the first line of a stack never shifts a `[success=N]` jump, since jumps
    count only later lines of the same stack.
    """
    ours = _inside_blocks(lines)
    continued = False
    for i, line in enumerate(lines):
        starts_entry = not continued
        # libpam joins a line ending in '\' with the next, unless it holds a comment; a
        # continuation line is not an entry of its own, whatever its first word.
        continued = "#" not in line and line.rstrip(" \t\n").endswith("\\")
        if i in ours:
            continued = False
            continue
        if starts_entry and _pam_line_type(line) == pam_type:
            return i
    return None


def _pam_reason(actions: dict[str, str], control: str) -> str:
    return _describe(actions, f"sshtrail hooks already in place (control {control})",
                     f"(control {control})")


# ---------------------------------------------------------------------------------------------
# sshd


def _sshd_block(lines: list[str]) -> list[str]:
    return [f"{BEGIN_PREFIX}sshd settings {_MANAGED}", *lines, END_MARKER]


def _at_top(lines: list[str], kind: str) -> int:
    # sshd keeps the first value it reads, and every line after a Match belongs to that Match,
    # so the only place a global setting is sure to count is the top.
    return 0


def _find_sshd(sshd_binary: str) -> str:
    path = shutil.which(sshd_binary) if "/" not in sshd_binary else sshd_binary
    if not path or not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise InstallError(
            f"sshd binary {sshd_binary} not found or not executable: sshtrail needs it to check "
            f"sshd_config (`sshd -t`, `sshd -T`). Install openssh-server, or pass the path to "
            f"your sshd.")
    return path


def _run_sshd(sshd: str, args: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sshd, *args], capture_output=True, text=True, errors="replace",
                              timeout=_SSHD_TIMEOUT, stdin=subprocess.DEVNULL,
                              env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"})
    except subprocess.TimeoutExpired:
        raise InstallError(
            f"`{sshd} {' '.join(args)}` did not finish in {_SSHD_TIMEOUT}s") from None
    except OSError as e:
        raise InstallError(f"could not run {sshd}: {e}") from None


def _sshd_message(proc: subprocess.CompletedProcess) -> str:
    msg = (proc.stderr.strip() or proc.stdout.strip()
           or f"exit status {proc.returncode}, no message")
    if "host key" in msg.lower() or "hostkeys" in msg.lower():
        # sshd -t and -T load every HostKey; a missing or unreadable one fails the whole check.
        msg += ("\n(sshd must be able to read every HostKey the config names: create missing "
                "keys with `ssh-keygen -A`, fix the HostKey lines, or run as root)")
    return msg


def _sshd_test(sshd: str, config: Path) -> str | None:
    """None if `sshd -t -f config` passes, else sshd's message."""
    proc = _run_sshd(sshd, ["-t", "-f", str(config)])
    return None if proc.returncode == 0 else _sshd_message(proc)


def _effective_settings(sshd: str, config: Path, text: str, current_text: str) -> dict[str, str]:
    """sshd's effective global settings (`sshd -T`) for `text` as the content of `config`."""
    if text == current_text:
        return _sshd_dump(sshd, config, config)
    # Judging other content than the file holds: a private copy. Relative Include paths are
    # resolved against /etc/ssh whatever the file's location, so the copy reads the same.
    with tempfile.TemporaryDirectory(prefix="sshtrail-install-") as tmp:
        copy = Path(tmp) / config.name
        copy.write_text(text, encoding="utf-8", errors="surrogateescape")
        return _sshd_dump(sshd, copy, config)


def _sshd_dump(sshd: str, config: Path, shown_as: Path) -> dict[str, str]:
    proc = _run_sshd(sshd, ["-T", "-f", str(config)])
    if proc.returncode != 0 and ("match" in proc.stderr.lower() or "-C" in proc.stderr):
        # Older sshd refuses -T on a config with Match blocks unless given a connection.
        proc = _run_sshd(sshd, ["-T", "-f", str(config), "-C", _MATCH_SPEC])
    if proc.returncode != 0:
        raise InstallError(f"`{sshd} -T -f {shown_as}` failed: "
                           f"{_sshd_message(proc).replace(str(config), str(shown_as))}")
    settings: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        key, _, value = line.partition(" ")
        settings.setdefault(key.lower(), value.strip())
    return settings


def _require_use_pam(effective: Mapping[str, str], config: Path) -> None:
    if effective.get("usepam", "").lower() != "yes":
        raise InstallError(
            f"UsePAM is {effective.get('usepam', 'unset')!r} in effect for {config}: sshtrail's "
            f"hooks run through PAM, so they would never be called. Set `UsePAM yes` in "
            f"{config} yourself (it changes how every user authenticates: check "
            f"PasswordAuthentication and KbdInteractiveAuthentication with it), then run "
            f"sshtrail install again. Nothing was changed.")


def _match_log_level_notes(text: str, config: Path) -> list[str]:
    """Warn about Match blocks that lower LogLevel: our global line does not reach them.

    Only the main file is read; `sshd -T` without a connection ignores most Match blocks, so
    this is the only way to see them.
    """
    notes, in_match = [], False
    for n, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].replace("=", " ", 1).split()
        if not words:
            continue
        key = words[0].lower()
        if key == "match":
            in_match = True
        elif key == "loglevel" and in_match and len(words) > 1:
            level = words[1].upper()
            if _LOG_LEVELS.get(level, 99) < _LOG_LEVELS[_NEEDED_LOG_LEVEL]:
                notes.append(f"{config} line {n}: a Match block sets LogLevel {words[1]}; for "
                             f"the connections it matches, refused public keys are not logged. "
                             f"Raise it to {_NEEDED_LOG_LEVEL} there if you want them audited.")
    return notes


def _still_low_notes(sshd: str, config: Path) -> list[str]:
    try:
        level = _sshd_dump(sshd, config, config).get("loglevel", "").upper()
    except InstallError as e:
        return [f"could not re-read the effective LogLevel: {e}"]
    if _LOG_LEVELS.get(level, 99) < _LOG_LEVELS[_NEEDED_LOG_LEVEL]:
        return [f"effective LogLevel is still {level} after inserting LogLevel "
                f"{_NEEDED_LOG_LEVEL}: a `Match all` block sets it; raise it there"]
    return []


def _sshd_reason(actions: dict[str, str], wanted: list[tuple[str, str]],
                 effective: Mapping[str, str]) -> str:
    if not wanted:
        level = effective.get("loglevel", "?")
        why = f"nothing needed (LogLevel {level} already logs refused public keys)"
        return ("removed sshtrail block: " + why) if actions else why
    why = "; ".join(f"{line}: {reason}" for line, reason in wanted)
    if actions.get("sshd") == "kept":
        return f"sshtrail block already in place ({why})"
    if actions.get("sshd") == "replaced":
        return f"replaced the sshtrail block where it stands ({why})"
    return f"inserted sshtrail block at the top ({why})"


# ---------------------------------------------------------------------------------------------
# Files: reading, atomic writing, rollback, state


@dataclasses.dataclass(frozen=True)
class _File:
    path: Path   # as given (shown in messages)
    real: Path   # symlinks resolved: we replace the target, never the operator's symlink
    data: bytes
    text: str


def _read_file(path: Path, *, what: str) -> _File:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if what == "PAM service file":
            raise InstallError(
                f"PAM service file {path} does not exist. sshd reads /etc/pam.d/<its program "
                f"name>; pick the right one with --pam-service NAME.") from None
        raise InstallError(f"{what} {path} does not exist: pass the sshd_config your sshd "
                           f"reads (/etc/ssh/sshd_config unless its service passes -f)") from None
    except IsADirectoryError:
        raise InstallError(f"{what} {path} is a directory, not a file") from None
    except PermissionError:
        raise InstallError(f"cannot read {what} {path}: permission denied (run as root)") from None
    except OSError as e:
        raise InstallError(f"cannot read {what} {path}: {e}") from None
    # surrogateescape: bytes that are not UTF-8 come back out exactly as they went in.
    return _File(path, Path(os.path.realpath(path)), data,
                 data.decode("utf-8", errors="surrogateescape"))


def _encode(text: str) -> bytes:
    return text.encode("utf-8", errors="surrogateescape")


def _atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` by `data` so that a reader sees the old or the new file, never a mix."""
    st = os.stat(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.sshtrail-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            os.fchmod(f.fileno(), stat.S_IMODE(st.st_mode))
            try:
                os.fchown(f.fileno(), st.st_uid, st.st_gid)
            except PermissionError:
                if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
                    raise
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)  # the rename itself must survive a crash
    finally:
        os.close(dir_fd)


def _commit(changes: list[tuple[_File, str]], sshd: str, sshd_config: Path, state_dir: Path,
            log: Callable[[str], object], *, validate: bool, action: str) -> None:
    """Write the changed files, check sshd_config, and put every file back if anything fails."""
    written: list[_File] = []
    try:
        for f, new_text in changes:
            if new_text == f.text:
                continue
            log(f"writing {f.path}")
            written.append(f)
            _atomic_write(f.real, _encode(new_text))
        if written and validate:
            log(f"checking {sshd_config} with {sshd} -t")
            error = _sshd_test(sshd, sshd_config)
            if error:
                raise InstallError(f"`{sshd} -t -f {sshd_config}` fails after sshtrail's "
                                   f"change: {error}")
    except BaseException as e:
        problems = _restore(written, state_dir, log)
        if not isinstance(e, (InstallError, OSError)):
            raise  # KeyboardInterrupt and the like: files are back, let it through
        what = str(e) if isinstance(e, InstallError) else f"could not write: {e}"
        if problems:
            raise InstallError(f"{action} failed: {what}\nRESTORE FAILED: "
                               + "; ".join(problems)) from e
        restored = ", ".join(str(f.path) for f in written) or "nothing had been written"
        raise InstallError(f"{action} failed and was rolled back ({restored} restored to "
                           f"their previous bytes): {what}") from e


def _restore(written: list[_File], state_dir: Path, log: Callable[[str], object]) -> list[str]:
    problems = []
    for f in reversed(written):
        try:
            log(f"restoring {f.path}")
            _atomic_write(f.real, f.data)
        except OSError as e:
            # Keep the operator's bytes somewhere they can find them.
            rescue = state_dir / f"rescue-{f.real.name}-{os.getpid()}"
            with contextlib.suppress(OSError):
                rescue.write_bytes(f.data)
            problems.append(f"{f.path}: {e}; its previous content is in {rescue}")
    return problems


def _status(f: _File, new_text: str) -> str:
    return "unchanged" if new_text == f.text else "changed"


def _describe(actions: dict[str, str], all_kept: str, suffix: str) -> str:
    if all(a == "kept" for a in actions.values()):
        return all_kept
    groups: dict[str, list[str]] = {}
    for kind, a in actions.items():
        groups.setdefault(a, []).append(kind)
    return "; ".join(f"{a} {', '.join(kinds)} block{'s' if len(kinds) > 1 else ''}"
                     for a, kinds in groups.items()) + f" {suffix}"


def _sha256(text_or_bytes: str | bytes) -> str:
    data = _encode(text_or_bytes) if isinstance(text_or_bytes, str) else text_or_bytes
    return hashlib.sha256(data).hexdigest()


def _hashes(f: _File, new_text: str, previous: Mapping | None) -> dict[str, str]:
    without, _ = _apply_blocks(new_text, f.path, {}, _at_top)
    before, after = _sha256(f.data), _sha256(new_text)
    if (new_text == f.text and isinstance(previous, Mapping)
            and previous.get("path") == str(f.path) and previous.get("sha256_after") == after):
        # A run that changed nothing keeps the record of the run that did, so a repeated
        # install writes nothing at all, not even the state file.
        before = previous.get("sha256_before", before)
    return {
        "path": str(f.path),
        "sha256_before": before,
        "sha256_after": after,
        # What uninstall would leave: equal to the bytes before the first install unless the
        # operator edited the file since.
        "sha256_without_sshtrail": _sha256(without),
    }


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(state_dir / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise InstallError(f"cannot use state directory {state_dir}: {e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise InstallError(f"another sshtrail install or uninstall holds "
                                   f"{state_dir / _LOCK_FILE}; wait for it and retry") from None
            raise
        yield
    finally:
        os.close(fd)


def _read_state(state_dir: Path) -> dict:
    try:
        state = json.loads((state_dir / STATE_FILE).read_text())
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError):
        return {}  # the blocks are the truth; a lost or damaged record changes nothing


def _state_files(state: Mapping) -> dict[str, dict]:
    files = state.get("files")
    if not isinstance(files, dict):
        return {}
    return {k: v for k, v in files.items() if isinstance(v, dict)}


def _write_state(state_dir: Path, record: dict, notes: list[str]) -> Path | None:
    """Record what was done; skip the write when nothing but the time would change."""
    path = state_dir / STATE_FILE
    previous = _read_state(state_dir)
    previous.pop("time", None)
    record = {"format": 1, **record}
    if previous == record:
        return path
    record["time"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
    try:
        fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=f".{STATE_FILE}.")
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=2, sort_keys=True)
            f.write("\n")
            os.fchmod(f.fileno(), 0o644)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        # The files are done and checked; the record only helps `doctor`, so say it and go on.
        notes.append(f"could not write the state record {path}: {e}")
        return None
    return path
