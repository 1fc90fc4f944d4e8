"""A private, throw-away OpenSSH lab on loopback, for integration tests, demos and benchmarks.

A ``Lab`` runs a real ``sshd`` on 127.0.0.1 with its own config, host key, log file and PAM
service, creates test users with passwords and keys, and drives the real OpenSSH client
against it::

    with Lab("t1a2b", tmp_path) as lab:
        alice = lab.add_user("alice", "pw")
        assert lab.ssh(alice, "echo hi").stdout == b"hi\\n"

How it stays private: sshd names its PAM service after its own program name, so the lab starts
sshd through a symlink ``<workdir>/sshd-sshtrail-<name>`` -> /usr/sbin/sshd, which reads
``/etc/pam.d/sshd-sshtrail-<name>``, a file the lab writes and removes again. Its sshd_config
lives in the workdir and listens on 127.0.0.1 only, on a free port picked at start.

What it must never do: touch the host's own sshd -- never start, stop or signal it, never edit
/etc/ssh/sshd_config or /etc/pam.d/sshd (it only reads the latter, as the default PAM text),
never listen on anything but loopback. It removes only what it created itself: its PAM file,
its symlink, and the users it added (all named ``st-...``, marked in their GECOS field), and it
ends only processes it started (its sshd and that sshd's connection processes) or that belong to
its own users.

Needs root (useradd, /etc/pam.d, sshd). Standard library only, so that ``make demo`` and
``bench/`` can import it without pytest. Run it directly for a manual lab::

    python tests/lab.py          # starts a lab with one user, prints how to log in, Ctrl-C ends
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from sshtrail.procfs import alive

SSHD = Path("/usr/sbin/sshd")
PAM_DIR = Path("/etc/pam.d")
HOST_PAM_FILE = PAM_DIR / "sshd"  # read only, as the default text of a lab's PAM file
PRIVSEP_DIR = Path("/run/sshd")
SFTP_SERVER = "/usr/lib/openssh/sftp-server"  # Debian's default Subsystem line
PAM_PREFIX = "sshd-sshtrail-"
USER_PREFIX = "st-"
# Written into every PAM file and user the lab creates, so that leftovers of a killed run can be
# recognised (and swept by sweep_stale()) without ever touching anything else.
MARK = "sshtrail test lab"

# The lab relies on these being what it wrote: port and address (lab.port, loopback only) and
# the pid file (readiness and reload detection).
_RESERVED_KEYWORDS = {"port", "listenaddress", "pidfile"}

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
_LOGIN_HINT_RE = re.compile(r"^[a-z0-9_-]{0,16}$")

_DEFAULT = object()  # "the user's own key" for Lab.ssh(key=...)


class LabError(RuntimeError):
    """The lab could not do what was asked; the message carries the sshd log's tail if useful."""


@dataclasses.dataclass(frozen=True)
class User:
    login: str
    password: str | None
    uid: int
    gid: int
    home: Path
    key: Path | None  # private key (in the lab's workdir), None if created with key=False

    @property
    def pubkey(self) -> Path | None:
        return None if self.key is None else self.key.with_name(self.key.name + ".pub")

    def __str__(self) -> str:
        return self.login


# Labs not yet cleaned up. atexit cleans whatever a crashed test or script left here; a strong
# reference on purpose, so that a forgotten Lab cannot be garbage-collected without cleanup.
_LIVE: dict[int, "Lab"] = {}
_LIVE_LOCK = threading.Lock()


def _cleanup_live_labs() -> None:
    with _LIVE_LOCK:
        labs = list(_LIVE.values())
    for lab in labs:
        try:
            lab.cleanup()
        except Exception as exc:  # at exit there is no one left to raise to
            print(f"sshtrail lab {lab.name}: cleanup at exit failed: {exc}", file=sys.stderr)


atexit.register(_cleanup_live_labs)


