"""Connections lent to one thread at a time, for both stores.

The collector's worker threads come and go: a connection per thread would outlive its thread
(and, on PostgreSQL, hold one of the server's connection slots). A call borrows a connection,
and gives it back after; one that is not fit to lend again (left inside a transaction, dropped
by the server: `reusable` says) is closed instead.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

from .store import StoreError

MAX_IDLE = 8  # connections kept open between calls


class ConnectionPool:
    def __init__(self, connect, reusable, name: str):
        self._connect, self._reusable, self._name = connect, reusable, name
        self._idle: list = []
        self._lock = threading.Lock()
        self._closed = False

    @contextmanager
    def use(self):
        with self._lock:
            if self._closed:
                raise StoreError(f"{self._name} is closed")
            c = self._idle.pop() if self._idle else None
        if c is None:
            c = self._connect()
        try:
            yield c
        finally:
            with self._lock:
                keep = not self._closed and len(self._idle) < MAX_IDLE and self._reusable(c)
                if keep:
                    self._idle.append(c)
            if not keep:
                c.close()

    def close(self) -> None:
        """Close the idle connections now, those in use as their calls end."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for c in idle:
            c.close()
