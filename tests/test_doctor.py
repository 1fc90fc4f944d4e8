"""`sshtrail doctor` on a real lab host: all OK when healthy, and each problem named with its fix.

A healthy host here is the whole chain: a lab sshd with sshtrail installed, the agent running,
BPF loaded, and the host enrolled with a real collector process reached over mutual TLS.
"""
import os
import re
import time

import pytest

pytestmark = pytest.mark.integration

CHECKS = ("PAM hook", "session wrapper", "wrapper environment", "sshd log level", "UsePAM",
          "login shells", "sshd log", "spool", "agent", "eBPF host events", "certificate",
          "collector")


def doctor(trail, *extra):
    return trail.cli("doctor", "--pam-service", trail.lab.pam_service,
                     "--sshd-config", str(trail.lab.sshd_config), *extra, check=False)


def fails(output: str) -> dict[str, str]:
    return dict(re.findall(r"^FAIL  ([^:]+): (.*)$", output, re.M))


@pytest.fixture
def collector():
    from collector_proc import CollectorProc
    c = CollectorProc().start()
    yield c
    c.close()


@pytest.fixture
def enrolled(trail_factory, collector):
    from collector_proc import enroll_trail
    t = trail_factory(settings="[ebpf]\nenabled = true\n")
    enroll_trail(t, collector)
    return t


def test_healthy_host_is_all_ok(enrolled):
    r = doctor(enrolled)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FAIL" not in r.stdout
    for name in CHECKS:
        assert re.search(rf"^OK    {name}: ", r.stdout, re.M), (name, r.stdout)
    assert re.search(rf"^{len(CHECKS)} OK, 0 to fix$", r.stdout, re.M), r.stdout
    assert "eBPF host events: the tracer's probes load" in r.stdout
    assert re.search(r"^OK    certificate: host lab-host, valid until \d{4}-\d\d-\d\d .*\((36[45]|36[0-9]) days\)",
                     r.stdout, re.M), r.stdout
    assert re.search(r"^OK    collector: https://127\.0\.0\.1:\d+ reachable over mutual TLS", r.stdout, re.M)
    assert re.search(r"^OK    spool: .* writable; backlog \d+ event", r.stdout, re.M)
    assert re.search(r"^OK    session wrapper: ForceCommand in effect: .*session_wrapper/shell\.py",
                     r.stdout, re.M)


def test_each_problem_is_named_with_a_fix(enrolled, collector):
    t = enrolled
    t.stop_agent()
    collector.stop()
    text = t.lab.pam_file.read_text()
    t.lab.pam_file.write_text(text.replace("session optional pam_exec.so", "#removed"))
    r = doctor(t, "--no-bpf")
    assert r.returncode == 1
    assert re.search(r"^FAIL  agent: not reachable .*\n      fix: start it", r.stdout, re.M)
    assert re.search(r"^FAIL  PAM hook: .* lacks sshtrail's session hook\n      fix: run `sshtrail install`",
                     r.stdout, re.M)
    assert re.search(r"^FAIL  collector: https://127\.0\.0\.1:\d+ not reachable: .*\n      fix: check the "
                     r"collector runs", r.stdout, re.M), r.stdout
    assert set(fails(r.stdout)) == {"agent", "PAM hook", "collector"}, r.stdout
    assert "OK    spool" in r.stdout and "3 to fix" in r.stdout


def test_sshd_config_without_the_wrapper_is_named(trail_factory):
    t = trail_factory()
    t.uninstall()
    t.cli("install", "--pam-service", t.lab.pam_service, "--sshd-config",
          str(t.lab.sshd_config), "--no-wrapper")
    r = doctor(t, "--no-bpf")
    assert r.returncode == 1
    assert re.search(r"^FAIL  session wrapper: ForceCommand in effect: none\n      fix: run `sshtrail "
                     r"install` \(without --no-wrapper\)", r.stdout, re.M), r.stdout


def test_hooks_that_run_a_missing_program_are_named(trail_factory, tmp_path):
    """What a moved or removed sshtrail leaves behind: hooks and a ForceCommand into nowhere."""
    t = trail_factory()
    gone = str(tmp_path / "gone" / "python3")
    for path in (t.lab.pam_file, t.lab.sshd_config):
        text = path.read_text()
        path.write_text(re.sub(r"/\S*/python3?[\d.]*", gone, text))
    r = doctor(t, "--no-bpf")
    assert r.returncode == 1
    f = fails(r.stdout)
    assert gone in f["PAM hook"] and "does not exist" in f["PAM hook"], r.stdout
    assert gone in f["session wrapper"] and "every session fails" in f["session wrapper"], r.stdout


def test_hooks_that_leave_calls_where_no_agent_takes_them_are_named(trail_factory, tmp_path):
    """spool.path changed since install: the calls still get written, by a Python hook each."""
    t = trail_factory()
    t.write_config(f'[spool]\npath = "{tmp_path}/elsewhere/spool.db"\n')
    r = doctor(t, "--no-bpf")
    f = fails(r.stdout)
    assert f"not in {tmp_path}/elsewhere/spool.db.pam-calls" in f["PAM hook"], r.stdout
    assert "nothing is lost" in f["PAM hook"]
    t.install()
    assert "PAM hook" not in fails(doctor(t, "--no-bpf").stdout)


