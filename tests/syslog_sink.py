"""A /dev/log listener for tests: these machines run no syslog daemon, so a test that checks
what the PAM hook reported binds /dev/log itself and reads the datagrams.

It reads on a thread from the start: a unix datagram queue holds only a few messages, and a
sender (libc syslog) blocks when it is full, which would turn a slow test into a hung hook.
"""
import os
import socket
import threading
import time

DEV_LOG = "/dev/log"


class SyslogSink:
    def __init__(self, path: str = DEV_LOG):
        if os.path.exists(path):
            raise RuntimeError(f"{path} exists: a syslog daemon runs here; not replacing it")
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        os.chmod(path, 0o666)
        self.sock.settimeout(0.1)
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append(self.sock.recv(65536).decode(errors="replace"))
            except socket.timeout:
                continue
            except OSError:
                return

    def wait_for(self, text: str, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in list(self.messages):
                if text in m:
                    return m
            time.sleep(0.02)
        mine = [m for m in self.messages if "sshtrail" in m]
        raise AssertionError(f"no syslog message containing {text!r}; sshtrail said {mine!r}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()
        os.unlink(self.path)
