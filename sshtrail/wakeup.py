"""Signals as bytes on a pipe (signal.set_wakeup_fd), for a loop that polls: each signal taken
writes its number there, and the loop reads them as events among the others, instead of
handlers racing it. Used by the session wrapper (on every login: hence `_signal`, the C module,
whose numbers are all it needs; signal.py's enum wrappers cost ~5 ms of a start) and the player.
"""
from __future__ import annotations

import os

import _signal as signal


def _nothing(*_) -> None:
    """The handler: the byte on the pipe is the message."""


class SignalPipe:
    def __init__(self, signals) -> None:
        self.fd, self._w = os.pipe()
        for fd in (self.fd, self._w):
            os.set_blocking(fd, False)
        self._old_wakeup = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        self._old = {s: signal.signal(s, _nothing) for s in signals}

    def read(self) -> bytes:
        """The numbers of the signals taken since the last read (b"": none)."""
        try:
            return os.read(self.fd, 512)
        except BlockingIOError:
            return b""

    def close(self) -> None:
        """The handlers and the wakeup fd as they were before."""
        signal.set_wakeup_fd(self._old_wakeup)
        for s, h in self._old.items():
            signal.signal(s, h)
        os.close(self.fd)
        os.close(self._w)
