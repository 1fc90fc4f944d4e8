"""Turning SQLite's WAL mode on, for the spool and the collector's store, which several processes
open at once."""
from __future__ import annotations

import sqlite3
import time


def turn_on(db: sqlite3.Connection, busy_timeout: float) -> str:
    """PRAGMA journal_mode=WAL, waiting out the busy timeout; returns the mode now in force.
    On a new database its first openers (a login's detached PAM calls, a collector's workers)
    all turn WAL on at once, and SQLite tells all but one "database is locked" straight away,
    without calling the busy handler it was given."""
    deadline = time.monotonic() + busy_timeout
    while True:
        try:
            return db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        except sqlite3.OperationalError as e:
            if e.sqlite_errorcode & 0xff != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.005)
