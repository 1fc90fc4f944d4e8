"""Tests for sshtrail.install: real `sshd -t`/`-T` on temp copies; /etc is only ever read."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sshtrail.errors import SshtrailError
from sshtrail.install import InstallError, install, uninstall, wanted_sshd_lines

SSHD = "/usr/sbin/sshd"
HOOK = [sys.executable, "-I", "-m", "pam_module.hook", "--config", "/etc/sshtrail/sshtrail.toml"]
MANAGED = "(managed by `sshtrail install`; `sshtrail uninstall` removes it)"

pytestmark = pytest.mark.skipif(not os.access(SSHD, os.X_OK) or not shutil.which("ssh-keygen"),
                                reason="needs openssh-server and ssh-keygen")

SMALL_PAM = (
    "# made-up service\n"
    "auth     required pam_unix.so\n"
    "account  required pam_unix.so\n"
    "session  required pam_unix.so\n"
)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def block(pam_type: str, control: str, argv=HOOK) -> str:
    return (f"# >>> sshtrail {pam_type} hook {MANAGED}\n"
            f"{pam_type} {control} pam_exec.so quiet {' '.join(argv)}\n"
            f"# <<< sshtrail\n")


SSHD_BLOCK = f"# >>> sshtrail sshd settings {MANAGED}\nLogLevel VERBOSE\n# <<< sshtrail\n"


def without_sshtrail_lines(text: str) -> str:
    """Drop our marked blocks by a means independent of the code under test."""
    out, inside = [], False
    for line in text.splitlines(keepends=True):
        if line.startswith("# >>> sshtrail "):
            inside = True
        elif line.startswith("# <<< sshtrail"):
            inside = False
        elif not inside:
            out.append(line)
    return "".join(out)


def effective(config: Path, *extra: str) -> dict[str, str]:
    out = subprocess.run([SSHD, "-T", "-f", str(config), *extra], check=True,
                         capture_output=True, text=True).stdout
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


@pytest.fixture(scope="session")
def host_key(tmp_path_factory) -> Path:
    key = tmp_path_factory.mktemp("hostkey") / "ssh_host_ed25519_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key


class Setup:
    def __init__(self, root: Path, host_key: Path):
        self.root = root
        self.etc = root / "etc"
        self.etc.mkdir()
        self.pam = self.etc / "pam-sshd"
        self.cfg = self.etc / "sshd_config"
        self.state = root / "state"
        self.host_key = host_key
        self.logged: list[str] = []

    def write(self, pam: str | bytes | None = None, cfg: str | bytes | None = None,
              cfg_body: str | None = None) -> None:
        """cfg_body gets a HostKey line for our temp key in front, and UsePAM yes."""
        if pam is not None:
            self.pam.write_bytes(pam if isinstance(pam, bytes) else pam.encode())
        if cfg_body is not None:
            cfg = f"HostKey {self.host_key}\nUsePAM yes\n{cfg_body}"
        if cfg is not None:
            self.cfg.write_bytes(cfg if isinstance(cfg, bytes) else cfg.encode())

    def install(self, **kw):
        args = dict(pam_file=self.pam, sshd_config=self.cfg, hook_argv=HOOK, fail_closed=False,
                    state_dir=self.state, log=self.logged.append)
        args.update(kw)
        return install(**args)

    def uninstall(self, **kw):
        args = dict(pam_file=self.pam, sshd_config=self.cfg, state_dir=self.state,
                    log=self.logged.append)
        args.update(kw)
        return uninstall(**args)

    def snapshot(self) -> tuple[bytes, bytes]:
        return self.pam.read_bytes(), self.cfg.read_bytes()

    def fake_sshd(self, script: str) -> str:
        path = self.root / "fake-sshd"
        path.write_text(f"#!/bin/sh\ncd {self.root}\n{script}\nexec {SSHD} \"$@\"\n")
        path.chmod(0o755)
        return str(path)


@pytest.fixture
def env(tmp_path, host_key) -> Setup:
    return Setup(tmp_path, host_key)


@pytest.fixture
def real_env(env) -> Setup:
    """Copies of this host's real /etc/pam.d/sshd and /etc/ssh/sshd_config, HostKey -> temp key."""
    pam = Path("/etc/pam.d/sshd").read_text()
    cfg = Path("/etc/ssh/sshd_config").read_text()
    if "#HostKey /etc/ssh/ssh_host_ed25519_key\n" in cfg:
        cfg = cfg.replace("#HostKey /etc/ssh/ssh_host_ed25519_key\n",
                          f"HostKey {env.host_key}\n", 1)
    else:
        cfg = f"HostKey {env.host_key}\n" + cfg
    env.write(pam=pam, cfg=cfg)
    return env


