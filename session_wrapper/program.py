"""The session's program, started as sshd would start it. The wrapper is a Python process, and
Python changes two things of its own at start that every program it starts would inherit
(found comparing a session's `env` and /proc/self/status with and without the wrapper):

- it ignores SIGPIPE and SIGXFSZ, and an ignored signal stays ignored across exec: `yes | head
  -1` then printed "Broken pipe", and `while :; do echo; done | head -1` never ended;
- started in the C locale (no LANG, or a locale the host lacks), it coerces it (PEP 538) by
  setting LC_CTYPE=C.UTF-8 in its environment; `-I` makes it ignore PYTHONCOERCECLOCALE=0.
"""
from __future__ import annotations

import os

# The C module, not signal.py: its enum wrappers cost ~5 ms of every session's start.
import _signal as signal


def undo_locale_coercion(environ) -> None:
    """Put LC_CTYPE back as sshd gave it to us, from the environment the kernel keeps as we
    were started. Call it before the wrapper makes itself non-dumpable: /proc/self is root's
    after that."""
    if "LC_CTYPE" not in environ:
        return  # Python coerces only by setting it
    try:
        with open("/proc/self/environ", "rb") as f:
            block = f.read()
    except OSError:
        return  # no /proc: keep it
    for entry in block.split(b"\0"):
        if entry.startswith(b"LC_CTYPE="):  # the first one, as getenv() finds it
            environ["LC_CTYPE"] = os.fsdecode(entry[len(b"LC_CTYPE="):])
            return
    del environ["LC_CTYPE"]


def exec_program(path: str, argv: list[str], env: dict) -> None:
    """In the child: become the program (never returns; 127 if it cannot be run)."""
    try:
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        os.execve(path, argv, env)
    finally:
        os._exit(127)
