"""A real collector for tests, the demo and the benchmarks: `sshtrail collector init` and
`sshtrail collector serve` as a separate process on a loopback port, with its own config and
directory, and the tokens a test needs (enrollment, reading). `stop()` / `start()` take it down
and bring it back on the same port and store (the "collector down for a while" cases).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

SSHTRAIL = [sys.executable, "-m", "sshtrail.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CollectorProc:
    def __init__(self, *, database: str = "", directory: Path | None = None,
                 blob_dir: Path | None = None, port: int | None = None, init: bool = True):
        self.dir = directory or Path(tempfile.mkdtemp(prefix="sshtrail-collector-"))
        self.port = port or free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.config = self.dir / "collector.toml"
        lines = ["[collector]", f'dir = "{self.dir / "state"}"', f'listen = "127.0.0.1:{self.port}"',
                 'names = ["127.0.0.1", "localhost"]']
        if database:
            lines.append(f'database = "{database}"')
        if blob_dir:
            lines.append(f'blob_dir = "{blob_dir}"')
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None
        self.log = self.dir / "collector.log"
        if init and not (self.dir / "state" / "ca.crt").exists():
            self.cli("collector", "init")
        self._reader: str | None = None

    @property
    def ca_file(self) -> Path:
        return self.dir / "state" / "ca.crt"

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(SSHTRAIL + [args[0], "--config", str(self.config), *args[1:]],
                           capture_output=True, text=True, timeout=120)
        if check and r.returncode != 0:
            raise AssertionError(f"sshtrail {' '.join(args)} failed ({r.returncode}):\n{r.stderr}")
        return r

    def start(self) -> "CollectorProc":
        self.proc = subprocess.Popen(SSHTRAIL + ["collector", "serve", "--config", str(self.config)],
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"))
        deadline = time.monotonic() + 20
        while True:
            try:
                requests.get(self.url + "/healthz", verify=str(self.ca_file), timeout=2)
                return self
            except requests.RequestException:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = self.log.read_text()
                    self.close()  # nobody else will: the caller never got a running collector
                    raise AssertionError("collector did not come up:\n" + log)
                time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def enroll_token(self, *extra: str) -> str:
        return self.cli("collector", "enroll-token", *extra).stdout.strip()

    @property
    def reader_token(self) -> str:
        if self._reader is None:
            self._reader = self.cli("collector", "reader-token", "tests").stdout.strip()
        return self._reader

    def get(self, path: str, **params) -> requests.Response:
        return requests.get(self.url + path, params=params, verify=str(self.ca_file), timeout=30,
                            headers={"Authorization": f"Bearer {self.reader_token}"})

    def events(self, **params) -> list[dict]:
        out, after = [], None
        while True:
            r = self.get("/v1/events", limit=1000, **params, **({"after": after} if after else {}))
            assert r.status_code == 200, r.text
            page = r.json()
            out += page["events"]
            after = page["next"]
            if not after:
                return out

    def wait_for(self, predicate, *, timeout: float = 30.0, what: str = "events", **params):
        deadline = time.monotonic() + timeout
        while True:
            evs = self.events(**params)
            if predicate(evs):
                return evs
            if time.monotonic() > deadline:
                raise AssertionError(f"collector: timed out waiting for {what}; have "
                                     f"{len(evs)}:\n" + "\n".join(json.dumps(e) for e in evs[-20:]))
            time.sleep(0.2)

    def verify(self, *args: str) -> subprocess.CompletedProcess:
        return self.cli("verify", *args, check=False)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def enroll_trail(trail, collector: CollectorProc) -> None:
    """Enroll a tests.trail.Trail's host with the collector, through the real CLI."""
    token = collector.enroll_token()
    trail.cli("enroll", "--collector", collector.url, "--token", token)


class SimHost:
    """A host without sshd: its own config, spool and identity, enrolled through the library,
    and the real Uploader shipping its spool. For tests about the collector, not the host."""

    def __init__(self, directory: Path, collector: CollectorProc, server_id: str,
                 url: str | None = None):
        from sshtrail import config
        from sshtrail.spool import Spool
        self.dir, self.server_id = Path(directory), server_id
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = self.dir / "sshtrail.toml"
        self.config.write_text(
            f'server_id = "{server_id}"\nserver_hostname = "{server_id}.test"\n'
            f'[spool]\npath = "{self.dir / "spool.db"}"\n'
            f'[upload]\nidentity_dir = "{self.dir / "identity"}"\n'
            f'url = "{url or collector.url}"\nidle_interval = 0.05\nbackoff_max = 1.0\n')
        self.cfg = config.load(self.config)
        self.spool = Spool.from_config(self.cfg)

    def enroll(self, collector: CollectorProc, token: str | None = None) -> dict:
        from sshtrail import enroll
        return enroll.enroll(collector.url, token or collector.enroll_token(), self.server_id,
                             self.cfg["upload.identity_dir"])

    def add_logins(self, n: int, login: str = "alice") -> list[str]:
        from sshtrail import events
        evs = [events.new("user.login", login=login, success=True, method="publickey")
               for _ in range(n)]
        for i in range(0, n, 1000):
            self.spool.append(*evs[i:i + 1000])
        return [e["uid"] for e in evs]

    def uploader(self):
        from sshtrail.uploader import Uploader
        return Uploader(self.cfg)

    def drain(self, timeout: float = 60.0) -> None:
        """Upload until the spool has nothing waiting."""
        u = self.uploader()  # its spool connection is opened in this thread: drain() may run in any
        deadline = time.monotonic() + timeout
        try:
            while u.spool.backlog()["events"] or u.spool.backlog()["chunks"]:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{self.server_id}: upload did not finish: "
                                         f"{u.spool.backlog()}")
                if not u.step():
                    time.sleep(max(u.wait, 0.01))
        finally:
            u.close()

    def close(self) -> None:
        self.spool.close()
