"""A private PostgreSQL server for tests: its own cluster in a temp dir, on 127.0.0.1 only.

Never touches the system's cluster. initdb and the server run as the `postgres` OS user when we
are root (PostgreSQL refuses to run as root), as ourselves otherwise. stop() leaves nothing:
no server process, no directory; a run killed before it could stop its server is cleaned up
by the next one (sweep_stale).

    server = PgServer.start()
    url = server.url            # postgresql://postgres@127.0.0.1:PORT/sshtrail_test
    url2 = server.create_database("other")
    server.stop()
"""
from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PREFIX = "sshtrail-pg-"
OWNER_FILE = "creator.pid"  # the pid of the process that made the dir, for sweep_stale


def bin_dir() -> Path:
    """PostgreSQL's binaries: $SSHTRAIL_PG_BIN, else Debian's newest /usr/lib/postgresql/N/bin."""
    if os.environ.get("SSHTRAIL_PG_BIN"):
        return Path(os.environ["SSHTRAIL_PG_BIN"])
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if not found:
        raise RuntimeError("no PostgreSQL server binaries: install Debian's `postgresql` "
                           "package, or set SSHTRAIL_PG_BIN to the directory holding initdb")
    return Path(found[-1]).parent


def _as_owner() -> list[str]:
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class PgServer:
    def __init__(self, fast: bool = True):
        self.fast = fast
        self.dir: Path | None = None
        self.port: int | None = None
        self.bin = bin_dir()
        self._stopped = False

    @classmethod
    def start(cls, *, fast: bool = True) -> "PgServer":
        """fast: fsync off, for tests (the data is thrown away); False for honest timings."""
        server = cls(fast)
        try:
            server._start()
        except BaseException:
            server.stop()
            raise
        atexit.register(server.stop)
        return server

    @property
    def data(self) -> Path:
        return self.dir / "data"

    def _run(self, *args: str, check: bool = True,
             timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([*_as_owner(), *args], cwd=self.dir, capture_output=True,
                              text=True, check=check, timeout=timeout)

    def _start(self) -> None:
        sweep_stale()
        self.dir = Path(tempfile.mkdtemp(prefix=PREFIX, dir="/tmp"))
        (self.dir / OWNER_FILE).write_text(str(os.getpid()))
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self.dir.chmod(0o700)
        try:
            self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
                      "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync")
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"initdb failed in {self.dir}:\n{e.stdout}{e.stderr}") from None
        opts = ["-c listen_addresses=127.0.0.1", f"-k {self.dir}", "-c max_connections=200"]
        if self.fast:
            opts += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        last = ""
        for _ in range(3):  # the port may be taken between _free_port and the bind
            self.port = _free_port()
            r = self._run(str(self.bin / "pg_ctl"), "start", "-D", str(self.data), "-w",
                          "-t", "60", "-l", str(self.dir / "server.log"),
                          "-o", " ".join(opts + [f"-p {self.port}"]), check=False)
            if r.returncode == 0:
                break
            last = r.stdout + r.stderr + self.log()
        else:
            raise RuntimeError(f"PostgreSQL did not start in {self.dir}:\n{last}")
        self.create_database("sshtrail_test")
        self.url = self.url_for("sshtrail_test")

    def log(self) -> str:
        try:
            return (self.dir / "server.log").read_text(errors="replace")
        except (OSError, TypeError):
            return ""

    def url_for(self, dbname: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def _admin(self, sql: str) -> None:
        import psycopg
        with psycopg.connect(self.url_for("postgres"), autocommit=True) as c:
            c.execute(sql)

    def create_database(self, name: str) -> str:
        """A new empty database (name: letters, digits, _) and its URL."""
        if not name.replace("_", "").isalnum():
            raise ValueError(f"database name {name!r}: use letters, digits and _")
        self._admin(f'CREATE DATABASE "{name}"')
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        """Stop the server and remove its directory; safe to call twice or after a failed start."""
        if self._stopped or self.dir is None:
            self._stopped = True
            return
        self._stopped = True
        _stop_dir(self.dir, self.bin)


def _stop_dir(d: Path, bin: Path) -> None:
    data = d / "data"
    pidfile = data / "postmaster.pid"
    if pidfile.exists():
        r = subprocess.run([*_as_owner(), str(bin / "pg_ctl"), "stop", "-D", str(data),
                            "-m", "fast", "-w", "-t", "30"], cwd=d, capture_output=True,
                           timeout=60)
        if r.returncode != 0 and pidfile.exists():
            # It would not stop in time: kill the postmaster this dir's pid file names (one
            # we started), and its children follow it.
            try:
                pid = int(pidfile.read_text().split()[0])
                os.kill(pid, signal.SIGKILL)
                for _ in range(100):
                    if not _pid_alive(pid):
                        break
                    time.sleep(0.05)
            except (OSError, ValueError, IndexError):
                pass
    shutil.rmtree(d, ignore_errors=True)


def sweep_stale() -> list[str]:
    """Stop servers and remove dirs of earlier runs that died without stopping them (their
    creating process is gone); servers of live runs are left alone."""
    removed = []
    for d in glob.glob(os.path.join("/tmp", PREFIX + "*")):
        try:
            pid = int((Path(d) / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not made by us, or still being set up
        if pid != os.getpid() and not _pid_alive(pid):
            try:
                _stop_dir(Path(d), bin_dir())
            except Exception:
                continue
            removed.append(d)
    return removed