# --- the real files -------------------------------------------------------------------------


def test_real_files_install_places_blocks_and_uninstall_restores_exact_bytes(real_env):
    env = real_env
    pam_before, cfg_before = sha(env.pam), sha(env.cfg)
    original_pam = env.pam.read_text()

    report = env.install()

    assert [f.status for f in report.files] == ["changed", "changed"]
    pam = env.pam.read_text()
    # Only whole blocks were added: every operator line is still there, in order, unchanged.
    assert without_sshtrail_lines(pam) == original_pam
    lines = pam.splitlines()
    # Each block sits right before the first line of its stack.
    assert lines[lines.index("@include common-auth") - 3:lines.index("@include common-auth")] \
        == block("auth", "optional").splitlines()
    nologin = next(i for i, l in enumerate(lines) if "pam_nologin.so" in l)
    assert lines[nologin - 2] == block("account", "optional").splitlines()[1]
    selinux = next(i for i, l in enumerate(lines) if "pam_selinux.so close" in l)
    assert lines[selinux - 2] == block("session", "optional").splitlines()[1]
    assert pam.count("# >>> sshtrail") == 3
    assert env.cfg.read_text().startswith(SSHD_BLOCK)
    assert effective(env.cfg)["loglevel"] == "VERBOSE"

    report = env.uninstall()

    assert [f.status for f in report.files] == ["changed", "changed"]
    assert (sha(env.pam), sha(env.cfg)) == (pam_before, cfg_before)


def test_install_twice_second_is_a_noop(real_env):
    env = real_env
    env.install()
    # An old mtime makes "no write at all" visible whatever the filesystem's granularity.
    for p in (env.pam, env.cfg, env.state / "install.json"):
        os.utime(p, ns=(1_000_000_000, 1_000_000_000))
    installed = env.snapshot()
    env.logged.clear()

    report = env.install()

    assert [f.status for f in report.files] == ["unchanged", "unchanged"]
    assert not report.changed
    assert env.snapshot() == installed
    for p in (env.pam, env.cfg, env.state / "install.json"):
        assert p.stat().st_mtime_ns == 1_000_000_000, p
    assert not any(m.startswith("writing") for m in env.logged), env.logged


# --- PAM placement --------------------------------------------------------------------------


def test_hook_line_format_and_placement_in_small_file(env):
    env.write(pam=SMALL_PAM, cfg_body="LogLevel VERBOSE\n")
    env.install()
    assert env.pam.read_text() == (
        "# made-up service\n"
        + block("auth", "optional") + "auth     required pam_unix.so\n"
        + block("account", "optional") + "account  required pam_unix.so\n"
        + block("session", "optional") + "session  required pam_unix.so\n")


def test_no_final_newline_and_missing_session_appends_reversibly(env):
    original = b"auth required pam_unix.so\naccount required pam_unix.so"  # no "\n" at the end
    env.write(pam=original, cfg_body="")
    env.install()
    text = env.pam.read_text()
    assert text == (block("auth", "optional") + "auth required pam_unix.so\n"
                    + block("account", "optional") + "account required pam_unix.so\n"
                    + block("session", "optional").rstrip("\n"))
    # The operator's last line is intact and the session hook is a line of its own.
    assert text.splitlines()[-2].startswith("session optional pam_exec.so")

    env.uninstall()
    assert env.pam.read_bytes() == original