def test_calls_an_agent_stopped_taking_are_named(trail_factory):
    import signal
    t = trail_factory()
    call = f"{t.spool_path}.pam-calls/100.00.42"
    os.kill(t.agent.pid, signal.SIGSTOP)  # hung: its socket still takes connections
    try:
        with open(call, "wb") as f:
            f.write(b"sshtrail-pam-call 1\0")
        os.utime(call, (time.time() - 60, time.time() - 60))
        f = fails(doctor(t, "--no-bpf").stdout)
        assert "1 PAM call(s) have waited" in f["agent"], f
    finally:
        os.kill(t.agent.pid, signal.SIGCONT)


def test_not_enrolled_and_expiring_certificates_are_named(trail_factory, collector):
    from collector_proc import enroll_trail
    t = trail_factory()
    r = doctor(t, "--no-bpf")
    assert re.search(r"^FAIL  enrollment: not enrolled: .*\n      fix: on the collector `sshtrail "
                     r"collector enroll-token`, then here `sshtrail enroll", r.stdout, re.M), r.stdout

    enroll_trail(t, collector)
    # The host certificate replaced by one of the same key and CA ending in three days.
    import pki
    from collector.ca import CA
    from sshtrail import signing
    ident = t.dir / "identity"
    key = signing.load_key(ident / "host.key")
    pem = pki.issue_for_test(CA(collector.dir / "state"), key, "lab-host",
                             not_before=time.time() - 60, not_after=time.time() + 3 * 86400)
    (ident / "host.crt").write_text(pem)
    r = doctor(t, "--no-bpf")
    assert re.search(r"^FAIL  certificate: host certificate expires .* in [23]\.\d days\n      fix: "
                     r"enroll again", r.stdout, re.M), r.stdout
    pem = pki.issue_for_test(CA(collector.dir / "state"), key, "lab-host",
                             not_before=time.time() - 7200, not_after=time.time() - 3600)
    (ident / "host.crt").write_text(pem)
    r = doctor(t, "--no-bpf")
    f = fails(r.stdout)
    assert f["certificate"].startswith("host certificate expired"), r.stdout
    # The collector refuses an expired client certificate in the handshake.
    assert "collector" in f, r.stdout


def test_sshd_log_missing_is_named(trail_factory):
    t = trail_factory()
    t.write_config(t.settings + "\n[sshd_log]\npath = \"/nonexistent/auth.log\"\n")
    r = doctor(t, "--no-bpf")
    assert re.search(r"^FAIL  sshd log: /nonexistent/auth\.log does not exist: .*\n      fix: install "
                     r"rsyslog", r.stdout, re.M), r.stdout


def test_bpf_unavailable_is_named(trail_factory):
    import site
    import subprocess
    import sys
    from trail import project_root
    t = trail_factory(settings="[ebpf]\nenabled = true\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(project_root())] + [p for p in site.getsitepackages() if "dist-packages" not in p]))
    r = subprocess.run([sys.executable, "-S", "-m", "sshtrail.cli", "doctor", "--config",
                        str(t.config), "--pam-service", t.lab.pam_service, "--sshd-config",
                        str(t.lab.sshd_config)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert re.search(r"^FAIL  eBPF host events: BCC's Python bindings are missing.*\n"
                     r"      fix: apt install python3-bpfcc", r.stdout, re.M)


def test_a_login_shell_that_runs_the_users_files_before_the_wrapper_is_named(trail_factory):
    # tcsh reads ~/.tcshrc for `tcsh -c wrapper` whatever the environment says: that user's
    # sessions could be kept from being recorded. (The shell need not be installed to be named.)
    t = trail_factory()
    user = t.lab.add_user("csh", shell="/usr/bin/tcsh")
    r = doctor(t, "--no-bpf")
    assert re.search(rf"^FAIL  login shells: 1 account\(s\) .*: {user.login} \(tcsh reads "
                     r"~/\.tcshrc\)\n      fix: give them bash, zsh or sh", r.stdout, re.M), r.stdout


def test_an_install_from_before_the_shell_settings_is_named(trail_factory):
    # A block written before SHLVL and ZDOTDIR were set (by an older version, not upgraded
    # through the packages) lets bash and zsh read the user's startup files before the wrapper.
    t = trail_factory()
    cfg = t.lab.sshd_config
    cfg.write_text(cfg.read_text().replace(" SHLVL=1 ZDOTDIR=/nonexistent", ""))
    r = doctor(t, "--no-bpf")
    assert re.search(r"^FAIL  wrapper environment: sshd does not set SHLVL=1 ZDOTDIR=/nonexistent: "
                     r".*\n      fix: run `sshtrail install` again", r.stdout, re.M), r.stdout
