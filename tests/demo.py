#!/usr/bin/env python3
"""`make demo`: a collector on 127.0.0.1 (SQLite, no setup), a lab sshd on 127.0.0.1 with sshtrail
installed and enrolled with that collector, a few real logins through the real OpenSSH client
and a recorded interactive session, and what they left, shown back from the host's spool and
from the collector. Everything it creates (collector, sshd, PAM service file, users) is removed
at the end; the host's own sshd is never touched."""
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from collector_proc import CollectorProc, enroll_trail  # noqa: E402
from lab import Lab  # noqa: E402
from terminal import PROMPT, Terminal, shell_user  # noqa: E402
from trail import SSHTRAIL, Trail  # noqa: E402


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def jump(lab, user, greeting: bytes):
    """`ssh -W` to a listener on 127.0.0.1 that greets and hangs up: what ProxyJump does."""
    target = socket.create_server(("127.0.0.1", 0))
    port = target.getsockname()[1]

    def serve():
        conn, _ = target.accept()
        conn.sendall(greeting)
        conn.close()
    threading.Thread(target=serve, daemon=True).start()
    try:
        return port, lab.ssh(user, None, extra_opts=["-W", f"127.0.0.1:{port}"], input=b"")
    finally:
        target.close()


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="sshtrail-demo-") as d:
        with Lab("demo", Path(d) / "lab", extra_sshd_config="AllowUsers st-*\n") as lab:
            say(f"lab sshd on 127.0.0.1:{lab.port} (PAM service {lab.pam_service})")
            trail = Trail(lab, settings="[ebpf]\nenabled = true\n")
            say("sshtrail install")
            print(trail.install().stdout.rstrip())
            trail.start_agent()
            say("sshtrail collector init && sshtrail collector serve  (a central collector)")
            collector = CollectorProc().start()
            print(f"  collector on {collector.url}")
            try:
                say("sshtrail collector enroll-token, then on the host: sshtrail enroll --collector URL --token T")
                enroll_trail(trail, collector)
                print("  " + trail.cli("status").stdout.replace("\n", "\n  ").rstrip())
                alice = lab.add_user("alice", "alice-demo-pw")
                steps = [
                    ("alice logs in with her key and runs `id -un`", lambda: lab.ssh(alice, "id -un")),
                    ("alice logs in with her password", lambda: lab.ssh(alice, "true", password="alice-demo-pw")),
                    ("alice types a wrong password", lambda: lab.ssh(alice, password="not-her-password")),
                    ("someone tries an unknown user", lambda: lab.ssh("st-mallory-000000", key=lab.stranger_key)),
                    ("someone offers a key alice never authorized", lambda: lab.ssh(alice, key=lab.stranger_key)),
                    ("root tries, outside AllowUsers", lambda: lab.ssh("root", key=lab.stranger_key)),
                ]
                for text, run in steps:
                    r = run()
                    out = r.stdout.decode().strip()
                    print(f"  {text}: exit {r.returncode}" + (f", printed {out!r}" if out else ""))
                port, r = jump(lab, alice, b"hello from behind the jump host\n")
                print(f"  alice jumps through the host to 127.0.0.1:{port} (ssh -W, what ProxyJump "
                      f"does): exit {r.returncode}, printed {r.stdout.decode().strip()!r}")
                # Refusals come from sshd's log, followed by the agent; give it a moment.
                trail.wait_for(lambda evs: sum(not e["success"] for e in evs) >= 4,
                               type="user.login", what="four refusals")
                say("bob opens an interactive session (ssh -tt on a terminal) and types a few commands")
                bob = shell_user(lab, "bob")
                term = Terminal(lab, bob, cols=100, rows=30)
                term.expect(re.escape(PROMPT))
                connect = ("python3 -c \"import socket; socket.create_connection(('127.0.0.1', "
                           f"{lab.port})).close()\"")
                for line in ("uname -s", "echo \"recorded at $(date -u +%H:%M:%S)\"", "ls / | head -3",
                             "cat /etc/hostname", connect):
                    term.send(line + "\r")
                    time.sleep(0.3)
                term.send("exit\r")
                print(f"  bob's session ended with exit status {term.wait()}")
                trail.wait_for(lambda evs: any(e["event"] == "session.recording" for e in evs),
                               user=bob.login, what="bob's recording")
                time.sleep(1)
                say("sshtrail events")
                print(trail.cli("events").stdout.rstrip())
                say("what bob's session did on the host (eBPF): sshtrail events --user bob "
                    "--type session.command / session.disk / session.network")
                for kind in ("session.command", "session.network"):
                    rows = trail.cli("events", "--user", bob.login, "--type", kind).stdout.splitlines()
                    print("\n".join(rows if kind == "session.command" else rows[1:]))
                disk = trail.cli("events", "--user", bob.login, "--type", "session.disk").stdout.splitlines()
                shown = [r for r in disk[1:] if "/etc/" in r or "/home/" in r][:6]
                print("\n".join(shown) + f"\n  ... {len(disk) - 1} file opens in all")
                say("alice's jump: no session channel, so nothing to record; the connection sshd made "
                    "for her, and how it went: sshtrail events --user alice --type session.network / "
                    "session.network_outcome")
                for kind in ("session.network", "session.network_outcome"):
                    trail.wait_for(lambda evs: any(e.get("forwarded") for e in evs), type=kind,
                                   user=alice.login, what=f"alice's forwarded connection ({kind})")
                    rows = trail.cli("events", "--user", alice.login, "--type", kind).stdout.splitlines()
                    print("\n".join(rows if kind == "session.network" else rows[1:]))
                say("sshtrail sessions")
                print(trail.cli("sessions").stdout.rstrip())
                sid = [e for e in trail.events(type="session.recording", user=bob.login)][0]["sid"]
                say(f"sshtrail export {sid} --format asciicast  (first lines; plays in asciinema)")
                cast = trail.cli("export", sid).stdout.splitlines()
                print("\n".join(cast[:12]) + (f"\n  ... {len(cast) - 12} more lines" if len(cast) > 12 else ""))
                say("at the collector: sshtrail events --collector URL --user bob (reader token)")
                collector.wait_for(lambda evs: any(e["event"] == "session.recording" for e in evs),
                                   user=bob.login, what="bob's session at the collector")
                token = Path(d) / "reader.token"
                token.write_text(collector.reader_token)
                remote = ["--collector", collector.url, "--token-file", str(token), "--ca",
                          str(collector.ca_file)]
                print(trail.cli("events", "--user", bob.login, "--type", "session.start", *remote).stdout.rstrip())
                print(trail.cli("events", "--user", bob.login, "--type", "session.recording", *remote).stdout.splitlines()[-1])
                say(f"at the collector: who reached 127.0.0.1:{port}, through the host or from a session? "
                    f"sshtrail events --text 127.0.0.1:{port} --collector URL")
                collector.wait_for(lambda evs: any(e.get("forwarded") for e in evs), user=alice.login,
                                   what="alice's forwarded connection at the collector")
                print(trail.cli("events", "--text", f"127.0.0.1:{port}", *remote).stdout.rstrip())
                say("sshtrail sessions --collector URL")
                print(trail.cli("sessions", *remote).stdout.rstrip())
                say("sshtrail verify  (on the collector: sequence, hash chain, batch signatures)")
                print(collector.verify().stdout.rstrip())
                say("sshtrail search 'recorded at' --collector URL  (what appeared on screen, and commands)")
                print(trail.cli("search", "recorded at", *remote, check=False).stdout.rstrip())
                if sys.stdout.isatty():
                    say(f"sshtrail play {sid} --speed 4 --collector URL  (space pauses, arrows seek, q quits)")
                    time.sleep(1)
                    subprocess.run(SSHTRAIL + ["play", sid, "--speed", "4", "--config",
                                               str(trail.config), *remote])
                else:
                    say(f"sshtrail export {sid} --format text --collector URL  (not a terminal: "
                        "the screen as text instead of a replay)")
                    print(trail.cli("export", sid, "--format", "text", *remote).stdout.rstrip())
            finally:
                collector.close()
                trail.uninstall()
                trail.close()
    say("done: collector and lab sshd stopped, users and PAM service removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
