"""Run a function in several processes that all start it at the same instant: for races that
only forked writers meeting a new file can show (threads share one SQLite connection's locks)."""
from __future__ import annotations

import os
import time


def run_at_once(count: int, fn) -> list[str]:
    """fn(i) in `count` forked children, released together; what each said: "ok", or the repr
    of what it raised."""
    start = time.monotonic() + 0.05
    children = []
    for i in range(count):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover (a child: it reports through the pipe)
            try:
                os.close(r)
                while time.monotonic() < start:
                    pass
                fn(i)
                os.write(w, b"ok")
            except BaseException as e:
                os.write(w, repr(e).encode())
            finally:
                os._exit(0)
        os.close(w)
        children.append((pid, r))
    said = []
    for pid, r in children:
        os.waitpid(pid, 0)
        said.append(os.read(r, 4096).decode())
        os.close(r)
    return said
