"""sshtrail's one config file (TOML), every key with a default, every default documented here.

`DEFAULTS` below is the single place a key is defined; `sshtrail config --defaults` prints it as
a commented TOML file (what packaging ships as /etc/sshtrail/sshtrail.toml). A malformed file is
an error that names the key and line, never a traceback.

Where the config comes from: `--config PATH`, else `$SSHTRAIL_CONFIG`, else DEFAULT_PATH. The PAM
hook is the exception: it takes only `--config`, because the PAM environment it inherits can be
set by the user logging in (pam_env's user_readenv), and a root process must not let the user
choose its config.
"""
from __future__ import annotations

import marshal
import os

from .errors import SshtrailError

DEFAULT_PATH = "/etc/sshtrail/sshtrail.toml"
# Parsed configs for the PAM hook, keyed by config path, valid while the file is unchanged.
CACHE_DIR = "/var/cache/sshtrail"
# Plain strings and os.path rather than pathlib, a plain class rather than dataclasses or
# typing.NamedTuple: the PAM hook imports this once per PAM call and those imports cost it
# several milliseconds.


class Key:
    __slots__ = ("name", "default", "doc", "choices")

    def __init__(self, name: str, default, doc: str, choices: tuple = ()):
        self.name, self.default, self.doc, self.choices = name, default, doc, choices


DEFAULTS: tuple[Key, ...] = (
    Key("server_id", "", "This host's identity in every event. Empty: /etc/machine-id, else the hostname."),
    Key("server_hostname", "", "Hostname shown in events. Empty: the system hostname."),
    Key("spool.path", "/var/spool/sshtrail/spool.db",
        "The local spool (SQLite, WAL). Its directory is created root-only (0700). Recording "
        "chunks of 64 KiB or more go in files beside it, in <spool.path>.chunks/."),
    Key("spool.max_bytes", 1 << 30,
        "Size cap of the spool, its chunk files included. Past it, events already delivered are pruned first; then on_full applies."),
    Key("spool.on_full", "drop_new",
        "When the spool is full of undelivered events: drop_new keeps the oldest evidence and counts "
        "what it refuses; drop_oldest keeps the newest. Either way a spool.dropped event says how many.",
        ("drop_new", "drop_oldest")),
    Key("spool.busy_timeout", 2.0, "Seconds a writer waits for the spool's lock before giving up."),
    Key("pam.timeout", 3.0,
        "Hard limit, in seconds, on one run of the PAM hook; past it the hook gives up (and the "
        "login goes on unless fail_closed)."),
    Key("pam.fail_closed", False,
        "true: refuse the login when the hook cannot record it. Applies after `sshtrail install` "
        "is run again (it sets the PAM control word)."),
    Key("pam.attempt_grace", 30.0,
        "Seconds after an sshd connection is gone before a PAM attempt that opened no session and "
        "that sshd's log did not explain is reported as a refusal by itself."),
    Key("sshd_log.path", "/var/log/auth.log",
        "sshd's log: a file written by syslog or `sshd -E`. Followed across rotation."),
    Key("sshd_log.poll_interval", 0.2, "Seconds between reads of sshd's log when it is idle."),
    Key("install.state_dir", "/var/lib/sshtrail/install",
        "Where `sshtrail install` keeps its record of what it changed."),
    Key("agent.socket", "/run/sshtrail/agent.sock",
        "The agent's unix socket, where session wrappers deliver recordings. The agent learns "
        "who is calling from the kernel (SO_PEERCRED), never from what the caller says."),
    Key("recording.mode", "best_effort",
        "When the agent cannot take a recording: best_effort lets the session go on and says so "
        "loudly (syslog, then a session.recording_failed event); strict refuses the session, or "
        "ends it if the agent goes away or a program in it runs outside the recording.",
        ("best_effort", "strict")),
    Key("recording.strict_users", [], "Logins always recorded in strict mode, whatever recording.mode says."),
    Key("recording.strict_groups", [], "Members of these groups are always recorded in strict mode."),
    Key("recording.input", False,
        "Record what interactive users type. Off by default: input holds passwords typed at prompts."),
    Key("recording.exec_output", False,
        "Also record the output of non-interactive commands (scp, rsync, `ssh host cmd`)."),
    Key("recording.batch_ms", 50,
        "The wrapper hands recorded output to the agent at least this often (milliseconds)..."),
    Key("recording.batch_bytes", 1 << 20,
        "...or whenever this much is waiting (at most 4 MiB, what one recording chunk may hold)."),
    Key("recording.buffer_bytes", 64 << 20,
        "What a wrapper holds for an agent that is slow or away; past it, output is dropped from "
        "the recording (never from the terminal) and the loss is reported with its size."),
    Key("recording.unrecorded_grace", 5.0,
        "Seconds a process may run in an SSH session outside the session wrapper before the "
        "agent reports it, and ends it for strict accounts (a login's own helpers are gone by "
        "then)."),
    Key("ebpf.enabled", True,
        "Capture each recorded session's execs, file opens and connects with BPF (BCC). Where "
        "BPF cannot run, the agent says why (agent.ebpf_unavailable) and goes on without."),
    Key("ebpf.kinds", ["exec", "open", "connect"], "Which host events to capture."),
    Key("ebpf.ignore_prefixes", ["/etc/ld.so.cache", "/proc/self/", "/proc/thread-self/",
                                 "/usr/lib/locale/", "/usr/share/locale/",
                                 "/usr/lib/x86_64-linux-gnu/gconv/", "/sys/devices/system/cpu/"],
        "Read-only opens under these paths are not reported (what every program reads); opens "
        "for writing always are. Keep anything under /etc (but the loader's cache) and /home "
        "out of it."),
    Key("ebpf.max_args", 128, "Arguments kept per exec; more are cut and the event says so."),
    # -- this host's link to the collector (sshtrail enroll, the agent's uploader) --------------
    Key("upload.url", "",
        "The collector's URL, e.g. https://collector.example:8443. Empty: nothing is uploaded "
        "and events stay in the spool. Set by `sshtrail enroll`."),
    Key("upload.identity_dir", "/var/lib/sshtrail/identity",
        "This host's key (made here, never sent anywhere), its certificate and the collector's "
        "CA certificate, written by `sshtrail enroll`. Root-only."),
    Key("upload.batch_events", 2000, "Most events in one upload."),
    Key("upload.batch_bytes", 4 << 20, "About the most bytes of events in one upload."),
    Key("upload.idle_interval", 0.5, "Seconds between looks at the spool when nothing waits."),
    Key("upload.backoff_max", 60.0,
        "Longest wait, in seconds, between retries while the collector is unreachable or failing "
        "(exponential backoff with jitter, from a quarter second)."),
    Key("upload.timeout", 30.0, "Seconds one upload may take before it is retried."),
    # -- the collector service (sshtrail collector ...) ------------------------------------------
    Key("collector.listen", "0.0.0.0:8443", "Address and port the collector serves HTTPS on."),
    Key("collector.dir", "/var/lib/sshtrail/collector",
        "The collector's own files: its CA and server certificate (sshtrail collector init), "
        "recordings, and the SQLite store."),
    Key("collector.database", "",
        "Empty: the embedded SQLite store in collector.dir. Or a PostgreSQL URL "
        "(postgresql://user@host/db), which several collector processes may share."),
    Key("collector.blob_dir", "",
        "Where recordings are kept (zstd-compressed). Empty: collector.dir/recordings. "
        "Collectors sharing a PostgreSQL database must share this directory too."),
    Key("collector.names", ["localhost", "127.0.0.1"],
        "Host names and addresses the collector's server certificate is made for (init)."),
    Key("collector.cert_days", 365, "Lifetime of a host certificate issued at enrollment, in days."),
    Key("collector.token_ttl", 3600.0, "Seconds an enrollment token stays valid (single use)."),
    Key("collector.workers", 2,
        "Collector processes sharing the listening socket: checking uploads is Python work, "
        "one core per process. About the number of cores of the collector's host."),
    Key("collector.max_batch_bytes", 8 << 20,
        "Largest upload the collector takes; bigger ones get 413 and nothing of them is stored."),
)
_BY_NAME = {k.name: k for k in DEFAULTS}