@pytest.mark.parametrize("original", [
    b"",
    b"# nothing but a comment",
    b"password required pam_unix.so\n",
    b"password required pam_unix.so",
    b"password required pam_unix.so\r\n# caf\xe9 in latin-1, not utf-8\n",
])
def test_files_without_stacks_round_trip(env, original):
    env.write(pam=original, cfg_body="")
    env.install()
    text = env.pam.read_bytes()
    assert text.count(b"pam_exec.so") == 3
    assert text.startswith(original.rstrip(b"\n"))
    # Appending to a file with or without final newline keeps that property.
    assert text.endswith(b"\n") == (original.endswith(b"\n") or original == b"")
    env.install()  # idempotent in this shape too
    assert env.pam.read_bytes() == text
    env.uninstall()
    assert env.pam.read_bytes() == original


def test_include_and_dash_types_count_other_includes_do_not(env):
    env.write(cfg_body="", pam=(
        "@include common-password\n"
        "@include my-site-stack\n"          # not typed: could hold anything
        "-session optional pam_systemd.so\n"
        "@include common-auth\n"
        "ACCOUNT required pam_unix.so\n"     # libpam reads types case-insensitively
    ))
    env.install()
    lines = env.pam.read_text().splitlines()
    assert lines[2].startswith("# >>> sshtrail session hook")
    assert lines[5] == "-session optional pam_systemd.so"
    assert lines[6].startswith("# >>> sshtrail auth hook")
    assert lines[9] == "@include common-auth"
    assert lines[10].startswith("# >>> sshtrail account hook")


def test_continuation_line_is_not_a_stack_line(env):
    original = ("session required pam_env.so \\\n"
                "auth not_a_new_entry\n"          # continues the line above
                "auth required pam_unix.so\n")
    env.write(pam=original, cfg_body="")
    env.install()
    lines = env.pam.read_text().splitlines()
    # The session block goes before line 1; the auth block not between a line and its
    # continuation, but before the real first auth entry.
    assert lines[0].startswith("# >>> sshtrail session hook")
    assert lines[3:5] == ["session required pam_env.so \\", "auth not_a_new_entry"]
    assert lines[5].startswith("# >>> sshtrail auth hook")
    assert lines[8] == "auth required pam_unix.so"


# --- updates --------------------------------------------------------------------------------


def test_fail_closed_switches_control_words_in_place(env):
    env.write(pam=SMALL_PAM, cfg_body="")
    env.install(fail_closed=False)
    open_text = env.pam.read_text()
    assert open_text.count(" optional pam_exec.so") == 3

    report = env.install(fail_closed=True)

    closed = env.pam.read_text()
    assert report.files[0].status == "changed"
    assert closed.count(" required pam_exec.so") == 3
    assert " optional pam_exec.so" not in closed
    assert closed == open_text.replace(" optional pam_exec.so", " required pam_exec.so")

    env.install(fail_closed=False)
    assert env.pam.read_text() == open_text
    env.uninstall()
    assert env.pam.read_text() == SMALL_PAM


def test_new_hook_argv_replaces_blocks_where_the_operator_moved_them(env):
    env.write(pam=SMALL_PAM, cfg_body="")
    env.install()
    # The operator moves our auth block below pam_unix on purpose.
    text = env.pam.read_text()
    auth = block("auth", "optional")
    text = text.replace(auth, "").replace("auth     required pam_unix.so\n",
                                          "auth     required pam_unix.so\n" + auth)
    env.pam.write_text(text)

    new_argv = HOOK[:-1] + ["/etc/sshtrail/other.toml"]
    env.install(hook_argv=new_argv)

    assert env.pam.read_text() == text.replace(" ".join(HOOK), " ".join(new_argv))


