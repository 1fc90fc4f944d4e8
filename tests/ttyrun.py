"""Run a program with a fresh pty as its controlling terminal (for tools that insist on one)."""
import fcntl
import os
import struct
import subprocess
import termios


def run_on_a_tty(argv, cwd):
    """Run argv with a fresh pty as controlling terminal (80x24) and stdout a pipe.

    asciinema 2.2 opens /dev/tty even for `cat` (to put it in raw mode), which fails without a
    controlling terminal, as under CI; stdout stays a pipe so the bytes arrive untranslated."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    # asciinema prints through sys.stdout: pin its encoding, whatever the locale of the run.
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    try:
        # start_new_session runs setsid() in the child before preexec_fn, so the pty on fd 0
        # can become its controlling terminal.
        return subprocess.run(argv, cwd=cwd, stdin=slave, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env, timeout=60,
                              start_new_session=True,
                              preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    finally:
        os.close(master)
        os.close(slave)
