"""The wrapper's code compiled ahead, by `sshtrail install`.

The wrapper runs as the logged-in user, who cannot write `__pycache__` beside root's code. Where
root never imported a module the wrapper loads (a fresh checkout, a tree updated since), every
session compiles it again as it starts: ~18 ms of each session's setup here, for the whole
wrapper. The packages' postinst compiles their tree; a drop-in install from a checkout has this.
"""
from __future__ import annotations

import compileall
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where everything session_wrapper.session imports lives (its own package and the core).
PACKAGES = ("session_wrapper", "sshtrail")


def compile_ahead() -> bool:
    """Write the bytecode that is missing or stale; True if all of it is now in place."""
    ok = True
    for name in PACKAGES:
        # quiet=2: a failure (a read-only tree) is the caller's to report, in one line.
        ok = compileall.compile_dir(os.path.join(ROOT, name), maxlevels=0, quiet=2) and ok
    return ok
