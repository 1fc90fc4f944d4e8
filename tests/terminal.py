"""A real OpenSSH client on a pseudo-terminal: what a person at a terminal does, for tests and
the demo."""
import re
import select
import signal
import time

import ptyprocess

PROMPT = b"READY$ "


class Terminal:
    """A real `ssh -tt` client on a pseudo-terminal of ours, as a person at a terminal."""

    def __init__(self, lab, user, command=None, cols=80, rows=24, term="xterm"):
        argv, env = lab.ssh_argv(user, command, tty=True)
        env = dict(env, PS1=PROMPT.decode(), TERM=term)
        self.p = ptyprocess.PtyProcess.spawn(argv, env=env, dimensions=(rows, cols))
        self.seen = b""

    def expect(self, pattern: bytes, timeout=15.0) -> bytes:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.seen):
            left = deadline - time.monotonic()
            # select first: a read would wait for ever on a session that stopped sending.
            if left <= 0 or not select.select([self.p.fd], [], [], left)[0]:
                raise AssertionError(f"{pattern!r} not seen; got {self.seen[-500:]!r}")
            try:
                self.seen += self.p.read(65536)
            except EOFError:
                raise AssertionError(f"{pattern!r} not seen before EOF; got {self.seen[-500:]!r}")
        return self.seen

    def send(self, text: str) -> None:
        self.p.write(text.encode())

    def wait(self, timeout=15.0) -> int:
        deadline = time.monotonic() + timeout
        while self.p.isalive():
            try:
                self.seen += self.p.read(65536)
            except EOFError:
                pass
            if time.monotonic() > deadline:
                self.p.kill(signal.SIGKILL)
                raise AssertionError("ssh did not exit")
        while True:  # what ssh printed just before it exited is still in our pty
            try:
                self.seen += self.p.read(65536)
            except EOFError:
                break
        return self.p.exitstatus


def shell_user(lab, hint="rec"):
    # A prompt we can wait for, whatever the distribution's bashrc does.
    user = lab.add_user(hint)
    (user.home / ".bashrc").write_text(f"PS1='{PROMPT.decode()}'\n")
    return user
