"""CPU time of a set of processes, through a cgroup of their own: for benchmarks that must count
every process a session causes, including those that are not descendants of the client (sshd
forks the session's processes from its listener, the agent is a daemon of its own).

    with CpuGroup("sshtrail-bench-plain") as g:
        g.add(lab.pid)                    # children forked from now on inherit the group
        before = g.usage_ns()
        ...                               # run the session; start the client with preexec_fn=g.join
        spent = g.usage_ns() - before

Two kinds of group, the first that works here: cgroup v1 `cpuacct` (`cpuacct.usage`, ns), or a
cgroup v2 group (`cpu.stat` `usage_usec`, which v2 keeps in every group even when the `cpu`
controller is bound to a v1 hierarchy, as on hosts that mount both).

What it must never do: leave a group behind, or a process in one. close() moves whatever is
still inside back to the group this process started in, then removes the group; `with` does it
even on error. Needs root.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _own_group(match) -> str | None:
    """This process's group path in the hierarchy whose /proc/self/cgroup line matches."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if match(controllers.split(",")):
            return path
    return None


def _candidates() -> list[tuple[str, Path, Path]]:
    """(kind, mount of our own group, usage file name) in order of preference."""
    found = []
    v1 = _own_group(lambda cs: "cpuacct" in cs)
    if v1 is not None and (CGROUP_ROOT / "cpuacct" / "cpuacct.usage").exists():
        found.append(("v1 cpuacct", CGROUP_ROOT / "cpuacct" / v1.lstrip("/"), "cpuacct.usage"))
    v2 = _own_group(lambda cs: cs == [""])
    for mount in (CGROUP_ROOT / "unified", CGROUP_ROOT):  # hybrid, then pure v2
        if v2 is not None and (mount / "cgroup.controllers").exists():
            found.append(("v2", mount / v2.lstrip("/"), "cpu.stat"))
            break
    return found


class CpuGroup:
    def __init__(self, name: str):
        self.kind = self.path = self.home = None
        errors = []
        for kind, home, usage_file in _candidates():
            path = home / f"{name}-{os.getpid()}"
            try:
                path.mkdir()
                if not (path / usage_file).exists():
                    raise OSError(f"no {usage_file} in a new group")
            except OSError as e:
                errors.append(f"{kind} at {home}: {e}")
                if path.is_dir():
                    path.rmdir()
                continue
            self.kind, self.home, self.path, self._usage_file = kind, home, path, usage_file
            return
        raise SystemExit("no cgroup to count CPU in (root needed): " + ("; ".join(errors)
                                                                         or "none mounted"))

    def add(self, pid: int) -> None:
        """Move a running process (all its threads) in; what it forks later is born inside."""
        (self.path / "cgroup.procs").write_text(str(pid))

    def join(self) -> None:
        """For subprocess preexec_fn: the child enters the group before it execs."""
        self.add(os.getpid())

    def remove(self, pid: int) -> None:
        """Back to the group we started in."""
        try:
            (self.home / "cgroup.procs").write_text(str(pid))
        except ProcessLookupError:
            pass  # exited meanwhile: the kernel took it out

    def pids(self) -> set[int]:
        return {int(p) for p in (self.path / "cgroup.procs").read_text().split()}

    def usage_ns(self) -> int:
        text = (self.path / self._usage_file).read_text()
        if self._usage_file == "cpu.stat":
            fields = dict(line.split() for line in text.splitlines())
            return int(fields["usage_usec"]) * 1000
        return int(text)

    def close(self, timeout: float = 5.0) -> None:
        if self.path is None:
            return
        deadline = time.monotonic() + timeout
        while True:
            for pid in self.pids():
                self.remove(pid)
            try:
                self.path.rmdir()
                self.path = None
                return
            except OSError:
                # EBUSY while an exiting task is still being taken out: it goes within moments.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def __enter__(self) -> "CpuGroup":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
