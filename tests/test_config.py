"""Config: defaults, overrides, and errors that name the key and line."""
import os
import subprocess
import sys
import tomllib

import pytest

from sshtrail import config


def test_defaults_without_file(tmp_path, monkeypatch):
    monkeypatch.delenv("SSHTRAIL_CONFIG", raising=False)
    monkeypatch.setattr(config, "DEFAULT_PATH", tmp_path / "absent.toml")
    cfg = config.load()
    assert cfg["spool.path"] == "/var/spool/sshtrail/spool.db"
    assert cfg["pam.fail_closed"] is False and cfg.source is None


def test_explicit_missing_file_is_an_error(tmp_path):
    with pytest.raises(config.ConfigError, match="config file not found"):
        config.load(tmp_path / "nope.toml")


def test_env_var_points_elsewhere(tmp_path, monkeypatch):
    p = tmp_path / "c.toml"
    p.write_text('[spool]\npath = "/tmp/x.db"\n')
    monkeypatch.setenv("SSHTRAIL_CONFIG", str(p))
    assert config.load()["spool.path"] == "/tmp/x.db"
    # The PAM hook ignores the environment: a user can set it through pam_env.
    monkeypatch.setattr(config, "DEFAULT_PATH", tmp_path / "absent.toml")
    assert config.load(use_env=False)["spool.path"] == "/var/spool/sshtrail/spool.db"


def test_int_accepted_for_float():
    assert config.parse("[pam]\ntimeout = 2\n")["pam.timeout"] == 2.0


@pytest.mark.parametrize("text,message", [
    ("[spool]\nmax_bytes = 'big'\n", r"line 2: spool.max_bytes must be an integer"),
    ("spool.on_full = 'panic'\n", r"line 1: spool.on_full must be one of drop_new, drop_oldest"),
    ("[pam]\n\nfail_closed = 1\n", r"line 3: pam.fail_closed must be a boolean"),
    ("[pam]\ntimout = 1\n", r"line 2: unknown key 'pam.timout'"),
    ("[pam\n", r"not valid TOML: .*line 1"),
    ("[pam]\ntimeout = -1\n", r"line 2: pam.timeout must not be negative"),
])
def test_errors_name_key_and_line(text, message):
    with pytest.raises(config.ConfigError, match=message):
        config.parse(text, "/etc/sshtrail/sshtrail.toml")


def test_rendered_defaults_parse_back_to_defaults():
    text = config.render_defaults()
    uncommented = "\n".join(l[2:] if l.startswith("# ") and " = " in l else l
                            for l in text.splitlines())
    cfg = config.parse(uncommented)
    for key in config.DEFAULTS:
        assert cfg[key.name] == key.default
    assert all(v == {} for v in tomllib.loads(text).values())  # all commented out


def test_cli_reports_bad_config_without_traceback(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[spool]\nmax_bytes = 'x'\n")
    r = subprocess.run([sys.executable, "-m", "sshtrail.cli", "config", "--config", str(p)],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "line 2: spool.max_bytes must be an integer" in r.stderr
    assert "Traceback" not in r.stderr


def test_cached_load_follows_edits_and_ignores_foreign_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "CACHE_DIR", str(tmp_path / "cache"))
    p = tmp_path / "c.toml"
    p.write_text('[spool]\npath = "/tmp/one.db"\n')
    assert config.load_cached(p)["spool.path"] == "/tmp/one.db"
    assert len(list((tmp_path / "cache").iterdir())) == 1  # cached
    assert config.load_cached(p)["spool.path"] == "/tmp/one.db"  # from the cache
    p.write_text('[spool]\npath = "/tmp/two-longer.db"\n')
    assert config.load_cached(p)["spool.path"] == "/tmp/two-longer.db"  # edit seen
    p.write_text("[spool]\npath = 7\n")
    with pytest.raises(config.ConfigError, match="spool.path must be a string"):
        config.load_cached(p)  # a bad edit is an error, not the old cached values
    # Readable by all (the session wrapper runs as the user), written by root only.
    (entry,) = (tmp_path / "cache").iterdir()
    assert entry.stat().st_mode & 0o777 == 0o644
    # A cache directory others can write to is not trusted (nor written).
    p.write_text('[spool]\npath = "/tmp/three.db"\n')
    os.chmod(tmp_path / "cache", 0o777)
    for f in (tmp_path / "cache").iterdir():
        f.write_bytes(b"garbage")
    assert config.load_cached(p)["spool.path"] == "/tmp/three.db"