def test_duplicate_and_unknown_blocks_of_ours_are_cleaned_up(env):
    stray = (f"# >>> sshtrail password hook {MANAGED}\n"
             "password optional pam_exec.so quiet /x\n# <<< sshtrail\n")
    env.write(pam=SMALL_PAM + stray + block("auth", "optional"), cfg_body="")
    env.install()
    text = env.pam.read_text()
    assert text.count("# >>> sshtrail") == 3
    assert "password optional" not in text
    env.uninstall()
    assert env.pam.read_text() == SMALL_PAM


def test_damaged_block_is_refused_and_nothing_written(env):
    env.write(pam=SMALL_PAM + f"# >>> sshtrail auth hook {MANAGED}\nauth optional pam_exec.so /x\n",
              cfg_body="")
    before = env.snapshot()
    with pytest.raises(InstallError, match="without an end marker"):
        env.install()
    with pytest.raises(InstallError, match="line 5"):
        env.uninstall()
    assert env.snapshot() == before


# --- sshd_config ----------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["QUIET", "FATAL", "ERROR", "INFO"])
def test_low_log_level_is_raised_at_the_top(env, level):
    body = f"LogLevel {level}\n"
    env.write(pam=SMALL_PAM, cfg_body=body)
    original = env.cfg.read_bytes()
    report = env.install()
    assert report.files[1].status == "changed"
    assert env.cfg.read_bytes() == SSHD_BLOCK.encode() + original
    assert effective(env.cfg)["loglevel"] == "VERBOSE"
    env.uninstall()
    assert env.cfg.read_bytes() == original


@pytest.mark.parametrize("level", ["VERBOSE", "DEBUG", "DEBUG1", "DEBUG2", "DEBUG3"])
def test_verbose_or_debug_log_level_is_kept(env, level):
    env.write(pam=SMALL_PAM, cfg_body=f"LogLevel {level}\n")
    os.utime(env.cfg, ns=(1_000_000_000, 1_000_000_000))
    original = env.cfg.read_bytes()
    report = env.install()
    assert report.files[1].status == "unchanged"
    assert "nothing needed" in report.files[1].reason
    assert env.cfg.read_bytes() == original
    assert env.cfg.stat().st_mtime_ns == 1_000_000_000


def test_wanted_sshd_lines_unit():
    assert wanted_sshd_lines({"loglevel": "SILENT"})[0][0] == "LogLevel VERBOSE"
    assert wanted_sshd_lines({"loglevel": "INFO"})[0][0] == "LogLevel VERBOSE"
    assert wanted_sshd_lines({"loglevel": "DEBUG2"}) == []
    with pytest.raises(InstallError):
        wanted_sshd_lines({})


def test_config_ending_in_match_block_gets_global_setting(env):
    # Appending would put LogLevel inside `Match User bob`; the top is global for everyone.
    env.write(pam=SMALL_PAM, cfg_body="LogLevel INFO\nMatch User bob\n    X11Forwarding no\n")
    env.install()
    assert env.cfg.read_text().startswith(SSHD_BLOCK)
    assert effective(env.cfg)["loglevel"] == "VERBOSE"
    assert effective(env.cfg, "-C", "user=bob,host=localhost,addr=127.0.0.1")["loglevel"] \
        == "VERBOSE"
    assert effective(env.cfg, "-C", "user=bob,host=localhost,addr=127.0.0.1")["x11forwarding"] \
        == "no"


def test_match_block_keeps_its_own_debug_level_and_low_match_level_is_warned(env):
    env.write(pam=SMALL_PAM, cfg_body=(
        "Match User bob\n    LogLevel DEBUG2\n"
        "Match User deploy\n    LogLevel QUIET\n"))
    report = env.install()
    assert effective(env.cfg, "-C", "user=bob,host=localhost,addr=127.0.0.1")["loglevel"] \
        == "DEBUG2"
    assert any("LogLevel QUIET" in n and "line 6" in n for n in report.notes), report.notes