class ConfigError(SshtrailError, ValueError):
    """A config problem; the message names the file, key and line and says what to do."""


def _line_of(text: str, key: str) -> int | None:
    # tomllib reports lines only for syntax errors; for a bad value we find the key ourselves.
    import re
    leaf = key.rsplit(".", 1)[-1]
    for n, line in enumerate(text.splitlines(), 1):
        if re.match(rf"\s*(?:[\w\"-]+\s*\.\s*)*(\"?){re.escape(leaf)}\1\s*=", line):
            return n
    return None


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in data.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, name + "."))
        else:
            out[name] = v
    return out


class Config:
    """Read-only view of the settings: `cfg["spool.path"]`. `source` is the file or None."""

    def __init__(self, values: dict, source: str | None):
        self._values = values
        self.source = source

    def __getitem__(self, name: str):
        return self._values[name]

    @property
    def server_id(self) -> str:
        if self["server_id"]:
            return self["server_id"]
        try:
            with open("/etc/machine-id") as f:
                mid = f.read().strip()
            if mid:
                return mid
        except OSError:
            pass
        return os.uname().nodename

    @property
    def server_hostname(self) -> str:
        return self["server_hostname"] or os.uname().nodename

    def strict_for(self, login: str, gid: int) -> bool:
        """Must this login's sessions be recorded (recording.mode, strict_users, strict_groups)?
        `gid`: the login's primary group. The wrapper asks for its own session, the agent for
        one whose process escaped the wrapper."""
        if self["recording.mode"] == "strict" or login in self["recording.strict_users"]:
            return True
        if self["recording.strict_groups"]:
            import grp  # only here: the wrapper's start pays for nothing it does not use
            names = {g.gr_name for g in grp.getgrall() if login in g.gr_mem}
            try:
                names.add(grp.getgrgid(gid).gr_name)
            except KeyError:
                pass
            return bool(names & set(self["recording.strict_groups"]))
        return False