class Lab:
    """A private sshd on 127.0.0.1 with its own PAM service and test users. See module doc."""

    def __init__(
        self,
        name: str,
        workdir: Path,
        *,
        extra_sshd_config: str = "",
        pam_text: str | None = None,
    ) -> None:
        if not _NAME_RE.match(name):
            # The name becomes a file name under /etc/pam.d: no slashes, dots or surprises.
            raise ValueError(f"lab name {name!r}: use 1-32 of a-z 0-9 _ - (starting alnum)")
        _check_extra_config(extra_sshd_config)
        self.name = name
        self.workdir = Path(workdir).absolute()
        self.extra_sshd_config = extra_sshd_config
        self.pam_text = pam_text
        self.pam_service = PAM_PREFIX + name
        self.pam_file = PAM_DIR / self.pam_service
        self.sshd_program = self.workdir / self.pam_service  # the symlink; sshd's argv[0]
        self.sshd_config = self.workdir / "sshd_config"
        self.log_file = self.workdir / "sshd.log"
        self.stderr_file = self.workdir / "sshd.stderr"  # what sshd prints before -E applies
        self.pid_file = self.workdir / "sshd.pid"
        self.host_key = self.workdir / "ssh_host_ed25519_key"
        self.known_hosts = self.workdir / "known_hosts"
        self.keys_dir = self.workdir / "keys"
        self.host_alias = f"sshtrail-lab-{name}"
        self.port: int = 0
        self.users: list[User] = []
        self._proc: subprocess.Popen | None = None
        self._configured = False
        self._created_pam = False
        self._created_link = False
        self._stranger_key: Path | None = None
        self._lock = threading.Lock()  # add_user may be called from several threads

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Write host key, config and PAM file (first time only), start sshd, wait until ready.

        Later starts (after stop(), or restart()) reuse the files as they are now, so that
        changes made by the code under test (e.g. ``sshtrail install``) are kept.
        """
        if self.running:
            return
        with _LIVE_LOCK:
            _LIVE[id(self)] = self  # registered before anything is created, so atexit sees it
        if not self._configured:
            self._setup_files()
        self._launch(retry_port=True)

    def _setup_files(self) -> None:
        _require_root()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.keys_dir.mkdir(mode=0o700, exist_ok=True)
        # sshd's privilege-separation chroot; normally made by the (not running) host service.
        PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        if not self.host_key.exists():
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", self.host_alias,
                  "-f", str(self.host_key)])
        # Clients check the host key for real (HostKeyAlias makes the entry port-independent),
        # so a test can never silently talk to some other server on a recycled port.
        pub = (self.host_key.with_suffix(".pub")).read_text().split()
        self.known_hosts.write_text(f"{self.host_alias} {pub[0]} {pub[1]}\n")

        if self.sshd_program.is_symlink() or self.sshd_program.exists():
            self.sshd_program.unlink()
        self.sshd_program.symlink_to(SSHD)
        self._created_link = True

        text = self.pam_text if self.pam_text is not None else HOST_PAM_FILE.read_text()
        text = f"# {MARK}: name={self.name} pid={os.getpid()} workdir={self.workdir}\n" + text
        if self._created_pam:
            _write_file(self.pam_file, text, 0o644)
        else:
            try:
                _create_file(self.pam_file, text, 0o644)
            except FileExistsError:
                # Never overwrite a PAM service we did not write: it may be another live lab's.
                raise LabError(
                    f"{self.pam_file} already exists: another lab named {self.name!r} is "
                    f"running, or a killed run left it (sweep_stale() removes dead labs' files)"
                ) from None
            self._created_pam = True

        self.port = _free_port()
        self.write_sshd_config()
        self._configured = True

    def write_sshd_config(self) -> None:
        """(Re)write sshd_config from the lab's settings and current port."""
        self.sshd_config.write_text(render_sshd_config(
            port=self.port, host_key=self.host_key, pid_file=self.pid_file,
            extra=self.extra_sshd_config))

    def _launch(self, *, retry_port: bool) -> None:
        # Another process may take the port between _free_port() and sshd's bind: then pick
        # another one, unless the caller wants this port (restart keeps the port tests know).
        attempts = 5 if retry_port else 1
        for attempt in range(attempts):
            try:
                self._launch_once()
                return
            except LabError as exc:
                if attempt + 1 < attempts and "Address already in use" in str(exc):
                    self.port = _free_port()
                    self.write_sshd_config()
                    continue
                raise

    def _launch_once(self) -> None:
        self.pid_file.unlink(missing_ok=True)
        argv = [str(self.sshd_program), "-D", "-f", str(self.sshd_config),
                "-E", str(self.log_file)]
        # sshd in the foreground is our child, so stop() can end it and wait for it. If this
        # Python process dies without cleanup (SIGKILL), the parent-death signal still ends
        # sshd. It is tied to the creating *thread*, so only used from the main thread.
        setpriv = shutil.which("setpriv")
        if setpriv and threading.current_thread() is threading.main_thread():
            argv = [setpriv, "--pdeathsig", "TERM", "--"] + argv
        with open(self.stderr_file, "ab") as err:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                # own process group: a Ctrl-C at the terminal reaches Python, which cleans up,
                # rather than killing sshd under it.
                start_new_session=True)
        self._wait_ready(self._proc.pid)

    def _wait_ready(self, pid: int, timeout: float = 15.0) -> None:
        # sshd writes its PidFile only after all listen sockets are bound; waiting for it
        # (rather than probing the port) keeps stray connections out of the log under test.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise LabError(f"sshd for lab {self.name} exited with {code} while starting"
                               f"{self._tail()}")
            try:
                if int(self.pid_file.read_text().strip() or 0) == pid:
                    return
            except (FileNotFoundError, ValueError):
                pass
            time.sleep(0.02)
        self.stop()
        raise LabError(f"sshd for lab {self.name} not ready after {timeout:.0f}s{self._tail()}")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The listening sshd's pid (setpriv execs into sshd, so it is the child's pid)."""
        return self._proc.pid if self.running else None

    def reload(self, timeout: float = 15.0) -> None:
        """SIGHUP: sshd re-executes itself with the (changed) config, same pid, open sessions
        kept. Raises with the log's tail if the new config kills it.

        The PAM file needs neither: sshd reads it anew for every connection.
        """
        if not self.running:
            raise LabError(f"lab {self.name}: reload() but sshd is not running")
        assert self._proc is not None
        # sshd rewrites the pid file after the re-exec has bound its sockets again; removing it
        # first lets us tell "reloaded" from "not yet".
        self.pid_file.unlink(missing_ok=True)
        self._proc.send_signal(signal.SIGHUP)
        self._wait_ready(self._proc.pid, timeout)

    def restart(self) -> None:
        """Stop and start sshd on the same port with the files as they are now. Open sessions
        are kept (sshd's connection processes outlive their listener, as on a real host)."""
        self.stop(sessions=False)
        self._launch(retry_port=False)

    def stop(self, *, sessions: bool = True, timeout: float = 10.0) -> None:
        """Stop sshd and wait for it; idempotent. With ``sessions`` also end the connection
        processes it forked (found before the listener goes, while they are still its children).
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return
        children = _descendants(proc.pid) if sessions and proc.poll() is None else []
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _terminate_pids(children, timeout)

    def cleanup(self) -> None:
        """Stop sshd, remove the PAM file, the symlink and every user this lab created.

        Does every step even if one fails, then raises the first error. Idempotent.
        """
        errors: list[BaseException] = []

        def step(fn, *args):
            try:
                fn(*args)
            except Exception as exc:  # keep going: a failed step must not leave the rest
                errors.append(exc)

        step(self.stop)
        for user in list(self.users):
            step(self._delete_user, user)
        if self._created_pam:
            step(self.pam_file.unlink, True)  # missing_ok
            self._created_pam = False
        if self._created_link:
            step(self.sshd_program.unlink, True)
            self._created_link = False
        self._configured = False  # a later start() writes everything afresh
        with _LIVE_LOCK:
            _LIVE.pop(id(self), None)
        if errors:
            raise LabError(f"lab {self.name}: cleanup incomplete: {errors[0]}") from errors[0]

    def __enter__(self) -> "Lab":
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.cleanup()

    # -- users -------------------------------------------------------------------------------

    def add_user(
        self,
        login: str = "",
        password: str | None = None,
        *,
        key: bool = True,
        shell: str = "/bin/bash",
        exact: bool = False,
    ) -> User:
        """Create a local user (useradd -m), set its password, give it an ed25519 key.

        ``login`` is a readable hint: the real name is ``st-<hint>-<random>`` (use ``.login``),
        so it never collides with a real account or another lab's. ``exact=True`` takes the
        name as given (it must not exist yet; the lab never deletes a user it did not create).
        Without a password the account is locked for password logins, keys still work.
        """
        _require_root()
        if exact:
            name = login
        else:
            if not _LOGIN_HINT_RE.match(login):
                raise ValueError(f"login hint {login!r}: use up to 16 of a-z 0-9 _ -")
            name = f"{USER_PREFIX}{login + '-' if login else ''}{secrets.token_hex(3)}"
        if len(name) > 32:
            raise ValueError(f"login {name!r} longer than 32 characters")
        _run(["useradd", "--create-home", "--user-group", "--shell", shell,
              "--comment", f"{MARK} {self.name} pid={os.getpid()}", name])
        pw = pwd.getpwnam(name)
        key_path = self.keys_dir / name if key else None
        user = User(name, password, pw.pw_uid, pw.pw_gid, Path(pw.pw_dir), key_path)
        with self._lock:
            self.users.append(user)  # remembered at once, so cleanup removes it whatever fails
        with _LIVE_LOCK:
            _LIVE[id(self)] = self  # a user may be added before start()
        if password is not None:
            _run(["chpasswd"], input=f"{name}:{password}\n".encode())
        if key_path is not None:
            self.keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{name}@{self.host_alias}",
                  "-f", str(key_path)])
            self.authorize_key(user, user.pubkey)
        return user

    def authorize_key(self, user: User, pubkey: Path | str) -> None:
        """Append a public key (file or text) to the user's authorized_keys, with the owner and
        modes StrictModes insists on."""
        text = Path(pubkey).read_text() if isinstance(pubkey, Path) else pubkey
        ssh_dir = user.home / ".ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        auth = ssh_dir / "authorized_keys"
        with open(auth, "a") as f:
            f.write(text if text.endswith("\n") else text + "\n")
        for path, mode in ((ssh_dir, 0o700), (auth, 0o600)):
            os.chown(path, user.uid, user.gid)
            os.chmod(path, mode)

    def user(self, login: str) -> User:
        for u in self.users:
            if u.login == login:
                return u
        raise KeyError(login)

    def _delete_user(self, user: User) -> None:
        # userdel refuses while the user has processes (a session a test left open, a command
        # that outlived its ssh client): end those first, found by uid, never by name.
        _terminate_pids(_pids_of_uid(user.uid), 5.0)
        try:
            pwd.getpwnam(user.login)
        except KeyError:
            pass
        else:
            # 12: home or mail spool could not be removed -- the account itself is gone.
            # --force: remove it even if a process of it appeared after the sweep above.
            _run(["userdel", "--remove", "--force", user.login], ok=(0, 12))
        with self._lock:
            if user in self.users:
                self.users.remove(user)

    # -- client ------------------------------------------------------------------------------

    @property
    def stranger_key(self) -> Path:
        """A key no user has authorized: for "refused public key" tests."""
        if self._stranger_key is None:
            path = self.keys_dir / "stranger"
            if not path.exists():
                self.keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "stranger",
                      "-f", str(path)])
            self._stranger_key = path
        return self._stranger_key

    def ssh_argv(
        self,
        user: User | str,
        command: str | None = "true",
        *,
        key: Path | None | object = _DEFAULT,
        password: str | None = None,
        tty: bool = False,
        extra_opts: Sequence[str] = (),
    ) -> tuple[list[str], dict[str, str]]:
        """The argv and environment Lab.ssh() would run, for tests that need Popen (e.g. an
        interactive session driven through a pty). ``command=None`` asks for a login shell."""
        login = user.login if isinstance(user, User) else user
        if key is _DEFAULT:
            known = user if isinstance(user, User) else self._find_user(login)
            key = known.key if known is not None and password is None else None
        argv = [
            "ssh", "-F", "/dev/null",  # neither root's ~/.ssh/config nor /etc/ssh/ssh_config
            "-p", str(self.port),
            "-o", f"HostKeyAlias={self.host_alias}",
            "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "UpdateHostKeys=no",
            "-o", "IdentityAgent=none",  # an agent in the caller's env must not offer keys
            "-o", "ControlMaster=no", "-o", "ControlPath=none",
            "-o", "ConnectTimeout=10",
            "-o", "LogLevel=ERROR",
            "-tt" if tty else "-T",
        ]
        env = dict(os.environ)
        env.pop("SSH_AUTH_SOCK", None)
        methods = []
        if key is not None:
            methods.append("publickey")
            argv += ["-o", "IdentitiesOnly=yes", "-i", str(key)]
        else:
            # no -i and IdentitiesOnly: ssh would still offer root's ~/.ssh/id_* files
            argv += ["-o", "IdentitiesOnly=yes", "-o", "IdentityFile=none"]
        if password is not None:
            methods.append("password")
            argv += ["-o", "NumberOfPasswordPrompts=1", "-o", "KbdInteractiveAuthentication=no"]
            # sshpass -e: the password travels in the environment, not in argv (ps shows argv)
            argv = ["sshpass", "-e"] + argv
            env["SSHPASS"] = password
        else:
            argv += ["-o", "BatchMode=yes", "-o", "PasswordAuthentication=no",
                     "-o", "KbdInteractiveAuthentication=no"]
            if not methods:
                methods.append("publickey")  # offers nothing: a plain refusal
        argv += ["-o", "PreferredAuthentications=" + ",".join(methods)]
        argv += list(extra_opts)
        argv.append(f"{login}@127.0.0.1")
        if command is not None:
            argv.append(command)
        return argv, env

    def ssh(
        self,
        user: User | str,
        command: str | None = "true",
        *,
        key: Path | None | object = _DEFAULT,
        password: str | None = None,
        tty: bool = False,
        timeout: float = 30,
        extra_opts: Sequence[str] = (),
        input: bytes | None = None,
    ) -> subprocess.CompletedProcess:
        """Run ``command`` through the real OpenSSH client; returns stdout/stderr as bytes.

        Authentication: with ``password`` -- password only, via sshpass (one prompt, so a wrong
        password exits 255 like ssh itself rather than sshpass's 5). Otherwise public key only
        (BatchMode), with ``key`` (default: the user's own key; None: offer no key at all).
        ``user`` may be a login string, e.g. one that does not exist.
        """
        argv, env = self.ssh_argv(user, command, key=key, password=password, tty=tty,
                                  extra_opts=extra_opts)
        return subprocess.run(
            argv, env=env, input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True, timeout=timeout)

    def _find_user(self, login: str) -> User | None:
        try:
            return self.user(login)
        except KeyError:
            return None

    # -- log ---------------------------------------------------------------------------------

    def log_text(self, since: int = 0) -> str:
        """sshd's log (lines carry neither timestamp nor pid). ``since``: a log_mark()."""
        try:
            with open(self.log_file, "rb") as f:
                f.seek(since)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_mark(self) -> int:
        """The log's current end, to read only what comes after: log_text(since=mark)."""
        try:
            return self.log_file.stat().st_size
        except FileNotFoundError:
            return 0

    def wait_for_log(self, pattern: str, *, since: int = 0, timeout: float = 10.0) -> re.Match:
        """Wait until a regex matches the log; some lines (session close, disconnect) are
        written just after the client has already returned."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.log_text(since))
            if m:
                return m
            if time.monotonic() > deadline:
                raise LabError(f"lab {self.name}: {pattern!r} not in sshd log after "
                               f"{timeout:.0f}s{self._tail()}")
            time.sleep(0.05)

    def _tail(self, lines: int = 30) -> str:
        parts = []
        for path in (self.stderr_file, self.log_file):
            try:
                text = path.read_text(errors="replace").strip()
            except FileNotFoundError:
                continue
            if text:
                parts.append(f"\n--- {path} (last {lines} lines) ---\n"
                             + "\n".join(text.splitlines()[-lines:]))
        return "".join(parts)

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<Lab {self.name} 127.0.0.1:{self.port} {state}>"


# -- config --------------------------------------------------------------------------------

def render_sshd_config(*, port: int, host_key: Path, pid_file: Path, extra: str = "") -> str:
    """The lab's sshd_config. Keywords that ``extra`` sets before its first Match block replace
    the lab's own line (sshd keeps the first value it reads, so appending would not override);
    Match blocks in ``extra`` stay at the end, where sshd requires them."""
    overridden = _global_keywords(extra)
    defaults = [
        ("Port", str(port)),
        ("ListenAddress", "127.0.0.1"),  # loopback only, never the host's interfaces
        ("AddressFamily", "inet"),
        ("HostKey", str(host_key)),
        ("PidFile", str(pid_file)),
        ("UsePAM", "yes"),
        ("PasswordAuthentication", "yes"),
        ("KbdInteractiveAuthentication", "no"),
        ("PubkeyAuthentication", "yes"),
        ("LogLevel", "VERBOSE"),  # VERBOSE logs key fingerprints and refused keys
        ("PrintMotd", "no"),  # as Debian: pam_motd prints it
        ("AcceptEnv", "LANG LC_*"),
        # Default 10:30:100 randomly drops unauthenticated connections beyond 10: tests and
        # benchmarks open 50 at once.
        ("MaxStartups", "200"),
        ("Subsystem", f"sftp {SFTP_SERVER}"),
    ]
    if _sshd_version() >= (9, 8):
        # Newer sshd penalises addresses with failed logins by refusing them for a while;
        # every lab client is 127.0.0.1 and tests fail logins on purpose.
        defaults.append(("PerSourcePenalties", "no"))
    lines = [
        "# sshtrail test lab: a private sshd on loopback (tests/lab.py). Not the host's sshd.",
        "# Deliberately no Include of /etc/ssh/sshd_config.d: the host's settings stay out.",
    ]
    lines += [f"{k} {v}" for k, v in defaults if k.lower() not in overridden]
    if extra.strip():
        lines += ["", "# extra_sshd_config", extra.rstrip("\n")]
    return "\n".join(lines) + "\n"


def _global_keywords(config: str) -> set[str]:
    found = set()
    for line in config.splitlines():
        words = line.strip().replace("=", " ", 1).split()
        if not words or words[0].startswith("#"):
            continue
        if words[0].lower() == "match":
            break
        found.add(words[0].lower())
    return found


def _check_extra_config(extra: str) -> None:
    reserved = _global_keywords(extra) & _RESERVED_KEYWORDS
    if reserved:
        raise ValueError(f"extra_sshd_config may not set {sorted(reserved)}: the lab owns "
                         f"port, address and pid file")


_VERSION: tuple[int, int] | None = None


def _sshd_version() -> tuple[int, int]:
    global _VERSION
    if _VERSION is None:
        # sshd -V prints e.g. "OpenSSH_9.2, OpenSSL 3.0.x" on stderr; needs no host key or
        # config, and reads neither.
        r = subprocess.run([str(SSHD), "-V"], capture_output=True, text=True)
        m = re.search(r"OpenSSH_(\d+)\.(\d+)", r.stdout + r.stderr)
        _VERSION = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    return _VERSION


# -- stale leftovers ---------------------------------------------------------------------------

def sweep_stale() -> list[str]:
    """Remove PAM files and users of labs whose process is gone (a run killed by SIGKILL, where
    neither finally nor atexit ran). Only what carries the lab's mark and a dead pid; returns
    what was removed. Safe to call while other labs run."""
    removed = []
    for path in sorted(PAM_DIR.glob(PAM_PREFIX + "*")):
        try:
            first = path.read_text(errors="replace").splitlines()[:1]
        except OSError:
            continue
        m = re.match(rf"# {MARK}: name=\S+ pid=(\d+)", first[0]) if first else None
        if m and not alive(int(m.group(1))):
            path.unlink(missing_ok=True)
            removed.append(str(path))
    for pw in pwd.getpwall():
        m = re.match(rf"{MARK} \S+ pid=(\d+)$", pw.pw_gecos)
        if pw.pw_name.startswith(USER_PREFIX) and m and not alive(int(m.group(1))):
            _terminate_pids(_pids_of_uid(pw.pw_uid), 5.0)
            try:
                _run(["userdel", "--remove", "--force", pw.pw_name], ok=(0, 12))
            except LabError:
                continue
            removed.append(f"user {pw.pw_name}")
    return removed


# -- helpers -------------------------------------------------------------------------------------

def _require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the sshtrail lab needs root (useradd, /etc/pam.d, sshd)")


# useradd, userdel and chpasswd lock /etc/passwd and /etc/shadow and fail at once when another
# holds the lock: serialise them within this process, retry when another process holds it.
_ACCOUNTS_LOCK = threading.Lock()
_ACCOUNT_TOOLS = {"useradd", "userdel", "chpasswd"}


def _run(argv: list[str], *, input: bytes | None = None,
         ok: Sequence[int] = (0,)) -> subprocess.CompletedProcess:
    for attempt in range(20):
        if argv[0] in _ACCOUNT_TOOLS:
            with _ACCOUNTS_LOCK:
                r = subprocess.run(argv, input=input, capture_output=True)
        else:
            r = subprocess.run(argv, input=input, capture_output=True)
        if r.returncode in ok or b"lock" not in r.stderr or argv[0] not in _ACCOUNT_TOOLS:
            break
        time.sleep(0.1 + 0.05 * attempt)
    if r.returncode not in ok:
        raise LabError(f"{' '.join(argv[:1] + argv[-1:])} failed ({r.returncode}): "
                       f"{r.stderr.decode(errors='replace').strip()}")
    return r


def _write_file(path: Path, text: str, mode: int) -> None:
    # write then rename: sshd may read the PAM file at any moment, never half of it
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _create_file(path: Path, text: str, mode: int) -> None:
    # complete before it appears (as above), and only if nobody else created it meanwhile:
    # link() fails where rename() would silently replace
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    try:
        os.link(tmp, path)
    finally:
        tmp.unlink()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, real uid), from /proc."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
            with open(f"/proc/{entry.name}/status", "rb") as f:
                status = f.read()
        except OSError:  # gone meanwhile
            continue
        # comm is in parentheses and may contain anything, so split after the last ')'
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        m = re.search(rb"^Uid:\s+(\d+)", status, re.M)
        table[int(entry.name)] = (ppid, int(m.group(1)) if m else -1)
    return table


def _descendants(pid: int) -> list[int]:
    table = _proc_table()
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, (pp, _) in table.items() if pp == parent]
        found += kids
        frontier += kids
    return found


def _pids_of_uid(uid: int) -> list[int]:
    return [p for p, (_, u) in _proc_table().items() if u == uid]


def _terminate_pids(pids: Iterable[int], timeout: float) -> None:
    pids = [p for p in pids if p != os.getpid()]
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if alive(p) and not _zombie(p)]
        time.sleep(0.02)
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rindex(b")") + 2:][:1] == b"Z"
    except OSError:
        return True


# -- manual lab ------------------------------------------------------------------------------------

def _main() -> None:
    import tempfile
    # SIGTERM (e.g. from make or a CI timeout) ends the lab through the same cleanup as Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="sshtrail-lab-") as tmp:
        with Lab("demo" + secrets.token_hex(2), Path(tmp)) as lab:
            user = lab.add_user("demo", "demo")
            argv, _ = lab.ssh_argv(user, None, tty=True)
            print(f"lab {lab.name}: sshd pid {lab.pid} on 127.0.0.1:{lab.port}\n"
                  f"  log:      {lab.log_file}\n"
                  f"  PAM file: {lab.pam_file}\n"
                  f"  user:     {user.login} (password 'demo')\n"
                  f"  log in:   {' '.join(argv)}\n"
                  f"Ctrl-C ends the lab and removes user and PAM file.", flush=True)
            try:
                while lab.running:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass


if __name__ == "__main__":
    _main()