def test_operator_raising_log_level_later_gets_our_block_removed(env):
    env.write(pam=SMALL_PAM, cfg_body="LogLevel INFO\n")
    original = env.cfg.read_text()
    env.install()
    # Our block at the top would now mask the operator's DEBUG3; install must step aside.
    env.cfg.write_text(env.cfg.read_text().replace("LogLevel INFO", "LogLevel DEBUG3"))
    report = env.install()
    assert report.files[1].status == "changed"
    assert env.cfg.read_text() == original.replace("LogLevel INFO", "LogLevel DEBUG3")
    assert effective(env.cfg)["loglevel"] == "DEBUG3"


def test_use_pam_no_is_refused_and_nothing_written(env):
    env.write(pam=SMALL_PAM, cfg=f"HostKey {env.host_key}\nUsePAM no\n")
    before = env.snapshot()
    with pytest.raises(InstallError, match="UsePAM yes"):
        env.install()
    assert env.snapshot() == before
    assert not (env.state / "install.json").exists()


def test_use_pam_default_no_is_refused(env):
    env.write(pam=SMALL_PAM, cfg=f"HostKey {env.host_key}\n")  # OpenSSH's default is no
    with pytest.raises(InstallError, match="UsePAM"):
        env.install()
    assert b"sshtrail" not in env.pam.read_bytes()


def test_broken_config_is_refused_and_both_files_untouched(env):
    env.write(pam=SMALL_PAM, cfg_body="NoSuchOption yes\n")
    before = env.snapshot()
    with pytest.raises(InstallError) as e:
        env.install()
    assert "Bad configuration option" in str(e.value)
    assert "already fails" in str(e.value)
    assert env.snapshot() == before
    assert not any(m.startswith("writing") for m in env.logged)


def test_missing_host_key_is_reported_clearly(env):
    env.write(pam=SMALL_PAM, cfg=f"HostKey {env.root}/no-such-key\nUsePAM yes\n")
    before = env.snapshot()
    with pytest.raises(InstallError) as e:
        env.install()
    assert f"{env.root}/no-such-key" in str(e.value)
    assert "ssh-keygen -A" in str(e.value)
    assert env.snapshot() == before


def test_sshd_failing_after_our_change_rolls_back_both_files(env):
    env.write(pam=SMALL_PAM, cfg_body="LogLevel INFO\n")
    before = env.snapshot()
    # The second `sshd -t` (the one after writing) fails, and keeps what it was shown.
    fake = env.fake_sshd(
        'if [ "$1" = "-t" ]; then\n'
        '  n=$(( $(cat count 2>/dev/null || echo 0) + 1 )); echo $n > count\n'
        '  if [ $n -ge 2 ]; then cp "$3" seen-config; cp etc/pam-sshd seen-pam\n'
        '    echo "$3 line 1: simulated breakage" >&2; exit 255; fi\n'
        'fi')
    with pytest.raises(InstallError) as e:
        env.install(sshd_binary=fake)
    assert "simulated breakage" in str(e.value)
    assert "rolled back" in str(e.value)
    # The change had really been written when sshd looked ...
    assert (env.root / "seen-config").read_text().startswith(SSHD_BLOCK)
    assert b"pam_exec.so" in (env.root / "seen-pam").read_bytes()
    # ... and both files are back to their bytes.
    assert env.snapshot() == before
    assert not (env.state / "install.json").exists()
    assert sorted(os.listdir(env.etc)) == ["pam-sshd", "sshd_config"]


def test_sshd_without_connection_parameters_gets_minus_c(env):
    env.write(pam=SMALL_PAM, cfg_body="LogLevel ERROR\nMatch User bob\n    LogLevel DEBUG3\n")
    # Older sshd refuses -T on a Match config without -C; this one imitates that.
    fake = env.fake_sshd(
        'echo "$@" >> calls\n'
        'case " $* " in *" -T "*) case " $* " in *" -C "*) ;; *)\n'
        '  echo "Match directives need connection parameters (-C)" >&2; exit 255;; esac;; esac')
    report = env.install(sshd_binary=fake)
    assert report.files[1].status == "changed"
    assert env.cfg.read_text().startswith(SSHD_BLOCK)
    assert "-C user=root,host=localhost,addr=127.0.0.1" in (env.root / "calls").read_text()