def parse(text: str, source: str = "<config>") -> Config:
    import tomllib  # here, not at the top: the PAM hook usually reads the cache instead
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}. Fix that line, or see "
                          "`sshtrail config --defaults` for a valid file.") from None
    values = {k.name: k.default for k in DEFAULTS}
    for name, value in _flatten(data).items():
        where = f"{source}, line {_line_of(text, name) or '?'}"
        key = _BY_NAME.get(name)
        if key is None:
            raise ConfigError(f"{where}: unknown key {name!r}. Known keys: "
                              f"{', '.join(_BY_NAME)} (see `sshtrail config --defaults`).")
        want = type(key.default)
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not want or (want is list and not all(type(v) is str for v in value)):
            raise ConfigError(f"{where}: {name} must be {_tname(want)}, got {value!r}.")
        if key.choices and value not in key.choices:
            raise ConfigError(f"{where}: {name} must be one of {', '.join(key.choices)}, got {value!r}.")
        if want in (int, float) and value < 0:
            raise ConfigError(f"{where}: {name} must not be negative, got {value!r}.")
        values[name] = value
    return Config(values, source if source != "<config>" else None)


def _tname(t: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean (true/false)",
            list: "a list of strings"}[t]


def resolve_path(explicit: str | os.PathLike | None, *, use_env: bool = True) -> tuple[str, bool]:
    """The config file to read and whether it must exist (an explicit choice must)."""
    if explicit:
        return os.fspath(explicit), True
    env = os.environ.get("SSHTRAIL_CONFIG") if use_env else None
    if env:
        return env, True
    return DEFAULT_PATH, False


def load(explicit: str | os.PathLike | None = None, *, use_env: bool = True) -> Config:
    path, required = resolve_path(explicit, use_env=use_env)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        if required:
            raise ConfigError(f"{path}: config file not found. Create it (see `sshtrail config "
                              "--defaults`) or point --config / SSHTRAIL_CONFIG at the right file.") from None
        return Config({k.name: k.default for k in DEFAULTS}, None)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config: {e}") from None
    return parse(text, path)


def cache_file(path: str) -> str:
    """Where load_cached keeps the settings of the config file at `path`."""
    from .sha import sha256
    return os.path.join(CACHE_DIR, sha256(os.path.abspath(path).encode()).hexdigest()[:32])


def load_cached(explicit: str | None) -> Config:
    """load() for the PAM hook and the session wrapper (no environment), skipping the TOML
    parser while the file is unchanged: importing tomllib costs ~7 ms of every PAM call and
    session start. Keyed by the file's inode, size and mtime. Only root writes the cache (the
    hook, which runs before every session); everyone may read it, as they may read the config
    itself; it is trusted only if root owns it and nobody else can write it."""
    path, _ = resolve_path(explicit, use_env=False)
    try:
        st = os.stat(path)
    except OSError:
        return load(explicit, use_env=False)  # absent: defaults, or the error load() gives
    stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
    cache = cache_file(path)
    if _trusted(CACHE_DIR):
        try:
            with open(cache, "rb") as f:
                if not _trusted(f.fileno()):
                    raise ValueError(cache)
                saved_stamp, values = marshal.load(f)
            if tuple(saved_stamp) == stamp and set(values) == set(_BY_NAME):
                return Config(values, path)
        except (OSError, EOFError, ValueError, TypeError):
            pass
    cfg = load(path, use_env=False)
    if os.geteuid() == 0:
        try:
            os.makedirs(CACHE_DIR, mode=0o755, exist_ok=True)
            if _trusted(CACHE_DIR):
                tmp = f"{cache}.{os.getpid()}"
                old = os.umask(0o022)
                try:
                    with open(tmp, "wb") as f:
                        marshal.dump((stamp, cfg._values), f)
                finally:
                    os.umask(old)
                os.replace(tmp, cache)
        except OSError:
            pass  # a cache we cannot write only costs time
    return cfg


def _trusted(path_or_fd) -> bool:
    try:
        st = os.stat(path_or_fd)
    except OSError:
        return False
    return st.st_uid == 0 and not st.st_mode & 0o022


def render_defaults() -> str:
    """The documented default file: every key, commented out at its default."""
    out = ["# sshtrail configuration. Every key is shown at its default, commented out.", ""]
    section = None
    for key in DEFAULTS:
        sect, _, leaf = key.name.rpartition(".")
        if sect != section:
            if sect:
                out += ["", f"[{sect}]"]
            section = sect
        out.append(f"# {key.doc}")
        if key.choices:
            out.append(f"# One of: {', '.join(key.choices)}.")
        out.append(f"# {leaf} = {_toml_value(key.default)}")
    return "\n".join(out) + "\n"


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)
