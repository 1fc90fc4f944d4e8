"""Build sshtrail's .deb and .rpm packages from this checkout: `python packaging/build.py deb|rpm`.

Both come from one staging step, so the two layouts cannot drift apart:

  /usr/bin/sshtrail                   the CLI (packaging/files/sshtrail.in)
  /usr/lib/sshtrail/lib/              sshtrail, pam_module, session_wrapper, ebpf + bundled libraries
  /usr/lib/sshtrail/collector-lib/    collector + its bundled libraries   (sshtrail-collector)
  /usr/lib/sshtrail/maint.py          what the maintainer scripts run (packaging/files/maint.py)
  /etc/sshtrail/sshtrail.toml         every key at its default, commented (a conffile)
  /var/spool/sshtrail/                the spool's directory, root-only
  <unitdir>/sshtrail-agent.service    <unitdir>/sshtrail-collector.service  (sshtrail-collector)
  /usr/share/man/man1/sshtrail.1.gz   made from the CLI's argparse definitions

The private environment is a plain directory on the system python's path, not a virtualenv: a
venv's interpreter path is fixed when it is made, and what sshd runs (`python3 -I -S hook.py`)
must not depend on site machinery anyway. Libraries are pip-installed --target that directory
at build time, from PyPI wheels only (--only-binary), pinned, --no-deps (packaging/requirements/
lists each closure). The deb takes from Debian 12 what its archive has at a usable version; the
rpm bundles the host side whole (see the requirement files). No .pyc is shipped: the
maintainer scripts compile on install and remove them before removal.

Outputs go to dist/; work files to build/packaging/.
"""
from __future__ import annotations

import argparse
import configparser
import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

LIBDIR = "/usr/lib/sshtrail"
HOST_PACKAGES = ("sshtrail", "pam_module", "session_wrapper", "ebpf")
COLLECTOR_PACKAGES = ("collector",)
MAINTAINER = "sshtrail developers <sshtrail@example.org>"
SUMMARY = "audit trail for plain OpenSSH servers"
DESCRIPTION = """\
sshtrail records every SSH login attempt on this host, granted or
refused, every interactive session (replayable), and the commands, file
opens and network connections each session caused, and ships it all to
a central collector over mutual TLS. It is a plugin, not a new SSH
server: sshd stays as it is, hooked through PAM and ForceCommand.

Installing the package changes nothing about logins: `sshtrail install`
hooks sshd; `sshtrail uninstall`, and removing the package, put the PAM
file and sshd_config back byte for byte. `sshtrail doctor` checks the
host end to end."""
COLLECTOR_DESCRIPTION = """\
The central service of sshtrail: hosts upload their audit events and
session recordings to it over mutual TLS; auditors search and replay
them. It runs as its own unprivileged user, sshtrail-collector, from
sshtrail-collector.service, with its state in /var/lib/sshtrail/collector,
and stores into embedded SQLite, or PostgreSQL for several collectors
sharing one database."""

# What each target takes from the system rather than bundling (see requirements/*.txt).
PROFILES = {
    # python: the interpreter named in /usr/bin/sshtrail, and so in what `sshtrail install`
    # writes into PAM and sshd_config; maint_python: how the maintainer scripts call it (Debian
    # policy wants commands found on PATH there).
    "deb": dict(python="/usr/bin/python3", maint_python="python3",
                unitdir="/lib/systemd/system", host_reqs="host-deb.txt"),
    "rpm": dict(python="/usr/bin/python3.11", maint_python="/usr/bin/python3.11",
                unitdir="/usr/lib/systemd/system", host_reqs="host-rpm.txt"),
}


def version() -> str:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg["metadata"]["version"]


def run(*argv, **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(map(str, argv)), file=sys.stderr)
    return subprocess.run([str(a) for a in argv], check=True, **kw)


def sub(text: str, profile: dict, *, maint: bool = False) -> str:
    return (text.replace("@PYTHON@", profile["maint_python" if maint else "python"]).replace("@LIBDIR@", LIBDIR)
            .replace("@BINDIR@", "/usr/bin"))