# --- errors ---------------------------------------------------------------------------------


def test_missing_pam_file_names_path_and_option(env):
    env.write(cfg_body="")
    with pytest.raises(InstallError) as e:
        env.install()
    assert str(env.pam) in str(e.value) and "--pam-service" in str(e.value)
    assert isinstance(e.value, SshtrailError)  # so the CLI prints it instead of a traceback


def test_missing_sshd_config(env):
    env.write(pam=SMALL_PAM)
    with pytest.raises(InstallError, match=str(env.cfg)):
        env.install()
    assert env.pam.read_text() == SMALL_PAM


def test_missing_sshd_binary(env):
    env.write(pam=SMALL_PAM, cfg_body="")
    with pytest.raises(InstallError, match="no-such-sshd"):
        env.install(sshd_binary=str(env.root / "no-such-sshd"))
    with pytest.raises(InstallError, match="no-such-sshd"):
        env.uninstall(sshd_binary=str(env.root / "no-such-sshd"))
    assert env.pam.read_text() == SMALL_PAM


@pytest.mark.parametrize("argv, why", [
    (["/opt/my tools/python3", "-I"], "contains"),
    (HOOK[:-1] + ["/etc/sshtrail/a b.toml"], "contains"),
    (HOOK + ["#x"], "contains"),
    (HOOK + ["[x]"], "contains"),
    (HOOK + ["x\\"], "contains"),
    (HOOK + [""], "empty"),
    (["python3", "-I"], "absolute"),
    ([], "non-empty"),
])
def test_hook_argv_pam_cannot_carry_is_refused(env, argv, why):
    env.write(pam=SMALL_PAM, cfg_body="")
    before = env.snapshot()
    with pytest.raises(InstallError, match=why):
        env.install(hook_argv=argv)
    assert env.snapshot() == before


def test_fail_closed_with_missing_hook_program_is_refused(env):
    env.write(pam=SMALL_PAM, cfg_body="")
    missing = [str(env.root / "venv/bin/python3")] + HOOK[1:]
    with pytest.raises(InstallError, match="every SSH login would fail"):
        env.install(hook_argv=missing, fail_closed=True)
    assert env.pam.read_text() == SMALL_PAM
    report = env.install(hook_argv=missing, fail_closed=False)  # fail-open: allowed, warned
    assert any("missing or not executable" in n for n in report.notes)
    assert env.pam.read_text().count(" optional pam_exec.so") == 3


