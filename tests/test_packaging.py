"""The .deb and .rpm packages (packaging/), built by `make deb` / `make rpm`, checked for real.

- lintian has no errors or warnings; `systemd-analyze verify` accepts both units.
- The .debs go into a fresh Debian 12 root made by debootstrap (Debian's archive only: apt
  resolves every Depends from deb.debian.org, nothing comes from PyPI). There: installing changes
  no PAM or sshd file; `sshtrail install`; an sshd on a loopback port; a real login with the
  host's ssh client; the events in the spool; `sshtrail doctor`; the collector package run as
  its own user; an upgrade keeps config, spool and hooks (brought up to date), and a session
  running across it; then
  `apt purge` leaves /etc/pam.d and /etc/ssh byte for byte as before, and a session running
  across the purge goes on. Then the documented switch: /etc/sshtrail/auto-install hooks sshd
  at package install, and `apt remove` takes it out again.
- The .rpms: file list, dependencies and scriptlets (`rpm -qp`), their files installed into a
  scratch root with `rpm --root`, and the bundled environment importable with nothing from the
  host's site-packages.

The debootstrapped base (minbase + openssh-server) is cached as a tarball under
/var/cache/sshtrail-test/, and so are the .debs apt downloads, so a second run needs no big
download. Everything else (the root, mounts, processes started in it) goes after the module.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

ROOT_DIR = Path(__file__).resolve().parent.parent
CACHE = Path("/var/cache/sshtrail-test")
MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
BASE = CACHE / f"{SUITE}-minbase-openssh-v1.tar"
ARCHIVES = CACHE / "apt-archives"
# Services must not start inside the root (an openssh-server install would start sshd on
# port 22 of this machine); the one action allowed is the reload our prerm asks for.
POLICY_RC_D = """#!/bin/sh
# sshtrail tests: no service starts in this root; `ssh reload` (sshtrail's prerm) may run.
[ "$1" = ssh ] && [ "$2" = reload ] && exit 0
exit 101
"""
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "HOME": "/root",
       "DEBIAN_FRONTEND": "noninteractive"}

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (debootstrap, chroot, mounts)")


def sh(*argv, check=True, timeout=600, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout,
                       **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, argv))} failed ({r.returncode}):\n"
                             f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def version() -> str:
    return re.search(r"^version\s*=\s*(\S+)", (ROOT_DIR / "setup.cfg").read_text(), re.M).group(1)


@pytest.fixture(scope="module")
def packages() -> dict[str, Path]:
    """The four packages, built by the Makefile targets (which rebuild only what changed)."""
    sh("make", "-s", "-C", ROOT_DIR, "deb", "rpm", timeout=1200)
    v = version()
    found = {"deb": ROOT_DIR / f"dist/sshtrail_{v}-1_all.deb",
             "collector-deb": ROOT_DIR / f"dist/sshtrail-collector_{v}-1_amd64.deb",
             "rpm": ROOT_DIR / f"dist/sshtrail-{v}-1.x86_64.rpm",
             "collector-rpm": ROOT_DIR / f"dist/sshtrail-collector-{v}-1.x86_64.rpm"}
    for p in found.values():
        assert p.exists(), p
    return found


# -- static checks -------------------------------------------------------------------------


def test_lintian_is_clean(packages):
    r = sh("lintian", "--tag-display-limit", "0", packages["deb"], packages["collector-deb"],
           check=False)
    tags = [ln for ln in (r.stdout + r.stderr).splitlines() if re.match(r"^[EWX]: ", ln)]
    assert not tags, "\n".join(tags)
    assert r.returncode == 0, r.stdout + r.stderr


def test_deb_metadata(packages):
    info = sh("dpkg-deb", "--info", packages["deb"]).stdout
    assert "Architecture: all" in info
    depends = re.search(r"^ Depends: (.*)$", info, re.M).group(1)
    for dep in ("openssh-server", "python3 (>= 3.11~)", "python3-cryptography",
                "python3-requests"):
        assert dep in depends, depends
    assert re.search(r"^ Recommends: .*python3-bpfcc", info, re.M)
    files = sh("dpkg-deb", "--contents", packages["deb"]).stdout
    for path in ("./usr/bin/sshtrail", "./etc/sshtrail/sshtrail.toml",
                 "./usr/lib/sshtrail/lib/pam_module/hook.py",
                 "./usr/lib/sshtrail/lib/pam_module/detach.sh",
                 "./usr/lib/sshtrail/lib/session_wrapper/shell.py",
                 "./usr/lib/sshtrail/lib/ebpf/probes.c", "./usr/lib/sshtrail/lib/sqlite_utils/",
                 "./lib/systemd/system/sshtrail-agent.service",
                 "./usr/share/man/man1/sshtrail.1.gz"):
        assert path in files, path
    assert re.search(r"^drwx------ root/root .* \./var/spool/sshtrail/$", files, re.M)
    assert ".pyc" not in files and "__pycache__" not in files and "/collector/" not in files
    conffiles = sh("dpkg-deb", "-f", packages["deb"], "Conffiles", check=False).stdout
    ctl = Path(tempfile.mkdtemp())
    try:
        sh("dpkg-deb", "--control", packages["deb"], ctl)
        assert (ctl / "conffiles").read_text() == "/etc/sshtrail/sshtrail.toml\n", conffiles
    finally:
        shutil.rmtree(ctl)
    cinfo = sh("dpkg-deb", "--info", packages["collector-deb"]).stdout
    assert "Architecture: amd64" in cinfo
    assert f"sshtrail (= {version()}-1)" in cinfo and "libpq5" in cinfo


def test_systemd_units_verify(packages, tmp_path):
    """`systemd-analyze verify` against a root holding the packages' files and this machine's
    own units (the targets the units name), so that ExecStart and the man page resolve."""
    root = tmp_path / "root"
    (root / "lib/systemd").mkdir(parents=True)
    shutil.copytree("/lib/systemd/system", root / "lib/systemd/system", symlinks=True)
    for deb in (packages["deb"], packages["collector-deb"]):
        sh("dpkg-deb", "-x", deb, root)
    units = ["/lib/systemd/system/sshtrail-agent.service",
             "/lib/systemd/system/sshtrail-collector.service"]
    env = dict(os.environ, MANPATH=str(root / "usr/share/man"))
    r = sh("systemd-analyze", "verify", f"--root={root}", *units, check=False, env=env)
    assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), r.stderr
    agent = (root / units[0].lstrip("/")).read_text()
    coll = (root / units[1].lstrip("/")).read_text()
    # The check has teeth: a unit with a mistake in it is refused.
    bad = root / "lib/systemd/system/sshtrail-agent.service"
    bad.write_text(bad.read_text().replace("ProtectSystem=strict", "ProtectSystem=sideways"))
    r = sh("systemd-analyze", "verify", f"--root={root}", units[0], check=False, env=env)
    assert "sideways" in r.stderr
    # And the hardening is there: root-only where it must be, unprivileged where it can be.
    for line in ("Restart=on-failure", "ProtectSystem=strict", "NoNewPrivileges=yes",
                 "ExecStart=/usr/bin/sshtrail agent"):
        assert line in agent, line
    assert "CAP_BPF" in agent and "User=" not in agent
    for line in ("User=sshtrail-collector", "CapabilityBoundingSet=\n", "ProtectSystem=strict",
                 "PrivateUsers=yes", "Restart=on-failure", "ExecStart=/usr/bin/sshtrail collector serve"):
        assert line in coll, line


def test_rpm_metadata_scripts_and_files(packages, tmp_path):
    rpm = packages["rpm"]
    requires = sh("rpm", "-qp", "--requires", rpm).stdout.split("\n")
    for dep in ("python3.11", "openssh-server", "pam", "systemd"):
        assert dep in requires, requires
    assert not [r for r in requires if r.startswith(("libpq", "libssl", "python3.11dist"))], requires
    # Nothing private is offered to the rest of the system.
    assert all(p.startswith("sshtrail") for p in sh("rpm", "-qp", "--provides", rpm).stdout.split("\n") if p)
    scripts = sh("rpm", "-qp", "--scripts", rpm).stdout
    assert re.search(r"preuninstall scriptlet.*\n(?:.*\n)*?if \[ \$1 -eq 0 \]; then\n(?:.*\n)*?"
                     r".*/usr/bin/python3\.11 -I /usr/lib/sshtrail/maint\.py unhook \|\| exit 1", scripts)
    assert re.search(r"postinstall scriptlet.*\n(?:.*\n)*?.*maint\.py auto-install", scripts)
    assert "preset sshtrail-agent.service" in scripts
    files = sh("rpm", "-qpl", rpm).stdout.split("\n")
    for path in ("/usr/bin/sshtrail", "/etc/sshtrail/sshtrail.toml", "/usr/lib/sshtrail/maint.py",
                 "/usr/lib/sshtrail/lib/pam_module/hook.py", "/usr/lib/sshtrail/lib/cryptography/__init__.py",
                 "/usr/lib/sshtrail/lib/requests/__init__.py",
                 "/usr/lib/systemd/system/sshtrail-agent.service", "/var/spool/sshtrail"):
        assert path in files, path
    assert not [f for f in files if f.endswith(".pyc") or "/.build-id" in f]
    assert sh("rpm", "-qpc", rpm).stdout.split() == ["/etc/sshtrail/sshtrail.toml"]
    cscripts = sh("rpm", "-qp", "--scripts", packages["collector-rpm"]).stdout
    assert "useradd -r -g sshtrail-collector" in cscripts
    assert f"sshtrail = {version()}-1" in sh("rpm", "-qp", "--requires", packages["collector-rpm"]).stdout

    # Into a scratch root: the files land where the list says, with their modes.
    scratch = tmp_path / "rpmroot"
    r = sh("rpm", "--root", scratch, "--dbpath", "/var/lib/rpm", "-i", "--nodeps", "--noscripts",
           "--nosignature", "--ignorearch", "--ignoreos", rpm, packages["collector-rpm"], check=False)
    assert r.returncode == 0, r.stderr
    launcher = (scratch / "usr/bin/sshtrail").read_text()
    assert launcher.startswith("#!/usr/bin/python3.11 -I\n")
    assert os.stat(scratch / "var/spool/sshtrail").st_mode & 0o777 == 0o700
    assert "pam_module" in os.listdir(scratch / "usr/lib/sshtrail/lib")
    assert (scratch / "usr/lib/sshtrail/collector-lib/collector/app.py").exists()
    # The bundle is whole: with -S nothing of this machine's site-packages is reachable, yet
    # the CLI, the TLS/crypto stack and the collector's libraries import and work.
    code = ("import sys; sys.path[:0] = [%r, %r]\n"
            "from sshtrail import cli, signing, enroll, uploader\n"
            "import cryptography, requests, sqlite_utils, pyte, collector.app, collector.blobs, zstandard\n"
            "import psycopg, uvicorn, starlette\n"
            "k = signing.generate_key(); assert signing.make_csr(k, 'h1')\n"
            "print(cryptography.__file__, psycopg.pq.__impl__)\n"
            % (str(scratch / "usr/lib/sshtrail/lib"), str(scratch / "usr/lib/sshtrail/collector-lib")))
    r = sh("/usr/bin/python3", "-I", "-S", "-c", code, check=False)
    assert r.returncode == 0, r.stderr
    assert str(scratch) in r.stdout and "python" in r.stdout


# -- the .deb in a fresh Debian 12 -----------------------------------------------------------


def _mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f)


class Chroot:
    """A Debian root under a temporary directory, with /proc and /dev/pts while it is in use."""

    def __init__(self, path: Path):
        self.path = path
        self.mounts: list[Path] = []

    def mount(self) -> None:
        for kind, src, dst in (("proc", "proc", "proc"), ("bind", "/dev/pts", "dev/pts")):
            target = self.path / dst
            target.mkdir(parents=True, exist_ok=True)
            if kind == "proc":
                sh("mount", "-t", "proc", "proc", target)
            else:
                sh("mount", "--bind", src, target)
            self.mounts.append(target)
        ptmx = self.path / "dev/ptmx"
        if not ptmx.exists():
            ptmx.symlink_to("pts/ptmx")

    def unmount(self) -> None:
        for target in reversed(self.mounts):
            if _mounted(target) and sh("umount", target, check=False).returncode != 0:
                sh("umount", "-l", target, check=False)
        self.mounts = []

    def run(self, *argv, check=True, timeout=600, **kw) -> subprocess.CompletedProcess:
        return sh("chroot", self.path, *argv, check=check, timeout=timeout, env=ENV, **kw)

    def processes(self) -> list[int]:
        """Processes whose root is this root: started by this test, directly or not."""
        me = os.path.realpath(self.path)
        pids = []
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    if os.readlink(f"/proc/{d}/root") == me:
                        pids.append(int(d))
                except OSError:
                    pass
        return pids

    def kill_all(self) -> None:
        for _ in range(50):
            pids = self.processes()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)


def _base_tarball() -> Path:
    """Debian 12 minbase with openssh-server, made once and kept as a tarball."""
    if BASE.exists():
        return BASE
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sshtrail-base-", dir="/var/tmp"))
    root = Chroot(work / "root")
    try:
        sh("debootstrap", "--variant=minbase", SUITE, root.path, MIRROR, timeout=1200)
        (root.path / "usr/sbin/policy-rc.d").write_text(POLICY_RC_D)
        (root.path / "usr/sbin/policy-rc.d").chmod(0o755)
        root.mount()
        root.run("apt-get", "install", "-y", "-q", "--no-install-recommends", "openssh-server")
        root.run("apt-get", "clean")
        root.unmount()
        tmp = BASE.with_suffix(".part")
        sh("tar", "-C", root.path, "--numeric-owner", "-cf", tmp, ".")
        os.replace(tmp, BASE)
        return BASE
    finally:
        root.kill_all()
        root.unmount()
        shutil.rmtree(work, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree_bytes(root: Path, *dirs: str) -> dict[str, bytes]:
    out = {}
    for d in dirs:
        for p in sorted((root / d).rglob("*")):
            if p.is_file() and not p.is_symlink():
                out[str(p.relative_to(root))] = p.read_bytes()
            elif p.is_symlink():
                out[str(p.relative_to(root))] = b"-> " + os.readlink(p).encode()
    return out


def _diff(before: dict, after: dict) -> list[str]:
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


class Host:
    """The debootstrapped host: its root, its sshd, its agent, a user with a key."""

    def __init__(self, chroot: Chroot, key: Path):
        self.c = chroot
        self.key = key
        self.port = _free_port()
        self.agent: subprocess.Popen | None = None

    def start_sshd(self) -> None:
        (self.c.path / "run/sshd").mkdir(exist_ok=True)
        self.c.run("/usr/sbin/sshd", "-p", str(self.port), "-o", "ListenAddress=127.0.0.1",
                   "-E", "/var/log/sshd.log")

    def stop_sshd(self) -> None:
        pidfile = self.c.path / "run/sshd.pid"
        try:
            os.kill(int(pidfile.read_text().split()[0]), signal.SIGTERM)
        except (OSError, ValueError, IndexError):
            pass

    def ssh_argv(self, command: str) -> list[str]:
        return ["ssh", "-F", "/dev/null", "-i", str(self.key), "-p", str(self.port),
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10",
                "alice@127.0.0.1", command]

    def ssh(self, command: str, check=True) -> subprocess.CompletedProcess:
        deadline = time.monotonic() + 20
        while True:
            r = sh(*self.ssh_argv(command), check=False, timeout=60)
            # sshd re-reading its config after a reload refuses for a moment: retry that only.
            if r.returncode != 255 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        if check and r.returncode != 0:
            raise AssertionError(f"ssh {command!r} failed ({r.returncode}): {r.stderr}\n"
                                 + self.log_tail())
        return r

    def log_tail(self) -> str:
        out = []
        for name, path in (("sshd", self.c.path / "var/log/sshd.log"),
                           ("agent", self.c.path.parent / "agent.log")):
            try:
                text = path.read_text()
                out.append(f"-- {name} log --\n" + (text[:1500] + "\n...\n" if len(text) > 3000 else "") + text[-1500:])
            except OSError:
                pass
        return "\n".join(out)

    def start_agent(self) -> None:
        log = open(self.c.path.parent / "agent.log", "ab")
        self.agent = subprocess.Popen(["chroot", str(self.c.path), "/usr/bin/sshtrail", "agent"],
                                      env=ENV, stdout=subprocess.DEVNULL, stderr=log)
        sock = self.c.path / "run/sshtrail/agent.sock"
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert self.agent.poll() is None, (self.c.path.parent / "agent.log").read_text()
            assert time.monotonic() < deadline, "agent socket did not appear"
            time.sleep(0.1)

    def stop_agent(self) -> None:
        if self.agent and self.agent.poll() is None:
            self.agent.send_signal(signal.SIGTERM)
            try:
                self.agent.wait(20)
            except subprocess.TimeoutExpired:
                self.agent.kill()
                self.agent.wait()
        self.agent = None

    def events(self) -> list[dict]:
        import json
        r = self.c.run("sshtrail", "events", "--json", check=False)
        if r.returncode != 0:
            return []
        return [json.loads(ln) for ln in r.stdout.splitlines()]

    def wait_events(self, predicate, what: str, timeout=30.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            evs = self.events()
            if predicate(evs):
                return evs
            if time.monotonic() > deadline:
                import shutil as _sh
                _sh.rmtree("/tmp/diag", ignore_errors=True)
                _sh.copytree(self.c.path / "var/spool/sshtrail", "/tmp/diag")
                raise AssertionError(f"timed out waiting for {what}; have {evs}\n{self.log_tail()}")
            time.sleep(0.3)

    def apt(self, *args, check=True) -> subprocess.CompletedProcess:
        argv = ("apt-get", "-y", "-q", "-o", "Dpkg::Options::=--force-confold", *args)
        r = self.c.run(*argv, check=False, timeout=900)
        if r.returncode != 0 and re.search(r"^(E: Failed to fetch|Err:)", r.stdout + r.stderr, re.M):
            # The network or the mirror failed us, not the package: refresh the lists, once.
            self.c.run("apt-get", "update", "-q", check=False, timeout=300)
            r = self.c.run(*argv, check=False, timeout=900)
        if check and r.returncode != 0:
            raise AssertionError(f"apt-get {' '.join(args)} failed ({r.returncode}):\n"
                                 f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        return r


@pytest.fixture(scope="module")
def debian(packages):
    """A fresh Debian 12 root with the .debs copied in (not installed), its apt archive cache
    shared with later runs; everything is torn down after the module, on failure too."""
    # One run at a time on a machine: the base tarball and the apt cache are shared.
    import fcntl
    CACHE.mkdir(parents=True, exist_ok=True)
    lock = open(CACHE / "lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    base = _base_tarball()
    work = Path(tempfile.mkdtemp(prefix="sshtrail-pkgtest-", dir="/var/tmp"))
    chroot = Chroot(work / "root")
    chroot.path.mkdir()
    archives = chroot.path / "var/cache/apt/archives"
    host = None
    try:
        sh("tar", "-C", chroot.path, "--numeric-owner", "-xf", base)
        chroot.mount()
        ARCHIVES.mkdir(parents=True, exist_ok=True)
        (ARCHIVES / "partial").mkdir(exist_ok=True)
        archives.mkdir(parents=True, exist_ok=True)
        sh("mount", "--bind", ARCHIVES, archives)
        chroot.mounts.append(archives)
        for name in ("deb", "collector-deb"):
            shutil.copy(packages[name], chroot.path / "tmp" / packages[name].name)
        key = work / "id_ed25519"
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key)
        chroot.run("useradd", "-m", "-s", "/bin/bash", "alice")
        chroot.run("usermod", "-p", "*", "alice")
        ssh_dir = chroot.path / "home/alice/.ssh"
        ssh_dir.mkdir(mode=0o700)
        (ssh_dir / "authorized_keys").write_bytes(key.with_suffix(".pub").read_bytes())
        chroot.run("chown", "-R", "alice:alice", "/home/alice/.ssh")
        # What ssh.service's RuntimeDirectory makes on a real host; `sshd -t` needs it.
        (chroot.path / "run/sshd").mkdir(mode=0o755, exist_ok=True)
        chroot.run("apt-get", "update", "-q", timeout=300)
        host = Host(chroot, key)
        yield host
    finally:
        if host:
            host.stop_agent()
            host.stop_sshd()
        chroot.kill_all()
        chroot.unmount()
        leftover = [str(m) for m in (chroot.path / "proc", chroot.path / "dev/pts", archives)
                    if _mounted(m)]
        if not leftover:
            shutil.rmtree(work, ignore_errors=True)
        lock.close()
        assert not leftover, f"still mounted: {leftover}"


def _state(host: Host) -> dict:
    return _tree_bytes(host.c.path, "etc/pam.d", "etc/ssh")


def test_deb_in_fresh_debian(debian: Host, packages):
    h, root = debian, debian.c.path
    pristine = _state(h)
    assert "etc/pam.d/sshd" in pristine and "etc/ssh/sshd_config" in pristine

    # 1. Installing both packages, Depends from Debian's archive, changes no login behaviour.
    r = h.apt("install", "--no-install-recommends", f"/tmp/{packages['deb'].name}",
              f"/tmp/{packages['collector-deb'].name}")
    assert "sshd and PAM are unchanged until you run `sshtrail install`" in r.stderr + r.stdout
    assert _diff(pristine, _state(h)) == [], "package install touched PAM or sshd files"
    assert (root / "usr/lib/sshtrail/lib/sshtrail/__pycache__").is_dir()  # compiled by postinst
    assert not list((root / "usr/lib/python3/dist-packages").glob("sshtrail*"))
    r = h.c.run("sshtrail", "--help")
    assert "sshtrail doctor" in r.stdout
    assert (root / "usr/share/man/man1/sshtrail.1.gz").exists()
    # Depends really came from Debian: cryptography and requests are Debian's, not bundled.
    r = h.c.run("python3", "-I", "-c", "import sys; sys.path[:0]=['/usr/lib/sshtrail/lib']\n"
                "import cryptography, requests, sqlite_utils\n"
                "print(cryptography.__file__, requests.__file__, sqlite_utils.__file__)")
    crypto, req, su = r.stdout.split()
    assert crypto.startswith("/usr/lib/python3/dist-packages/") and req.startswith("/usr/lib/python3/")
    assert su.startswith("/usr/lib/sshtrail/lib/")

    # The conffile, edited as an operator would: sshd logs to a file here, no BCC installed.
    conf = root / "etc/sshtrail/sshtrail.toml"
    text = conf.read_text()
    assert '# path = "/var/log/auth.log"' in text and "# enabled = true" in text
    conf.write_text(text.replace('# path = "/var/log/auth.log"', 'path = "/var/log/sshd.log"')
                    .replace("# enabled = true", "enabled = false"))
    edited_conf = conf.read_bytes()

    # 2. sshtrail install: the paths it writes exist in the package.
    h.c.run("sshtrail", "install")
    pam = (root / "etc/pam.d/sshd").read_text()
    cfg = (root / "etc/ssh/sshd_config").read_text()
    assert "/usr/bin/python3 -I -S /usr/lib/sshtrail/lib/pam_module/hook.py" in pam
    assert "/bin/sh /usr/lib/sshtrail/lib/pam_module/detach.sh" in pam
    assert "ForceCommand /usr/bin/python3 -I -S /usr/lib/sshtrail/lib/session_wrapper/shell.py" in cfg
    hooked = _state(h)

    # 3. A real login through the chroot's sshd, recorded.
    h.start_sshd()
    h.start_agent()
    r = h.ssh("echo hello-from-$(id -un)")
    assert r.stdout == "hello-from-alice\n"
    evs = h.wait_events(lambda evs: any(e["event"] == "user.login" and e.get("success") for e in evs)
                        and any(e["event"] == "exec" for e in evs), "user.login and exec")
    login = next(e for e in evs if e["event"] == "user.login")
    assert login["login"] == "alice" and login["method"] == "publickey"
    assert any(e["event"] == "exec" and "echo hello" in e["command"] for e in evs)

    # 4. doctor on this host: everything but the collector link is in place.
    r = h.c.run("sshtrail", "doctor", "--no-bpf", check=False)
    fails = re.findall(r"^FAIL  ([^:]+):", r.stdout, re.M)
    assert fails == ["enrollment"], r.stdout
    for name in ("PAM hook", "session wrapper", "sshd log level", "UsePAM", "sshd log", "spool", "agent"):
        assert re.search(rf"^OK    {name}: ", r.stdout, re.M), (name, r.stdout)

    # 5. The collector package: its own user, runs from its bundled libraries.
    assert h.c.run("getent", "passwd", "sshtrail-collector").stdout.startswith("sshtrail-collector:")
    h.c.run("runuser", "-u", "sshtrail-collector", "--", "sshtrail", "collector", "init")
    state = root / "var/lib/sshtrail/collector"
    assert (state / "server.crt").exists() and os.stat(state).st_mode & 0o777 == 0o700
    port = _free_port()
    coll = subprocess.Popen(["chroot", str(root), "runuser", "-u", "sshtrail-collector", "--",
                             "sshtrail", "collector", "serve", "--listen", f"127.0.0.1:{port}"],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        import requests
        deadline = time.monotonic() + 30
        while True:
            try:
                resp = requests.get(f"https://127.0.0.1:{port}/healthz", timeout=2,
                                    verify=str(state / "ca.crt"))
                break
            except requests.RequestException:
                assert coll.poll() is None, coll.stderr.read().decode()
                assert time.monotonic() < deadline, "collector did not come up"
                time.sleep(0.2)
        assert resp.status_code == 200 and resp.json()["ok"] is True
        uid = h.c.run("id", "-u", "sshtrail-collector").stdout.strip()
        status = Path(f"/proc/{_child_pid(coll.pid)}/status").read_text()
        assert re.search(rf"^Uid:\t{uid}\t{uid}\t", status, re.M) and uid != "0", status
    finally:
        coll.terminate()
        coll.wait(20)

    # 6. Upgrade (a reinstall runs the same scripts): config, spool and hooks stay, and a
    #    session running across it goes on. The hooks are brought up to this version's: here
    #    sshd_config holds the block of a version before sshd set SHLVL and ZDOTDIR.
    n_before = len(h.events())
    sshd_config = root / "etc/ssh/sshd_config"
    older = sshd_config.read_text().replace(" SHLVL=1 ZDOTDIR=/nonexistent", "")
    assert older != sshd_config.read_text()
    sshd_config.write_text(older)
    running = subprocess.Popen(h.ssh_argv("sleep 4; echo survived-upgrade"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    h.apt("install", "--reinstall", "--no-install-recommends", f"/tmp/{packages['deb'].name}")
    out, err = running.communicate(timeout=60)
    assert (out, running.returncode) == ("survived-upgrade\n", 0), err
    assert conf.read_bytes() == edited_conf
    assert _diff(hooked, _state(h)) == []
    assert len(h.events()) >= n_before
    assert h.ssh("echo again").stdout == "again\n"
    h.wait_events(lambda evs: sum(e["event"] == "exec" for e in evs) >= 3, "exec after upgrade")

    # 7. Purge: PAM and sshd files byte for byte as before; a running session goes on; sshd
    #    was reloaded, so a new login works without the (now gone) wrapper.
    running = subprocess.Popen(h.ssh_argv("sleep 4; echo survived-purge"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    h.stop_agent()  # what systemd's stop in prerm does on a real host
    r = h.apt("purge", "sshtrail", "sshtrail-collector")
    assert "reloaded ssh" in r.stderr + r.stdout, r.stdout + r.stderr
    assert _diff(pristine, _state(h)) == []
    out, err = running.communicate(timeout=60)
    assert (out, running.returncode) == ("survived-purge\n", 0), err
    assert h.ssh("echo plain-$0").stdout.startswith("plain-")
    for gone in ("usr/lib/sshtrail", "usr/bin/sshtrail", "etc/sshtrail", "var/spool/sshtrail",
                 "var/lib/sshtrail/install", "var/cache/sshtrail"):
        assert not (root / gone).exists(), gone
    assert (root / "var/lib/sshtrail/collector/ca.crt").exists()  # the fleet's CA is never purged

    # 8. The documented switch: /etc/sshtrail/auto-install hooks sshd at package install (its
    #    words are install's arguments), and `apt remove` restores the files.
    (root / "etc/sshtrail").mkdir()
    (root / "etc/sshtrail/auto-install").write_text("--no-wrapper\n")
    h.apt("install", "--no-install-recommends", f"/tmp/{packages['deb'].name}")
    assert "pam_module/hook.py" in (root / "etc/pam.d/sshd").read_text()
    assert "session_wrapper" not in (root / "etc/ssh/sshd_config").read_text()
    assert _diff(pristine, _state(h)) != []
    h.apt("remove", "sshtrail")
    assert _diff(pristine, _state(h)) == []
    assert (root / "etc/sshtrail/sshtrail.toml").exists()  # remove keeps the conffile
    h.apt("purge", "sshtrail")
    assert not (root / "etc/sshtrail").exists()


def _child_pid(pid: int) -> int:
    """The deepest child of pid (chroot -> runuser -> python)."""
    while True:
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                kids = f.read().split()
        except OSError:
            return pid
        if not kids:
            return pid
        pid = int(kids[0])
