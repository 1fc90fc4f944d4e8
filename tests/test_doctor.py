"""`sshtrail doctor` on a real lab host: all OK when healthy, and each problem named."""
import re

import pytest

pytestmark = pytest.mark.integration


def doctor(trail, *extra):
    return trail.cli("doctor", "--pam-service", trail.lab.pam_service,
                     "--sshd-config", str(trail.lab.sshd_config), *extra, check=False)


def test_healthy_host_is_all_ok(trail_factory):
    t = trail_factory(settings="[ebpf]\nenabled = true\n")
    r = doctor(t)
    assert r.returncode == 0, r.stdout
    assert "FAIL" not in r.stdout and re.search(r"^7 OK, 0 to fix$", r.stdout, re.M)
    assert "eBPF host events: the tracer's probes load" in r.stdout


def test_each_problem_is_named_with_a_fix(trail_factory):
    t = trail_factory()
    t.stop_agent()
    text = t.lab.pam_file.read_text()
    t.lab.pam_file.write_text(text.replace("session optional pam_exec.so", "#removed"))
    r = doctor(t, "--no-bpf")
    assert r.returncode == 1
    assert re.search(r"^FAIL  agent: not reachable .*\n      fix: start it", r.stdout, re.M)
    assert re.search(r"^FAIL  PAM hook: .* lacks sshtrail's session hook", r.stdout, re.M)
    assert "OK    spool" in r.stdout and "2 to fix" in r.stdout


def test_bpf_unavailable_is_named(trail_factory):
    import os
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
