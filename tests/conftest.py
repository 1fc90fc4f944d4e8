"""Shared pytest fixtures: the sshd lab (tests/lab.py) and the root requirement of tests using it.

Integration tests -- marked ``@pytest.mark.integration`` or using the ``lab``/``lab_factory``
fixtures -- create users, write /etc/pam.d files and run a private sshd, so they need root. CI
runs as root; elsewhere they are skipped with the reason, never half-run.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import sys
from pathlib import Path

import pytest

# tests/ is not a package; make "import lab" work whatever pytest's import mode.
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from lab import SSHD, Lab, sweep_stale  # noqa: E402

LAB_FIXTURES = {"lab", "lab_factory"}


def _integration_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return ("integration test needs root: it adds users, writes /etc/pam.d/sshd-sshtrail-* "
                "and runs a private sshd (CI runs as root)")
    missing = [p for p in (str(SSHD), "ssh", "ssh-keygen", "sshpass", "useradd")
               if shutil.which(p) is None]
    if missing:
        return (f"integration test needs {', '.join(missing)} "
                f"(packages openssh-server, openssh-client, sshpass)")
    return None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "integration: drives a real sshd on loopback; needs root (skipped otherwise)")
    # A CI timeout or `kill` sends SIGTERM, whose default action ends pytest without running
    # fixture teardown or atexit: users and PAM files of live labs would stay on the host.
    # Turned into KeyboardInterrupt, pytest stops as on Ctrl-C and the cleanups run.
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        def _on_sigterm(signum, frame):
            raise KeyboardInterrupt("SIGTERM")
        signal.signal(signal.SIGTERM, _on_sigterm)


def pytest_sessionstart(session: pytest.Session) -> None:
    # Leftovers of an earlier run that was SIGKILLed (only lab-marked files and users whose
    # creating process is dead; labs of other live runs are left alone).
    if os.geteuid() == 0:
        removed = sweep_stale()
        if removed:
            print(f"sshtrail lab: removed leftovers of dead runs: {', '.join(removed)}",
                  file=sys.stderr)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _integration_skip_reason()
    for item in items:
        if LAB_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
        if reason and item.get_closest_marker("integration"):
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def lab_factory(tmp_path: Path):
    """make(name=None, *, start=True, extra_sshd_config="", pam_text=None) -> Lab, in its own
    subdirectory of tmp_path; every lab made is cleaned up after the test, pass or fail."""
    labs: list[Lab] = []

    def make(name: str | None = None, *, start: bool = True, **kwargs) -> Lab:
        name = name or "t" + secrets.token_hex(3)
        lab = Lab(name, tmp_path / name, **kwargs)
        labs.append(lab)
        if start:
            lab.start()
        return lab

    try:
        yield make
    finally:
        errors = []
        for lab in reversed(labs):
            try:
                lab.cleanup()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest.fixture
def lab(lab_factory) -> Lab:
    """A started lab: private sshd on 127.0.0.1:lab.port, PAM service lab.pam_service."""
    return lab_factory()


@pytest.fixture
def syslog_sink():
    """/dev/log bound by the test (no syslog daemon runs here); see syslog_sink.py."""
    from syslog_sink import SyslogSink
    sink = SyslogSink()
    yield sink
    sink.close()


@pytest.fixture
def trail_factory(lab_factory):
    """make(**lab_kwargs) -> Trail: a started lab with sshtrail installed and its agent running;
    closed after the test."""
    from trail import Trail
    trails = []

    def make(settings: str = "", **lab_kwargs):
        t = Trail(lab_factory(**lab_kwargs), settings=settings)
        trails.append(t)
        t.install()
        t.start_agent()
        return t

    yield make
    for t in trails:
        t.close()


# -- collector stores (tests/test_store.py) -------------------------------------------------

@pytest.fixture(scope="session")
def postgres_server():
    """A private PostgreSQL server (tests/pg.py) for the whole run; stopped and removed after."""
    import pg
    try:
        pg.bin_dir()
    except RuntimeError as e:
        # `make test` installs PostgreSQL: its absence is a broken setup, not a reason to skip.
        pytest.fail(str(e))
    server = pg.PgServer.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres_server) -> str:
    """URL of a database on the private server, shared by the whole run."""
    return postgres_server.url


@pytest.fixture
def postgres_db(postgres_server) -> str:
    """URL of a new empty database, dropped after the test."""
    name = "t_" + secrets.token_hex(6)
    url = postgres_server.create_database(name)
    yield url
    postgres_server.drop_database(name)


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path: Path):
    """A fresh, empty collector store of each backend; closed after the test."""
    if request.param == "sqlite":
        from collector.store_sqlite import SqliteStore
        s = SqliteStore(tmp_path / "store.db")
    else:
        from collector.store_postgres import PostgresStore
        s = PostgresStore(request.getfixturevalue("postgres_db"))
    yield s
    s.close()
