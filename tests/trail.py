"""sshtrail installed into a lab sshd, the way an operator installs it: for tests, the demo and
the benchmarks.

`Trail(lab)` writes a private config (spool, state dir, agent socket: in a directory of its own;
sshd's log: the lab's), runs the real `sshtrail install` CLI against the lab's PAM service and
sshd_config, reloads the lab's sshd and starts the real `sshtrail agent`. It never touches the
host's defaults. Its directory is world-readable (the spool inside is root-only): the session
wrapper runs as the test user and must read the config and reach the agent's socket.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lab import Lab

SSHTRAIL = [sys.executable, "-m", "sshtrail.cli"]


class Trail:
    def __init__(self, lab: Lab, *, settings: str = ""):
        self.lab = lab
        self.dir = Path(tempfile.mkdtemp(prefix=f"sshtrail-{lab.name}-"))
        os.chmod(self.dir, 0o755)
        self.config = self.dir / "sshtrail.toml"
        self.spool_path = self.dir / "spool" / "spool.db"
        self.settings = settings
        self.agent: subprocess.Popen | None = None
        self.write_config()

    def write_config(self, settings: str | None = None) -> None:
        if settings is not None:
            self.settings = settings
        extra = self.settings
        # Sections the caller gives are merged by appending keys under the same headers.
        base = {"spool": [f'path = "{self.spool_path}"'],
                "agent": [f'socket = "{self.dir / "agent.sock"}"'],
                "sshd_log": [f'path = "{self.lab.log_file}"', "poll_interval = 0.05"],
                "pam": ["attempt_grace = 1.0"],
                # Off unless a test is about it: BCC takes seconds to load the probes.
                "ebpf": ["enabled = false"],
                "install": [f'state_dir = "{self.dir / "state"}"'],
                # Nothing is uploaded until a test enrolls this host with a collector.
                "upload": [f'identity_dir = "{self.dir / "identity"}"', "idle_interval = 0.1",
                           "backoff_max = 1.0"]}
        top = ['server_id = "lab-host"']
        section = None
        for line in extra.splitlines():
            line = line.strip()
            if line.startswith("["):
                section = line.strip("[]")
                base.setdefault(section, [])
            elif line:
                key = line.split("=")[0].strip()
                target = base[section] if section else top
                target[:] = [l for l in target if l.split("=")[0].strip() != key] + [line]
        text = "\n".join(top) + "\n" + "".join(
            f"\n[{s}]\n" + "\n".join(lines) + "\n" for s, lines in base.items())
        self.config.write_text(text)
        os.chmod(self.config, 0o644)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(SSHTRAIL + [args[0], "--config", str(self.config), *args[1:]],
                           capture_output=True, text=True, timeout=60)
        if check and r.returncode != 0:
            raise AssertionError(f"sshtrail {' '.join(args)} failed ({r.returncode}):\n{r.stderr}")
        return r

    def install(self, *, wrapper: bool = True) -> subprocess.CompletedProcess:
        r = self.cli("install", "--pam-service", self.lab.pam_service,
                     "--sshd-config", str(self.lab.sshd_config),
                     *([] if wrapper else ["--no-wrapper"]))
        self.lab.reload()
        return r

    def uninstall(self) -> subprocess.CompletedProcess:
        r = self.cli("uninstall", "--pam-service", self.lab.pam_service,
                     "--sshd-config", str(self.lab.sshd_config))
        self.lab.reload()
        return r

    def start_agent(self, *, without_bcc: bool = False, open_files: int | None = None) -> None:
        """Start `sshtrail agent`. without_bcc: as on a host without python3-bpfcc (no system
        site-packages: only the virtualenv's packages and this checkout). open_files: its soft
        limit of open files as it starts (systemd gives services 1024)."""
        argv, env = SSHTRAIL + ["agent", "--config", str(self.config)], None
        if without_bcc:
            import site
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                [str(project_root())] + [p for p in site.getsitepackages() if "dist-packages" not in p]))
            argv = [sys.executable, "-S"] + argv[1:]
        limit = None
        if open_files is not None:
            import resource
            limit = lambda: resource.setrlimit(  # noqa: E731
                resource.RLIMIT_NOFILE, (open_files, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        self.agent = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                                      stderr=open(self.dir / "agent.log", "ab"), preexec_fn=limit)
        self.wait_for(lambda evs: any(e["event"] == "agent.start" for e in evs), what="agent.start")

    def stop_agent(self) -> None:
        if self.agent and self.agent.poll() is None:
            self.agent.send_signal(signal.SIGTERM)
            try:
                self.agent.wait(10)
            except subprocess.TimeoutExpired:
                self.agent.kill()
                self.agent.wait()
        self.agent = None

    def events(self, **filters) -> list[dict]:
        args = ["events", "--json"]
        for k, v in filters.items():
            args += [f"--{k}", v]
        r = self.cli(*args, check=False)
        if r.returncode != 0:
            if "no spool" in r.stderr:
                return []
            raise AssertionError(r.stderr)
        return [json.loads(line) for line in r.stdout.splitlines()]

    def wait_for(self, predicate, *, timeout: float = 15.0, what: str = "events", **filters) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            evs = self.events(**filters)
            if predicate(evs):
                return evs
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; have:\n"
                                     + "\n".join(json.dumps(e) for e in evs))
            time.sleep(0.1)

    def logins(self, login: str, *, settle: float = 1.5, n: int = 1, timeout: float = 15.0) -> list[dict]:
        """user.login events for `login`, once at least `n` are there and nothing more arrived
        for `settle` seconds (a duplicate would show up in that time)."""
        self.wait_for(lambda evs: len(evs) >= n, timeout=timeout, what=f"{n} user.login for {login}",
                      type="user.login", user=login)
        time.sleep(settle)
        return self.events(type="user.login", user=login)

    def close(self) -> None:
        self.stop_agent()
        # A login's PAM hooks run detached and may still be writing when the test ends: removed
        # under them, the directory came back (the hook makes a missing spool's directory).
        self.wait_for_detached()
        shutil.rmtree(self.dir, ignore_errors=True)

    def wait_for_detached(self, timeout: float = 10.0) -> None:
        """Until no process started with this trail's config is left but the agent: detached
        PAM hooks (they end within pam.timeout, 3 s, by design) and session wrappers; and the
        PAM calls queued for the agent are written, if it runs."""
        deadline = time.monotonic() + timeout
        while ((self._processes_of_this_trail() or self.queued_pam_calls())
               and time.monotonic() < deadline):
            time.sleep(0.01)

    def queued_pam_calls(self) -> list[str]:
        """What detach.sh left for the agent and the agent has not written yet (none without
        an agent running: they wait for the next one)."""
        if not (self.agent and self.agent.poll() is None):
            return []
        from pam_module.queue import call_names, queue_dir
        try:
            return call_names(queue_dir(str(self.spool_path)))
        except FileNotFoundError:
            return []

    def _processes_of_this_trail(self) -> list[int]:
        needle = str(self.config).encode()
        skip = {os.getpid(), self.agent.pid if self.agent else 0}
        found = []
        for name in os.listdir("/proc"):
            if name.isdigit() and int(name) not in skip:
                try:
                    with open(f"/proc/{name}/cmdline", "rb") as f:
                        if needle in f.read():
                            found.append(int(name))
                except OSError:
                    pass
        return found


@contextlib.contextmanager
def locked_spool(path):
    """While inside, every writer of the spool at `path` waits for its write lock."""
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def env_without_sshtrail() -> dict:
    return {k: v for k, v in os.environ.items() if k != "SSHTRAIL_CONFIG"}


def project_root() -> Path:
    return Path(__file__).resolve().parent.parent