def test_concurrent_run_is_refused(env):
    env.write(pam=SMALL_PAM, cfg_body="")
    env.state.mkdir()
    with open(env.state / "install.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(InstallError, match="another sshtrail"):
            env.install()
    assert env.pam.read_text() == SMALL_PAM


# --- uninstall ------------------------------------------------------------------------------


def test_uninstall_when_not_installed_changes_nothing(real_env):
    env = real_env
    for p in (env.pam, env.cfg):
        os.utime(p, ns=(1_000_000_000, 1_000_000_000))
    before = env.snapshot()
    report = env.uninstall()
    assert [f.status for f in report.files] == ["unchanged", "unchanged"]
    assert all("not installed" in f.reason for f in report.files)
    assert env.snapshot() == before
    assert env.pam.stat().st_mtime_ns == env.cfg.stat().st_mtime_ns == 1_000_000_000


def test_operator_edits_survive_uninstall(real_env):
    env = real_env
    pam0, cfg0 = env.pam.read_text(), env.cfg.read_text()

    def edit_pam(t):
        return t.replace("session    required     pam_limits.so\n",
                         "session    required     pam_limits.so debug\n") + "# added later\n"

    def edit_cfg(t):
        return t.replace("X11Forwarding yes\n", "X11Forwarding no\n") + "MaxAuthTries 3\n"

    env.install()
    env.pam.write_text(edit_pam(env.pam.read_text()))
    env.cfg.write_text(edit_cfg(env.cfg.read_text()))
    report = env.uninstall()

    assert env.pam.read_text() == edit_pam(pam0) != pam0
    assert env.cfg.read_text() == edit_cfg(cfg0) != cfg0
    assert all("edits made since install are kept" in f.reason for f in report.files)


def test_uninstall_needs_no_state_record(real_env):
    env = real_env
    before = env.snapshot()
    env.install()
    shutil.rmtree(env.state)
    env.uninstall()
    assert env.snapshot() == before


def test_state_record_has_hashes(real_env):
    env = real_env
    pam_before, cfg_before = sha(env.pam), sha(env.cfg)
    report = env.install(fail_closed=True)
    state = json.loads(report.state_file.read_text())
    assert state["installed"] is True and state["fail_closed"] is True
    assert state["hook_argv"] == HOOK
    assert state["sshd_lines"] == ["LogLevel VERBOSE"]
    assert state["files"]["pam"]["sha256_before"] == pam_before
    assert state["files"]["pam"]["sha256_after"] == sha(env.pam)
    assert state["files"]["sshd_config"]["sha256_before"] == cfg_before
    assert state["files"]["sshd_config"]["sha256_after"] == sha(env.cfg)
    assert state["files"]["pam"]["sha256_without_sshtrail"] == pam_before

    env.uninstall()
    state = json.loads((env.state / "install.json").read_text())
    assert state["installed"] is False
    assert state["files"]["pam"]["sha256_after"] == pam_before


# --- how files are written ------------------------------------------------------------------


def test_mode_and_owner_kept_and_no_temp_files_left(env):
    env.write(pam=SMALL_PAM, cfg_body="LogLevel INFO\n")
    env.pam.chmod(0o640)
    env.cfg.chmod(0o600)
    if os.geteuid() == 0:
        os.chown(env.pam, 1, 1)
    owner = (env.pam.stat().st_uid, env.pam.stat().st_gid)
    env.install()
    assert stat.S_IMODE(env.pam.stat().st_mode) == 0o640
    assert stat.S_IMODE(env.cfg.stat().st_mode) == 0o600
    assert (env.pam.stat().st_uid, env.pam.stat().st_gid) == owner
    assert sorted(os.listdir(env.etc)) == ["pam-sshd", "sshd_config"]
    env.uninstall()
    assert stat.S_IMODE(env.pam.stat().st_mode) == 0o640
    assert (env.pam.stat().st_uid, env.pam.stat().st_gid) == owner


def test_symlinked_pam_file_stays_a_symlink(env):
    target = env.root / "real-pam"
    target.write_text(SMALL_PAM)
    env.pam.symlink_to(target)
    env.write(cfg_body="")
    env.install()
    assert env.pam.is_symlink()
    assert target.read_text().count("pam_exec.so") == 3
    env.uninstall()
    assert env.pam.is_symlink() and target.read_text() == SMALL_PAM


def test_uninstall_from_a_config_broken_since_install_still_removes_our_blocks(env):
    env.write(pam=SMALL_PAM, cfg_body="LogLevel INFO\n")
    original_cfg = env.cfg.read_text()
    env.install()
    env.cfg.write_text(env.cfg.read_text() + "NoSuchOption yes\n")  # the operator's mistake
    report = env.uninstall()
    assert env.pam.read_text() == SMALL_PAM
    assert env.cfg.read_text() == original_cfg + "NoSuchOption yes\n"
    assert report.files[1].reason.startswith("removed sshtrail block: sshd settings")
    assert any("already failed `sshd -t`" in n and "NoSuchOption" in n for n in report.notes)