def write(path: Path, data: str | bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(mode)


def copy_code(package: str, dest: Path) -> None:
    """A package of ours: its .py files and its data (detach.sh, probes.c); no caches."""
    src = ROOT / package
    for f in sorted(src.rglob("*")):
        rel = f.relative_to(src)
        if "__pycache__" in rel.parts or f.suffix in (".pyc", ".pyo") or f.is_dir():
            continue
        mode = 0o755 if f.read_bytes()[:2] == b"#!" and f.suffix != ".py" else 0o644
        write(dest / package / rel, f.read_bytes(), mode)


def bundle(requirements: Path, dest: Path) -> None:
    """pip install --target: wheels only (no build step can run code of the network's choosing
    on the build machine), exactly the pinned set, no dependency resolution."""
    run(sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
        "--no-deps", "--only-binary=:all:", "--no-compile", "--target", dest,
        "-r", requirements)
    # Console scripts of the libraries (their shebangs name the build machine's python).
    shutil.rmtree(dest / "bin", ignore_errors=True)
    # Wheels ship their extensions with symbols; packages ship them stripped.
    for so in dest.rglob("*.so*"):
        if so.is_file() and so.read_bytes()[:4] == b"\x7fELF":
            run("strip", "--strip-unneeded", "--remove-section=.comment",
                "--remove-section=.note", so)
    for p in list(dest.rglob("__pycache__")):
        shutil.rmtree(p, ignore_errors=True)


def stage(kind: str, work: Path) -> dict[str, Path]:
    """Stage the file trees of both binary packages; returns {package name: tree}."""
    profile = PROFILES[kind]
    shutil.rmtree(work, ignore_errors=True)
    host, coll = work / "sshtrail", work / "sshtrail-collector"
    lib, clib = host / LIBDIR.lstrip("/") / "lib", coll / LIBDIR.lstrip("/") / "collector-lib"
    for p in HOST_PACKAGES:
        copy_code(p, lib)
    for p in COLLECTOR_PACKAGES:
        copy_code(p, clib)
    bundle(HERE / "requirements" / profile["host_reqs"], lib)
    bundle(HERE / "requirements" / "collector.txt", clib)

    write(host / "usr/bin/sshtrail", sub((HERE / "files/sshtrail.in").read_text(), profile), 0o755)
    write(host / LIBDIR.lstrip("/") / "maint.py", (HERE / "files/maint.py").read_bytes(), 0o644)
    from sshtrail import config
    write(host / "etc/sshtrail/sshtrail.toml", config.render_defaults())
    spool = host / "var/spool/sshtrail"
    spool.mkdir(parents=True)
    spool.chmod(0o700)
    unitdir = profile["unitdir"].lstrip("/")
    for tree, unit in ((host, "sshtrail-agent.service"), (coll, "sshtrail-collector.service")):
        write(tree / unitdir / unit, sub((HERE / "systemd" / unit).read_text(), profile))
    from packaging_manpage import render  # noqa: see _import_manpage
    man = gzip.compress(render(version()).encode(), mtime=0)
    write(host / "usr/share/man/man1/sshtrail.1.gz", man)
    return {"sshtrail": host, "sshtrail-collector": coll}


def _import_manpage() -> None:
    import importlib.util
    spec = importlib.util.spec_from_file_location("packaging_manpage", HERE / "manpage.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules["packaging_manpage"] = mod


def _arch_dependent(tree: Path) -> bool:
    return any(f.suffix == ".so" or ".so." in f.name for f in tree.rglob("*") if f.is_file())


# -- deb ---------------------------------------------------------------------------------------

DEB_DEPENDS = {
    "sshtrail": ["python3 (>= 3.11~)", "openssh-server", "libpam-modules",
                 "python3-cryptography (>= 38)", "python3-requests (>= 2.28)",
                 "python3-pyte (>= 0.8)", "python3-ptyprocess (>= 0.7)", "python3-pampy (>= 2.0)"],
    # zstandard's extension is built for CPython 3.11: hence the upper bound.
    "sshtrail-collector": ["sshtrail (= {version})", "python3 (>= 3.11~)", "python3 (<< 3.12)",
                           "libc6 (>= 2.17)", "libpq5", "adduser"],
}
DEB_RECOMMENDS = {"sshtrail": ["python3-bpfcc"], "sshtrail-collector": []}
DEB_SUGGESTS = {"sshtrail": ["rsyslog", "sshtrail-collector"], "sshtrail-collector": ["postgresql"]}


def deb_changelog(name: str, ver: str) -> bytes:
    date = subprocess.run(["date", "-R", "-d", "@" + os.environ.get("SOURCE_DATE_EPOCH", "0")],
                          capture_output=True, text=True, check=True).stdout.strip()
    text = (f"{name} ({ver}) unstable; urgency=medium\n\n"
            f"  * Package built from the sshtrail source tree (packaging/build.py).\n\n"
            f" -- {MAINTAINER}  {date}\n")
    return gzip.compress(text.encode(), compresslevel=9, mtime=0)


def build_deb(trees: dict[str, Path], out: Path) -> list[Path]:
    ver = version() + "-1"
    built = []
    for name, tree in trees.items():
        arch = "amd64" if _arch_dependent(tree) else "all"
        doc = tree / "usr/share/doc" / name
        write(doc / "copyright", (HERE / "deb/copyright").read_text())
        write(doc / "changelog.Debian.gz", deb_changelog(name, ver))
        if name == "sshtrail":
            write(doc / "README.md.gz", gzip.compress((ROOT / "README.md").read_bytes(), mtime=0))
        overrides = HERE / "deb" / f"{name}.lintian-overrides"
        if overrides.exists():
            write(tree / "usr/share/lintian/overrides" / name, overrides.read_text())
        control = tree / "DEBIAN"
        control.mkdir()
        for script in ("postinst", "prerm", "postrm"):
            src = HERE / "deb" / f"{name}.{script}"
            if src.exists():
                write(control / script, sub(src.read_text(), PROFILES["deb"], maint=True), 0o755)
        conffiles = sorted("/" + str(f.relative_to(tree)) for f in (tree / "etc").rglob("*")
                           if f.is_file()) if (tree / "etc").exists() else []
        if conffiles:
            write(control / "conffiles", "".join(c + "\n" for c in conffiles))
        sums = []
        for f in sorted(tree.rglob("*")):
            rel = f.relative_to(tree)
            if f.is_file() and rel.parts[0] != "DEBIAN" and "/" + str(rel) not in conffiles:
                sums.append(f"{hashlib.md5(f.read_bytes()).hexdigest()}  {rel}\n")
        write(control / "md5sums", "".join(sums))
        size = sum(f.stat().st_size for f in tree.rglob("*") if f.is_file()) // 1024 + 1
        desc = (DESCRIPTION if name == "sshtrail" else COLLECTOR_DESCRIPTION)
        fields = [("Package", name), ("Version", ver), ("Architecture", arch),
                  ("Maintainer", MAINTAINER), ("Installed-Size", str(size)),
                  ("Depends", ", ".join(DEB_DEPENDS[name]).format(version=ver)),
                  ("Recommends", ", ".join(DEB_RECOMMENDS[name])),
                  ("Suggests", ", ".join(DEB_SUGGESTS[name])),
                  ("Section", "admin"), ("Priority", "optional"),
                  ("Description", (SUMMARY if name == "sshtrail" else
                                   "central collector for the sshtrail SSH audit trail") + "\n"
                   + "\n".join(" " + (ln if ln.strip() else ".") for ln in desc.splitlines()))]
        write(control / "control", "".join(f"{k}: {v}\n" for k, v in fields if v))
        out.mkdir(parents=True, exist_ok=True)
        deb = out / f"{name}_{ver}_{arch}.deb"
        run("dpkg-deb", "--root-owner-group", "-Zxz", "--build", tree, deb,
            stdout=subprocess.DEVNULL)
        built.append(deb)
    return built


# -- rpm ---------------------------------------------------------------------------------------

def build_rpm(trees: dict[str, Path], work: Path, out: Path) -> list[Path]:
    top = work / "rpmbuild"
    shutil.rmtree(top, ignore_errors=True)
    for d in ("BUILD", "RPMS", "SOURCES", "SPECS", "SRPMS", "BUILDROOT"):
        (top / d).mkdir(parents=True)
    # The staged trees go in as one source tarball: %install unpacks it into the buildroot.
    src = top / "SOURCES" / f"sshtrail-{version()}-staged.tar"
    with tarfile.open(src, "w") as tar:
        for name, tree in trees.items():
            tar.add(tree, arcname=name)
    files = {name: rpm_file_list(tree) for name, tree in trees.items()}
    spec = (HERE / "rpm/sshtrail.spec.in").read_text()
    spec = sub(spec, PROFILES["rpm"]).replace("@VERSION@", version())
    spec = spec.replace("@HOST_FILES@", files["sshtrail"]).replace(
        "@COLLECTOR_FILES@", files["sshtrail-collector"])
    spec = spec.replace("@DESCRIPTION@", DESCRIPTION).replace(
        "@COLLECTOR_DESCRIPTION@", COLLECTOR_DESCRIPTION)
    (top / "SPECS/sshtrail.spec").write_text(spec)
    run("rpmbuild", "-bb", "--quiet", "--target", "x86_64", "--define", f"_topdir {top}",
        top / "SPECS/sshtrail.spec")
    out.mkdir(parents=True, exist_ok=True)
    built = []
    for rpm in sorted((top / "RPMS").rglob("*.rpm")):
        shutil.copy2(rpm, out / rpm.name)
        built.append(out / rpm.name)
    return built


def rpm_file_list(tree: Path) -> str:
    lines = []
    for f in sorted(tree.rglob("*")):
        path = "/" + str(f.relative_to(tree))
        if f.is_dir():
            # Directories of our own only; /usr, /etc and friends belong to the filesystem package.
            if path.startswith((LIBDIR, "/etc/sshtrail", "/var/spool/sshtrail")):
                mode = f"%dir %attr(0700,root,root) " if path == "/var/spool/sshtrail" else "%dir "
                lines.append(mode + path)
            continue
        if path.startswith("/etc/"):
            lines.append(f"%config(noreplace) {path}")
        elif path.startswith("/usr/share/man/"):
            lines.append(f"%doc {path}")
        else:
            lines.append(path)
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kind", choices=sorted(PROFILES))
    p.add_argument("--out", type=Path, default=ROOT / "dist")
    p.add_argument("--work", type=Path, default=ROOT / "build" / "packaging")
    args = p.parse_args()
    os.environ.setdefault("SOURCE_DATE_EPOCH", subprocess.run(
        ["git", "-C", str(ROOT), "log", "-1", "--format=%ct"], capture_output=True,
        text=True).stdout.strip() or "0")
    _import_manpage()
    os.umask(0o022)
    work = args.work / args.kind
    trees = stage(args.kind, work / "trees")
    built = (build_deb(trees, args.out) if args.kind == "deb"
             else build_rpm(trees, work, args.out))
    for b in built:
        print(b)
    return 0


if __name__ == "__main__":
    sys.exit(main())
